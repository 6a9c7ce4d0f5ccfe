"""The demo's files: the bundled digits teachers and classifier (the shared paths, writing and
recipes live in pid_fast.data.assets, below the evaluation and the demo; re-exported here)."""

import os

from pid_fast.data.assets import (ASSETS_DIR, CLASSIFIER_FORMAT, DEFAULT_FEATURES, DEFAULT_TEACHER, RECIPE_KEY,
                                  checkpoint_recipe, missing_file, write_weights)

__all__ = ["ASSETS_DIR", "DEFAULT_TEACHER", "DEFAULT_CONDITIONAL_TEACHER", "DEFAULT_FEATURES", "RECIPE_KEY",
           "CLASSIFIER_FORMAT", "checkpoint_recipe", "write_weights", "missing_file"]

# class-conditional, trained with label dropout 0.1: it guides itself (`pid-fast demo --guidance W`)
DEFAULT_CONDITIONAL_TEACHER = os.path.join(ASSETS_DIR, "digits-teacher-cond.safetensors")

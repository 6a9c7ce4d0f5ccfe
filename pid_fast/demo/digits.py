"""The embedded default, under its old single-module name: the digits data
(``pid_fast.data.digits``), the digits teacher (``teacher.py``), the digits classifier
(``pid_fast.eval.digits``) and their files (``pid_fast.data.assets``). A thin re-export:
``pid_fast.digits`` (0.1's path) forwards here, and ``pid-fast train-teacher`` / ``train-features``
are documented with these names."""

from pid_fast.data.assets import ASSETS_DIR, DEFAULT_FEATURES, DEFAULT_TEACHER, checkpoint_recipe
from pid_fast.data.digits import DIGITS_RESOLUTION, digits_split, load_digits
from pid_fast.demo.teacher import DIGITS_NETWORK, edm_loss, load_digits_teacher, train_teacher
from pid_fast.eval.digits import DigitsClassifier, classifier_accuracy, load_classifier, train_classifier

__all__ = [
    "ASSETS_DIR", "DEFAULT_TEACHER", "DEFAULT_FEATURES", "DIGITS_RESOLUTION", "DIGITS_NETWORK", "load_digits",
    "digits_split", "edm_loss", "train_teacher", "load_digits_teacher", "DigitsClassifier", "train_classifier",
    "load_classifier", "classifier_accuracy", "checkpoint_recipe",
]

"""Reading and writing weights: EDM's pickles (safely), pid_fast's safetensors files, teachers."""

from pid_fast.io.edm_checkpoint import *  # noqa: F401,F403
from pid_fast.io.edm_checkpoint import __all__  # noqa: F401

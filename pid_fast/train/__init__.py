"""The PID trainer (``pid-fast distill``)."""

from pid_fast.train.trainer import *  # noqa: F401,F403
from pid_fast.train.trainer import __all__  # noqa: F401

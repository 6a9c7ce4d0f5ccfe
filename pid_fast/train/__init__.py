"""The PID trainer (``pid-fast distill`` / ``pid-fast sample`` are thin wrappers in pid_fast/cli).

- config.py: DEFAULT_CONFIG, config files and ``--set`` overrides, validation (resolve_config), resume rule
- builders.py: teacher, student, loss, optimizer and precision settings from a config; the student's noise labels
- checkpoint.py: checkpoint files (atomic writes, listing, newest readable one) and RNG states
- distributed.py: process group and device of this process, the collectives the loop uses
- loop.py: train() and the loop: inputs -> student/teacher loss -> backward -> optimizer -> EMA -> log/checkpoint
- launch.py: train_local_ddp, train() in several local processes (a stand-in for torchrun)
- generate.py: load_student and one-step generation from a checkpoint
- ema.py: exponential moving averages of the weights (also the digits teacher's)
- power_ema.py: EDM2's power-function EMAs, their snapshots and post-hoc reconstruction (`pid-fast power-ema`)
- teacher_share.py: a checkpoint blended with the run's initial (teacher's) weights after training (`pid-fast teacher-share`)
- schedules.py: the lr schedule, grid-index sampling/weighting and the coarse-to-fine grid schedule
- loss_window.py: the loop's device-side loss window (read at sync points only)
- prompts.py: a text-to-image run's prompt embeddings (cached in the run folder) and per-step prompt draws
- threads.py: the run's CPU thread count (choose_threads: --threads, the resumed run's, OMP_NUM_THREADS, else timed)
"""

from pid_fast.eval.images import save_image_grid, save_images, to_uint8  # (kept here for pid_fast.training)
from pid_fast.train.builders import build_student, build_teacher, resolve_precision
from pid_fast.train.checkpoint import CHECKPOINT_FORMAT, atomic_save, list_checkpoints, load_latest_checkpoint
from pid_fast.train.config import DEFAULT_CONFIG, RESUMABLE_CHANGES, apply_overrides, load_config, resolve_config
from pid_fast.train.ema import EMA
from pid_fast.train.generate import generate, load_student
from pid_fast.train.launch import train_local_ddp
from pid_fast.train.loop import NonFiniteLossError, train

__all__ = [
    "DEFAULT_CONFIG", "NonFiniteLossError", "EMA", "load_config", "apply_overrides", "resolve_config",
    "build_teacher", "build_student", "train", "train_local_ddp", "atomic_save", "list_checkpoints", "load_latest_checkpoint",
    "load_student", "generate", "save_image_grid", "save_images",
    # also used by the CLI, the evaluation and the tests
    "RESUMABLE_CHANGES", "CHECKPOINT_FORMAT", "resolve_precision", "to_uint8",
]

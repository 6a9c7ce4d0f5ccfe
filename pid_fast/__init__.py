"""pid_fast: fused Physics Informed Distillation (PID) of diffusion models for PyTorch.

Entry points:
  pid_loss(...)      the fused per-sample PID loss (what a training loop calls)
  pid_residual(...)  pred and target, for a norm computed by another network (LPIPS)
  pid_assemble(...)  the student's state x = a n + b F and the teacher's input c_in x
  build_info()       what was compiled (CPU, CUDA + archs) and whether Triton is usable
  PIDLoss            the drop-in loss module: loss = PIDLoss(teacher)(student_net, noise)
  guided(...)        a guided teacher (classifier-free guidance, autoguidance) for all of the above
"""

from pid_fast import _legacy
from pid_fast.loss import PIDLoss, pid_distillation_loss
from pid_fast.models.guidance import GuidedDenoiser, guided
from pid_fast.ops import (
    BACKENDS,
    available_backends,
    build_info,
    pid_assemble,
    pid_loss,
    pid_residual,
    resolve_backend,
)

__version__ = "0.1.0"

_legacy.install()  # old module paths (pid_fast.training, ...) keep working for one release

__all__ = [
    "BACKENDS",
    "PIDLoss",
    "GuidedDenoiser",
    "guided",
    "pid_distillation_loss",
    "available_backends",
    "build_info",
    "pid_assemble",
    "pid_loss",
    "pid_residual",
    "resolve_backend",
]

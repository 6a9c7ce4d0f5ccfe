"""The PID distillation loss: ``PIDLoss`` (drop-in module) and ``pid_distillation_loss``.

    distillation.py  one loss call as the data path: grid times -> student (2B) -> assemble ->
                     teacher -> fused residual/norm (or pred/target and LPIPS)
    derivative.py    the student's F(t), F(t2): two evaluations ("fd") or one plus a JVP ("jvp")
    student.py       the student as trainers hold it: raw or preconditioned, wrapped (DDP, FSDP,
                     compile, accelerate); train-mode randomness and first-output checks
    forward_ad_ops.py  math paths (attention, softmax) for ops whose forward-mode AD fails the jvp pass
"""

from pid_fast.loss.derivative import DERIVATIVES, student_outputs
from pid_fast.loss.student import STUDENT_PARAMETRIZATIONS, resolve_student, stochastic_parts
from pid_fast.loss.distillation import (
    NORMS,
    TEACHER_PRECISIONS,
    PIDLoss,
    default_noise_labels,
    grid_times,
    pid_distillation_loss,
)

__all__ = ["PIDLoss", "pid_distillation_loss", "grid_times", "default_noise_labels", "NORMS",
           "TEACHER_PRECISIONS", "DERIVATIVES", "student_outputs", "STUDENT_PARAMETRIZATIONS", "resolve_student",
           "stochastic_parts"]

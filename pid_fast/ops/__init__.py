"""The fused PID ops: the public functional API and the backends behind it.

    functional.py      pid_assemble / pid_residual / pid_loss: check and promote inputs, dispatch
    backends.py        which backends this installation has, and the one place that picks one
    extension.py       loads the compiled library (csrc/) that registers torch.ops.pid_fast
    library.py         torch.library glue shared by every backend: fake kernels, autograd, row layout
    triton_kernels.py  the Triton kernels, registered as torch.ops.pid_fast_triton (imports library only)
    reference.py       the plain-PyTorch reference, written as the spec's equations
    testing.py         random but realistic PID inputs for the tests and benchmarks
"""

from pid_fast.ops.backends import BACKENDS, available_backends, build_info, resolve_backend, triton_available
from pid_fast.ops.functional import NORMS, pid_assemble, pid_loss, pid_residual

__all__ = ["BACKENDS", "NORMS", "available_backends", "build_info", "pid_assemble", "pid_loss",
           "pid_residual", "resolve_backend", "triton_available"]

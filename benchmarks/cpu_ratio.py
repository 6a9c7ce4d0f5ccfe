"""CPU fwd+bwd of the PID loss at 64x3x32x32 (l2): eager reference vs the fused C++ op, median of
30 calls after 5 warm-ups, plus the loss op and scale_rows alone. Run on a quiet machine:
    OMP_NUM_THREADS=2 python benchmarks/cpu_ratio.py
"""

import time

import torch

from bench_pid_loss import make_step  # the benchmarks' fwd+bwd step (this folder)
from pid_fast.ops.testing import make_case

case = make_case((64, 3, 32, 32))


def median_ms(fn, n=30):
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


args = (*case.streams(), case.t, case.t2, None, None, None, None, case.c_skip, case.c_out, None,
        80.0, 0, 0.0, True)
ref, fused = median_ms(make_step(case, "reference", "reference")), median_ms(make_step(case, "fused", "cpu"))
op = median_ms(lambda: torch.ops.pid_fast.loss(*args))
scale = median_ms(lambda: torch.ops.pid_fast.scale_rows(case.f_t, case.t))
print(f"threads {torch.get_num_threads()}: reference {ref:.3f} ms, fused {fused:.3f} ms, "
      f"ratio {ref / fused:.1f}x | loss op alone {op:.3f} ms, scale_rows {scale:.3f} ms")

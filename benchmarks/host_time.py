"""Host time of one fwd+bwd call of pid_fast.pid_loss on a tiny CPU tensor (2x3x4x4: the kernels
take well under a microsecond there, so what is timed is Python argument checks, the dispatcher
and autograd). Median over rounds of the mean per-call time of a round, after warm-up.

    OMP_NUM_THREADS=1 python benchmarks/host_time.py [--calls 2000] [--rounds 9]

Prints per-call microseconds for: fwd+bwd (pid_loss(...).sum() then autograd.grad to F(t) and
F(t2)), the forward alone with gradients recorded, the forward under no_grad, and the loss op
called directly. It times whichever pid_fast is importable (printed with torch's version), so
the same file measures two builds: run it with each build's Python (see
benchmarks/results/stable_abi_host_time.md).
"""

import argparse
import statistics
import time

import torch

import pid_fast
from pid_fast.ops.testing import make_case


def per_call_us(fn, calls, rounds, warmup=200):
    for _ in range(warmup):
        fn()
    means = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(means)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    case = make_case((2, 3, 4, 4), torch.float32, "cpu", seed=0)
    f_t = case.f_t.detach().requires_grad_()
    f_t2 = case.f_t2.detach().requires_grad_()

    def loss(f1, f2):
        return pid_fast.pid_loss(case.noise, f1, f2, case.teacher_out, *case.coefs(),
                                 backend="cpu", validate=False)

    def fwd_bwd():
        return torch.autograd.grad(loss(f_t, f_t2).sum(), (f_t, f_t2))

    def fwd_no_grad():
        with torch.no_grad():
            return loss(case.f_t, case.f_t2)

    op_args = (*case.streams(), case.t, case.t2, None, None, None, None, case.c_skip,
               case.c_out, None, 80.0, 0, 0.0, True)
    timings = {
        "fwd+bwd": fwd_bwd,
        "fwd (grad recorded)": lambda: loss(f_t, f_t2),
        "fwd (no_grad)": fwd_no_grad,
        "loss op alone": lambda: torch.ops.pid_fast.loss(*op_args),
    }
    print(f"torch {torch.__version__}, pid_fast from {pid_fast.__file__}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds x {args.calls} calls")
    for name, fn in timings.items():
        print(f"  {name:<22s} {per_call_us(fn, args.calls, args.rounds):8.1f} us/call")


if __name__ == "__main__":
    main()

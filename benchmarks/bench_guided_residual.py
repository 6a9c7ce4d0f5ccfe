"""CPU speed of the PID loss fwd+bwd with a guided teacher (issue 27): the guide fused into the
loss op (one pass reads n, F(t), F(t2), G_m, G_g) against the unfused formula (G_w = G_g +
w (G_m - G_g) with three torch elementwise ops, then the unguided fused op), plus the unguided
fused op as the floor. fp32, l2, per-sample w in [1, 3].

    OMP_NUM_THREADS=1 pytest benchmarks/bench_guided_residual.py -c benchmarks/pytest.ini \
        -p no:cacheprovider --benchmark-json=out.json
    OMP_NUM_THREADS=1 python benchmarks/bench_guided_residual.py     # plain table, same variants

Results: benchmarks/results/guided_residual.md. extra_info holds ms per call and the bytes a
fused fwd+bwd must move (read 5 tensors, write both gradients: 7 tensors; unguided: 6).
"""

import argparse
import time

import pytest
import torch

import pid_fast
from pid_fast.ops.testing import make_case

SHAPES = [(64, 3, 32, 32), (32, 3, 64, 64), (8, 4, 128, 128)]
VARIANTS = ["fused_guided", "unfused_guided", "unguided"]
REPS = 5  # calls per timed round


def make_step(shape, variant, backend="cpu"):
    """One fwd+bwd call of the loss for ``variant`` on fixed random inputs."""
    case = make_case(shape, torch.float32, "cpu", seed=0)
    guide_out = make_case(shape, torch.float32, "cpu", seed=1).teacher_out
    scale = 1.0 + 2.0 * torch.rand(shape[0], generator=torch.Generator().manual_seed(2))
    f_t = case.f_t.detach().requires_grad_()
    f_t2 = case.f_t2.detach().requires_grad_()
    w_rows = scale.view(-1, *([1] * (len(shape) - 1)))

    def loss_of(teacher_out, **guide):
        return pid_fast.pid_loss(case.noise, f_t, f_t2, teacher_out, *case.coefs(),
                                 backend=backend, validate=False, **guide).mean()

    if variant == "fused_guided":
        def step():
            loss = loss_of(case.teacher_out, guide_out=guide_out, guide_scale=scale)
            return torch.autograd.grad(loss, (f_t, f_t2))
    elif variant == "unfused_guided":
        def step():
            g_w = guide_out + w_rows * (case.teacher_out - guide_out)  # 3 elementwise passes
            return torch.autograd.grad(loss_of(g_w), (f_t, f_t2))
    elif variant == "unguided":
        def step():
            return torch.autograd.grad(loss_of(case.teacher_out), (f_t, f_t2))
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return step, case


def moved_bytes(case, variant):
    return (6 if variant == "unguided" else 7) * case.f_t.numel() * case.f_t.element_size()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
def bench_cpu_guided_loss_fwd_bwd(benchmark, shape, variant):
    step, case = make_step(shape, variant)
    for _ in range(3):
        step()

    def many():
        for _ in range(REPS):
            step()

    benchmark.pedantic(many, rounds=7, iterations=1, warmup_rounds=1)
    info = dict(shape=list(shape), variant=variant, threads=torch.get_num_threads(),
                bytes=moved_bytes(case, variant))
    if benchmark.stats is not None:
        info["ms_per_call"] = benchmark.stats.stats.median * 1e3 / REPS
    benchmark.extra_info.update(info)


def interleaved_ms(fns, calls, warmup=5):
    """Median and minimum ms per call of each fn, timed round-robin (one call of each in turn),
    so that load from other processes drifts over all variants alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (sorted(ts)[calls // 2] * 1e3, min(ts) * 1e3) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=60, help="timed calls per variant")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, l2, fwd+bwd, "
          f"median (min) of {args.calls} interleaved calls, ms")
    print("| shape | fused guided | unfused guided | unguided fused | unfused / fused (median) |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        ms = interleaved_ms({v: make_step(shape, v)[0] for v in VARIANTS}, args.calls)
        cells = " | ".join(f"{ms[v][0]:.3f} ({ms[v][1]:.3f})" for v in VARIANTS)
        ratio = ms["unfused_guided"][0] / ms["fused_guided"][0]
        print(f"| {'x'.join(map(str, shape))} | {cells} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

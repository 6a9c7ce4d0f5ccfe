"""Speed of the PID loss forward+backward: eager reference, reference under torch.compile,
the fused C++ CPU op, the fused CUDA op and the Triton op.

    make bench                      # CPU, 2 threads, 64x3x32x32 (the issue's CPU target)
    pytest benchmarks/bench_pid_loss.py --benchmark-json=out.json   # on a GPU: GPU sizes too

Each benchmark's extra_info holds the per-call time (ms), the bytes a fused fwd+bwd must move
(read n, F(t), F(t2), G once; write both gradients once) and the GB/s that implies. On a GPU
the copy bandwidth is measured in the same run (bench_copy) to compare against.

GPU modes: "eager" launches every call from Python (host overhead included: what a bare loop
pays), "graph" replays the call captured in a CUDA graph (device time: what a training step
that is captured or host-bound elsewhere pays).
"""

import pytest
import torch

import pid_fast
from pid_fast.ops.testing import make_case

HAS_CUDA = torch.cuda.is_available()
CPU_SHAPES = [(64, 3, 32, 32)]
GPU_SHAPES = [(512, 3, 32, 32), (256, 3, 64, 64)]
VARIANTS = ["reference", "reference_compiled", "fused"]


def record(benchmark, reps, nbytes, **info):
    """Per-call time and achieved bandwidth into extra_info (skipped under --benchmark-disable,
    where pytest-benchmark runs the function once and keeps no statistics)."""
    info["bytes"] = nbytes
    if benchmark.stats is not None:
        ms = benchmark.stats.stats.median * 1e3 / reps
        info.update(ms_per_call=ms, GBps=nbytes / ms / 1e6)
    benchmark.extra_info.update(info)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(case, variant, backend):
    f_t = case.f_t.detach().requires_grad_()
    f_t2 = case.f_t2.detach().requires_grad_()

    def step():
        loss = pid_fast.pid_loss(case.noise, f_t, f_t2, case.teacher_out, *case.coefs(),
                                 backend=backend, validate=False).mean()
        return torch.autograd.grad(loss, (f_t, f_t2))

    if variant == "reference_compiled":
        return torch.compile(step)
    return step


def graphed(step):
    """Captures step() in a CUDA graph (after warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


# On a GPU the timed calls rotate over several input sets, so that a size that fits in L2
# (the H200 has 60 MB) is not timed from the cache.
NSETS = {"cuda": 4, "cpu": 1}


def rotating(fns):
    def call_all():
        for fn in fns:
            fn()
    return call_all


def run(benchmark, device, shape, variant, backend, reps, mode="eager"):
    torch.manual_seed(0)
    cases = [make_case(shape, torch.float32, device, seed=k) for k in range(NSETS[device])]
    step = rotating([make_step(case, variant, backend) for case in cases])
    for _ in range(3):  # warm-up (and compilation)
        step()
    if mode == "graph":
        step = graphed(step)
    sync(device)

    def many():
        for _ in range(reps):
            step()
        sync(device)

    benchmark.pedantic(many, rounds=10 if device == "cuda" else 5, iterations=1, warmup_rounds=1)
    case = cases[0]
    reps *= len(cases)
    record(benchmark, reps, 6 * case.f_t.numel() * case.f_t.element_size(),
           device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
           threads=torch.get_num_threads(), shape=list(shape), variant=variant,
           backend=backend, mode=mode)


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
def bench_cpu_loss_fwd_bwd(benchmark, shape, variant):
    backend = "cpu" if variant == "fused" else "reference"
    run(benchmark, "cpu", shape, variant, backend, reps=5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("variant,backend", [("reference", "reference"),
                                             ("reference_compiled", "reference"),
                                             ("fused", "cuda"), ("fused", "triton")])
def bench_gpu_loss_fwd_bwd(benchmark, shape, variant, backend, mode):
    if mode == "graph" and variant == "reference_compiled":
        pytest.skip("torch.compile(mode='reduce-overhead') is the compiled graph variant")
    run(benchmark, "cuda", shape, variant, backend, reps=50, mode=mode)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def bench_gpu_fused_single_pass(benchmark, shape, backend):
    """The loss op alone with need_grad=True, graph-replayed: the one pass that reads 4 and
    writes 2 tensors (what a trainer that applies the gradient itself pays; the autograd path
    adds a scaling pass over both gradients)."""
    ops = pid_fast.ops.backends.op_namespace(backend)
    cases = [make_case(shape, torch.float32, "cuda", seed=k) for k in range(NSETS["cuda"])]
    calls = [lambda c=c: ops.loss(*c.streams(), c.t, c.t2, None, None, None, None, c.c_skip,
                                  c.c_out, None, 80.0, 0, 0.0, True) for c in cases]
    reps = 50
    replay = graphed(rotating(calls))
    case = cases[0]
    sync("cuda")

    def many():
        for _ in range(reps):
            replay()
        sync("cuda")

    benchmark.pedantic(many, rounds=10, iterations=1, warmup_rounds=1)
    record(benchmark, reps * len(cases), 6 * case.f_t.numel() * 4,
           device=torch.cuda.get_device_name(), shape=list(shape), variant="single_pass",
           backend=backend, mode="graph")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def bench_gpu_copy_bandwidth(benchmark):
    """Device-to-device copy of 1 GiB: the bandwidth ceiling (bytes read + bytes written)."""
    x = torch.randn(2**28, device="cuda")
    y = torch.empty_like(x)
    reps = 20

    def many():
        for _ in range(reps):
            y.copy_(x)
        sync("cuda")

    benchmark.pedantic(many, rounds=5, iterations=1, warmup_rounds=1)
    record(benchmark, reps, 2 * x.numel() * 4, device=torch.cuda.get_device_name(),
           variant="copy")

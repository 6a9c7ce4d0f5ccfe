"""The whole PID training step: images/s, peak memory and model-FLOPs utilisation of an
official-style step (two separate fp32 student forwards, fp32 teacher, eager, L2, plain RAdam)
against pid_fast's default step (one 2B-batched student pass under bf16 autocast with fp32
master weights, the teacher under bf16 autocast, channels_last, the fused assemble and loss
ops, a foreach optimizer) and that step with its forward under torch.compile, in the same run
on the same card.

    pytest benchmarks/bench_step.py -c benchmarks/pytest.ini --benchmark-json=out.json

On the CPU (CI) a tiny network stands in; on a GPU the CIFAR-10 DDPM++ teacher/student at batch
128 and ImageNet-64 ADM at batch 32. FLOPs are counted once per configuration with
torch.utils.flop_counter (on the eager step); MFU is reported against the bf16 matrix-product
rate measured in the same run (bench_gpu_bf16_matmul).
"""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pid_fast.loss import PIDLoss
from pid_fast.models.networks import build_network, network_config
from pid_fast.models.preconditioning import EDMPrecond

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# (network, batch per GPU): EDM's CIFAR-10 DDPM++ at the reference's 128 per GPU; ImageNet-64
# ADM (296M parameters, class-conditional) at 32, which the fp32 official-style step fits.
CONFIGS = [("cifar10-ddpmpp", 128), ("imagenet64-adm", 32)] if HAS_CUDA else [("tiny-ddpmpp", 8)]
# official_style: two fp32 student forwards, fp32 teacher, unfused loss, per-tensor RAdam.
# pid_fast_default: what `pid-fast distill` does on a GPU (precision/channels_last 'auto').
# pid_fast_compiled: the same with the step's forward under torch.compile (the trainer's compile=true).
VARIANTS = ["official_style", "pid_fast_default"] + (["pid_fast_compiled"] if HAS_CUDA else [])
_MATMUL_TFLOPS = {}


def make_setup(name, batch, variant):
    """(step, eager_step): one training step of ``variant``, and the same step without
    torch.compile (for counting FLOPs)."""
    torch.manual_seed(0)
    # Zero-initialised output layers give denormal numbers that slow CPU arithmetic ~10x.
    torch.set_flush_denormal(True)
    net = build_network(name, device=DEVICE)
    student = copy.deepcopy(net).train()
    cfg = network_config(name)
    teacher = EDMPrecond(net.eval().requires_grad_(False), label_dim=cfg.get("label_dim", 0))
    res = cfg["img_resolution"]
    noise = torch.randn(batch, cfg["in_channels"], res, res, device=DEVICE) * 80.0
    labels = None
    if cfg.get("label_dim", 0):
        labels = torch.nn.functional.one_hot(torch.randint(0, cfg["label_dim"], (batch,), device=DEVICE),
                                             cfg["label_dim"]).float()
    fast = variant != "official_style"
    if fast:
        if HAS_CUDA:
            student = student.to(memory_format=torch.channels_last)
            teacher = teacher.to(memory_format=torch.channels_last)
        opt = torch.optim.RAdam(student.parameters(), lr=2e-4, foreach=True)
        loss_fn = PIDLoss(teacher, norm="l2", batched=True, teacher_precision="bf16" if HAS_CUDA else None)
    else:
        opt = torch.optim.RAdam(student.parameters(), lr=2e-4, foreach=False)
        loss_fn = PIDLoss(teacher, norm="l2", batched=False, backend="reference", teacher_precision="fp32")

    def forward():
        return loss_fn(student, noise, labels)

    def make_step(fwd):
        def step():
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=fast and HAS_CUDA):
                loss = fwd()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    # The trainer's compile=true: the whole forward (student, fused ops, teacher) in one graph.
    compiled = torch.compile(forward) if variant == "pid_fast_compiled" else forward
    return make_step(compiled), make_step(forward)


def count_flops(step):
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def bench_gpu_bf16_matmul(benchmark):
    """The bf16 matrix-product ceiling of this card (8192^3, random data)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()

    def many():
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()

    benchmark.pedantic(many, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        tflops = 2 * 8192**3 * 10 / benchmark.stats.stats.median / 1e12
        _MATMUL_TFLOPS["bf16"] = tflops
        benchmark.extra_info.update(device=torch.cuda.get_device_name(), variant="bf16_matmul",
                                    tflops=tflops)


@pytest.mark.parametrize("name,batch", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("variant", VARIANTS)
def bench_pid_step(benchmark, name, batch, variant):
    if variant == "pid_fast_compiled" and name != "cifar10-ddpmpp":
        pytest.skip("compiled step measured on CIFAR-10 only (compile time within the device budget)")
    step, eager_step = make_setup(name, batch, variant)
    flops = count_flops(eager_step)
    for _ in range(3 if HAS_CUDA else 1):
        step()
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def one():
        step()
        if HAS_CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(one, rounds=5 if HAS_CUDA else 2, iterations=1, warmup_rounds=1)
    info = dict(device=torch.cuda.get_device_name() if HAS_CUDA else "cpu", variant=variant,
                network=name, batch=batch, flops_per_step=flops)
    if benchmark.stats is not None:
        s = benchmark.stats.stats.median
        info.update(ms_per_step=s * 1e3, images_per_s=batch / s, tflops=flops / s / 1e12)
        if HAS_CUDA:
            info["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            if "bf16" in _MATMUL_TFLOPS:
                info["mfu_vs_bf16_matmul"] = flops / s / 1e12 / _MATMUL_TFLOPS["bf16"]
    benchmark.extra_info.update(info)

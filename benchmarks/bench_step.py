"""The whole PID training step: images/s, peak memory and model-FLOPs utilisation of an
official-style step (two separate fp32 student forwards, fp32 teacher, eager, L2, plain RAdam)
against pid_fast's default step (one 2B-batched student pass under bf16 autocast with fp32
master weights, channels_last, the fused assemble and loss ops, a foreach optimizer), in the
same run on the same card.

    pytest benchmarks/bench_step.py -c benchmarks/pytest.ini --benchmark-json=out.json

On the CPU (CI) a tiny network stands in; on a GPU the CIFAR-10 DDPM++ teacher/student at batch
128. FLOPs are counted once per configuration with torch.utils.flop_counter; MFU is reported
against the bf16 matrix-product rate measured in the same run (bench_gpu_bf16_matmul).
"""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pid_fast.loss import PIDLoss
from pid_fast.networks import build_network, network_config
from pid_fast.preconditioning import EDMPrecond

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
CONFIGS = [("cifar10-ddpmpp", 128)] if HAS_CUDA else [("tiny-ddpmpp", 8)]
_MATMUL_TFLOPS = {}


def make_setup(name, batch, fast):
    torch.manual_seed(0)
    # Zero-initialised output layers give denormal numbers that slow CPU arithmetic ~10x.
    torch.set_flush_denormal(True)
    net = build_network(name, device=DEVICE)
    student = copy.deepcopy(net).train()
    teacher = EDMPrecond(net.eval().requires_grad_(False))
    cfg = network_config(name)
    res = cfg["img_resolution"]
    noise = torch.randn(batch, cfg["in_channels"], res, res, device=DEVICE) * 80.0
    if fast:
        if HAS_CUDA:
            student = student.to(memory_format=torch.channels_last)
            teacher = teacher.to(memory_format=torch.channels_last)
        opt = torch.optim.RAdam(student.parameters(), lr=2e-4, foreach=True)
        loss_fn = PIDLoss(teacher, norm="l2", batched=True)
    else:
        opt = torch.optim.RAdam(student.parameters(), lr=2e-4, foreach=False)
        loss_fn = PIDLoss(teacher, norm="l2", batched=False, backend="reference")

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=fast):
            loss = loss_fn(student, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


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
@pytest.mark.parametrize("variant", ["official_style", "pid_fast_default"])
def bench_pid_step(benchmark, name, batch, variant):
    step = make_setup(name, batch, fast=variant == "pid_fast_default")
    flops = count_flops(step)
    for _ in range(2 if HAS_CUDA else 1):
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

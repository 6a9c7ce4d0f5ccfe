"""How faithful is PID's finite difference in each precision mode? Error against float64.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fd_precision.py \
        --json benchmarks/results/fd_precision-cpu.json --md benchmarks/results/fd_precision.md

For each network (the bundled digits teacher with its copy as the student; EDM's CIFAR-10
DDPM++ architecture with random weights, student = copy of teacher), each precision variant and
each group of grid indices of N = 250 (early 0-9: t near T; middle 120-129; late 240-249: t near
sigma_min, including the edge case i = N-1 where t2 > t), one PID loss forward + backward of the
student (the teacher in fp32 in every row), compared with the same step run in float64 (student
network, noise, times and the residual in fp64):

    pred_err   ||pred - pred64|| / ||pred64|| over the group, pred = y - t (y - y2)/(t - t2)
               formed in fp64 from the student's outputs (the network's rounding only)
    dF_err     the same for F(t) - F(t2), the difference that is amplified by t/(t - t2)
    grad_cos   cosine between the student's parameter gradient of the loss and the fp64 one
    loss_err   |loss - loss64| / loss64

Variants: the modes of pid_fast.models.precision (fp32, bf16, fp16, bf16-mixed, fp16-mixed);
ablations "DTYPE+part+part" (16-bit autocast with only those fp32 islands). "tf32" is emulated on
the CPU: fp32 with the inputs of every matrix product / convolution rounded to TF32's 10-bit
mantissa, forward and backward, as an Ampere+ GPU does when TF32 is allowed.

16-bit autocast: "real" runs torch.autocast; "emulated" runs the same autocast (so islands and
the network's autocast queries behave identically) but computes each autocast product (conv,
linear, attention, matmul) in fp32 on inputs rounded to the 16-bit dtype and rounds its output
to that dtype: the numerics of a tensor-core GPU (16-bit inputs, fp32 accumulation, 16-bit
outputs) up to summation order, at fp32 speed. CPUs without native bf16/fp16 convolutions
(no AVX-512/AMX) run real 16-bit convolutions ~10-50x slower than fp32, so by default the digits
network runs real autocast and CIFAR-10 the emulation; the digits network is also run emulated
(the "emu" rows) to show both give the same error levels.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import sys
import time

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pid_fast import pid_distillation_loss, pid_residual
from pid_fast.models.networks import build_network, network_config
from pid_fast.models.precision import ISLAND_PARTS, PRECISION_MODES, keep_fp32, precision_mode
from pid_fast.models.preconditioning import EDMPrecond, edm_coefficients

N = 250
GROUPS = {"early": list(range(0, 10)), "middle": list(range(120, 130)), "late": list(range(240, 250))}
# Ablations: which fp32 islands buy what ("fp16+embedding+modulation+output": the reference's
# ImageNet-64 recipe, fp16 with the time embedding and the output layers in fp32).
ABLATIONS = ("bf16+embedding+modulation", "bf16+output", "bf16+embedding+modulation+output+stream",
             "fp16+output", "fp16+embedding+modulation+output+stream")
CIFAR_ABLATIONS = ("bf16+embedding+modulation+output+stream", "fp16+embedding+modulation+output+stream")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NOTES = "## Reading"


# ----------------------------------------------------------------------------------------
# Variants: (autocast dtype or None, fp32 island parts, tf32 emulation).

def parse_variant(name: str):
    if name in PRECISION_MODES:
        spec = precision_mode(name, "--variants")
        return spec.autocast_dtype, spec.fp32_parts, spec.tf32
    dtype, *parts = name.split("+")
    if dtype not in DTYPES or not parts or any(p not in ISLAND_PARTS for p in parts):
        raise SystemExit(f"--variants: {name!r} is not a mode {PRECISION_MODES} or "
                         f"'bf16|fp16+part[+part]' with parts from {tuple(ISLAND_PARTS)}")
    return DTYPES[dtype], tuple(parts), False


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to the nearest value with a 10-bit mantissa (ties to even)."""
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -8192  # -8192 = ~0x1FFF
    return bits.view(torch.float32)


class _TF32Input(torch.autograd.Function):
    """Forward: round to TF32; backward: pass the gradient through (the product's output
    gradient is what the GPU rounds, see _TF32Output)."""

    @staticmethod
    def forward(ctx, x):
        return round_tf32(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _TF32Output(torch.autograd.Function):
    """Forward: identity; backward: the incoming gradient rounded to TF32 (it is an input of
    the backward products)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return round_tf32(grad)


def _any_dual(args, kwargs) -> bool:
    values = list(args) + list(kwargs.values())
    return any(isinstance(v, torch.Tensor) and fwAD.unpack_dual(v).tangent is not None for v in values)


def _tf32_rounding(v: torch.Tensor) -> torch.Tensor:
    """round_tf32(v) - v as a constant (no gradient, no tangent)."""
    primal = fwAD.unpack_dual(v).primal.detach()
    return round_tf32(primal) - primal


_PRODUCTS = {F.conv2d, F.conv_transpose2d, F.linear, F.scaled_dot_product_attention, torch.matmul, torch.mm,
             torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__}


def _map_floats(fn, args, kwargs):
    conv = lambda v: fn(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return [conv(a) for a in args], {k: conv(v) for k, v in kwargs.items()}


class EmulatedProducts(TorchFunctionMode):
    """Under CPU autocast: each autocast product in fp32 on 16-bit-rounded inputs, output rounded
    to the autocast dtype. With tf32=True and autocast off: fp32 products on TF32-rounded inputs."""

    def __init__(self, tf32: bool = False):
        super().__init__()
        self.tf32 = tf32

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            if torch.is_autocast_enabled("cpu"):
                dtype = torch.get_autocast_dtype("cpu")
                args, kwargs = _map_floats(lambda v: v.to(dtype).float(), args, kwargs)
                with torch.autocast("cpu", enabled=False):
                    return func(*args, **kwargs).to(dtype)
            if self.tf32 and _any_dual(args, kwargs):
                # The jvp pass (custom Functions would need forward-mode formulas that reverse
                # mode can differentiate): inputs rounded straight-through, tangents in fp32.
                args, kwargs = _map_floats(lambda v: v + _tf32_rounding(v) if v.dtype == torch.float32 else v,
                                           args, kwargs)
                return func(*args, **kwargs)
            if self.tf32:
                args, kwargs = _map_floats(
                    lambda v: _TF32Input.apply(v) if v.dtype == torch.float32 else v, args, kwargs)
                return _TF32Output.apply(func(*args, **kwargs))
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------
# Networks.

def digits_pair():
    from pid_fast.demo.digits import DEFAULT_TEACHER
    from pid_fast.io import load_teacher

    teacher = load_teacher(DEFAULT_TEACHER)
    return teacher, copy.deepcopy(teacher.model).train().requires_grad_(True)


def cifar_pair(seed: int):
    """CIFAR-10 DDPM++ (EDM's cifar10 teacher architecture) with random weights. EDM initialises
    the last conv of every block and the output conv to ~1e-5 (F would be ~0); those are redrawn
    as N(0, 1/fan_in) so every layer contributes, like a trained network's."""
    torch.manual_seed(seed)
    net = build_network(network_config("cifar10-ddpmpp", dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2 and p.abs().max() < 1e-3:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
    teacher = EDMPrecond(net, sigma_min=0.002, sigma_max=80.0).eval().requires_grad_(False)
    return teacher, copy.deepcopy(net).train().requires_grad_(True)


# ----------------------------------------------------------------------------------------
# One PID step and its errors.

def pid_step(student, teacher, noise, indices, *, dtype64=False, autocast_dtype=None, emulate=False, tf32=False):
    """Loss, gradient (flat fp64), F(t), F(t2) (fp64) and times of one PID step of ``student``."""
    outputs = {}

    def recorded(x, c_noise, labels):
        outputs["F"] = student(x, c_noise, labels)
        return outputs["F"]

    emulation = EmulatedProducts(tf32) if (emulate or tf32) else contextlib.nullcontext()
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None), emulation:
        per, t, t2 = pid_distillation_loss(
            recorded, teacher, noise, indices=indices, num_points=N,
            teacher_precision=None if dtype64 else "fp32", backend="reference" if dtype64 else None,
            return_times=True)
    loss = per.mean()
    student.zero_grad(set_to_none=True)
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1).double() if p.grad is not None
                      else torch.zeros(p.numel(), dtype=torch.float64) for p in student.parameters()])
    B = noise.shape[0]
    f = outputs["F"].detach().double()
    return float(loss.detach()), grad, f[:B], f[B:], t.double(), t2.double()


def pred_of(noise, f_t, f_t2, t, t2):
    """pred = y - t (y - y2)/(t - t2), in fp64 (pid_residual's reference backend)."""
    coef = edm_coefficients(t)
    pred, _ = pid_residual(noise, f_t, f_t2, torch.zeros_like(noise), t, t2, coef.c_skip, coef.c_out,
                           backend="reference", validate=False)
    return pred


def rel(a, b):
    return float((a - b).norm() / b.norm())


def per_sample_rel(a, b):
    B = b.shape[0]
    return ((a - b).reshape(B, -1).norm(dim=1) / b.reshape(B, -1).norm(dim=1)).tolist()


def errors(pred, pred64, diff, diff64, grad, grad64):
    """pred and F(t) - F(t2) errors (over the group and the worst sample) and the gradient's."""
    return dict(pred_err=rel(pred, pred64), pred_err_max=max(per_sample_rel(pred, pred64)),
                dF_err=rel(diff, diff64), dF_err_max=max(per_sample_rel(diff, diff64)),
                grad_cos=float(grad @ grad64 / (grad.norm() * grad64.norm())), grad_err=rel(grad, grad64))


def autocast_kinds(dtype, tf32, real16):
    """How a variant runs: 'none' (fp32), 'emulated' (tf32; or 16-bit emulated), 'real'."""
    if tf32:
        return ["emulated"]
    if dtype is None:
        return ["none"]
    return ["real", "emulated"] if real16 == "both" else [real16]


def measure_model(name, teacher, student, shape, batch, variants, real16, seed, log):
    """All variants x groups for one network; returns rows (dicts)."""
    student64 = copy.deepcopy(student).double()
    rows = []
    for number, (group, indices) in enumerate(GROUPS.items()):
        idx = torch.tensor([indices[j * len(indices) // batch] for j in range(batch)]) if batch < len(indices) \
            else torch.tensor([indices[j % len(indices)] for j in range(batch)])
        gen = torch.Generator().manual_seed(1000 * seed + number)
        noise = 80.0 * torch.randn(batch, *shape, generator=gen)
        t0 = time.perf_counter()
        loss64, g64, ft64, ft2_64, t, t2 = pid_step(student64, teacher, noise.double(), idx, dtype64=True)
        pred64 = pred_of(noise.double(), ft64, ft2_64, t, t2)
        log(f"{name} {group} fp64: {time.perf_counter() - t0:.1f}s")
        for variant in variants:
            dtype, parts, tf32 = parse_variant(variant)
            for autocast in autocast_kinds(dtype, tf32, real16):
                emulate = autocast == "emulated"
                net = copy.deepcopy(student)
                if parts:
                    keep_fp32(net, parts)
                t0 = time.perf_counter()
                loss, g, ft, ft2, _, _ = pid_step(net, teacher, noise, idx, autocast_dtype=dtype,
                                                  emulate=emulate and dtype is not None, tf32=tf32)
                seconds = time.perf_counter() - t0
                row = dict(model=name, variant=variant, autocast=autocast, group=group, indices=idx.tolist(),
                           k_min=float((t / (t - t2)).abs().min()), k_max=float((t / (t - t2)).abs().max()),
                           **errors(pred_of(noise.double(), ft, ft2, t, t2), pred64, ft - ft2, ft64 - ft2_64,
                                    g, g64),
                           loss=loss, loss64=loss64, loss_err=abs(loss - loss64) / abs(loss64), seconds=seconds)
                rows.append(row)
                log(f"{name} {group} {variant} [{row['autocast']}]: pred {row['pred_err']:.2e} "
                    f"dF {row['dF_err']:.2e} cos {row['grad_cos']:.6f} loss {row['loss_err']:.1e} ({seconds:.1f}s)")
    return rows


# ----------------------------------------------------------------------------------------
# Report.

def markdown(rows, command, meta):
    lines = [f"Command: `{command}`", "",
             f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), N = {N}; "
             f"student batch per group: digits {meta['digits_batch']}, cifar10-ddpmpp {meta['cifar_batch']} "
             f"(its two evaluations make a pass of twice that). Errors relative to the same step in float64; "
             f"the teacher runs in fp32 in every row.", "",
             "| model | variant | autocast | pred err early / middle / late | F(t)-F(t2) err early / middle / late "
             "| grad cosine early / middle / late | loss err (max) |",
             "|---|---|---|---|---|---|---|"]
    for (model, variant, autocast), g in by_group(rows, ("model", "variant", "autocast")):
        fmt = lambda key, spec: " / ".join(format(r[key], spec) for r in g)
        lines.append(f"| {model} | {variant} | {autocast} | {fmt('pred_err', '.1e')} | {fmt('dF_err', '.1e')} | "
                     f"{fmt('grad_cos', '.5f')} | {max(r['loss_err'] for r in g):.1e} |")
    return "\n".join(lines) + "\n"


def by_group(rows, fields):
    """[(values of ``fields``, that variant's rows in GROUPS order)], in first-seen order."""
    keyed = {}
    for r in rows:
        keyed.setdefault(tuple(r[f] for f in fields), {})[r["group"]] = r
    return [(key, [groups[k] for k in GROUPS if k in groups]) for key, groups in keyed.items()]


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--threads, --seed, --json, --md (shared with jvp_precision.py)."""
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--md", default=None, help="write the markdown table here")


def parse_variants(text: str) -> list[str]:
    """A comma list of variants, each checked by ``parse_variant``."""
    variants = [v for v in text.split(",") if v]
    for v in variants:
        parse_variant(v)
    return variants


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits,cifar10-ddpmpp", help="comma list: digits, cifar10-ddpmpp")
    p.add_argument("--variants", default=",".join(PRECISION_MODES + ABLATIONS),
                   help="digits: comma list of modes and ablations 'bf16|fp16+part[+part]'")
    p.add_argument("--cifar-variants", default=",".join(PRECISION_MODES + CIFAR_ABLATIONS),
                   help="the same for cifar10-ddpmpp (fewer ablations by default: it is ~30x the cost)")
    p.add_argument("--digits-batch", type=int, default=20, help="noises per group (indices spread over the group)")
    p.add_argument("--cifar-batch", type=int, default=2, help="noises per group for cifar10-ddpmpp")
    p.add_argument("--digits-autocast", choices=("real", "emulated", "both"), default="both")
    p.add_argument("--cifar-autocast", choices=("real", "emulated", "both"), default="emulated")
    add_run_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants, cifar_variants = parse_variants(args.variants), parse_variants(args.cifar_variants)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    rows, t_start = [], time.perf_counter()
    for model in [m for m in args.models.split(",") if m]:
        if model == "digits":
            teacher, student = digits_pair()
            rows += measure_model("digits", teacher, student, (1, 16, 16), args.digits_batch, variants,
                                  args.digits_autocast, args.seed, log)
        elif model == "cifar10-ddpmpp":
            teacher, student = cifar_pair(args.seed)
            rows += measure_model("cifar10-ddpmpp", teacher, student, (3, 32, 32), args.cifar_batch,
                                  cifar_variants, args.cifar_autocast, args.seed, log)
        else:
            raise SystemExit(f"--models: unknown model {model!r} (digits, cifar10-ddpmpp)")
    given = argv if argv is not None else sys.argv[1:]
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fd_precision.py " + " ".join(given)
    meta = dict(machine=f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
                torch=torch.__version__,
                threads=args.threads, digits_batch=args.digits_batch, cifar_batch=args.cifar_batch,
                total_seconds=round(time.perf_counter() - t_start, 1), command=command.strip())
    table = markdown(rows, meta["command"], meta)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.md:
        notes = ""  # a hand-written "## Reading" section below the table survives a rerun
        if os.path.exists(args.md):
            with open(args.md) as f:
                old = f.read()
            notes = old[old.index(NOTES):] if NOTES in old else ""
        with open(args.md, "w") as f:
            f.write("# Finite-difference fidelity per precision mode\n\n" + table + ("\n" + notes if notes else ""))


if __name__ == "__main__":
    main()

"""Precision modes for the student's pass, chosen so the finite difference stays faithful.

PID's residual multiplies the student's difference F(t) - F(t2) by k = t/(t - t2) (about
10-46 at N = 250), so the rounding of each student evaluation is amplified k-fold. The two
evaluations share their input c n and differ only in the noise label, so what decides the
accuracy of F(t) - F(t2) is where the time information flows: the noise-level embedding, the
per-block time modulation and the output layer. The mixed modes keep exactly those in fp32
("fp32 islands") while the convolutions and attention of the trunk stay 16-bit.

    mode         student pass                   fp32 islands                   GradScaler  pred error *
    fp32         fp32, TF32 off on CUDA         -                              no          7e-6 / 1e-4
    tf32         fp32, TF32 products on CUDA    -                              no          6e-3 / 3e-2
    bf16         bf16 autocast                  -                              no          1e-1 / 5e-1
    fp16         fp16 autocast                  -                              yes         1e-2 / 6e-2
    bf16-mixed   bf16 autocast                  embedding, modulation, output  no          6e-2 / 4e-1
    fp16-mixed   fp16 autocast                  embedding, modulation, output  yes         8e-3 / 6e-2

* The largest relative error of the residual's ``pred`` against a float64 run over early,
  middle and late grid indices, on the trained digits network / on CIFAR-10 DDPM++ with random
  weights (benchmarks/fd_precision.py; table in benchmarks/results/fd_precision.md). The error
  follows the mantissa of the trunk's activations (bf16 8 bits, fp16 and TF32's inputs 10-11),
  so the islands cut it by 1.1-1.6x while the format changes it 8x. TF32 costs as much as fp16,
  hence "fp32" keeps it off. On a CPU "tf32" computes exactly what "fp32" does.

Use (the trainer does this):

    net = prepare_network(net, mode)          # before DDP / torch.compile; idempotent
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(mode) else None
    with autocast_for(mode, device.type):
        loss = pid_loss(net, noise)           # the teacher has its own teacher_precision

The islands are made by ``keep_fp32(net, parts)`` without touching the network's code: each
chosen submodule's forward is replaced, on the instance, by ``FP32Forward``, which runs the
class's forward with autocast disabled on fp32 copies of 16-bit floating inputs. No parameter,
buffer or submodule is added (state_dict keys are unchanged), the network still pickles and
deepcopies, and hooks registered on the submodule still fire around it.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from pid_fast.checks import check_choice

__all__ = [
    "PrecisionMode", "PRECISION_MODES", "ISLAND_PARTS", "precision_mode", "autocast_for", "tf32_allowed",
    "needs_grad_scaler", "prepare_network", "keep_fp32", "fp32_islands", "FP32Forward",
]


@dataclass(frozen=True)
class PrecisionMode:
    """What a mode does: the autocast dtype of the student's pass (None: fp32), the parts kept
    in fp32 under that autocast, whether fp16's narrow range needs dynamic loss scaling, and
    whether TF32 matrix products are allowed on CUDA."""

    name: str
    autocast_dtype: Optional[torch.dtype]
    fp32_parts: tuple[str, ...] = ()
    grad_scaler: bool = False
    tf32: bool = False


# The parts of an EDM U-Net (SongUNet, DhariwalUNet) that carry the time information, as
# patterns on the submodule's qualified name (also under a wrapper: "model.", "module.").
#   embedding   the noise-level embedding and its MLP (and the class embedding)
#   modulation  each block's affine map of the embedding (scale/shift or bias of norm1)
#   output      the output head: SongUNet's NxN_aux_norm/aux_conv(/aux_up), ADM's out_norm/out_conv
#   stream      what writes the residual stream outside the blocks' 3x3 convolutions: the
#               first convolution and the blocks' skip projections; with these in fp32 the
#               stream (x + update) stays fp32 through the blocks by type promotion
# diffusers UNets (UNet2DModel / UNet2DConditionModel): time_proj/time_embedding/class_embedding,
# each resnet's time_emb_proj, conv_norm_out/conv_out. EDM2's UNet: emb_fourier/emb_noise/
# emb_label, each block's emb_linear, out_conv; its stream: conv_skip.
ISLAND_PARTS: dict[str, str] = {
    "embedding": r"(^|\.)(map_(noise|label|layer0|layer1)|time_proj|time_embedding|class_embedding"
                 r"|emb_(fourier|noise|label))$",
    "modulation": r"\.(affine|time_emb_proj|emb_linear)$",
    "output": r"(^|\.)(out_norm|out_conv|\d+x\d+_aux_(norm|conv|up)|conv_norm_out|conv_out)$",
    "stream": r"(\.skip|(^|\.)enc\.\d+x\d+_conv|\.conv_skip)$",
}
# The mixed modes' islands. "stream" is left out: it buys 10-40% less pred error (measured) but
# its 1x1 skip convolutions are ~5-7% of the FLOPs, which in true fp32 (no tensor cores, ~15x
# slower per FLOP) could cost a GPU about as much as the rest of the 16-bit pass (an estimate,
# not measured); keep_fp32(net, [..., "stream"]) adds it.
_TIME_PATH = ("embedding", "modulation", "output")

_MODES = (
    PrecisionMode("fp32", None),
    PrecisionMode("tf32", None, tf32=True),
    PrecisionMode("bf16", torch.bfloat16),
    PrecisionMode("fp16", torch.float16, grad_scaler=True),
    PrecisionMode("bf16-mixed", torch.bfloat16, _TIME_PATH),
    PrecisionMode("fp16-mixed", torch.float16, _TIME_PATH, grad_scaler=True),
)
PRECISION_MODES: tuple[str, ...] = tuple(m.name for m in _MODES)
_BY_NAME = {m.name: m for m in _MODES}


def precision_mode(mode: Any, name: str = "precision") -> PrecisionMode:
    """The ``PrecisionMode`` called ``mode`` (ValueError naming ``name`` otherwise)."""
    check_choice(mode, name, PRECISION_MODES)
    return _BY_NAME[mode]


def needs_grad_scaler(mode: str) -> bool:
    """True for the fp16 modes: scale the loss dynamically (``torch.amp.GradScaler``) so small
    gradients do not flush to zero in fp16, and skip steps whose gradients overflow."""
    return precision_mode(mode).grad_scaler


def tf32_allowed(mode: str) -> bool:
    """Whether ``autocast_for(mode, 'cuda')`` lets fp32 matrix products use TF32 (only "tf32":
    TF32 rounds their inputs to a 10-bit mantissa, as costly to the finite difference as fp16)."""
    return precision_mode(mode).tf32


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    # The two global switches (cuBLAS matmuls, cuDNN convolutions), restored on exit.
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def autocast_for(mode: str, device_type: str) -> Iterator[None]:
    """The student's precision for ``mode`` on ``device_type`` ('cuda', 'cpu', ...): autocast to
    the mode's 16-bit dtype, or autocast off ("fp32", also when called inside another autocast).
    On CUDA the TF32 switches are set to the mode's ``tf32`` for the block and restored after.
    Enter it outside a ``torch.compile``d function (the switches are global state)."""
    spec = precision_mode(mode, "mode")
    if not isinstance(device_type, str):
        raise TypeError(f"device_type must be a str such as 'cuda' or 'cpu', got {type(device_type).__name__}")
    tf32 = _tf32(spec.tf32) if device_type == "cuda" else contextlib.nullcontext()
    with tf32, torch.autocast(device_type, dtype=spec.autocast_dtype or torch.bfloat16,
                              enabled=spec.autocast_dtype is not None):
        yield


# ----------------------------------------------------------------------------------------
# fp32 islands.

def _to_fp32(value: Any) -> Any:
    # 16-bit floating tensors become fp32 (float64 and integer tensors are left alone).
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_fp32(v) for v in value)
    return value


class FP32Forward:
    """A module's own forward, run with autocast disabled on fp32 inputs (16-bit floating
    tensor arguments are cast up; outputs come back in fp32). Installed as the instance's
    ``forward`` attribute by ``keep_fp32``; plain attributes only, so the module still pickles
    and deepcopies (the copy's forward points at the copy)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}
        device_type = _device_type(args, kwargs, self.module)
        with torch.autocast(device_type, enabled=False):
            return type(self.module).forward(self.module, *args, **kwargs)

    def __repr__(self) -> str:
        return f"FP32Forward({type(self.module).__name__})"


def _device_type(args: tuple, kwargs: dict, module: nn.Module) -> str:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    for tensor in (*module.parameters(recurse=True), *module.buffers(recurse=True)):
        return tensor.device.type
    return "cpu"


def _is_island(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), FP32Forward)


def _check_parts(parts: Any) -> tuple[str, ...]:
    if isinstance(parts, str):
        parts = (parts,)
    try:
        parts = tuple(parts)
    except TypeError:
        raise TypeError(f"parts must be a sequence of names from {tuple(ISLAND_PARTS)}, "
                        f"got {type(parts).__name__}") from None
    for part in parts:
        check_choice(part, "parts", tuple(ISLAND_PARTS))
    return parts


def keep_fp32(net: nn.Module, parts: Iterable[str] = _TIME_PATH) -> nn.Module:
    """Make the submodules of ``net`` that belong to ``parts`` (names of ``ISLAND_PARTS``) run
    in fp32 under autocast. Idempotent; returns ``net`` (changed in place). Works on a bare
    network, a preconditioned wrapper, a DDP-wrapped or a ``torch.compile``d module (apply it
    before compiling: a compiled graph does not see later changes). Raises ValueError when a
    requested part matches no submodule (e.g. a network that is not an EDM U-Net)."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
    parts = _check_parts(parts)
    found = {part: 0 for part in parts}
    for qualified, module in net.named_modules():
        for part in parts:
            if re.search(ISLAND_PARTS[part], qualified):
                found[part] += 1
                if not _is_island(module):
                    module.forward = FP32Forward(module)  # an instance attribute, not a submodule
    missing = [part for part, count in found.items() if count == 0]
    if missing:
        raise ValueError(f"parts: {missing} match no submodule of {type(net).__name__} (names matching "
                         f"{[ISLAND_PARTS[p] for p in missing]})")
    return net


def fp32_islands(net: nn.Module) -> list[str]:
    """The qualified names of the submodules of ``net`` that ``keep_fp32`` made fp32 islands."""
    return [name for name, module in net.named_modules() if _is_island(module)]


def prepare_network(net: nn.Module, mode: str) -> nn.Module:
    """``net`` ready for ``mode``: its fp32 islands installed when the mode has them (the same
    object, changed in place; idempotent). Call it on the student before wrapping it in DDP or
    compiling it, and before taking the EMA copies (copies keep the islands, which do nothing
    outside autocast)."""
    spec = precision_mode(mode, "mode")
    if spec.fp32_parts:
        keep_fp32(net, spec.fp32_parts)
    return net

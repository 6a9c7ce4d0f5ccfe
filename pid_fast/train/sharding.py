"""FSDP2 for the trainer (config ``parallel: fsdp``): the student, its EMAs and optionally the
frozen teacher sharded over the ranks with ``torch.distributed.fsdp.fully_shard``.

Units. Each entry of the network's outermost ModuleList/ModuleDict containers (the U-Net's
encoder/decoder blocks: EDM's ``enc``/``dec``, EDM2's, diffusers' ``down_blocks``/``up_blocks``)
is one FSDP unit, then the root takes what is left (embeddings, the output layer). In the forward
one unit at a time is gathered to full weights, so a rank holds 1/world_size of every weight,
gradient and optimizer moment plus about one block unsharded.

Precision. The precision modes are autocast modes over fp32 master weights; fully_shard keeps
the fp32 weights for all of them except the pure 16-bit modes ("bf16", "fp16"), whose policy
gathers the weights in that dtype (half the all-gather) and reduces gradients in fp32. Inputs are
never cast by FSDP (``cast_forward_inputs=False``): the noise label c_noise(t) must stay fp32,
since the finite difference between t and t2 lives in its low bits.

The EMA copies are sharded exactly like the student (same units, same mesh), so their update is
a local lerp on each rank's shard (pid_fast.train.ema). The fused ops see local (gathered) plain
tensors and are unchanged.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["PARALLEL_MODES", "fsdp_units", "device_mesh", "shard_network", "is_sharded", "local_tensor",
           "full_state_dict", "total_grad_norm"]

PARALLEL_MODES = ("ddp", "fsdp")
_PURE_16BIT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_units(net: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit: the entries (holding parameters) of the
    outermost ModuleList/ModuleDict containers of ``net``, in registration order."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                units.extend(entry for entry in child.children() if any(True for _ in entry.parameters()))
            else:
                visit(child)

    visit(net)
    return units


def device_mesh(device: torch.device):
    """The 1-D mesh of all ranks on this process's device type."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("parallel 'fsdp' needs an initialised process group (pid_fast.train.distributed."
                           "process_group starts one, also for a single process)")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def mixed_precision_policy(precision: Optional[str]):
    """fully_shard's policy for a precision mode (see the module doc), or None for fp32 weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision not in _PURE_16BIT:
        return None
    return MixedPrecisionPolicy(param_dtype=_PURE_16BIT[precision], reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def shard_network(net: nn.Module, mesh, precision: Optional[str] = None, reshard_after_forward: bool = True
                  ) -> nn.Module:
    """``net`` sharded in place with fully_shard: each of ``fsdp_units(net)``, then the root."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(precision)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if policy is not None:
        kwargs["mp_policy"] = policy
    for unit in fsdp_units(net):
        fully_shard(unit, **kwargs)
    fully_shard(net, **kwargs)
    return net


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(state: dict) -> dict:
    """``state`` (a possibly nested dict) with every DTensor gathered to its full tensor, on the
    CPU. Collective under FSDP: every rank calls it."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = full_state_dict(value)
        elif isinstance(value, torch.Tensor):
            out[key] = _full(value.detach()).cpu()
        else:
            out[key] = value
    return out


def _grads(parameters: Iterable[nn.Parameter]) -> Iterator[torch.Tensor]:
    return (p.grad for p in parameters if p.grad is not None)


def total_grad_norm(parameters: Iterable[nn.Parameter], max_norm: Optional[float] = None) -> torch.Tensor:
    """The 2-norm of all gradients (of the whole model: sharded gradients are reduced over the
    ranks), as a device tensor; with ``max_norm`` the gradients are also clipped to it, as
    torch.nn.utils.clip_grad_norm_ does."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = nn.utils.get_total_norm(list(_grads(parameters)), norm_type=2.0)
    norm = _full(norm)
    if max_norm is not None:
        nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm

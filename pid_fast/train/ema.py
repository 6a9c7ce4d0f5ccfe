"""Exponential moving averages of a network's weights (the trainer's EMAs and the digits teacher's)."""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from pid_fast.train.sharding import local_tensor

__all__ = ["EMA", "update_ema"]


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """ema <- rate ema + (1 - rate) theta for every parameter (one fused lerp over all tensors);
    buffers are copied. Sharded (FSDP) copies of a sharded model are updated shard by shard,
    locally on each rank (pid_fast.train.sharding)."""
    torch._foreach_lerp_([local_tensor(p) for p in ema.parameters()],
                         [local_tensor(p.detach()) for p in model.parameters()], 1.0 - rate)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


class EMA:
    """One EMA copy of a network per rate, updated after every optimizer step."""

    what = "EMA with rate"  # how a missing entry is named in errors

    def __init__(self, model: nn.Module, rates):
        self.rates = [float(r) for r in rates]
        self.models = {r: copy.deepcopy(model).eval().requires_grad_(False) for r in self.rates}

    @staticmethod
    def key(rate: float) -> str:
        return repr(float(rate))

    def update(self, model: nn.Module) -> None:
        for rate, ema in self.models.items():
            update_ema(ema, model, rate)

    def state_dict(self) -> dict:
        return {self.key(r): m.state_dict() for r, m in self.models.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for r, m in self.models.items():
            if self.key(r) not in state:
                raise ValueError(f"checkpoint has no {self.what} {r} (has {sorted(state)})")
            m.load_state_dict(state[self.key(r)])

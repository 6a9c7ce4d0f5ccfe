"""Student initialisation: PID starts the student as a copy of the teacher's network."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

from pid_fast.io.edm_config import _config_difference, _describe_mismatch, _shape_table
from pid_fast.io.errors import ConfigMismatchError
from pid_fast.models.networks import build_network

__all__ = ["InitReport", "init_student_from_teacher", "student_from_teacher"]


class InitReport(NamedTuple):
    copied: tuple[str, ...]
    skipped: tuple[str, ...]  # student entries left at their own initialisation


def _network_of(obj: Any, who: str) -> nn.Module | Mapping[str, torch.Tensor]:
    from pid_fast.models.preconditioning import Preconditioning

    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, Preconditioning):
        # A preconditioning wrapper: the student is initialised from its raw network.
        if not isinstance(obj.model, nn.Module):
            raise TypeError(f"init_student_from_teacher: {who} wraps no nn.Module network")
        return obj.model
    if isinstance(obj, nn.Module):
        return obj
    raise TypeError(f"init_student_from_teacher: {who} must be a module or a state_dict, got {type(obj).__name__}")


def init_student_from_teacher(student: nn.Module, teacher: nn.Module | Mapping[str, torch.Tensor], *,
                              strict: bool = True, student_config: Mapping[str, Any] | None = None,
                              teacher_config: Mapping[str, Any] | None = None) -> InitReport:
    """Copy the teacher's weights into the student (PID initialises the student as the
    teacher). Both may be raw networks, preconditioning wrappers or state_dicts.

    With `strict=True` any missing/unexpected key or shape difference raises
    ConfigMismatchError naming them (and the differing config fields when both configs
    are given). With `strict=False` the matching entries are copied and the report lists
    the student entries left at their own initialisation. Values are cast to the
    student's dtype/device; the teacher is never modified."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"init_student_from_teacher: student must be an nn.Module, got {type(student).__name__}")
    student_net = _network_of(student, "student")
    teacher_sd = _network_of(teacher, "teacher")
    teacher_sd = teacher_sd.state_dict() if isinstance(teacher_sd, nn.Module) else teacher_sd
    target = student_net.state_dict()
    problems = _describe_mismatch(_shape_table(target), _shape_table(teacher_sd))
    if problems and strict:
        message = f"student and teacher weights differ: {problems}"
        if student_config is not None and teacher_config is not None:
            fields = sorted(set(student_config) | set(teacher_config))
            diff = _config_difference(student_config, teacher_config, fields)
            if diff:
                message += " | config differences (student vs teacher): " + "; ".join(diff)
        raise ConfigMismatchError(message + " (use strict=False to copy only the matching weights)")
    copied, skipped = [], []
    with torch.no_grad():
        for key, value in target.items():
            source = teacher_sd.get(key)
            if source is not None and tuple(source.shape) == tuple(value.shape):
                value.copy_(source.to(device=value.device, dtype=value.dtype))
                copied.append(key)
            else:
                skipped.append(key)
    return InitReport(tuple(copied), tuple(skipped))


def student_from_teacher(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                         device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """A raw student network with the teacher's architecture (`config` is a teacher config
    with a 'network' entry, or a network config), initialised from the teacher's weights.
    `overrides` change non-weight fields such as dropout; a change that alters the weights
    raises ConfigMismatchError."""
    network = dict(config["network"]) if "network" in config else dict(config)
    student_config = dict(network, **overrides)
    student = build_network(student_config, device=device)
    init_student_from_teacher(student, state_dict, student_config=student_config, teacher_config=network)
    return student

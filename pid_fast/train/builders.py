"""What a run is made of, built from its config: the teacher, the student, the loss, the
optimizer, the concrete precision settings, and the student's noise-label rule (recorded in the
checkpoint so that a student samples without its teacher)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from pid_fast.io import init_student_from_teacher
from pid_fast.io.diffusers_io import load_diffusers_teacher
from pid_fast.io.teachers import load_teacher_with_config
from pid_fast.loss import PIDLoss
from pid_fast.models.diffusers_adapter import (DiffusersDenoiser, build_diffusers_network, diffusers_noise_labels,
                                               is_diffusers_network)
from pid_fast.models.networks import build_network, network_config
from pid_fast.models.preconditioning import (PRECONDITIONINGS, DirectDenoiser, EDMPrecond, GaussianDenoiser,
                                             Preconditioning, VEPrecond, VPPrecond)

__all__ = ["network_spec", "build_teacher", "given_teacher", "build_student", "resolve_precision", "build_loss",
           "build_optimizer", "noise_rule", "noise_labels", "student_metadata"]


def network_spec(spec: Any, key: str) -> dict:
    """A network config from a NETWORK_CONFIGS name, a full config (with model_type) or
    {"name": ..., <overrides>}."""
    if isinstance(spec, str):
        return network_config(spec)
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "model_type" in spec:
            return spec
        if "name" in spec:
            return network_config(spec.pop("name"), **spec)
    raise ValueError(f"config[{key!r}] must be a network name, a config with 'model_type' or "
                     f"{{'name': ..., <overrides>}}, got {spec!r}")


# --------------------------------------------------------------------------------------------
# Teacher and student


def build_teacher(tcfg: Mapping[str, Any], device: torch.device) -> tuple[Preconditioning, Optional[dict]]:
    """(frozen teacher, its network config or None) from config['teacher']."""
    kind = tcfg["kind"]
    if kind == "gaussian":
        teacher = GaussianDenoiser(tcfg.get("mean", 0.0), tcfg.get("std", 0.5), label_dim=int(tcfg.get("label_dim", 0)))
        return teacher.to(device).eval().requires_grad_(False), None
    if kind == "edm":
        return _load_edm_teacher(tcfg, device)
    if kind == "diffusers":
        return _load_diffusers_teacher(tcfg, device)
    net_cfg = network_spec(tcfg["network"], "teacher.network")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tcfg.get("seed", 0)))
        model = build_network(net_cfg)
    precond = PRECONDITIONINGS[tcfg.get("precond", "edm")]
    teacher = precond(model, label_dim=int(net_cfg.get("label_dim", 0)), use_fp16=bool(tcfg.get("use_fp16", False)),
                      **dict(tcfg.get("precond_kwargs") or {}))
    return teacher.to(device).eval().requires_grad_(False), net_cfg


def _load_edm_teacher(tcfg: Mapping[str, Any], device: torch.device) -> tuple[Preconditioning, dict]:
    """(frozen teacher, its network config) of a teacher of kind 'edm': an EDM .pkl or a file
    written by `pid-fast convert`, read by the one teacher loader of pid_fast.io."""
    teacher, config = load_teacher_with_config(tcfg["path"], key=tcfg.get("key", "ema"), device=device,
                                               name="teacher.path")
    return teacher, dict(config["network"])


def _load_diffusers_teacher(tcfg: Mapping[str, Any], device: torch.device) -> tuple[Preconditioning, dict]:
    """(frozen teacher, its network config) of a teacher of kind 'diffusers': a local folder
    written by save_pretrained (pid_fast.io.diffusers_io)."""
    teacher = load_diffusers_teacher(tcfg["path"], scheduler=tcfg.get("scheduler"),
                                     prediction_type=tcfg.get("prediction_type"),
                                     timestep_rounding=tcfg.get("timestep_rounding"), device=device)
    if teacher.model.cross_attention:
        raise ValueError("config['teacher.path']: a UNet2DConditionModel needs encoder_hidden_states, which the "
                         "trainer does not draw; use PIDLoss in your own loop (examples/diffusers_loop.py)")
    return teacher, teacher.model.rebuild_config()


def given_teacher(teacher: Preconditioning, tcfg: Mapping[str, Any],
                  device: torch.device) -> tuple[Preconditioning, Optional[dict]]:
    """(frozen teacher, its network config or None) for a teacher object handed to ``train``:
    config['teacher'] then only describes its architecture."""
    teacher = teacher.to(device).eval().requires_grad_(False)
    net_cfg = network_spec(tcfg["network"], "teacher.network") if tcfg["kind"] == "network" else None
    return teacher, net_cfg


def build_student(scfg: Mapping[str, Any], teacher: Preconditioning, teacher_net: Optional[dict],
                  device: torch.device) -> tuple[nn.Module, dict]:
    """(student raw network in train mode, its network config)."""
    if scfg["network"] is not None:
        net_cfg = network_spec(scfg["network"], "student.network")
    elif teacher_net is not None:
        net_cfg = dict(teacher_net)
    else:
        raise ValueError("config['student.network'] is required: the teacher has no network config")
    if scfg["dropout"] is not None:
        net_cfg["dropout"] = float(scfg["dropout"])
    if int(net_cfg.get("label_dim", 0)) != int(getattr(teacher, "label_dim", 0)):
        raise ValueError(f"config['student.network'] has label_dim={net_cfg.get('label_dim', 0)} but the teacher "
                         f"has label_dim={getattr(teacher, 'label_dim', 0)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(scfg["seed"]))
        net = _build_student_network(net_cfg)
    if scfg["init"] == "teacher":
        if not isinstance(getattr(teacher, "model", None), nn.Module):
            raise ValueError("config['student.init'] is 'teacher' but the teacher has no network to copy")
        init_student_from_teacher(net, teacher.model)
    return net.to(device).train().requires_grad_(True), net_cfg


def _build_student_network(net_cfg: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised student network: an EDM network or a diffusers UNet."""
    return build_diffusers_network(net_cfg) if is_diffusers_network(net_cfg) else build_network(net_cfg)


# --------------------------------------------------------------------------------------------
# Precision, loss, optimizer


# precision 'auto' (CPU, CUDA): only a mode whose digits FD stays within 5% of fp32's and whose
# residual pred error stays within 1e-2 (benchmarks/results/precision_fidelity.md and
# fd_precision.md; README: Precision). fp16-mixed is the fastest such mode on GPUs.
AUTO_PRECISION = {False: "fp32", True: "fp16-mixed"}


def resolve_precision(cfg: Mapping[str, Any], device: torch.device) -> dict:
    """The 'auto' settings made concrete for ``device``: {'precision', 'teacher_precision',
    'channels_last'}."""
    precision = cfg["precision"] if cfg["precision"] != "auto" else AUTO_PRECISION[device.type == "cuda"]
    teacher_precision = cfg["loss"]["teacher_precision"]
    if teacher_precision == "auto":  # the teacher in bf16 when the student's trunk is
        teacher_precision = "bf16" if precision in ("bf16", "bf16-mixed") else None
    channels_last = cfg["channels_last"] if cfg["channels_last"] != "auto" else device.type == "cuda"
    return {"precision": precision, "teacher_precision": teacher_precision, "channels_last": channels_last}


def build_loss(lcfg: Mapping[str, Any], teacher: Preconditioning, device: torch.device,
               teacher_precision: Optional[str]) -> PIDLoss:
    """The PID loss of config['loss'] (with its LPIPS network for norm 'lpips')."""
    lpips = None
    if lcfg["norm"] == "lpips":
        from pid_fast.eval.lpips import LPIPSNorm

        lpips = LPIPSNorm(lcfg["lpips_weights"], net=lcfg["lpips_net"], resize=lcfg["lpips_resize"],
                          pooling=lcfg["lpips_pooling"], lin_weights=lcfg["lpips_lin_weights"]).to(device)
    return PIDLoss(teacher, N=lcfg["N"], sigma_min=lcfg["sigma_min"], sigma_max=lcfg["sigma_max"],
                   rho=lcfg["rho"], norm=lcfg["norm"], backend=lcfg["backend"], batched=lcfg["batched"],
                   huber_c=lcfg["huber_c"], lpips=lpips, teacher_precision=teacher_precision,
                   derivative=lcfg["derivative"])


def build_optimizer(params, ocfg: Mapping[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """RAdam or Adam as in config['optimizer']."""
    kwargs = dict(lr=ocfg["lr"], betas=tuple(ocfg["betas"]), eps=ocfg["eps"], weight_decay=ocfg["weight_decay"])
    if ocfg["name"] == "radam":  # (no fused RAdam; torch picks the foreach version on CUDA)
        return torch.optim.RAdam(params, **kwargs)
    return torch.optim.Adam(params, fused=device.type == "cuda", **kwargs)


# --------------------------------------------------------------------------------------------
# The student's noise labels and sampling metadata


def noise_rule(teacher: Preconditioning) -> dict:
    """How the student's c_noise(t) is computed (the teacher's rule), as a JSON-able dict."""
    if isinstance(teacher, DiffusersDenoiser):  # its training schedule, sigma -> timestep
        return teacher.noise_rule()
    if isinstance(teacher, VPPrecond):
        return {"precond": "vp", "beta_d": teacher.beta_d, "beta_min": teacher.beta_min, "M": teacher.M,
                "epsilon_t": teacher.epsilon_t}
    if isinstance(teacher, VEPrecond):
        return {"precond": "ve"}
    if isinstance(teacher, (EDMPrecond, DirectDenoiser)):
        return {"precond": "edm"}
    raise ValueError(f"cannot record the noise-label rule of a {type(teacher).__name__} teacher")


def noise_labels(rule: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """t -> c_noise(t) for a rule recorded by ``noise_rule``."""
    if rule["precond"] == "diffusers":
        return diffusers_noise_labels(rule)
    kwargs = {k: v for k, v in rule.items() if k != "precond"}
    coefficients = PRECONDITIONINGS[rule["precond"]](lambda *a: None, **kwargs)  # coefficients only
    return lambda t: coefficients.coefficients(t).c_noise


def student_metadata(net_cfg: Mapping[str, Any], teacher: Preconditioning, lcfg: Mapping[str, Any],
                     sigma_data: float) -> dict:
    """What sampling the student needs besides its weights (checkpoint['student'])."""
    label_dim = int(getattr(teacher, "label_dim", 0))
    shape = (int(net_cfg["in_channels"]), int(net_cfg["img_resolution"]), int(net_cfg["img_resolution"]))
    return {"network": net_cfg, "noise_rule": noise_rule(teacher), "label_dim": label_dim, "shape": list(shape),
            "sigma_min": lcfg["sigma_min"], "sigma_max": lcfg["sigma_max"], "sigma_data": sigma_data}

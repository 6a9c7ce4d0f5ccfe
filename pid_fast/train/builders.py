"""What a run is made of, built from its config: the teacher, the student, the loss, the
optimizer, the concrete precision settings, and the student's noise-label rule (recorded in the
checkpoint so that a student samples without its teacher)."""

from __future__ import annotations

import fnmatch

import math
import warnings
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from pid_fast.checks import check_grid
from pid_fast.io import init_student_from_teacher
from pid_fast.io.diffusers_io import find_diffusers_parts, load_diffusers_scheduler, load_diffusers_teacher
from pid_fast.io.teachers import load_teacher_with_config
from pid_fast.loss import PIDLoss
from pid_fast.models.diffusers_adapter import (DiffusersDenoiser, build_diffusers_network, diffusers_noise_labels,
                                               is_diffusers_network, scheduler_sigma_range)
from pid_fast.models.guidance import GuidedDenoiser, guided
from pid_fast.models.networks import build_network, network_config
from pid_fast.models.preconditioning import (PRECONDITIONINGS, DirectDenoiser, EDMPrecond, GaussianDenoiser,
                                             Preconditioning, VEPrecond, VPPrecond)

__all__ = ["network_spec", "build_teacher", "is_text_teacher", "given_teacher", "build_student", "resolve_precision", "build_loss",
           "build_optimizer", "teacher_sigma_range", "resolve_sigma_range", "noise_rule", "noise_labels",
           "student_metadata"]


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


def build_teacher(tcfg: Mapping[str, Any], device: torch.device,
                  unconditional: Optional[torch.Tensor] = None) -> tuple[Preconditioning, Optional[dict]]:
    """(frozen teacher, its network config or None) from config['teacher']; with
    teacher.guidance, the guided teacher (pid_fast.guided) of that teacher and its guide.
    ``unconditional``: a text teacher's unconditional input, the negative prompt's embedding
    [1, L, D] (pid_fast.train.prompts.TextConditions.negative)."""
    teacher, net_cfg = _build_unguided_teacher(tcfg, device)
    guidance = tcfg.get("guidance")
    return (teacher if guidance is None else guided_teacher(teacher, guidance, device, unconditional)), net_cfg


def is_text_teacher(teacher: Any) -> bool:
    """Whether a (guided) teacher's network is a cross-attention UNet conditioned on text embeddings."""
    return bool(getattr(getattr(unguided(teacher), "model", None), "cross_attention", False))


def guided_teacher(main: Preconditioning, gcfg: Mapping[str, Any], device: torch.device,
                   unconditional: Optional[torch.Tensor] = None) -> GuidedDenoiser:
    """The guided teacher of config['teacher.guidance'] around ``main``: guide "unconditional"
    (main without its label: zeros, EDM's label dropout, the one-hot ``null_label``, or for a text
    teacher ``unconditional``, the negative prompt's embedding) or a second teacher's config
    (autoguidance: it gets the same labels)."""
    guide_cfg, interval = gcfg["guide"], gcfg.get("interval")
    interval = None if interval is None else tuple(interval)
    if guide_cfg == "unconditional" and is_text_teacher(main):
        if unconditional is None:
            raise ValueError("config['teacher.guidance']: a text-conditioned teacher's unconditional input is the "
                             "negative prompt's embedding; build it with the run's prompt embeddings "
                             "(pid_fast.train.prompts.text_conditions(...).negative)")
        return guided(main, main, gcfg["scale"], guide_labels=unconditional.to(device), interval=interval)
    if guide_cfg == "unconditional":
        null, label_dim = gcfg.get("null_label"), int(main.label_dim)
        network_null = getattr(getattr(main, "model", None), "null_class", None)  # DiT's row after the classes
        if null is not None and int(null) == network_null:
            null = None  # the all-zero label stands for it
        if null is not None and not 0 <= int(null) < label_dim:
            raise ValueError(f"config['teacher.guidance.null_label']: {null} is not a class index of the teacher's "
                             f"{label_dim} classes" + (f" nor its null class {network_null}"
                                                       if network_null is not None else ""))
        guide_labels = "zeros" if null is None else nn.functional.one_hot(torch.tensor(int(null)), label_dim).float()
        return guided(main, main, gcfg["scale"], guide_labels=guide_labels, interval=interval)
    guide, _ = _build_unguided_teacher(guide_cfg, device)
    return guided(main, guide, gcfg["scale"], interval=interval)


def unguided(teacher: Preconditioning) -> Preconditioning:
    """The main teacher of a guided one (what the student copies and takes its noise labels from)."""
    return teacher.main if isinstance(teacher, GuidedDenoiser) else teacher


def _build_unguided_teacher(tcfg: Mapping[str, Any], device: torch.device) -> tuple[Preconditioning, Optional[dict]]:
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
    if teacher.model.cross_attention:  # a text-to-image pipeline: its conditions are the prompts' embeddings
        from pid_fast.io.text_conditioning import text_pipeline_parts

        text_pipeline_parts(tcfg["path"])  # names a missing text_encoder/, tokenizer/ or vae/ (the trainer's
        # prompts: pid_fast.train.prompts.text_conditions)
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
    """(student raw network in train mode, its network config). The student's image shape and
    label width must be the teacher's (``check_student_shape``); with student.init 'teacher' or a
    diffusers teacher, a network given by name takes them from the teacher unless set explicitly."""
    if scfg["network"] is not None:
        spec = scfg["network"]
        if teacher_net is not None and (scfg["init"] == "teacher" or is_diffusers_network(teacher_net)):
            spec = _with_teacher_shape(spec, teacher_net, int(getattr(teacher, "label_dim", 0)))
        net_cfg = network_spec(spec, "student.network")
    elif teacher_net is not None:
        net_cfg = dict(teacher_net)
    else:
        raise ValueError("config['student.network'] is required: the teacher has no network config")
    if scfg["dropout"] is not None:
        net_cfg["dropout"] = float(scfg["dropout"])
    check_student_shape(net_cfg, teacher, teacher_net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(scfg["seed"]))
        net = _build_student_network(net_cfg)
    if scfg["init"] == "teacher":
        teacher = unguided(teacher)
        if not isinstance(getattr(teacher, "model", None), nn.Module):
            raise ValueError("config['student.init'] is 'teacher' but the teacher has no network to copy")
        init_student_from_teacher(net, teacher.model)
    return net.to(device).train().requires_grad_(True), net_cfg


# The keys of a network config that fix the images and labels it takes.
SHAPE_KEYS = ("img_resolution", "in_channels", "out_channels", "label_dim")


def _teacher_shape(teacher_net: Mapping[str, Any], label_dim: int) -> dict:
    """The teacher's image shape and label width as student network keys, those its network
    config gives (the student outputs images like its input: out_channels = the teacher's
    in_channels)."""
    shape = {}
    if "img_resolution" in teacher_net:
        shape["img_resolution"] = int(teacher_net["img_resolution"])
    if "in_channels" in teacher_net:
        shape["in_channels"] = shape["out_channels"] = int(teacher_net["in_channels"])
    return {**shape, "label_dim": label_dim}


def _with_teacher_shape(spec: Any, teacher_net: Mapping[str, Any], label_dim: int) -> Any:
    """A student network given by name ('name' or {'name': ..., <overrides>}) with the teacher's
    shape keys where it does not set them itself; a full config (with model_type) as given."""
    shape = _teacher_shape(teacher_net, label_dim)
    if isinstance(spec, str):
        return {"name": spec, **shape}
    if isinstance(spec, Mapping) and "model_type" not in spec and "name" in spec:
        return {**{k: v for k, v in shape.items() if k not in spec}, **spec}
    return spec


def check_student_shape(net_cfg: Mapping[str, Any], teacher: Any, teacher_net: Optional[Mapping[str, Any]]) -> None:
    """The student network's image resolution, channels and label width against the teacher's
    (its network config when it has one; the label width always): a ValueError naming both."""
    label_dim = int(getattr(teacher, "label_dim", 0))
    expected = {"label_dim": label_dim} if teacher_net is None else _teacher_shape(teacher_net, label_dim)
    for key, want in expected.items():
        if key != "label_dim" and key not in net_cfg:
            continue
        got = int(net_cfg.get(key, 0))
        if got != want:
            raise ValueError(f"config['student.network'] has {key}={got} but the teacher has {key}={want}: the "
                             f"student must take and return the teacher's images"
                             + (" and labels" if key == "label_dim" else "")
                             + f" (set {key} to {want}, or give the network by name with student.init 'teacher' "
                               f"to take the teacher's)")


def _build_student_network(net_cfg: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised student network: an EDM network or a diffusers UNet."""
    return build_diffusers_network(net_cfg) if is_diffusers_network(net_cfg) else build_network(net_cfg)


# --------------------------------------------------------------------------------------------
# Precision, loss, optimizer


# precision 'auto' (CPU, CUDA): only a mode whose digits FD stays within 5% of fp32's and whose
# residual pred error stays within 1e-2 (benchmarks/results/precision_fidelity.md and
# fd_precision.md; README: Precision). fp16-mixed is the fastest such mode on GPUs.
AUTO_PRECISION = {False: "fp32", True: "fp16-mixed"}


def resolve_precision(cfg: Mapping[str, Any], device: torch.device,
                      recorded: Optional[Mapping[str, Any]] = None) -> dict:
    """The 'auto' settings made concrete for ``device``: {'precision', 'teacher_precision',
    'channels_last'}. ``recorded``: what a resumed run resolved them to (its checkpoint's
    'machine'), kept so that a resume on another machine trains as the run did."""
    recorded = recorded or {}
    precision = cfg["precision"] if cfg["precision"] != "auto" else recorded.get(
        "precision", AUTO_PRECISION[device.type == "cuda"])
    teacher_precision = cfg["loss"]["teacher_precision"]
    if teacher_precision == "auto":  # the teacher in bf16 when the student's trunk is
        teacher_precision = recorded.get("teacher_precision",
                                         "bf16" if precision in ("bf16", "bf16-mixed") else None)
    channels_last = cfg["channels_last"] if cfg["channels_last"] != "auto" else recorded.get(
        "channels_last", device.type == "cuda")
    return {"precision": precision, "teacher_precision": teacher_precision, "channels_last": channels_last}


def teacher_sigma_range(tcfg: Mapping[str, Any], *, load: bool = True
                        ) -> Optional[tuple[tuple[float, float], tuple[float, float]]]:
    """((PID's default sigma range, the teacher's own range)) of config['teacher'] without building
    the teacher's network: kinds 'network' and 'gaussian' from the config, a diffusers teacher from
    its scheduler (``load``), an 'edm' teacher by loading it (``load``); None when ``load`` is False
    and the teacher is read from a file. The rules are the teacher's (``Preconditioning.pid_sigma_range``,
    ``sigma_min``/``sigma_max``)."""
    kind = tcfg["kind"]
    if kind == "gaussian":
        stand_in = GaussianDenoiser(tcfg.get("mean", 0.0), tcfg.get("std", 0.5))
    elif kind == "network":  # the preconditioning's coefficients only
        stand_in = PRECONDITIONINGS[tcfg.get("precond", "edm")](lambda *a: None,
                                                                **dict(tcfg.get("precond_kwargs") or {}))
    elif not load:
        return None
    elif kind == "diffusers":
        _, scheduler_file = find_diffusers_parts(tcfg["path"], tcfg.get("scheduler"))
        trained = scheduler_sigma_range(load_diffusers_scheduler(scheduler_file))
        return trained, trained  # DiffusersDenoiser.pid_sigma_range: the trained range
    else:
        stand_in, _ = build_teacher(tcfg, torch.device("cpu"))
    return stand_in.pid_sigma_range(), (float(stand_in.sigma_min), float(stand_in.sigma_max))


# A configured end this close to the teacher's (relative) counts as inside: DDPM's smallest
# trained sigma is 0.0100013, and 0.01 is what users write.
SIGMA_RANGE_RTOL = 1e-3


def resolve_sigma_range(lcfg: dict, teacher: Any) -> tuple[float, float]:
    """config['loss']'s sigma range for ``teacher``, filled in place where null with the teacher's
    default (``pid_sigma_range``: a diffusers teacher's trained range, else EDM's 0.002 .. 80 within
    the teacher's), so that config.json and the checkpoints store it. A range outside the
    teacher's [sigma_min, sigma_max] is a ValueError naming both, or with loss.allow_extrapolation
    one warning."""
    default = teacher.pid_sigma_range() if hasattr(teacher, "pid_sigma_range") else (0.002, 80.0)
    for key, value in zip(("sigma_min", "sigma_max"), default):
        if lcfg[key] is None:
            lcfg[key] = float(value)
    check_grid(lcfg["N"], lcfg["sigma_min"], lcfg["sigma_max"], lcfg["rho"], where="config: loss.",
               num_points_name="N")
    low, high = float(getattr(teacher, "sigma_min", 0.0)), float(getattr(teacher, "sigma_max", math.inf))
    outside = []
    if lcfg["sigma_min"] < low * (1 - SIGMA_RANGE_RTOL):
        outside.append(f"loss.sigma_min={lcfg['sigma_min']:g} is below the teacher's smallest sigma {low:.6g}")
    if lcfg["sigma_max"] > high * (1 + SIGMA_RANGE_RTOL):
        outside.append(f"loss.sigma_max={lcfg['sigma_max']:g} is above the teacher's largest sigma {high:.6g}")
    if outside:
        what = (f"config: {' and '.join(outside)} (the teacher's range is [{low:.6g}, {high:.6g}]; there its time "
                f"label is clamped while the preconditioning uses the true sigma)")
        if not lcfg["allow_extrapolation"]:
            raise ValueError(f"{what}; set the range inside it (null: the teacher's own) or "
                             f"loss.allow_extrapolation=true to train there anyway")
        warnings.warn(f"{what}; training there anyway (loss.allow_extrapolation)", stacklevel=2)
    return float(lcfg["sigma_min"]), float(lcfg["sigma_max"])


def build_loss(lcfg: dict, teacher: Preconditioning, device: torch.device,
               teacher_precision: Optional[str]) -> PIDLoss:
    """The PID loss of config['loss'] (with its LPIPS network for norm 'lpips'); fills in and
    checks its sigma range first (``resolve_sigma_range``)."""
    resolve_sigma_range(lcfg, teacher)
    lpips = None
    if lcfg["norm"] == "lpips":
        from pid_fast.eval.lpips import LPIPSNorm

        lpips = LPIPSNorm(lcfg["lpips_weights"], net=lcfg["lpips_net"], resize=lcfg["lpips_resize"],
                          pooling=lcfg["lpips_pooling"], lin_weights=lcfg["lpips_lin_weights"]).to(device)
    return PIDLoss(teacher, N=lcfg["N"], sigma_min=lcfg["sigma_min"], sigma_max=lcfg["sigma_max"],
                   rho=lcfg["rho"], norm=lcfg["norm"], backend=lcfg["backend"], batched=lcfg["batched"],
                   huber_c=lcfg["huber_c"], lpips=lpips, teacher_precision=teacher_precision,
                   derivative=lcfg["derivative"], allow_stochastic_student=lcfg["allow_stochastic_student"])


def lr_scale_groups(named_parameters, lr_scale: Mapping[str, float], lr: float) -> list[dict]:
    """The optimizer's parameter groups for config['optimizer.lr_scale']: one group per factor
    (fnmatch patterns on the parameter names, the first match wins, unmatched parameters keep
    factor 1), each with ``lr_scale`` and ``lr`` = factor x lr. A pattern that matches no
    parameter raises (a misspelt name would otherwise train silently at the base lr)."""
    groups: dict[float, list] = {}
    used, names = set(), []
    for name, param in named_parameters:
        names.append(name)
        pattern = next((p for p in lr_scale if fnmatch.fnmatchcase(name, p)), None)
        used.add(pattern)
        groups.setdefault(1.0 if pattern is None else float(lr_scale[pattern]), []).append(param)
    unused = [p for p in lr_scale if p not in used]
    if unused:
        raise ValueError(f"config['optimizer.lr_scale']: no student parameter matches {unused} "
                         f"(the student's parameters are named like {names[:3]})")
    return [{"params": params, "lr_scale": scale, "lr": lr * scale} for scale, params in groups.items()]


def build_optimizer(params, ocfg: Mapping[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """RAdam or Adam as in config['optimizer']; ``params`` an iterable of parameters, or of
    (name, parameter) pairs (then optimizer.lr_scale's groups apply)."""
    params = list(params)
    if params and isinstance(params[0], tuple):
        params = lr_scale_groups(params, ocfg.get("lr_scale") or {}, ocfg["lr"])
    kwargs = dict(lr=ocfg["lr"], betas=tuple(ocfg["betas"]), eps=ocfg["eps"], weight_decay=ocfg["weight_decay"])
    if ocfg["name"] == "radam":  # (no fused RAdam; torch picks the foreach version on CUDA)
        return torch.optim.RAdam(params, **kwargs)
    return torch.optim.Adam(params, fused=device.type == "cuda", **kwargs)


# --------------------------------------------------------------------------------------------
# The student's noise labels and sampling metadata


def noise_rule(teacher: Preconditioning) -> dict:
    """How the student's c_noise(t) is computed (the teacher's rule), as a JSON-able dict."""
    teacher = unguided(teacher)
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

"""The PID trainer: config, teacher/student construction, the training loop with EMA,
gradient accumulation, bf16 autocast, DDP, atomic checkpoints and resume, and sampling from
a checkpoint. ``pid-fast distill`` / ``pid-fast sample`` (train_cli.py) are thin wrappers.

Determinism. The random inputs of step s (the noise z, the grid indices i and the class
labels of the whole global batch) are drawn from a generator seeded with (seed, s), and each
rank / accumulation round takes its slice of them. Hence
- a resumed run sees exactly the inputs the uninterrupted run would have seen, and with the
  model, EMAs, optimizer and RNG states restored from the checkpoint it ends with
  bit-identical parameters on the CPU;
- W processes with accumulation A compute the gradient of the same global batch as one
  process (up to the summation order of the all-reduce).

Host syncs. The loop never reads the loss on every step: losses and the first non-finite
step are accumulated on the device and read every ``log_every`` steps and before every
checkpoint, so a checkpoint is only written after the check passed.

Checkpoints (``checkpoint-<step>.pt`` in the run folder) are written to a temporary file,
fsync'ed and renamed over the final name (atomic on POSIX), so a kill at any moment leaves
every ``checkpoint-*.pt`` complete; resume picks the newest one that loads.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import math
import os
import random
import re
import socket
import time
import warnings
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from pid_fast.loss import TEACHER_PRECISIONS, PIDLoss
from pid_fast.models.networks import build_network, network_config
from pid_fast.models.preconditioning import (PRECONDITIONINGS, DirectDenoiser, EDMPrecond, GaussianDenoiser,
                                      Preconditioning, VEPrecond, VPPrecond, build_denoiser)
from pid_fast.io.atomic import atomic_write
from pid_fast.train.ema import EMA
from pid_fast.eval.images import save_image_grid, save_images, to_uint8  # noqa: F401  (re-exported)
from pid_fast.sampling import seeded_latents, student_sample

__all__ = [
    "DEFAULT_CONFIG", "NonFiniteLossError", "EMA", "load_config", "apply_overrides", "resolve_config",
    "build_teacher", "build_student", "train", "train_local_ddp", "atomic_save", "list_checkpoints", "load_latest_checkpoint",
    "load_student", "generate", "save_image_grid", "save_images",
]

CHECKPOINT_FORMAT = "pid_fast.train/1"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)\.pt$")

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "device": "auto",                # auto | cpu | cuda
    # kind "edm": {"path": converted .safetensors or EDM .pkl, "key": "ema"}
    # kind "network": a freshly initialised network {"network", "precond", "seed", "use_fp16"}
    # kind "gaussian": the exact denoiser of N(mean, std^2) {"mean", "std", "label_dim"}
    "teacher": {"kind": "network", "network": "tiny-ddpmpp", "precond": "edm", "seed": 0, "use_fp16": False},
    # init "teacher": a copy of the teacher's network (PID); "random": fresh weights (seed).
    # network null: the teacher's architecture.
    "student": {"init": "teacher", "network": None, "dropout": 0.0, "seed": 1},
    "loss": {"N": 250, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "norm": "l2", "huber_c": None,
             "lpips_weights": None, "lpips_net": "vgg", "lpips_resize": 224, "backend": None, "batched": True,
             # auto: bf16 autocast when the student runs in bf16, else the teacher's own dtype;
             # null: the teacher's own dtype; fp32 | bf16 (see PIDLoss)
             "teacher_precision": "auto"},
    "optimizer": {"name": "radam", "lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    "ema_rates": [0.999, 0.9999, 0.99995],
    "batch_size": 512,               # global batch (all ranks and accumulation rounds)
    "accum": 1,                      # gradient accumulation rounds per step
    "precision": "auto",             # fp32 | bf16 (autocast of the student) | auto: bf16 on CUDA, fp32 on CPU
    "channels_last": "auto",         # true | false | auto: true on CUDA (networks and teacher)
    "compile": False,                # torch.compile the step's forward: false | true (inductor) | a backend name
    "clip_grad_norm": None,
    "total_steps": 800000,
    "log_every": 100,
    "checkpoint_every": 5000,
    "keep_checkpoints": 2,           # newest checkpoints kept (0: all)
    "snapshot_every": 5000,          # PNG grid of one-step samples from fixed noise (0: never)
    "snapshot_num": 64,
    "progress": True,
}

# Keys that may change when a run is resumed; every other difference is refused.
RESUMABLE_CHANGES = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "snapshot_every",
                     "snapshot_num", "progress", "device", "channels_last", "compile")

_TEACHER_KEYS = {"edm": {"kind", "path", "key"},
                 "network": {"kind", "network", "precond", "seed", "use_fp16", "precond_kwargs"},
                 "gaussian": {"kind", "mean", "std", "label_dim"}}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing a checkpoint."""

    def __init__(self, step: int, value: float, last_checkpoint: Optional[str]):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                else "no checkpoint had been written yet")
        super().__init__(f"non-finite loss ({value}) at step {step}: training stopped; {kept}. Lower the "
                         f"learning rate, enable clip_grad_norm or use precision='fp32', then resume.")


# ============================================================================================
# Config


def load_config(path: str | os.PathLike) -> dict:
    """A config file (.json, or .yaml/.yml when PyYAML is installed) as a dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no such file: {path!r}")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"config: {path!r} is YAML but PyYAML is not installed; pip install pyyaml "
                             f"or use a .json config") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {path!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: Mapping[str, Any], overrides) -> dict:
    """``config`` with overrides applied: a mapping of dotted keys, or "a.b=value" strings
    (value parsed as JSON when it parses, else kept as a string)."""
    config = copy.deepcopy(dict(config))
    items = overrides.items() if isinstance(overrides, Mapping) else []
    if not isinstance(overrides, Mapping):
        parsed = []
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"override {item!r} must have the form key=value (e.g. optimizer.lr=1e-4)")
            key, value = item.split("=", 1)
            parsed.append((key.strip(), _parse_value(value.strip())))
        items = parsed
    for key, value in items:
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return config


def _merge(defaults: Mapping, user: Mapping, where: str) -> dict:
    out = copy.deepcopy(dict(defaults))
    for key, value in user.items():
        if isinstance(key, str) and key.startswith("_"):
            continue  # "_comment" and the like
        if key not in defaults:
            raise ValueError(f"config: unknown key {where + key!r}; known keys: {sorted(defaults)}")
        if key == "teacher":
            out[key] = copy.deepcopy(value)  # replaced whole: its keys depend on its kind
        elif isinstance(defaults[key], dict) and isinstance(value, Mapping):
            out[key] = _merge(defaults[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"config[{key!r}] must be {expected}, got {value!r}")


def _int(cfg, key, minimum, where=""):
    v = cfg[key]
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, where + key,
          f"an int >= {minimum}", v)


def _pos(cfg, key, where="", allow_none=False, allow_zero=False):
    v = cfg[key]
    if allow_none and v is None:
        return
    ok = _is_num(v) and (v >= 0 if allow_zero else v > 0)
    _need(ok, where + key, ("a non-negative" if allow_zero else "a positive") + " number"
          + (" or null" if allow_none else ""), v)


def resolve_config(config: Optional[Mapping[str, Any]] = None) -> dict:
    """The full, validated config: ``config`` over DEFAULT_CONFIG. Raises ValueError naming
    the key for an unknown key or a bad value."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    cfg = _merge(DEFAULT_CONFIG, config or {}, "")
    _int(cfg, "seed", 0)
    _need(cfg["device"] in ("auto", "cpu", "cuda"), "device", "'auto', 'cpu' or 'cuda'", cfg["device"])
    for key in ("batch_size", "accum", "total_steps", "log_every", "checkpoint_every", "snapshot_num"):
        _int(cfg, key, 1)
    _int(cfg, "keep_checkpoints", 0)
    _int(cfg, "snapshot_every", 0)
    _need(cfg["precision"] in ("auto", "fp32", "bf16"), "precision", "'auto', 'fp32' or 'bf16'", cfg["precision"])
    _need(cfg["channels_last"] in ("auto", True, False), "channels_last", "true, false or 'auto'",
          cfg["channels_last"])
    _need(isinstance(cfg["compile"], (bool, str)) and cfg["compile"] != "", "compile",
          "false, true or a torch.compile backend name (e.g. 'inductor', 'aot_eager')", cfg["compile"])
    _pos(cfg, "clip_grad_norm", allow_none=True)
    _need(isinstance(cfg["progress"], bool), "progress", "a bool", cfg["progress"])
    rates = cfg["ema_rates"]
    _need(isinstance(rates, list) and all(_is_num(r) and 0 < r < 1 for r in rates)
          and len(set(rates)) == len(rates), "ema_rates", "a list of distinct numbers in (0, 1)", rates)

    opt = cfg["optimizer"]
    _need(opt["name"] in ("radam", "adam"), "optimizer.name", "'radam' or 'adam'", opt["name"])
    _pos(opt, "lr", "optimizer.")
    _pos(opt, "eps", "optimizer.")
    _pos(opt, "weight_decay", "optimizer.", allow_zero=True)
    b = opt["betas"]
    _need(isinstance(b, (list, tuple)) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b),
          "optimizer.betas", "two numbers in [0, 1)", b)

    loss = cfg["loss"]
    _int(loss, "N", 2, "loss.")
    for key in ("sigma_min", "sigma_max", "rho"):
        _pos(loss, key, "loss.")
    _need(loss["sigma_min"] < loss["sigma_max"], "loss.sigma_min", "smaller than loss.sigma_max",
          loss["sigma_min"])
    _need(loss["norm"] in ("l2", "l1", "huber", "lpips"), "loss.norm", "'l2', 'l1', 'huber' or 'lpips'",
          loss["norm"])
    if loss["norm"] == "huber":
        _pos(loss, "huber_c", "loss.")
    else:
        _need(loss["huber_c"] is None, "loss.huber_c", "null unless loss.norm is 'huber'", loss["huber_c"])
    if loss["norm"] == "lpips":
        _need(isinstance(loss["lpips_weights"], str), "loss.lpips_weights",
              "the path of the LPIPS backbone weights (norm 'lpips')", loss["lpips_weights"])
    _need(loss["backend"] in (None, "reference", "cpu", "cuda", "triton"), "loss.backend",
          "null, 'reference', 'cpu', 'cuda' or 'triton'", loss["backend"])
    _need(isinstance(loss["batched"], bool), "loss.batched", "a bool", loss["batched"])
    _need(loss["teacher_precision"] in ("auto", *TEACHER_PRECISIONS), "loss.teacher_precision",
          "'auto', null, 'fp32' or 'bf16'", loss["teacher_precision"])

    teacher = cfg["teacher"]
    _need(isinstance(teacher, dict) and teacher.get("kind") in _TEACHER_KEYS, "teacher.kind",
          f"one of {sorted(_TEACHER_KEYS)}", teacher.get("kind") if isinstance(teacher, dict) else teacher)
    extra = set(teacher) - _TEACHER_KEYS[teacher["kind"]]
    if extra:
        raise ValueError(f"config: unknown key(s) {sorted('teacher.' + k for k in extra)} for teacher kind "
                         f"{teacher['kind']!r}; known: {sorted(_TEACHER_KEYS[teacher['kind']])}")
    if teacher["kind"] == "edm":
        _need(isinstance(teacher.get("path"), str), "teacher.path", "the path of the teacher checkpoint",
              teacher.get("path"))
    elif teacher["kind"] == "network":
        _need(teacher.get("precond", "edm") in PRECONDITIONINGS, "teacher.precond",
              f"one of {sorted(PRECONDITIONINGS)}", teacher.get("precond"))
        _need(teacher.get("network") is not None, "teacher.network", "a network name or config", None)
    student = cfg["student"]
    _need(student["init"] in ("teacher", "random"), "student.init", "'teacher' or 'random'", student["init"])
    _pos(student, "dropout", "student.", allow_none=True, allow_zero=True)
    _int(student, "seed", 0, "student.")
    if teacher["kind"] == "gaussian":
        _need(student["network"] is not None, "student.network",
              "a network name or config (the gaussian teacher has no network)", None)
        _need(student["init"] == "random", "student.init", "'random' with a gaussian teacher", student["init"])
    return cfg


def _network_spec(spec: Any, key: str) -> dict:
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


# ============================================================================================
# Teacher, student, EMA


def build_teacher(tcfg: Mapping[str, Any], device: torch.device) -> tuple[Preconditioning, Optional[dict]]:
    """(frozen teacher, its network config or None) from config['teacher']."""
    kind = tcfg["kind"]
    if kind == "gaussian":
        teacher = GaussianDenoiser(tcfg.get("mean", 0.0), tcfg.get("std", 0.5), label_dim=int(tcfg.get("label_dim", 0)))
        return teacher.to(device).eval().requires_grad_(False), None
    if kind == "edm":
        from pid_fast.io.edm_checkpoint import load_checkpoint, read_edm_checkpoint

        path = tcfg["path"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher.path: no such file: {path!r} (an EDM .pkl or a file written "
                                    f"by `pid-fast convert`)")
        if path.endswith(".pkl"):
            ckpt = read_edm_checkpoint(path, key=tcfg.get("key", "ema"))
            state_dict, config = ckpt.state_dict, ckpt.config
        else:
            state_dict, config = load_checkpoint(path)
        teacher = build_denoiser(config)
        teacher.model.load_state_dict(state_dict, strict=True)
        return teacher.to(device).eval().requires_grad_(False), dict(config["network"])
    net_cfg = _network_spec(tcfg["network"], "teacher.network")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tcfg.get("seed", 0)))
        model = build_network(net_cfg)
    precond = PRECONDITIONINGS[tcfg.get("precond", "edm")]
    teacher = precond(model, label_dim=int(net_cfg.get("label_dim", 0)), use_fp16=bool(tcfg.get("use_fp16", False)),
                      **dict(tcfg.get("precond_kwargs") or {}))
    return teacher.to(device).eval().requires_grad_(False), net_cfg


def build_student(scfg: Mapping[str, Any], teacher: Preconditioning, teacher_net: Optional[dict],
                  device: torch.device) -> tuple[nn.Module, dict]:
    """(student raw network in train mode, its network config)."""
    if scfg["network"] is not None:
        net_cfg = _network_spec(scfg["network"], "student.network")
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
        net = build_network(net_cfg)
    if scfg["init"] == "teacher":
        from pid_fast.io.edm_checkpoint import init_student_from_teacher

        if not isinstance(getattr(teacher, "model", None), nn.Module):
            raise ValueError("config['student.init'] is 'teacher' but the teacher has no network to copy")
        init_student_from_teacher(net, teacher.model)
    return net.to(device).train().requires_grad_(True), net_cfg


def _noise_rule(teacher: Preconditioning) -> dict:
    """How the student's c_noise(t) is computed (the teacher's rule), as a JSON-able dict."""
    if isinstance(teacher, VPPrecond):
        return {"precond": "vp", "beta_d": teacher.beta_d, "beta_min": teacher.beta_min, "M": teacher.M,
                "epsilon_t": teacher.epsilon_t}
    if isinstance(teacher, VEPrecond):
        return {"precond": "ve"}
    if isinstance(teacher, (EDMPrecond, DirectDenoiser)):
        return {"precond": "edm"}
    raise ValueError(f"cannot record the noise-label rule of a {type(teacher).__name__} teacher")


def _noise_labels(rule: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    kwargs = {k: v for k, v in rule.items() if k != "precond"}
    coef = PRECONDITIONINGS[rule["precond"]](lambda *a: None, **kwargs)  # coefficients only
    return lambda t: coef.coefficients(t).c_noise


def _make_optimizer(params, ocfg, device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=ocfg["lr"], betas=tuple(ocfg["betas"]), eps=ocfg["eps"], weight_decay=ocfg["weight_decay"])
    if ocfg["name"] == "radam":  # (no fused RAdam; torch picks the foreach version on CUDA)
        return torch.optim.RAdam(params, **kw)
    return torch.optim.Adam(params, fused=device.type == "cuda", **kw)


def resolve_precision(cfg: Mapping[str, Any], device: torch.device) -> dict:
    """The 'auto' settings made concrete for ``device``: {'precision', 'teacher_precision',
    'channels_last'}."""
    precision = cfg["precision"] if cfg["precision"] != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    tp = cfg["loss"]["teacher_precision"]
    if tp == "auto":
        tp = "bf16" if precision == "bf16" else None
    cl = cfg["channels_last"] if cfg["channels_last"] != "auto" else device.type == "cuda"
    return {"precision": precision, "teacher_precision": tp, "channels_last": cl}


def _make_loss(lcfg: Mapping[str, Any], teacher: Preconditioning, device: torch.device,
               teacher_precision: Optional[str]) -> PIDLoss:
    lpips = None
    if lcfg["norm"] == "lpips":
        from pid_fast.eval.lpips import LPIPSNorm

        lpips = LPIPSNorm(lcfg["lpips_weights"], net=lcfg["lpips_net"], resize=lcfg["lpips_resize"]).to(device)
    return PIDLoss(teacher, N=lcfg["N"], sigma_min=lcfg["sigma_min"], sigma_max=lcfg["sigma_max"],
                   rho=lcfg["rho"], norm=lcfg["norm"], backend=lcfg["backend"], batched=lcfg["batched"],
                   huber_c=lcfg["huber_c"], lpips=lpips, teacher_precision=teacher_precision)


# ============================================================================================
# RNG states and checkpoints


def _rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``:
    ``path`` is either the old complete file or the new complete file, never a partial one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints in ``run_dir``, newest first (temporary files excluded)."""
    out = []
    for path in glob.glob(os.path.join(os.fspath(run_dir), "checkpoint-*.pt")):
        m = CHECKPOINT_RE.search(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out, reverse=True)


def _load(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a pid_fast training checkpoint")
    return state


def load_latest_checkpoint(run_dir: str | os.PathLike) -> Optional[tuple[str, dict]]:
    """(path, state) of the newest checkpoint of ``run_dir`` that loads, or None."""
    for _, path in list_checkpoints(run_dir):
        try:
            return path, _load(path)
        except Exception as exc:  # a damaged file (e.g. disk full): fall back to the previous one
            warnings.warn(f"skipping unreadable checkpoint {path}: {exc}")
    return None


def _checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"checkpoint-{step:09d}.pt")


# ============================================================================================
# Distributed setup


def _dist_context(device_cfg: str):
    """(rank, world_size, device, initialized_here) for this process (torchrun sets the env)."""
    initialized_here = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        use_cuda = device_cfg != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        initialized_here = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_cfg == "cuda" and not torch.cuda.is_available():
        raise ValueError("config['device'] is 'cuda' but CUDA is not available")
    if device_cfg != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device, initialized_here


def _step_seed(seed: int, step: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def _draw_inputs(gen: torch.Generator, seed: int, G: int, shape, N: int, label_dim: int, device):
    """The random inputs of one step for the whole global batch: latents z ~ N(0, I), grid
    indices i ~ UniformInt{0..N-1} and uniform one-hot class labels (None if unconditional)."""
    gen.manual_seed(seed)
    z = torch.randn((G, *shape), generator=gen, device=device)
    idx = torch.randint(0, N, (G,), generator=gen, device=device)
    labels = None
    if label_dim:
        labels = F.one_hot(torch.randint(0, label_dim, (G,), generator=gen, device=device), label_dim).float()
    return z, idx, labels


# ============================================================================================
# Training


def _resume_config(stored: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict:
    diffs = [k for k in cfg if k not in RESUMABLE_CHANGES and cfg[k] != stored.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {stored.get(k)!r} (checkpoint) vs {cfg[k]!r} (now)" for k in diffs)
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {detail}. Only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change on resume.")
    return dict(cfg)


def train(config: Optional[Mapping[str, Any]], run_dir: str | os.PathLike, *, resume: bool = False,
          teacher: Optional[Preconditioning] = None) -> dict:
    """Run PID distillation as configured (see DEFAULT_CONFIG) in ``run_dir``.

    resume: continue from the newest checkpoint of ``run_dir`` (a fresh start when there is
    none). teacher: a teacher object to use instead of building config['teacher'] (the config
    still describes the student). Under torchrun (WORLD_SIZE > 1) or an initialised process
    group, trains with DDP. Returns a summary dict (step, loss, images_per_s, checkpoint).
    Raises NonFiniteLossError when the loss stops being finite.
    """
    cfg = resolve_config(config)
    run_dir = os.fspath(run_dir)
    rank, world, device, initialized_here = _dist_context(cfg["device"])
    denormals = device.type == "cpu" and torch.set_flush_denormal(True)  # denormals slow CPUs ~10x
    try:
        return _train(cfg, run_dir, resume, teacher, rank, world, device)
    finally:
        if denormals:
            torch.set_flush_denormal(False)
        if initialized_here:
            dist.destroy_process_group()


def _train(cfg, run_dir, resume, teacher_obj, rank, world, device) -> dict:
    G, A = cfg["batch_size"], cfg["accum"]
    if G % (world * A):
        raise ValueError(f"config['batch_size'] ({G}) must be divisible by world_size x accum "
                         f"({world} x {A})")
    m = G // (world * A)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(run_dir, "checkpoint-*.pt.tmp-*")):
            with contextlib.suppress(OSError):
                os.remove(stale)  # left by a killed run; never a valid checkpoint
    if world > 1:
        dist.barrier()

    ckpt_path, ckpt = None, None
    if resume:
        found = load_latest_checkpoint(run_dir)
        if found is not None:
            ckpt_path, ckpt = found
            cfg = _resume_config(ckpt["config"], cfg)

    # Networks, loss, optimizer, EMA.
    if teacher_obj is not None:  # config['teacher'] then only describes the architecture
        teacher = teacher_obj.to(device).eval().requires_grad_(False)
        tcfg = cfg["teacher"]
        teacher_net = _network_spec(tcfg["network"], "teacher.network") if tcfg["kind"] == "network" else None
    else:
        teacher, teacher_net = build_teacher(cfg["teacher"], device)
    net, net_cfg = build_student(cfg["student"], teacher, teacher_net, device)
    modes = resolve_precision(cfg, device)
    if modes["channels_last"]:  # (the fused ops take any layout; convolutions prefer NHWC)
        net = net.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    loss_fn = _make_loss(cfg["loss"], teacher, device, modes["teacher_precision"])
    opt = _make_optimizer(net.parameters(), cfg["optimizer"], device)
    ema = EMA(net, cfg["ema_rates"])
    L = cfg["loss"]
    label_dim = int(getattr(teacher, "label_dim", 0))
    shape = (int(net_cfg["in_channels"]), int(net_cfg["img_resolution"]), int(net_cfg["img_resolution"]))
    student_meta = {"network": net_cfg, "noise_rule": _noise_rule(teacher), "label_dim": label_dim,
                    "shape": list(shape), "sigma_min": L["sigma_min"], "sigma_max": L["sigma_max"],
                    "sigma_data": loss_fn.sigma_data}

    step = 0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = int(ckpt["step"])
        states = ckpt["rng"]
        _set_rng_state(states[rank] if rank < len(states) else states[0], device)
    else:
        torch.manual_seed(cfg["seed"] + rank)
        np.random.seed((cfg["seed"] + rank) % (1 << 32))
        random.seed(cfg["seed"] + rank)
    last_ckpt = ckpt_path
    del ckpt

    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    T = float(L["sigma_max"])

    def loss_forward(z_sl, labels_sl, idx_sl):
        return loss_fn(model, z_sl * T, labels_sl, indices=idx_sl)

    if cfg["compile"] is not False:
        backend = "inductor" if cfg["compile"] is True else cfg["compile"]
        if world > 1:  # DDP's bucketing needs the compiled frame to be its own module
            model = torch.compile(model, backend=backend)
        else:  # the whole forward: student pass, fused ops and the teacher in one graph
            loss_forward = torch.compile(loss_forward, backend=backend)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if modes["precision"] == "bf16" \
        else contextlib.nullcontext

    log_path = os.path.join(run_dir, "log.jsonl")
    if rank == 0:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    # Fixed noise for the snapshots (per-seed generators: independent of the training RNG).
    snap_z, snap_labels = seeded_latents(range(cfg["snapshot_num"]), shape, label_dim, device=device)

    def snapshot(at_step: int) -> None:
        if rank != 0 or not cfg["snapshot_every"]:
            return
        net.eval()
        with torch.no_grad():
            x = student_sample(net, snap_z, snap_labels, sigma_min=L["sigma_min"], sigma_max=L["sigma_max"],
                               sigma_data=loss_fn.sigma_data, noise_labels=loss_fn.noise_labels)
        net.train()
        if x.shape[1] in (1, 3):
            save_image_grid(x, os.path.join(run_dir, f"samples-{at_step:09d}.png"))

    def save(at_step: int) -> str:
        states = [_rng_state(device)]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, _rng_state(device))
        path = _checkpoint_path(run_dir, at_step)
        if rank == 0:
            atomic_save({"format": CHECKPOINT_FORMAT, "step": at_step, "config": cfg, "world_size": world,
                         "student": student_meta, "model": net.state_dict(), "ema": ema.state_dict(),
                         "optimizer": opt.state_dict(), "rng": states}, path)
            keep = cfg["keep_checkpoints"]
            for _, old in list_checkpoints(run_dir)[keep:] if keep else []:
                with contextlib.suppress(OSError):
                    os.remove(old)
        return path

    from tqdm import tqdm

    bar = tqdm(total=cfg["total_steps"], initial=step, unit="step", dynamic_ncols=True,
               disable=not cfg["progress"] or rank != 0, desc="pid distill")
    if step == 0 and ckpt_path is None:
        snapshot(0)
    # Device-side accumulators, read only at sync points (no per-step host sync).
    NO_BAD = 1 << 62
    first_bad = torch.full((), NO_BAD, dtype=torch.int64, device=device)
    bad_value = torch.zeros((), dtype=torch.float32, device=device)
    step_dev = torch.full((), step, dtype=torch.int64, device=device)
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_steps, window_t0 = 0, time.perf_counter()
    gen = torch.Generator(device)
    last = {"loss": None, "images_per_s": None}
    log_every, ckpt_every, snap_every = cfg["log_every"], cfg["checkpoint_every"], cfg["snapshot_every"]

    while step < cfg["total_steps"]:
        z, idx, labels = _draw_inputs(gen, _step_seed(cfg["seed"], step), G, shape, L["N"], label_dim, device)
        step_loss = torch.zeros((), dtype=torch.float32, device=device)
        for a in range(A):
            sl = slice((a * world + rank) * m, (a * world + rank + 1) * m)
            no_sync = model.no_sync() if world > 1 and a < A - 1 else contextlib.nullcontext()
            with no_sync:
                with autocast():
                    loss = loss_forward(z[sl], None if labels is None else labels[sl], idx[sl])
                (loss / A).backward()
            step_loss += loss.detach().float() / A
        if cfg["clip_grad_norm"] is not None:
            nn.utils.clip_grad_norm_(net.parameters(), cfg["clip_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(net)
        step += 1
        step_dev += 1
        is_bad = ~torch.isfinite(step_loss) & (first_bad == NO_BAD)
        first_bad = torch.where(is_bad, step_dev, first_bad)
        bad_value = torch.where(is_bad, step_loss, bad_value)
        window_loss += step_loss
        window_steps += 1
        bar.update(1)

        final = step == cfg["total_steps"]
        do_ckpt = step % ckpt_every == 0 or final
        if step % log_every == 0 or do_ckpt:
            # Sync point: the window's mean loss over ranks and the first non-finite step.
            stats = torch.stack([window_loss, bad_value.double()])
            bad = first_bad.clone()
            if world > 1:
                dist.all_reduce(stats)
                dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad_step = int(bad)
            if bad_step != NO_BAD:
                bar.close()
                if rank == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": bad_step, "event": "non-finite loss",
                                            "last_checkpoint": last_ckpt}) + "\n")
                raise NonFiniteLossError(bad_step, float(stats[1]), last_ckpt)
            elapsed = time.perf_counter() - window_t0
            mean_loss = float(stats[0]) / (window_steps * world)
            ips = window_steps * G / max(elapsed, 1e-9)
            last = {"loss": mean_loss, "images_per_s": ips}
            bar.set_postfix(loss=f"{mean_loss:.4g}", img_s=f"{ips:.1f}")
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": mean_loss, "images_per_s": ips,
                                        "lr": opt.param_groups[0]["lr"], "time": time.time()}) + "\n")
            if do_ckpt:
                last_ckpt = save(step)
            if snap_every and (step % snap_every == 0 or final):
                snapshot(step)
            window_loss.zero_()
            window_steps, window_t0 = 0, time.perf_counter()
        elif snap_every and step % snap_every == 0:
            snapshot(step)
    bar.close()
    if world > 1:
        dist.barrier()
    return {"step": step, "loss": last["loss"], "images_per_s": last["images_per_s"], "checkpoint": last_ckpt,
            "run_dir": run_dir}


# ============================================================================================
# Local multi-process (CPU / gloo) launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, config: dict, run_dir: str, resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(config, run_dir, resume=resume)


def train_local_ddp(config: Mapping[str, Any], run_dir: str | os.PathLike, world_size: int = 2,
                    resume: bool = False) -> None:
    """Run ``train`` in ``world_size`` local processes (gloo on the CPU, NCCL on GPUs): a
    stand-in for torchrun, used by the tests."""
    import torch.multiprocessing as mp

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    mp.spawn(_ddp_worker, args=(world_size, _free_port(), dict(config), os.fspath(run_dir), resume),
             nprocs=world_size, join=True)


# ============================================================================================
# Sampling from a checkpoint


def load_student(checkpoint: str | os.PathLike, weights: str = "model",
                 device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(student network in eval mode, metadata) from a training checkpoint file or run folder.
    weights: "model" (the trained weights), "ema" (the slowest EMA) or "ema-<rate>"."""
    checkpoint = os.fspath(checkpoint)
    if os.path.isdir(checkpoint):
        found = load_latest_checkpoint(checkpoint)
        if found is None:
            raise FileNotFoundError(f"checkpoint: no checkpoint-*.pt in folder {checkpoint!r}")
        checkpoint, state = found
    elif os.path.isfile(checkpoint):
        state = _load(checkpoint)
    else:
        raise FileNotFoundError(f"checkpoint: no such file or folder: {checkpoint!r}")
    meta = dict(state["student"], step=state["step"], path=checkpoint)
    if weights == "model":
        sd = state["model"]
    elif weights == "ema" or weights.startswith("ema-"):
        emas = state["ema"]
        key = max(emas, key=float) if weights == "ema" else weights[4:]
        if key not in emas:
            matches = [k for k in emas if float(k) == float(key)] if _parse_float(key) is not None else []
            if not matches:
                raise ValueError(f"weights: no EMA with rate {key!r} in {checkpoint} (has {sorted(emas)})")
            key = matches[0]
        sd = emas[key]
    else:
        raise ValueError(f"weights must be 'model', 'ema' or 'ema-<rate>', got {weights!r}")
    net = build_network(meta["network"])
    net.load_state_dict(sd)
    return net.to(device).eval().requires_grad_(False), meta


def _parse_float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


@torch.no_grad()
def generate(net: nn.Module, meta: Mapping[str, Any], seeds, batch: int = 64, device="cpu",
             class_label: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One-step samples (B, C, H, W) in [-1, 1] on the CPU for the given seeds (the latents and
    class labels of seed k depend only on k), and the integer class labels (or None)."""
    seeds = list(seeds)
    label_dim = int(meta["label_dim"])
    if class_label is not None and not (label_dim and 0 <= class_label < label_dim):
        raise ValueError(f"class_label must be in [0, {label_dim}) for this student, got {class_label!r}")
    noise_labels = _noise_labels(meta["noise_rule"])
    xs, ls = [], []
    for k in range(0, len(seeds), batch):
        z, labels = seeded_latents(seeds[k:k + batch], meta["shape"], label_dim, device=device)
        if labels is not None and class_label is not None:
            labels = F.one_hot(torch.full((z.shape[0],), class_label, device=device), label_dim).float()
        x = student_sample(net, z, labels, sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"],
                           sigma_data=meta["sigma_data"], noise_labels=noise_labels)
        xs.append(x.float().cpu())
        if labels is not None:
            ls.append(labels.argmax(1).cpu())
    return torch.cat(xs), (torch.cat(ls) if ls else None)

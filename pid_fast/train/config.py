"""The trainer's config: the defaults, a file and ``--set`` overrides over them, and validation.

A config is a plain dict (the checkpoint stores it, ``config.json`` shows it); ``resolve_config``
merges it over DEFAULT_CONFIG and checks every value through pid_fast/checks.py, naming the key.
"""

from __future__ import annotations

import copy
import math
import json
import os
from typing import Any, Mapping, Optional

from pid_fast.models.precision import PRECISION_MODES
from pid_fast.checks import LOSS_NORMS, check_choice, check_grid, check_int, check_norm, check_positive, is_number
from pid_fast.loss import DERIVATIVES, TEACHER_PRECISIONS
from pid_fast.models.diffusers_adapter import PREDICTION_TYPES, TIMESTEP_ROUNDINGS
from pid_fast.models.preconditioning import PRECONDITIONINGS
from pid_fast.train.schedules import GRID_SAMPLINGS, GRID_WEIGHTINGS, LR_SCHEDULES, check_coarse_to_fine

__all__ = ["DEFAULT_CONFIG", "RESUMABLE_CHANGES", "TEACHER_KEYS", "load_config", "apply_overrides",
           "resolve_config", "check_resume_config"]

DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "device": "auto",                # auto | cpu | cuda
    # kind "edm": {"path": converted .safetensors or EDM .pkl, "key": "ema"}
    # kind "network": a freshly initialised network {"network", "precond", "seed", "use_fp16"}
    # kind "gaussian": the exact denoiser of N(mean, std^2) {"mean", "std", "label_dim"}
    # kind "diffusers": a local save_pretrained folder {"path", "scheduler", "prediction_type",
    #   "timestep_rounding"} (pid_fast.io.diffusers_io; configs/diffusers-ddpm-cifar10.json); a
    #   text-to-image pipeline folder also takes "prompts": a .txt (one per line) / .jsonl / .parquet
    #   file whose embeddings are cached in the run folder (pid_fast.train.prompts)
    "teacher": {"kind": "network", "network": "tiny-ddpmpp", "precond": "edm", "seed": 0, "use_fp16": False},
    # init "teacher": a copy of the teacher's network (PID); "random": fresh weights (seed).
    # network null: the teacher's architecture.
    "student": {"init": "teacher", "network": None, "dropout": 0.0, "seed": 1},
    # sigma_min / sigma_max: the PID grid's range; null: the teacher's own (a diffusers teacher's
    # trained range, e.g. 0.0100 .. 157.4 for DDPM's linear schedule; EDM's 0.002 .. 80 within what
    # other teachers declare), filled in when the teacher is known and stored in config.json and the
    # checkpoints. A range outside the teacher's is an error unless allow_extrapolation (then a warning).
    "loss": {"N": 250, "sigma_min": None, "sigma_max": None, "allow_extrapolation": False, "rho": 7.0,
             "norm": "l2", "huber_c": None,
             "lpips_weights": None, "lpips_net": "vgg", "lpips_resize": 224,
             # LPIPS pooling: null = "avg" for vgg (the reference's, piq's replace_pooling=True), "max"
             # for alex/squeeze; lpips_lin_weights: the linear heads file (null: the lpips package's)
             "lpips_pooling": None, "lpips_lin_weights": None,
             # the student's time derivative: "fd" (two evaluations, the reference) | "jvp"
             # (one evaluation and its forward-mode derivative in c_noise; pid_fast.loss.derivative)
             "derivative": "fd", "backend": None, "batched": True,
             # train-mode randomness in the student (student.dropout > 0): the t and t2 evaluations
             # get different masks, so PIDLoss refuses it unless this is true (pid_fast.loss.student)
             "allow_stochastic_student": False,
             # auto: bf16 autocast when the student runs in bf16, else the teacher's own dtype;
             # null: the teacher's own dtype; fp32 | bf16 (see PIDLoss)
             "teacher_precision": "auto"},
    # lr_scale: per-parameter-group learning rates, {"name pattern": factor} (fnmatch on the student's
    # parameter names, e.g. {"map_*": 3.0}; the first matching pattern wins, the rest keep 1; a
    # pattern that matches no parameter is an error): the group's lr is factor x the schedule's
    "optimizer": {"name": "radam", "lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                  "lr_scale": {}},
    # the learning rate over training (pid_fast.train.schedules): optimizer.lr after a linear warm-up
    # over warmup_steps, then "constant" (the reference), "inv_sqrt" (EDM2: / sqrt(max(step / decay_steps, 1)))
    # or "cosine" (to 0 at decay_steps); it may change on resume (the lr is a function of the step only)
    "lr_schedule": {"warmup_steps": 0, "decay": "constant", "decay_steps": 1000},
    "ema_rates": [0.999, 0.9999, 0.99995],
    # EDM2's power-function EMAs (pid_fast.train.power_ema), one per sigma_rel, kept in the
    # checkpoints and written to power-ema-<step>.pt every snapshot_every steps (0: never), from
    # which `pid-fast power-ema` rebuilds any EMA length after training
    "power_ema": {"sigma_rels": [], "snapshot_every": 0},
    # the grid indices of each step (pid_fast.train.schedules): sampling "uniform" (the reference)
    # | "importance" (by each index's running mean loss, mixed with uniform_mix of the uniform draw,
    # reweighted: the expected loss is unchanged); weighting "uniform" | "adaptive" (each index's loss
    # over its running mean) | "endpoint" (fixed: (|t_i - t_i2| / t_i)^weighting_power, each index's share of
    # the one-step sample's error, pid_fast.train.schedules); coarse_to_fine: [[until_step, N'], ...], nested coarser grids first;
    # indices_per_noise k: k grid points on each noise's trajectory per step (the student and the
    # teacher then run on k x batch_size rows; 1: the reference's one point per noise)
    "grid": {"sampling": "uniform", "weighting": "uniform", "weighting_power": 1.0, "stats_decay": 0.99,
             "uniform_mix": 0.5, "coarse_to_fine": [], "indices_per_noise": 1},
    "batch_size": 512,               # global batch (all ranks and accumulation rounds)
    "accum": 1,                      # gradient accumulation rounds per step
    # the student's pass (pid_fast.models.precision): fp32 | tf32 | bf16 | fp16 | bf16-mixed |
    # fp16-mixed (16-bit trunk, time path in fp32) | auto: fp16-mixed on CUDA, fp32 on the CPU
    "precision": "auto",
    "channels_last": "auto",         # true | false | auto: true on CUDA (networks and teacher)
    "compile": False,                # torch.compile the step's forward: false | true (inductor) | a backend name
    # data parallelism over the ranks (pid_fast.train.sharding): "ddp" (every rank holds everything) |
    # "fsdp" (FSDP2: the student per U-Net block then the root, its optimizer state and the EMAs sharded;
    # checkpoints as sharded DCP folders, pid_fast.train.sharded_checkpoint)
    "parallel": "ddp",
    "teacher_sharding": None,        # fsdp: shard the frozen teacher too (null: true under fsdp)
    # rank 0's dashboards besides log.jsonl (pid_fast.train.tracking): TensorBoard event files in
    # RUN/tensorboard; W&B (needs the wandb package; WANDB_MODE=offline works without a network)
    "log": {"tensorboard": False, "wandb": False, "wandb_project": "pid-fast"},
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
                     "snapshot_num", "progress", "device", "channels_last", "compile", "lr_schedule", "log")

# The keys of config['teacher'] for each teacher kind.
TEACHER_KEYS = {"edm": {"kind", "path", "key", "guidance"},
                "network": {"kind", "network", "precond", "seed", "use_fp16", "precond_kwargs", "guidance"},
                "gaussian": {"kind", "mean", "std", "label_dim", "guidance"},
                "diffusers": {"kind", "path", "scheduler", "prediction_type", "timestep_rounding", "prompts", "guidance"}}
# config['teacher.guidance'] (pid_fast.guided): {"scale": w, "guide": "unconditional" | a teacher config
# without guidance, "interval": [sigma_lo, sigma_hi] | null, "null_label": class index | null,
# "negative_prompt": a text teacher's unconditional input (null: the empty prompt)}
GUIDANCE_KEYS = {"scale", "guide", "interval", "null_label", "negative_prompt"}


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
    """An override's value: JSON when it parses, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_overrides(overrides) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs from a mapping or from "a.b=value" strings."""
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    parsed = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r} must have the form key=value (e.g. optimizer.lr=1e-4)")
        key, value = item.split("=", 1)
        parsed.append((key.strip(), _parse_value(value.strip())))
    return parsed


def apply_overrides(config: Mapping[str, Any], overrides) -> dict:
    """``config`` with overrides applied: a mapping of dotted keys, or "a.b=value" strings
    (value parsed as JSON when it parses, else kept as a string)."""
    config = copy.deepcopy(dict(config))
    for key, value in _parse_overrides(overrides):
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return config


def _merge(defaults: Mapping, user: Mapping, where: str) -> dict:
    """``user`` over ``defaults``, recursively; an unknown key is an error."""
    out = copy.deepcopy(dict(defaults))
    for key, value in user.items():
        if isinstance(key, str) and key.startswith("_"):
            continue  # "_comment" and the like
        if key not in defaults:
            raise ValueError(f"config: unknown key {where + key!r}; known keys: {sorted(defaults)}")
        if key == "teacher":
            out[key] = copy.deepcopy(value)  # replaced whole: its keys depend on its kind
        elif isinstance(defaults[key], dict) and defaults[key] and isinstance(value, Mapping):  # ({}: free-form)
            out[key] = _merge(defaults[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _name(key: str) -> str:
    """How an error message names a (dotted) config key."""
    return f"config[{key!r}]"


def _need(cond: bool, key: str, expected: str, value: Any) -> None:
    """A rule of the config's own (one that no other layer has)."""
    if not cond:
        raise ValueError(f"{_name(key)} must be {expected}, got {value!r}")


def resolve_config(config: Optional[Mapping[str, Any]] = None) -> dict:
    """The full, validated config: ``config`` over DEFAULT_CONFIG. Raises ValueError naming
    the key for an unknown key or a bad value."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    cfg = _merge(DEFAULT_CONFIG, config or {}, "")
    _check_run(cfg)
    _check_parallel_and_log(cfg)
    _check_optimizer(cfg["optimizer"])
    _check_loss(cfg["loss"])
    _check_schedules_and_power_ema(cfg)
    _check_teacher(cfg["teacher"])
    _check_student(cfg["student"], cfg["teacher"])
    _fill_sigma_range(cfg)
    return cfg


def _fill_sigma_range(cfg: dict) -> None:
    """loss.sigma_min / sigma_max left null take the teacher's range where the config alone gives
    it (kinds 'network' and 'gaussian'); a teacher read from a file fills them when it is loaded
    (pid_fast.train.builders.resolve_sigma_range). Then the grid is checked as a whole."""
    from pid_fast.train.builders import teacher_sigma_range

    loss = cfg["loss"]
    if loss["sigma_min"] is None or loss["sigma_max"] is None:
        found = teacher_sigma_range(cfg["teacher"], load=False)
        if found is not None:
            for key, value in zip(("sigma_min", "sigma_max"), found[0]):
                if loss[key] is None:
                    loss[key] = value
    if loss["sigma_min"] is not None and loss["sigma_max"] is not None:
        check_grid(loss["N"], loss["sigma_min"], loss["sigma_max"], loss["rho"], where="config: loss.",
                   num_points_name="N")


def _check_run(cfg: Mapping[str, Any]) -> None:
    """The top-level keys: seed, device, batch and step counts, precision, EMA rates."""
    check_int(cfg["seed"], _name("seed"), 0)
    check_choice(cfg["device"], _name("device"), ("auto", "cpu", "cuda"))
    for key in ("batch_size", "accum", "total_steps", "log_every", "checkpoint_every", "snapshot_num"):
        check_int(cfg[key], _name(key), 1)
    check_int(cfg["keep_checkpoints"], _name("keep_checkpoints"), 0)
    check_int(cfg["snapshot_every"], _name("snapshot_every"), 0)
    check_choice(cfg["precision"], _name("precision"), ("auto", *PRECISION_MODES))
    check_choice(cfg["channels_last"], _name("channels_last"), ("auto", True, False))
    _need(isinstance(cfg["compile"], (bool, str)) and cfg["compile"] != "", "compile",
          "false, true or a torch.compile backend name (e.g. 'inductor', 'aot_eager')", cfg["compile"])
    check_positive(cfg["clip_grad_norm"], _name("clip_grad_norm"), allow_none=True)
    _need(isinstance(cfg["progress"], bool), "progress", "a bool", cfg["progress"])
    rates = cfg["ema_rates"]
    _need(isinstance(rates, list) and all(is_number(r) and 0 < r < 1 for r in rates)
          and len(set(rates)) == len(rates), "ema_rates", "a list of distinct numbers in (0, 1)", rates)


def _check_parallel_and_log(cfg: Mapping[str, Any]) -> None:
    """parallel, teacher_sharding and the log sinks (what fsdp does not support is named here)."""
    from pid_fast.train.sharding import PARALLEL_MODES

    check_choice(cfg["parallel"], _name("parallel"), PARALLEL_MODES)
    sharding = cfg["teacher_sharding"]
    _need(sharding is None or isinstance(sharding, bool), "teacher_sharding", "null, true or false", sharding)
    if cfg["parallel"] != "fsdp":
        _need(not sharding, "teacher_sharding", "null or false unless parallel is 'fsdp'", sharding)
    else:
        # FSDP2's hooks are autograd Functions without a forward-mode formula: no dual tensors through them
        _need(cfg["loss"]["derivative"] != "jvp", "loss.derivative", "'fd' with parallel 'fsdp' (FSDP2's "
              "module hooks have no forward-mode AD)", cfg["loss"]["derivative"])
        _need(cfg["compile"] is False, "compile", "false with parallel 'fsdp' (not supported yet)", cfg["compile"])
    log = cfg["log"]
    for key in ("tensorboard", "wandb"):
        _need(isinstance(log[key], bool), f"log.{key}", "a bool", log[key])
    _need(isinstance(log["wandb_project"], str) and log["wandb_project"] != "", "log.wandb_project",
          "a non-empty string", log["wandb_project"])


def _check_optimizer(opt: Mapping[str, Any]) -> None:
    check_choice(opt["name"], _name("optimizer.name"), ("radam", "adam"))
    check_positive(opt["lr"], _name("optimizer.lr"))
    check_positive(opt["eps"], _name("optimizer.eps"))
    check_positive(opt["weight_decay"], _name("optimizer.weight_decay"), allow_zero=True)
    betas = opt["betas"]
    _need(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas),
          "optimizer.betas", "two numbers in [0, 1)", betas)
    scales = opt["lr_scale"]
    _need(isinstance(scales, dict) and all(isinstance(k, str) and k and is_number(v) and v > 0
                                           for k, v in scales.items()),
          "optimizer.lr_scale", "a dict of parameter-name patterns to positive numbers", scales)


def _check_schedules_and_power_ema(cfg: Mapping[str, Any]) -> None:
    """The keys of the lr schedule, the power EMAs and the grid-index schedule."""
    check_int(cfg["lr_schedule"]["warmup_steps"], _name("lr_schedule.warmup_steps"), 0)
    check_choice(cfg["lr_schedule"]["decay"], _name("lr_schedule.decay"), LR_SCHEDULES)
    check_int(cfg["lr_schedule"]["decay_steps"], _name("lr_schedule.decay_steps"), 1)
    sigma_rels = cfg["power_ema"]["sigma_rels"]
    _need(isinstance(sigma_rels, list) and all(is_number(s) and 0 < s < 0.28 for s in sigma_rels)
          and len(set(sigma_rels)) == len(sigma_rels), "power_ema.sigma_rels",
          "a list of distinct numbers in (0, 0.28)", sigma_rels)
    check_int(cfg["power_ema"]["snapshot_every"], _name("power_ema.snapshot_every"), 0)
    grid = cfg["grid"]
    check_choice(grid["sampling"], _name("grid.sampling"), GRID_SAMPLINGS)
    check_choice(grid["weighting"], _name("grid.weighting"), GRID_WEIGHTINGS)
    _need(is_number(grid["weighting_power"]) and grid["weighting_power"] != 0 and abs(grid["weighting_power"]) <= 4,
          "grid.weighting_power", "a non-zero number in [-4, 4]", grid["weighting_power"])
    _need(is_number(grid["stats_decay"]) and 0 <= grid["stats_decay"] < 1, "grid.stats_decay", "a number in [0, 1)",
          grid["stats_decay"])
    _need(is_number(grid["uniform_mix"]) and 0 < grid["uniform_mix"] <= 1, "grid.uniform_mix", "a number in (0, 1]",
          grid["uniform_mix"])
    check_coarse_to_fine(grid["coarse_to_fine"], cfg["loss"]["N"], _name("grid.coarse_to_fine"))
    check_int(grid["indices_per_noise"], _name("grid.indices_per_noise"), minimum=1)


def _check_loss(loss: Mapping[str, Any]) -> None:
    check_int(loss["N"], "config: loss.N", 2)
    check_positive(loss["rho"], "config: loss.rho")
    for key in ("sigma_min", "sigma_max"):  # null: the teacher's (_fill_sigma_range)
        check_positive(loss[key], f"config: loss.{key}", allow_none=True)
    _need(isinstance(loss["allow_extrapolation"], bool), "loss.allow_extrapolation", "a bool",
          loss["allow_extrapolation"])
    norm = check_choice(loss["norm"], _name("loss.norm"), LOSS_NORMS)
    # huber_c > 0 with 'huber' and null otherwise. The LPIPS network is only built later, from
    # lpips_weights: a stand-in callable passes the "lpips needs a callable" half of the rule.
    check_norm(norm, loss["huber_c"], norms=LOSS_NORMS, lpips=_lpips_stand_in if norm == "lpips" else None,
               where="config: loss.")
    if norm == "lpips":
        _need(isinstance(loss["lpips_weights"], str), "loss.lpips_weights",
              "the path of the LPIPS backbone weights (norm 'lpips')", loss["lpips_weights"])
    check_choice(loss["lpips_pooling"], _name("loss.lpips_pooling"), (None, "avg", "max"))
    check_choice(loss["derivative"], _name("loss.derivative"), DERIVATIVES)
    _need(loss["lpips_lin_weights"] is None or isinstance(loss["lpips_lin_weights"], str), "loss.lpips_lin_weights",
          "null or the path of the LPIPS linear-head weights", loss["lpips_lin_weights"])
    check_choice(loss["backend"], _name("loss.backend"), (None, "reference", "cpu", "cuda", "triton"))
    _need(isinstance(loss["batched"], bool), "loss.batched", "a bool", loss["batched"])
    _need(isinstance(loss["allow_stochastic_student"], bool), "loss.allow_stochastic_student", "a bool",
          loss["allow_stochastic_student"])
    check_choice(loss["teacher_precision"], _name("loss.teacher_precision"), ("auto", *TEACHER_PRECISIONS))


def _lpips_stand_in(pred, target):  # pragma: no cover - never called
    raise NotImplementedError


def _check_teacher(teacher: Any) -> None:
    kind = teacher.get("kind") if isinstance(teacher, dict) else teacher
    _need(isinstance(teacher, dict) and kind in TEACHER_KEYS, "teacher.kind", f"one of {sorted(TEACHER_KEYS)}", kind)
    extra = set(teacher) - TEACHER_KEYS[kind]
    if extra:
        raise ValueError(f"config: unknown key(s) {sorted('teacher.' + k for k in extra)} for teacher kind "
                         f"{kind!r}; known: {sorted(TEACHER_KEYS[kind])}")
    if teacher.get("guidance") is not None:
        _check_guidance(teacher["guidance"])
    if kind == "edm":
        _need(isinstance(teacher.get("path"), str), "teacher.path", "the path of the teacher checkpoint",
              teacher.get("path"))
    elif kind == "diffusers":
        _check_diffusers_teacher(teacher)
    elif kind == "network":
        check_choice(teacher.get("precond", "edm"), _name("teacher.precond"), sorted(PRECONDITIONINGS))
        _need(teacher.get("network") is not None, "teacher.network", "a network name or config", None)


def _check_guidance(guidance: Any) -> None:
    _need(isinstance(guidance, dict), "teacher.guidance", f"null or a dict with keys {sorted(GUIDANCE_KEYS)}", guidance)
    extra = set(guidance) - GUIDANCE_KEYS
    if extra:
        raise ValueError(f"config: unknown key(s) {sorted('teacher.guidance.' + k for k in extra)}; "
                         f"known: {sorted(GUIDANCE_KEYS)}")
    scale = guidance.get("scale")
    _need(isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale),
          "teacher.guidance.scale", "a finite number (the guidance weight w; 1: no guidance)", scale)
    guide = guidance.get("guide")
    if guide != "unconditional":
        _need(isinstance(guide, dict), "teacher.guidance.guide",
              "'unconditional' (the main teacher without its label) or a second teacher's config", guide)
        _need(guide.get("guidance") is None, "teacher.guidance.guide.guidance", "null (a guide is not guided)",
              guide.get("guidance"))
        _check_teacher(guide)
    interval = guidance.get("interval")
    _need(interval is None or (isinstance(interval, (list, tuple)) and len(interval) == 2
                               and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
                               and 0 <= interval[0] < interval[1]),
          "teacher.guidance.interval", "null or [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi", interval)
    null = guidance.get("null_label")
    _need(null is None or (isinstance(null, int) and not isinstance(null, bool) and null >= 0 and guide == "unconditional"),
          "teacher.guidance.null_label", "null or a class index (with guide 'unconditional')", null)
    negative = guidance.get("negative_prompt")
    _need(negative is None or (isinstance(negative, str) and guide == "unconditional"),
          "teacher.guidance.negative_prompt", "null or a prompt (with guide 'unconditional' and a text teacher)",
          negative)


def _check_diffusers_teacher(teacher: Mapping[str, Any]) -> None:
    _need(isinstance(teacher.get("path"), str), "teacher.path",
          "the path of a local diffusers folder (written by save_pretrained)", teacher.get("path"))
    _need(teacher.get("scheduler") is None or isinstance(teacher.get("scheduler"), str), "teacher.scheduler",
          "null or the path of a scheduler folder / scheduler_config.json", teacher.get("scheduler"))
    check_choice(teacher.get("prediction_type"), _name("teacher.prediction_type"), (None, *PREDICTION_TYPES))
    check_choice(teacher.get("timestep_rounding"), _name("teacher.timestep_rounding"), (None, *TIMESTEP_ROUNDINGS))
    _need(teacher.get("prompts") is None or (isinstance(teacher.get("prompts"), str) and teacher.get("prompts")),
          "teacher.prompts", "null or the path of a prompt file (.txt one per line, .jsonl, .parquet)",
          teacher.get("prompts"))
    guidance = teacher.get("guidance") or {}
    _need(guidance.get("negative_prompt") is None or teacher.get("prompts") is not None,
          "teacher.guidance.negative_prompt", "null unless the teacher is text-conditioned (teacher.prompts set)",
          guidance.get("negative_prompt"))


def _check_student(student: Mapping[str, Any], teacher: Mapping[str, Any]) -> None:
    check_choice(student["init"], _name("student.init"), ("teacher", "random"))
    check_positive(student["dropout"], _name("student.dropout"), allow_zero=True, allow_none=True)
    check_int(student["seed"], _name("student.seed"), 0)
    if teacher["kind"] == "gaussian":
        _need(student["network"] is not None, "student.network",
              "a network name or config (the gaussian teacher has no network)", None)
        _need(student["init"] == "random", "student.init", "'random' with a gaussian teacher", student["init"])


def check_resume_config(stored: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict:
    """``cfg`` for resuming a run whose checkpoint holds ``stored``: only RESUMABLE_CHANGES may
    differ."""
    stored = _with_keys_added_since(stored)
    cfg = _with_stored_sigma_range(stored, cfg)
    diffs = [k for k in cfg if k not in RESUMABLE_CHANGES and cfg[k] != stored.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {stored.get(k)!r} (checkpoint) vs {cfg[k]!r} (now)" for k in diffs)
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {detail}. Only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change on resume.")
    return dict(cfg)


def _with_stored_sigma_range(stored: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict:
    """``cfg`` with a null sigma range taken from the run (which filled it in from its teacher),
    and ``stored`` with cfg's allow_extrapolation (a permission, not a setting of the run)."""
    cfg = copy.deepcopy(dict(cfg))
    loss, stored_loss = cfg.get("loss"), stored.get("loss")
    if isinstance(loss, dict) and isinstance(stored_loss, dict):
        for key in ("sigma_min", "sigma_max"):
            if loss.get(key) is None:
                loss[key] = stored_loss.get(key)
        stored_loss["allow_extrapolation"] = loss.get("allow_extrapolation", False)
    return cfg


def _with_keys_added_since(stored: Mapping[str, Any]) -> dict:
    """A checkpoint's config with the keys added after it was written, set to what that version
    of pid_fast did (LPIPS with VGG then used max pooling), so old runs resume."""
    stored = copy.deepcopy(dict(stored))
    loss = stored.get("loss")
    if isinstance(loss, dict) and "lpips_pooling" not in loss:
        old_vgg_lpips = loss.get("norm") == "lpips" and loss.get("lpips_net", "vgg") == "vgg"
        loss["lpips_pooling"] = "max" if old_vgg_lpips else None
        loss.setdefault("lpips_lin_weights", None)
    if isinstance(loss, dict):
        loss.setdefault("derivative", "fd")
        loss.setdefault("allow_stochastic_student", False)
    if isinstance(stored.get("optimizer"), dict):
        stored["optimizer"].setdefault("lr_scale", {})
    stored.setdefault("lr_schedule", {"warmup_steps": 0, "decay": "constant", "decay_steps": 1000})
    stored.setdefault("power_ema", {"sigma_rels": [], "snapshot_every": 0})
    stored.setdefault("parallel", "ddp")
    stored.setdefault("teacher_sharding", None)
    stored.setdefault("grid", {"sampling": "uniform", "weighting": "uniform", "stats_decay": 0.99,
                               "uniform_mix": 0.5, "coarse_to_fine": []})
    if isinstance(stored["grid"], dict):
        stored["grid"].setdefault("indices_per_noise", 1)
        stored["grid"].setdefault("weighting_power", 1.0)
    return stored

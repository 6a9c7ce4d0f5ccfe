"""diffusers models on disk: a teacher from a local ``save_pretrained`` folder, and a trained PID
student exported as a folder diffusers loads back (nothing is ever downloaded).

Teacher folders (``load_diffusers_teacher``):
- a pipeline-style folder: PATH/unet/ (config.json + weights) and PATH/scheduler/scheduler_config.json;
- a bare UNet folder PATH (config.json + weights) with PATH/scheduler_config.json, or with the
  scheduler given separately (a folder holding scheduler_config.json, or that file).

Exported student (``export_one_step``): a folder diffusers loads as a one-step pipeline,
OUT/model_index.json + OUT/pipeline_pid_one_step.py (the PIDOneStepPipeline class, torch and
diffusers only; a copy of pid_fast/io/pipeline_pid_one_step.py) + OUT/unet/ (``save_pretrained``),
and OUT/pid_one_step.json with the constants of the one-step sample (see ``one_step_sample``)::

    pipe = DiffusionPipeline.from_pretrained("OUT", trust_remote_code=True)  # runs the folder's pipeline file
    images = pipe(batch_size=16).images      # PIL; output_type="np" / "pt" / "latent" (x in [-1, 1])

or by hand, with the UNet alone::

    unet = UNet2DModel.from_pretrained("OUT/unet")
    s = json.load(open("OUT/pid_one_step.json"))
    z = torch.randn(16, *s["shape"])
    t = torch.tensor([s["timestep"]])  # a tensor: diffusers casts a Python number to an integer
    x = s["noise_weight"] * z + s["output_weight"] * unet(s["input_scale"] * z, t).sample
    images = x.clamp(-1, 1)          # in [-1, 1]; class-conditional UNets also take class_labels=...
    # (a learned-variance UNet, out_channels = 2 in_channels: take .sample[:, :in_channels])
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Optional

import torch
from torch import nn

from pid_fast.io.errors import CheckpointFormatError
from pid_fast.models.diffusers_adapter import (EDM_SCHEDULERS, UNET_CLASSES, DiffusersDenoiser, DiffusersUNet,
                                               denoiser_from_scheduler, import_diffusers, one_step_settings,
                                               prediction_part, scheduler_alphas_cumprod)

__all__ = ["ONE_STEP_FILE", "find_diffusers_parts", "load_diffusers_scheduler", "load_diffusers_teacher",
           "export_one_step", "load_one_step", "one_step_sample"]

ONE_STEP_FILE = "pid_one_step.json"
PIPELINE_FILE, PIPELINE_CLASS = "pipeline_pid_one_step.py", "PIDOneStepPipeline"
SCHEDULER_FILE = "scheduler_config.json"


def _read_json(path: str, name: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{name}: cannot read {path!r} as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{name}: {path!r} does not hold a JSON object")
    return data


def find_diffusers_parts(path: str | os.PathLike, scheduler: Optional[str | os.PathLike] = None, *,
                         name: str = "teacher.path") -> tuple[str, str]:
    """(the UNet's folder, the scheduler config file) of a local diffusers folder (see the module
    docstring); errors name ``name`` (and 'teacher.scheduler' for the scheduler)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name}: no such folder: {path!r} (a diffusers model folder written by "
                                f"save_pretrained)")
    # a pipeline folder's network: unet/ (UNet pipelines) or transformer/ (DiT pipelines); else the folder itself
    unet_dir = next((os.path.join(path, sub) for sub in ("unet", "transformer")
                     if os.path.isfile(os.path.join(path, sub, "config.json"))), path)
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        raise CheckpointFormatError(f"{name}: {path!r} is not a diffusers model folder: expected unet/config.json "
                                    f"or transformer/config.json (a pipeline folder) or config.json (a network "
                                    f"folder), written by save_pretrained")
    if scheduler is not None:
        scheduler = os.fspath(scheduler)
        found = os.path.join(scheduler, SCHEDULER_FILE) if os.path.isdir(scheduler) else scheduler
        if not os.path.isfile(found):
            raise FileNotFoundError(f"teacher.scheduler: no {SCHEDULER_FILE} at {scheduler!r}")
        return unet_dir, found
    for candidate in (os.path.join(path, "scheduler", SCHEDULER_FILE), os.path.join(unet_dir, SCHEDULER_FILE),
                      os.path.join(path, SCHEDULER_FILE)):
        if os.path.isfile(candidate):
            return unet_dir, candidate
    raise CheckpointFormatError(f"{name}: {path!r} has no scheduler config: expected scheduler/{SCHEDULER_FILE} or "
                                f"{SCHEDULER_FILE} next to the UNet's config.json (or set teacher.scheduler)")


def load_diffusers_scheduler(config_file: str, *, name: str = "teacher.scheduler") -> Any:
    """The diffusers scheduler of a scheduler_config.json (built from the config; no download).
    Accepted: DDPM-style schedulers with a discrete ``alphas_cumprod`` (zero terminal SNR included)
    and the EDM ones (EDM_SCHEDULERS)."""
    diffusers = import_diffusers(name)
    config = _read_json(config_file, name)
    class_name = config.get("_class_name", "DDPMScheduler")
    scheduler_class = getattr(diffusers, str(class_name), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise ValueError(f"{name}: unknown scheduler class {class_name!r} in {config_file!r}")
    scheduler = scheduler_class.from_config(config)
    if class_name in EDM_SCHEDULERS:
        return scheduler
    if getattr(scheduler, "alphas_cumprod", None) is None or "prediction_type" not in scheduler.config:
        raise ValueError(f"{name}: unsupported scheduler {class_name!r}: PID needs a DDPM-style discrete schedule "
                         f"(alphas_cumprod) with a prediction_type, e.g. DDPMScheduler, DDIMScheduler, "
                         f"EulerDiscreteScheduler, or an EDM one ({', '.join(EDM_SCHEDULERS)})")
    try:
        scheduler_alphas_cumprod(scheduler)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return scheduler


def _load_unet(unet_dir: str, name: str, device: torch.device | str, dtype: Optional[torch.dtype]) -> nn.Module:
    diffusers = import_diffusers(name)
    class_name = _read_json(os.path.join(unet_dir, "config.json"), name).get("_class_name")
    if class_name not in UNET_CLASSES:
        raise CheckpointFormatError(f"{name}: {unet_dir!r} holds a {class_name!r}; supported UNets: "
                                    f"{', '.join(UNET_CLASSES)}")
    try:
        unet = getattr(diffusers, class_name).from_pretrained(unet_dir, local_files_only=True, torch_dtype=dtype,
                                                          low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointFormatError(f"{name}: cannot load the {class_name} in {unet_dir!r}: {exc}") from None
    return unet.to(device)


def load_diffusers_teacher(path: str | os.PathLike, *, scheduler: Optional[str | os.PathLike] = None,
                           prediction_type: Optional[str] = None, timestep_rounding: Optional[str] = None,
                           device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None,
                           name: str = "teacher.path") -> DiffusersDenoiser:
    """A frozen, eval-mode ``DiffusersDenoiser`` from a local diffusers folder (module docstring).
    ``prediction_type`` overrides the scheduler's; ``timestep_rounding``: see DiffusersDenoiser."""
    import_diffusers(f"{name} (a diffusers teacher)")
    unet_dir, scheduler_file = find_diffusers_parts(path, scheduler, name=name)
    sched = load_diffusers_scheduler(scheduler_file)
    unet = _load_unet(unet_dir, name, device, dtype)
    try:
        teacher = denoiser_from_scheduler(
            unet, sched, timestep_rounding=timestep_rounding,
            **({} if prediction_type is None else {"prediction_type": prediction_type}))
    except ValueError as exc:  # e.g. an unsupported prediction_type in the scheduler config
        raise ValueError(f"{name}: {exc}") from None
    return teacher.to(device).eval().requires_grad_(False)


def export_one_step(net: DiffusersUNet, meta: Mapping[str, Any], out: str | os.PathLike) -> dict:
    """Write a trained diffusers student (``net``, its checkpoint metadata ``meta``) as OUT/unet/
    (save_pretrained) and OUT/pid_one_step.json; returns the one-step settings."""
    if not isinstance(net, DiffusersUNet):
        raise TypeError(f"export_one_step: the student must be a diffusers network, got {type(net).__name__}")
    out = os.fspath(out)
    settings = one_step_settings(meta)
    settings["unet_class"] = type(net.unet).__name__
    if meta.get("step") is not None:
        settings["pid_step"] = int(meta["step"])
    net.unet.save_pretrained(os.path.join(out, "unet"))
    with open(os.path.join(out, ONE_STEP_FILE), "w") as f:
        json.dump(settings, f, indent=2)
    _write_pipeline(out, settings)
    return settings


def _write_pipeline(out: str, settings: Mapping[str, Any]) -> None:
    """OUT/model_index.json naming the one-step pipeline class of OUT/pipeline_pid_one_step.py (a
    copy of pid_fast/io/pipeline_pid_one_step.py, torch and diffusers only) with the one-step
    constants as its config, so that DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)
    loads it offline."""
    diffusers = import_diffusers("export_one_step")
    shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), PIPELINE_FILE),
                    os.path.join(out, PIPELINE_FILE))
    index = {"_class_name": [PIPELINE_FILE[:-3], PIPELINE_CLASS], "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", settings["unet_class"]],
             **{key: settings[key] for key in ("timestep", "input_scale", "noise_weight", "output_weight", "clamp",
                                               "shape", "label_dim")}}
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def load_one_step(folder: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(the diffusers UNet in eval mode, the one-step settings) of an exported student folder."""
    folder = os.fspath(folder)
    settings_file = os.path.join(folder, ONE_STEP_FILE)
    if not os.path.isfile(settings_file):
        raise FileNotFoundError(f"folder: {folder!r} has no {ONE_STEP_FILE} (written by pid-fast export-diffusers)")
    settings = _read_json(settings_file, "folder")
    unet = _load_unet(os.path.join(folder, "unet"), "folder", device, None)
    return unet.eval().requires_grad_(False), settings


@torch.no_grad()
def one_step_sample(unet: nn.Module, settings: Mapping[str, Any], z: torch.Tensor, **unet_kwargs: Any) -> torch.Tensor:
    """One-step images in [-1, 1] from latents z ~ N(0, I): the formula of the module docstring
    (``unet_kwargs``: e.g. class_labels=... for a class-conditional UNet)."""
    timestep = torch.full((z.shape[0],), float(settings["timestep"]), device=z.device)
    out = prediction_part(unet(float(settings["input_scale"]) * z, timestep, **unet_kwargs).sample.float(), z.shape[1])
    x = float(settings["noise_weight"]) * z + float(settings["output_weight"]) * out
    return x if settings["clamp"] is None else x.clamp(*settings["clamp"])

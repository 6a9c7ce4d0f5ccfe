"""A PID student of a text-to-image teacher exported as a folder that plain diffusers loads and
samples in one step from a prompt (`pid-fast export-diffusers RUN OUT`; nothing is downloaded):

    OUT/model_index.json            names PIDTextToImagePipeline of OUT/pipeline_pid_text_to_image.py
    OUT/pipeline_pid_text_to_image.py  (a copy of pid_fast/io/pipeline_pid_text_to_image.py: torch + diffusers)
    OUT/unet/                       the student (UNet2DConditionModel.save_pretrained)
    OUT/text_encoder/, tokenizer/, vae/  copies of the teacher pipeline's frozen components
    OUT/pid_one_step.json           the constants of the one-step sample (one_step_settings)

    pipe = DiffusionPipeline.from_pretrained("OUT", trust_remote_code=True)
    image = pipe("a red cat").images[0]
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

from pid_fast.io.text_conditioning import text_pipeline_parts
from pid_fast.models.diffusers_adapter import DiffusersUNet, import_diffusers, one_step_settings

__all__ = ["TEXT_PIPELINE_FILE", "TEXT_PIPELINE_CLASS", "export_text_to_image"]

TEXT_PIPELINE_FILE, TEXT_PIPELINE_CLASS = "pipeline_pid_text_to_image.py", "PIDTextToImagePipeline"
ONE_STEP_FILE = "pid_one_step.json"


def export_text_to_image(net: DiffusersUNet, meta: Mapping[str, Any], out: str | os.PathLike) -> dict:
    """Write the text-to-image student ``net`` (checkpoint metadata ``meta`` with its 'text') to OUT
    (module docstring); returns the one-step settings."""
    if not isinstance(net, DiffusersUNet) or not net.cross_attention:
        raise TypeError(f"export_text_to_image: the student must be a diffusers UNet2DConditionModel, got "
                        f"{type(getattr(net, 'unet', net)).__name__}")
    text = meta.get("text")
    if not text:
        raise ValueError("export_text_to_image: the checkpoint has no text conditioning (meta['text'])")
    diffusers = import_diffusers("export_text_to_image")
    pipeline, out = text["pipeline"], os.fspath(out)
    parts = text_pipeline_parts(pipeline, name="the teacher pipeline recorded in the checkpoint")
    settings = one_step_settings(meta)
    settings.update(unet_class=type(net.unet).__name__, clamp=None, text_pipeline=pipeline)
    if meta.get("step") is not None:
        settings["pid_step"] = int(meta["step"])
    os.makedirs(out, exist_ok=True)
    net.unet.save_pretrained(os.path.join(out, "unet"))
    index = {"_class_name": [TEXT_PIPELINE_FILE[:-3], TEXT_PIPELINE_CLASS], "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", settings["unet_class"]]}
    for component, (folder, (library, cls)) in parts.items():
        shutil.copytree(folder, os.path.join(out, component), dirs_exist_ok=True)
        index[component] = [library, cls]
    index.update({key: settings[key] for key in ("timestep", "input_scale", "noise_weight", "output_weight", "shape")})
    shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), TEXT_PIPELINE_FILE),
                    os.path.join(out, TEXT_PIPELINE_FILE))
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out, ONE_STEP_FILE), "w") as f:
        json.dump(settings, f, indent=2)
    return settings

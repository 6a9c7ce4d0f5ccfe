"""A tiny text-to-image pipeline end to end through the CLI (issue 29): `pid-fast distill` with
classifier-free guidance -> `sample --prompt` -> `export-diffusers` -> plain diffusers, one step
from a prompt (and the README's snippet); the teacher's `sample --teacher --prompt` equals
diffusers' StableDiffusionPipeline from the same latents; the CLI's errors."""

import json
import os
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from text_pipeline import save_prompts, save_text_pipeline  # noqa: E402

from pid_fast.cli import main  # noqa: E402
from pid_fast.sampling import seeded_latents  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def _ok(result):
    assert result.exit_code == 0 and result.exception is None, result.output
    return result.output


def _error(result, *needles):
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(pipeline folder, run folder, work folder): 4 guided steps of `pid-fast distill`."""
    root = tmp_path_factory.mktemp("t2i")
    pipeline = save_text_pipeline(root / "sd-tiny")
    config = {"device": "cpu", "teacher": {"kind": "diffusers", "path": pipeline,
                                           "prompts": save_prompts(root / "prompts.txt"),
                                           "guidance": {"scale": 4.0, "guide": "unconditional",
                                                        "negative_prompt": ""}},
              "loss": {"N": 50}, "batch_size": 4, "log_every": 2, "keep_checkpoints": 0,
              "ema_rates": [0.5], "optimizer": {"lr": 1e-3}}
    with open(root / "config.json", "w") as f:
        json.dump(config, f)
    run = root / "run"
    out = _ok(CliRunner().invoke(main, ["distill", "--config", str(root / "config.json"), "--run-dir", str(run),
                                        "--total-steps", "4", "--checkpoint-every", "2", "--snapshot-every", "4",
                                        "--threads", "1", "--no-progress"]))
    assert "done: step 4" in out
    return pipeline, run, root


def test_distill_sample_export_and_plain_diffusers(distilled):
    pipeline, run, root = distilled
    assert os.path.isfile(run / "samples-000000004.png") and os.listdir(run / "text_embeddings")
    prompts = ["a red cat", "the blue sea"]
    _ok(CliRunner().invoke(main, ["sample", str(run), str(root / "s.npz"), "--num", "4", "--weights", "model",
                                  "--prompt", prompts[0], "--prompt", prompts[1]]))
    samples = np.load(root / "s.npz")
    assert samples["x"].shape == (4, 3, 16, 16) and samples["images"].shape == (4, 16, 16, 3)  # decoded RGB
    assert np.abs(samples["x"]).max() <= 1 and np.abs(samples["x"][0] - samples["x"][1]).max() > 0
    out = root / "one-step"
    _ok(CliRunner().invoke(main, ["export-diffusers", str(run), str(out), "--weights", "model"]))
    for part in ("unet", "text_encoder", "tokenizer", "vae", "model_index.json", "pipeline_pid_text_to_image.py"):
        assert os.path.exists(out / part), part
    # plain diffusers, offline: the same images as `pid-fast sample` from the same latents and prompts
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert type(pipe).__name__ == "PIDTextToImagePipeline"
    z, _ = seeded_latents(range(4), [4, 8, 8])
    images = pipe([prompts[0], prompts[1], prompts[0], prompts[1]], latents=z, output_type="pt").images
    np.testing.assert_allclose(images.numpy() * 2 - 1, samples["x"], rtol=0, atol=1e-5)
    # one UNet call: the student's latents are what the UNet gives in one step
    latent = pipe(prompts[0], latents=z[:1], output_type="latent").images
    settings = json.load(open(out / "pid_one_step.json"))
    unet = diffusers.UNet2DConditionModel.from_pretrained(str(out / "unet"))
    with torch.no_grad():
        emb = pipe.encode_prompt([prompts[0]], torch.device("cpu"))
        direct = settings["noise_weight"] * z[:1] + settings["output_weight"] * unet(
            settings["input_scale"] * z[:1], torch.tensor([settings["timestep"]]), encoder_hidden_states=emb).sample
    torch.testing.assert_close(latent, direct, rtol=1e-5, atol=1e-5)


def test_the_readme_text_to_image_snippet_runs(distilled, tmp_path, monkeypatch):
    _, run, root = distilled
    out = tmp_path / "one-step-sd"
    _ok(CliRunner().invoke(main, ["export-diffusers", str(run), str(out)]))
    text = open(README).read()
    match = re.search(r"<!-- export-diffusers text-to-image snippet -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README: no python block after <!-- export-diffusers text-to-image snippet -->"
    assert len(match.group(1).strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(match.group(1).replace('"one-step-sd"', repr(str(out))), "README.md", "exec"), scope)
    assert scope["image"].size == (16, 16) and os.path.isfile(tmp_path / "cat.png")


def test_teacher_samples_from_a_prompt_are_diffusers(distilled):
    pipeline, _, root = distilled
    _ok(CliRunner().invoke(main, ["sample", "--teacher", pipeline, str(root / "t.npz"), "--num", "2",
                                  "--prompt", "a red cat", "--sampler", "euler", "--steps", "5"]))
    ours = np.load(root / "t.npz")["x"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    z, _ = seeded_latents(range(2), [4, 8, 8])
    theirs = pipe("a red cat", num_images_per_prompt=2, latents=z, guidance_scale=1.0, num_inference_steps=5,
                  height=16, width=16, output_type="pt").images.numpy() * 2 - 1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    # the guided teacher of the run's config (classifier-free guidance w = 4) differs from the unguided one
    _ok(CliRunner().invoke(main, ["sample", "--teacher", str(root / "config.json"), str(root / "g.npz"), "--num",
                                  "2", "--prompt", "a red cat", "--steps", "3"]))
    assert np.abs(np.load(root / "g.npz")["x"] - ours).max() > 1e-3


def test_cli_errors(distilled):
    pipeline, run, root = distilled
    _error(CliRunner().invoke(main, ["sample", str(run), str(root / "e.npz"), "--num", "2"]),
           "text-conditioned", "--prompt")
    _error(CliRunner().invoke(main, ["sample", "--teacher", pipeline, str(root / "e.npz"), "--num", "2"]),
           "text-conditioned", "--prompt")
    config = json.load(open(root / "config.json"))
    del config["teacher"]["prompts"], config["teacher"]["guidance"]
    with open(root / "noprompts.json", "w") as f:
        json.dump(config, f)
    _error(CliRunner().invoke(main, ["distill", "--config", str(root / "noprompts.json"), "--run-dir",
                                     str(root / "r"), "--total-steps", "1", "--threads", "1", "--no-progress"]),
           "teacher.prompts", "is required")

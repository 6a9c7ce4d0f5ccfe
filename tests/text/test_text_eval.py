"""Evaluating a text-to-image student (issue 29, item 5): CLIP score with a local (tiny random)
CLIP folder, and the per-sample RMSE to the guided teacher's Heun samples from the same noise
and prompt, through the API and `pid-fast clip-score` / `pid-fast text-eval`."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from text_pipeline import PROMPTS, save_clip, save_prompts, save_text_pipeline  # noqa: E402

from pid_fast.cli import main  # noqa: E402
from pid_fast.eval.text_to_image import CLIP_MEAN, CLIP_STD, ClipScorer, rmse_to_teacher  # noqa: E402
from pid_fast.sampling import heun_sample, seeded_latents  # noqa: E402
from pid_fast.train import build_teacher, load_student, resolve_config, train  # noqa: E402
from pid_fast.train.prompts import encode_for_sampling, text_conditions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip") / "clip-tiny")


def test_clip_score_is_100_cos_of_clips_own_embeddings(clip_folder):
    scorer = ClipScorer(clip_folder)
    images = torch.rand(3, 3, 24, 24) * 2 - 1
    prompts = ["a red cat", "the sun", "a tree"]
    scores = scorer(images, prompts)
    # CLIPModel's own forward: logits_per_image = exp(logit_scale) cos, on the same pixels
    model = transformers.CLIPModel.from_pretrained(clip_folder)
    pixels = torch.nn.functional.interpolate((images + 1) / 2, size=(16, 16), mode="bicubic", antialias=True)
    pixels = (pixels.clamp(0, 1) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    cos = logits.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(scores, (100 * cos).clamp_min(0), rtol=1e-4, atol=1e-4)
    assert scores.shape == (3,) and bool((scores >= 0).all()) and bool((scores <= 100).all())
    with pytest.raises(ValueError, match="prompts: one per image"):
        scorer(images, prompts[:2])
    with pytest.raises(FileNotFoundError, match="--clip: no such folder"):
        ClipScorer(clip_folder + "-missing")


def test_rmse_to_teacher_and_the_commands(tmp_path, clip_folder):
    pipeline = save_text_pipeline(tmp_path / "sd-tiny")
    prompts = save_prompts(tmp_path / "prompts.txt")
    cfg = {"device": "cpu", "teacher": {"kind": "diffusers", "path": pipeline, "prompts": prompts,
                                        "guidance": {"scale": 3.0, "guide": "unconditional"}},
           "loss": {"N": 50}, "batch_size": 4, "total_steps": 2, "log_every": 2, "checkpoint_every": 2,
           "snapshot_every": 0, "progress": False, "ema_rates": [0.5], "optimizer": {"lr": 1e-3}}
    train(cfg, tmp_path / "run", threads=1)
    net, meta = load_student(tmp_path / "run", weights="model")
    tcfg = resolve_config(cfg)["teacher"]
    text = text_conditions(tcfg, None)
    teacher, _ = build_teacher(tcfg, torch.device("cpu"), text.negative)
    emb = encode_for_sampling(pipeline, PROMPTS, 3)
    torch.testing.assert_close(emb, text.embeddings[:3], rtol=0, atol=0)
    rmse, student, reference = rmse_to_teacher(net, meta, teacher, emb, range(3), num_steps=4)
    # the reference is the guided teacher's Heun solution from sigma_max z on the run's range
    z, _ = seeded_latents(range(3), meta["shape"])
    expected = heun_sample(teacher, z, emb, num_steps=4, sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"],
                           grid="karras").float()
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rmse, (student - reference).square().flatten(1).mean(1).sqrt())
    assert rmse.shape == (3,) and bool((rmse > 0).all())
    runner = CliRunner()
    result = runner.invoke(main, ["text-eval", str(tmp_path / "run"), "--prompts", prompts, "--num", "3",
                                  "--steps", "4", "--weights", "model", "--clip", clip_folder])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["rmse_to_teacher"] == pytest.approx(float(rmse.mean()), rel=1e-5)
    assert 0 <= out["clip_score_student"] <= 100 and 0 <= out["clip_score_teacher"] <= 100
    # clip-score of `sample --prompt`'s .npz reads the prompts stored in it
    result = runner.invoke(main, ["sample", str(tmp_path / "run"), str(tmp_path / "s.npz"), "--num", "2",
                                  "--prompt", "a red cat", "--prompt", "the sun"])
    assert result.exit_code == 0, result.output
    assert list(np.load(tmp_path / "s.npz")["prompts"]) == ["a red cat", "the sun"]
    result = runner.invoke(main, ["clip-score", str(tmp_path / "s.npz"), "--clip", clip_folder])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    images = torch.from_numpy(np.load(tmp_path / "s.npz")["x"])
    expected = ClipScorer(clip_folder)(images, ["a red cat", "the sun"])
    assert scored["num"] == 2 and scored["clip_score"] == pytest.approx(float(expected.mean()), rel=1e-5)
    # errors: an unconditional run, a missing CLIP folder
    result = runner.invoke(main, ["clip-score", str(tmp_path / "s.npz"), "--clip", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "Traceback" not in result.output

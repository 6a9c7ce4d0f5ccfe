"""A text-to-image teacher in the trainer (issue 29): prompt files, the embeddings (diffusers'
encode_prompt), their cache in the run folder, the guided teacher (classifier-free guidance with
the negative prompt's embedding = diffusers' formula), the per-step prompt draws, exact resume,
and the errors for what cannot be trained."""

import json
import os
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from text_pipeline import PROMPTS, save_prompts, save_text_pipeline  # noqa: E402

from pid_fast.io.errors import CheckpointFormatError  # noqa: E402
from pid_fast.io.text_conditioning import (TextEncoder, cached_embeddings, load_text_encoder,  # noqa: E402
                                           read_prompts)
from pid_fast.models.guidance import GuidedDenoiser  # noqa: E402
from pid_fast.train import build_teacher, load_student, resolve_config, train  # noqa: E402
from pid_fast.train.loop import step_seed  # noqa: E402
from pid_fast.train.prompts import text_conditions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return save_text_pipeline(tmp_path_factory.mktemp("pipe") / "sd-tiny")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return save_prompts(tmp_path_factory.mktemp("prompts") / "prompts.txt")


def _config(pipeline, prompts, guidance=None, **over):
    teacher = {"kind": "diffusers", "path": pipeline, "prompts": prompts}
    if guidance is not None:
        teacher["guidance"] = guidance
    cfg = {"device": "cpu", "teacher": teacher, "loss": {"N": 50}, "batch_size": 4, "total_steps": 4,
           "log_every": 2, "checkpoint_every": 2, "keep_checkpoints": 0, "snapshot_every": 0, "progress": False,
           "ema_rates": [0.5], "optimizer": {"lr": 1e-3}}
    cfg.update(over)
    return cfg


# --------------------------------------------------------------------------------------------
# Prompt files


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  \nthe sea\r\n")
    assert read_prompts(txt) == ["a cat", "the sea"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "id": 1}\n\n{"prompt": "a dog"}\n')
    assert read_prompts(jsonl) == ["a cat", "a dog"]
    (tmp_path / "c.jsonl").write_text('{"caption": "one"}\n')
    assert read_prompts(tmp_path / "c.jsonl") == ["one"]
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match=r"teacher.prompts.*line 1 has no prompt column.*'title'"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"teacher.prompts.*holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match=r"teacher.prompts: no such file"):
        read_prompts(tmp_path / "missing.txt")


def test_parquet_prompts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a cat", "a dog"]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == ["a cat", "a dog"]


# --------------------------------------------------------------------------------------------
# Embeddings and their cache


def test_embeddings_are_diffusers_encode_prompt(pipeline):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    ours = load_text_encoder(pipeline)(PROMPTS[:2] + [""])
    theirs, negative = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, True, negative_prompt=["", ""])
    assert ours.shape == (3, 12, 16) and ours.dtype == torch.float32
    torch.testing.assert_close(ours[:2], theirs, rtol=0, atol=0)
    torch.testing.assert_close(ours[2:], negative[:1], rtol=0, atol=0)


def test_a_long_prompt_is_truncated_with_one_warning(pipeline):
    encoder = load_text_encoder(pipeline)
    long = ["a " * 20 + "cat", "the " * 30]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = encoder(long, batch_size=1)
        encoder(long)
    ours = [w for w in caught if "truncated" in str(w.message)]
    assert len(ours) == 1 and "2 prompt(s)" in str(ours[0].message) and "12 tokens" in str(ours[0].message)
    # truncated as diffusers truncates: the first 12 tokens' embedding
    tokens = encoder.tokenizer(long, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    torch.testing.assert_close(out, encoder.text_encoder(tokens.input_ids)[0], rtol=0, atol=0)


def test_the_cache_is_keyed_by_encoder_and_prompts(pipeline, tmp_path):
    emb, neg, info = cached_embeddings(pipeline, PROMPTS, "", tmp_path)
    assert info["encoded"] and os.path.isfile(info["file"]) and emb.shape == (4, 12, 16) and neg.shape == (1, 12, 16)
    again, neg2, info2 = cached_embeddings(pipeline, PROMPTS, "", tmp_path)
    assert not info2["encoded"] and torch.equal(again, emb) and torch.equal(neg2, neg)
    other = cached_embeddings(pipeline, PROMPTS[:3], "blurry", tmp_path)
    assert other[2]["encoded"] and other[2]["file"] != info["file"]
    torch.testing.assert_close(other[0], emb[:3], rtol=0, atol=0)
    torch.testing.assert_close(other[1], load_text_encoder(pipeline)(["blurry"]), rtol=0, atol=0)
    # a changed text encoder (another weights file) is another key
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(pipeline, copy)
    encoder = transformers.CLIPTextModel.from_pretrained(copy / "text_encoder")
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    encoder.save_pretrained(copy / "text_encoder")
    changed = cached_embeddings(str(copy), PROMPTS, "", tmp_path)
    assert changed[2]["encoded"] and changed[2]["encoder_sha256"] != info["encoder_sha256"]
    assert not torch.equal(changed[0], emb)


# --------------------------------------------------------------------------------------------
# The guided teacher


def test_guided_text_teacher_is_diffusers_cfg(pipeline, prompts_file):
    guidance = {"scale": 4.5, "guide": "unconditional", "negative_prompt": "blurry"}
    cfg = resolve_config(_config(pipeline, prompts_file, guidance))
    text = text_conditions(cfg["teacher"], None)
    teacher, net = build_teacher(cfg["teacher"], torch.device("cpu"), text.negative)
    assert isinstance(teacher, GuidedDenoiser) and teacher.shares_network
    assert net["class_name"] == "UNet2DConditionModel"
    torch.testing.assert_close(text.negative, load_text_encoder(pipeline)(["blurry"]), rtol=0, atol=0)
    # D_w(x; sigma) = x - sigma (eps_u + w (eps_c - eps_u)), the UNet called at x / sqrt(1 + sigma^2)
    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(pipeline, "unet"))
    x, sigma = torch.randn(2, 4, 8, 8) * 3, torch.tensor([2.0, 0.5])
    labels = text.embeddings[:2]
    timestep = teacher.main.timesteps(sigma)
    x_in = x / (1 + sigma.square()).sqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        eps_c = unet(x_in, timestep, encoder_hidden_states=labels).sample
        eps_u = unet(x_in, timestep, encoder_hidden_states=text.negative.expand(2, -1, -1)).sample
        expected = x - sigma.view(-1, 1, 1, 1) * (eps_u + 4.5 * (eps_c - eps_u))
        torch.testing.assert_close(teacher(x, sigma, labels), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"teacher.guidance.*negative prompt's embedding"):
        build_teacher(cfg["teacher"], torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# The trainer


def test_prompt_draws_are_a_function_of_seed_and_step(pipeline, prompts_file):
    text = text_conditions(resolve_config(_config(pipeline, prompts_file))["teacher"], None)
    first = text.indices(step_seed(0, 7), 4000)
    assert torch.equal(first, text.indices(step_seed(0, 7), 4000))
    assert not torch.equal(first, text.indices(step_seed(0, 8), 4000))
    counts = torch.bincount(first, minlength=4).float() / 4000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.03)  # uniform
    rows = text.draw(step_seed(0, 7), 4000, torch.device("cpu"))
    assert torch.equal(rows, text.embeddings[first])


def test_training_runs_guided_and_resumes_bit_for_bit(pipeline, prompts_file, tmp_path, monkeypatch):
    guidance = {"scale": 3.0, "guide": "unconditional", "interval": [0.1, 10.0]}
    cfg = _config(pipeline, prompts_file, guidance, snapshot_every=4, snapshot_num=3)
    whole = train(cfg, tmp_path / "whole", threads=1)
    cache = os.listdir(tmp_path / "whole" / "text_embeddings")
    assert len(cache) == 1 and cache[0].startswith("text-embeddings-") and whole["step"] == 4
    assert os.path.isfile(tmp_path / "whole" / "samples-000000004.png")  # decoded through the VAE
    from PIL import Image

    assert Image.open(tmp_path / "whole" / "samples-000000004.png").mode == "RGB"
    train(dict(cfg, total_steps=2), tmp_path / "part", threads=1)
    # the resumed run reads the cached embeddings: the text encoder never runs again
    monkeypatch.setattr(TextEncoder, "__call__", lambda *a, **k: pytest.fail("the text encoder ran on resume"))
    train(cfg, tmp_path / "part", resume=True, threads=1)
    a, meta = load_student(tmp_path / "whole")
    b, _ = load_student(tmp_path / "part")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert meta["text"]["num_prompts"] == 4 and meta["text"]["embedding_shape"] == [12, 16]
    assert meta["text"]["pipeline"] == os.path.abspath(pipeline) and meta["label_dim"] == 0
    assert meta["shape"] == [4, 8, 8]
    stored = json.load(open(tmp_path / "whole" / "config.json"))
    assert stored["teacher"]["prompts"] == prompts_file


def test_text_errors(pipeline, prompts_file, tmp_path):
    import shutil

    # a text-conditioned teacher without prompts
    cfg = _config(pipeline, None)
    del cfg["teacher"]["prompts"]
    with pytest.raises(ValueError, match=r"config\['teacher.prompts'\] is required.*UNet2DConditionModel"):
        train(cfg, tmp_path / "r1", threads=1)
    # an empty prompt file
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"teacher.prompts.*holds no prompts"):
        train(_config(pipeline, str(tmp_path / "empty.txt")), tmp_path / "r2", threads=1)
    # a folder missing a component, named
    broken = tmp_path / "broken"
    shutil.copytree(pipeline, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(CheckpointFormatError, match=r"lacks tokenizer/"):
        train(_config(str(broken), prompts_file), tmp_path / "r3", threads=1)
    # a scheduler the adapter does not support, with the supported ones named
    flow = tmp_path / "flow"
    shutil.copytree(pipeline, flow)
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(flow / "scheduler")
    with pytest.raises(ValueError, match=r"FlowMatchEulerDiscreteScheduler.*DDPMScheduler.*EDMEulerScheduler"):
        train(_config(str(flow), prompts_file), tmp_path / "r4", threads=1)
    # config keys
    with pytest.raises(ValueError, match=r"teacher.guidance.negative_prompt"):
        resolve_config(_config(pipeline, None, {"scale": 2.0, "guide": "unconditional", "negative_prompt": "x"}))
    with pytest.raises(ValueError, match=r"teacher.prompts"):
        resolve_config(_config(pipeline, 3))


def test_resume_refuses_changed_prompts(pipeline, tmp_path):
    prompts = save_prompts(tmp_path / "p.txt")
    cfg = _config(pipeline, prompts, total_steps=2)
    train(cfg, tmp_path / "run", threads=1)
    save_prompts(tmp_path / "p.txt", ["a green dog"] + PROMPTS[1:])  # same file, other prompts
    with pytest.raises(ValueError, match=r"cannot resume .*the prompt list \(teacher.prompts\).*changed"):
        train(dict(cfg, total_steps=4), tmp_path / "run", resume=True, threads=1)

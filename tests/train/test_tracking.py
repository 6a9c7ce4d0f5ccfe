"""Dashboards (config 'log'): TensorBoard event files that tensorboard's own reader parses, with the
numbers of log.jsonl; W&B in offline mode when its package is installed."""

import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from pid_fast.train import apply_overrides, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_training import tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_tensorboard_events_hold_the_logged_numbers(tmp_path, parallel):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(**{"total_steps": 4, "log_every": 1, "checkpoint_every": 4, "snapshot_every": 2,
                         "log.tensorboard": True, "parallel": parallel})
    train(cfg, tmp_path)
    acc = _events(tmp_path)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s"}
    records = _records(tmp_path)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in records] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in records], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/grad_norm")], [r["grad_norm"] for r in records],
                               rtol=1e-6)
    assert all(r["grad_norm"] > 0 for r in records)
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-3] * 4)
    images = acc.Images("samples/one_step")
    assert [e.step for e in images] == [0, 2, 4]
    assert (images[0].width, images[0].height) == (16, 16)  # 4 samples of 8 x 8 in a 2 x 2 grid
    assert images[0].encoded_image_string != images[-1].encoded_image_string


def test_tensorboard_off_writes_nothing_and_cli_flag(tmp_path):
    pytest.importorskip("tensorboard")
    from pid_fast.cli import main as group

    train(tiny_config(total_steps=1), tmp_path / "off")
    assert not os.path.exists(tmp_path / "off" / "tensorboard")
    assert "grad_norm" not in _records(tmp_path / "off")[0]  # no extra pass over the gradients
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(tiny_config(total_steps=2)))
    res = CliRunner().invoke(group, ["distill", "--config", str(cfg_path), "--run-dir", str(tmp_path / "on"),
                                     "--tensorboard", "--parallel", "fsdp", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert _events(tmp_path / "on").Tags()["scalars"]
    assert json.load(open(tmp_path / "on" / "config.json"))["parallel"] == "fsdp"


def test_resumed_run_drops_the_killed_runs_tail_of_events(tmp_path):
    """A resumed run restarts its events at the checkpoint's step (purge_step): no step twice."""
    pytest.importorskip("tensorboard")
    cfg = tiny_config(**{"total_steps": 3, "log_every": 1, "checkpoint_every": 2, "log.tensorboard": True})
    train(cfg, tmp_path)  # checkpoints at 2 and 3
    os.remove(os.path.join(tmp_path, "checkpoint-000000003.pt"))  # as if killed after logging step 3
    train(apply_overrides(cfg, {"total_steps": 4}), tmp_path, resume=True)
    steps = [e.step for e in _events(tmp_path).Scalars("train/loss")]
    assert steps == [1, 2, 3, 4]


def test_missing_tracker_package_is_named(tmp_path, monkeypatch):
    import pid_fast.train.tracking as tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"log\.tensorboard.*pid_fast\[tensorboard\]"):
        train(tiny_config(**{"total_steps": 1, "log.tensorboard": True}), tmp_path)


class _FakeWandb:
    """Records what the trainer hands W&B (init's arguments, log calls, images, finish)."""

    def __init__(self):
        self.inits, self.logs, self.finished = [], [], 0

    def module(self):
        import importlib.machinery
        import types

        mod = types.ModuleType("wandb")
        mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what check_trackers' find_spec sees
        fake = self

        class Run:
            def log(self, values, step=None):
                fake.logs.append((step, dict(values)))

            def finish(self):
                fake.finished += 1

        def init(**kwargs):
            fake.inits.append(kwargs)
            return Run()

        mod.init, mod.Image = init, lambda array: ("image", tuple(array.shape))
        return mod


def test_wandb_gets_the_logged_numbers_and_one_run_id_across_a_resume(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    over = {"log_every": 1, "checkpoint_every": 2, "snapshot_every": 2, "log.wandb": True,
            "log.wandb_project": "my-project"}
    train(tiny_config(**over, total_steps=2), tmp_path)
    train(tiny_config(**over, total_steps=4), tmp_path, resume=True)
    assert len(fake.inits) == 2 and fake.finished == 2
    first, second = fake.inits
    assert first["id"] == second["id"] == (tmp_path / "wandb-id").read_text().strip() and len(first["id"]) == 8
    assert first["project"] == "my-project" and first["resume"] == "allow" and first["dir"] == str(tmp_path)
    scalars = {step: values for step, values in fake.logs if "train/loss" in values}
    records = {r["step"]: r for r in _records(tmp_path) if "loss" in r}
    assert sorted(scalars) == sorted(records) == [1, 2, 3, 4]
    for step, values in scalars.items():
        assert values["train/loss"] == pytest.approx(records[step]["loss"], rel=1e-6)
        assert values["train/lr"] == pytest.approx(records[step]["lr"], rel=1e-6)
    images = [step for step, values in fake.logs if "samples/one_step" in values]
    assert 2 in images and 4 in images
    assert all(values["samples/one_step"][0] == "image" for _, values in fake.logs if "samples/one_step" in values)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run(tmp_path, monkeypatch):
    """The real package, offline: a run and its resume write one W&B run (the same id)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    over = {"log_every": 1, "checkpoint_every": 2, "snapshot_every": 2, "log.wandb": True}
    train(tiny_config(**over, total_steps=2), tmp_path)
    train(tiny_config(**over, total_steps=4), tmp_path, resume=True)
    run_id = (tmp_path / "wandb-id").read_text().strip()
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    # offline-run-<date>_<time>-<id>, with "-1" added by wandb when both start in the same second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", d) for d in runs), runs
    images = [f for d in runs for f in os.listdir(tmp_path / "wandb" / d / "files" / "media" / "images" / "samples")]
    assert len(images) >= 2

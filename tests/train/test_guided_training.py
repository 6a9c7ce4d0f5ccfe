"""config['teacher.guidance']: the trainer distils the guided teacher (pid_fast.guided)."""

import pytest
import torch

from pid_fast.models.guidance import GuidedDenoiser
from pid_fast.train import build_teacher, resolve_config, train
from pid_fast.train.checkpoint import list_checkpoints, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

NET = {"name": "tiny-ddpmpp", "model_channels": 8, "channel_mult": [1], "attn_resolutions": [], "img_resolution": 8,
       "in_channels": 1, "out_channels": 1, "label_dim": 3}


def _config(guidance, **over):
    cfg = {"device": "cpu", "teacher": {"kind": "network", "network": NET, "seed": 0, "guidance": guidance},
           "student": {"init": "teacher"}, "batch_size": 4, "total_steps": 2, "checkpoint_every": 2,
           "snapshot_every": 0, "progress": False, "ema_rates": [0.5]}
    cfg.update(over)
    return cfg


def test_guidance_config_builds_the_guided_teacher():
    cfg = resolve_config(_config({"scale": 2.0, "guide": "unconditional", "interval": [0.1, 5.0]}))
    teacher, _ = build_teacher(cfg["teacher"], torch.device("cpu"))
    assert isinstance(teacher, GuidedDenoiser) and teacher.shares_network
    assert teacher.scale == 2.0 and teacher.interval == (0.1, 5.0) and teacher.guide_labels == "zeros"
    cfg = resolve_config(_config({"scale": 1.5, "guide": "unconditional", "null_label": 2}))
    teacher, _ = build_teacher(cfg["teacher"], torch.device("cpu"))
    assert torch.equal(teacher.guide_labels, torch.tensor([0.0, 0.0, 1.0]))
    guide = {"kind": "network", "network": dict(NET, model_channels=4), "seed": 3}
    cfg = resolve_config(_config({"scale": 2.5, "guide": guide}))
    teacher, _ = build_teacher(cfg["teacher"], torch.device("cpu"))
    assert not teacher.shares_network and teacher.guide.model is not teacher.main.model


@pytest.mark.parametrize("guidance, match", [
    ({"scale": "2", "guide": "unconditional"}, "teacher.guidance.scale"),
    ({"scale": 2.0}, "teacher.guidance.guide"),
    ({"scale": 2.0, "guide": "unconditional", "interval": [3.0, 1.0]}, "teacher.guidance.interval"),
    ({"scale": 2.0, "guide": "unconditional", "bogus": 1}, "teacher.guidance.bogus"),
    ({"scale": 2.0, "guide": {"kind": "nope"}}, "teacher.kind"),
    ({"scale": 2.0, "guide": {"kind": "gaussian"}, "null_label": 1}, "teacher.guidance.null_label"),
])
def test_bad_guidance_config_names_the_key(guidance, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(_config(guidance))


def test_trainer_distils_the_guided_teacher(tmp_path):
    """Two steps with guidance differ from two steps without (the teacher's target differs);
    with scale 1 they are the unguided run bit for bit."""
    runs = {}
    for name, guidance in (("guided", {"scale": 3.0, "guide": "unconditional"}),
                           ("scale1", {"scale": 1.0, "guide": "unconditional"}), ("plain", None)):
        train(_config(guidance), tmp_path / name, threads=1)
        runs[name] = read_checkpoint(list_checkpoints(tmp_path / name)[0][1])["model"]
    assert all(torch.equal(runs["scale1"][k], runs["plain"][k]) for k in runs["plain"])
    assert any(not torch.equal(runs["guided"][k], runs["plain"][k]) for k in runs["plain"])


def test_student_dropout_needs_allow_stochastic_student(tmp_path):
    """A student with dropout gets different masks at t and t2: the trainer stops with PIDLoss's
    error unless loss.allow_stochastic_student is set."""
    config = _config(None, student={"init": "teacher", "dropout": 0.2})
    with pytest.raises(ValueError, match="allow_stochastic_student"):
        train(config, tmp_path / "a", threads=1)
    config["loss"] = {"allow_stochastic_student": True}
    assert train(config, tmp_path / "b", threads=1)["step"] == 2

"""The trainer's newer loss keys (lpips_pooling, lpips_lin_weights, derivative) and resuming runs
whose checkpoints predate them."""

import pytest
import torch

from pid_fast.train import apply_overrides, resolve_config, train
from pid_fast.train.builders import build_loss
from pid_fast.train.checkpoint import list_checkpoints
from pid_fast.train.config import check_resume_config

pytestmark = pytest.mark.usefixtures("one_thread")

NET = "tiny-ddpmpp"


def tiny_config(**over):
    cfg = {"device": "cpu", "teacher": {"kind": "network", "network": NET, "precond": "edm", "seed": 0},
           "student": {"init": "random", "network": NET, "seed": 1}, "batch_size": 2, "total_steps": 2,
           "log_every": 1, "checkpoint_every": 1, "snapshot_every": 0, "progress": False,
           "ema_rates": [0.9], "optimizer": {"lr": 1e-3}}
    return apply_overrides(cfg, over)


def test_lpips_keys_validated():
    cfg = resolve_config(tiny_config())
    assert cfg["loss"]["lpips_pooling"] is None and cfg["loss"]["lpips_lin_weights"] is None
    with pytest.raises(ValueError, match="loss.lpips_pooling"):
        resolve_config(tiny_config(**{"loss.lpips_pooling": "mean"}))
    with pytest.raises(ValueError, match="loss.lpips_lin_weights"):
        resolve_config(tiny_config(**{"loss.lpips_lin_weights": 3}))


@pytest.mark.parametrize("pooling, expected", [(None, "avg"), ("avg", "avg"), ("max", "max")])
def test_lpips_pooling_reaches_the_norm(tmp_path, pooling, expected):
    torchvision = pytest.importorskip("torchvision")
    weights = tmp_path / "vgg16.pth"
    features = torchvision.models.vgg16(weights=None).features.state_dict()  # (the classifier is unused)
    torch.save({f"features.{k}": v for k, v in features.items()}, weights)
    cfg = resolve_config(tiny_config(**{"loss.norm": "lpips", "loss.lpips_weights": str(weights),
                                        "loss.lpips_pooling": pooling, "loss.lpips_resize": 32}))
    from pid_fast.train.builders import build_teacher

    teacher, _ = build_teacher(cfg["teacher"], torch.device("cpu"))
    loss = build_loss(cfg["loss"], teacher, torch.device("cpu"), None)
    assert loss.lpips.pooling == expected


def test_resume_checkpoint_written_before_the_lpips_keys(tmp_path):
    """A run whose stored config has no lpips_pooling / lpips_lin_weights resumes; an old VGG
    LPIPS run (max pooling then) is not silently continued with average pooling."""
    run = tmp_path / "run"
    cfg = tiny_config()
    train(cfg, run)
    path = list_checkpoints(run)[0][1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("lpips_pooling", "lpips_lin_weights"):
        del state["config"]["loss"][key]
    torch.save(state, path)
    out = train(apply_overrides(cfg, {"total_steps": 3}), run, resume=True)
    assert out["step"] == 3

    old = resolve_config(tiny_config(**{"loss.norm": "lpips", "loss.lpips_weights": "vgg.pth"}))
    stored = {**old, "loss": {k: v for k, v in old["loss"].items() if not k.startswith("lpips_p")}}
    del stored["loss"]["lpips_lin_weights"]
    with pytest.raises(ValueError, match="cannot resume.*lpips_pooling"):
        check_resume_config(stored, old)
    assert check_resume_config(stored, resolve_config(apply_overrides(old, {"loss.lpips_pooling": "max"})))


def test_derivative_key_reaches_the_loss_and_trains(tmp_path):
    with pytest.raises(ValueError, match="loss.derivative"):
        resolve_config(tiny_config(**{"loss.derivative": "fdd"}))
    cfg = resolve_config(tiny_config(**{"loss.derivative": "jvp"}))
    from pid_fast.train.builders import build_teacher

    teacher, _ = build_teacher(cfg["teacher"], torch.device("cpu"))
    assert build_loss(cfg["loss"], teacher, torch.device("cpu"), None).derivative == "jvp"
    out = train(tiny_config(**{"loss.derivative": "jvp"}), tmp_path / "run")
    assert out["step"] == 2 and out["loss"] is not None and out["loss"] == out["loss"]  # finite, not NaN


# Loss of a mode's first step against fp32's (teacher-initialised student, the same draws); the
# bounds are those of tests/models/test_precision.py, measured on the digits network.
MODE_TOLERANCE = {"fp32": 1e-6, "tf32": 1e-6, "bf16": 6e-2, "bf16-mixed": 7e-2, "fp16": 1.5e-2, "fp16-mixed": 1.5e-2}


def _first_loss(run_dir):
    import json

    with open(run_dir / "log.jsonl") as f:
        return json.loads(f.readline())["loss"]


@pytest.mark.parametrize("derivative", ["fd", "jvp"])
def test_every_precision_mode_trains(tmp_path, derivative):
    """Each mode's first loss against fp32's with the same derivative (the jvp one has no
    cancellation, so the fd bounds hold for it too)."""
    base = tiny_config(**{"total_steps": 1, "student.init": "teacher", "student.network": None,
                          "loss.derivative": derivative})
    train(apply_overrides(base, {"precision": "fp32"}), tmp_path / "fp32")
    ref = _first_loss(tmp_path / "fp32")
    for mode, tol in MODE_TOLERANCE.items():
        run = tmp_path / f"{mode}-{derivative}"
        train(apply_overrides(base, {"precision": mode}), run)
        loss = _first_loss(run)
        assert abs(loss - ref) <= tol * max(abs(ref), 1.0), (mode, loss, ref)
        state = torch.load(list_checkpoints(run)[0][1], map_location="cpu", weights_only=True)
        assert ("grad_scaler" in state) == mode.startswith("fp16")  # loss scaling only in fp16 modes
        assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


def test_fp16_mixed_under_ddp_matches_one_process(tmp_path):
    from pid_fast.train import train_local_ddp

    cfg = tiny_config(**{"batch_size": 4, "total_steps": 2, "student.init": "teacher", "student.network": None,
                         "precision": "fp16-mixed"})
    train_local_ddp(apply_overrides(cfg, {"accum": 1}), tmp_path / "ddp", world_size=2)
    train(cfg, tmp_path / "single")
    a = torch.load(list_checkpoints(tmp_path / "ddp")[0][1], map_location="cpu", weights_only=True)
    b = torch.load(list_checkpoints(tmp_path / "single")[0][1], map_location="cpu", weights_only=True)
    assert a["world_size"] == 2 and "grad_scaler" in a
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=1e-3, atol=1e-4)

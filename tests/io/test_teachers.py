"""The one teacher loader (trainer, CLI, demo) and the atomic safetensors writer."""

import os

import pytest
import torch
from edm_fakes import edm_snapshot, make_teacher

from pid_fast.io import (CheckpointFormatError, ConfigMismatchError, convert, load_checkpoint, load_teacher,
                         load_teacher_with_config, save_checkpoint)
from pid_fast.models.networks import network_config
from pid_fast.models.preconditioning import VPPrecond


def _outputs_match(loaded, teacher, cfg):
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 20.0])
    labels = torch.tensor([3, 4]) if cfg["label_dim"] else None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, labels), teacher(x, sigma, labels), atol=0, rtol=0)


@pytest.mark.parametrize("suffix", [".pkl", ".safetensors", ".bin"])
def test_one_loader_for_pickles_and_converted_files(tmp_path, marker, suffix):
    teacher, cfg = make_teacher("tiny-ncsnpp", "VPPrecond", {})
    pkl = tmp_path / "snap.pkl"
    pkl.write_bytes(edm_snapshot(teacher, cfg, marker))
    path = tmp_path / f"teacher{suffix}"
    if suffix == ".pkl":
        path = pkl
    else:  # the content decides, not the name: '.bin' holds a converted safetensors file
        convert(pkl, path)
    loaded, config = load_teacher_with_config(path, device="cpu")
    assert type(loaded) is VPPrecond and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    assert config["precond"] == "vp" and config["network"] == cfg
    _outputs_match(loaded, teacher, cfg)
    assert type(load_teacher(path, "cpu")) is VPPrecond
    assert not marker.exists()


def test_loader_reads_the_requested_entry(tmp_path, marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    path = tmp_path / "snap.pkl"
    path.write_bytes(edm_snapshot(teacher, cfg, marker))
    with pytest.raises(CheckpointFormatError, match="no 'net' entry"):
        load_teacher_with_config(path, key="net")
    assert load_teacher(path, key="ema").sigma_data == teacher.sigma_data


def test_missing_teacher_file_says_what_it_must_be(tmp_path):
    missing = tmp_path / "nowhere.pkl"
    with pytest.raises(FileNotFoundError, match=r"teacher: no such file: .*nowhere\.pkl.*EDM \.pkl.*pid-fast convert"):
        load_teacher_with_config(missing)
    with pytest.raises(FileNotFoundError, match=r"^teacher\.path: no such file"):
        load_teacher_with_config(missing, name="teacher.path")
    with pytest.raises(FileNotFoundError, match="pid-fast convert"):
        load_teacher(missing)


def test_loader_checks_the_config_against_the_weights(tmp_path):
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    path = tmp_path / "wrong.safetensors"
    save_checkpoint(path, teacher.model.state_dict(),
                    {"precond": "edm", "network": network_config("tiny-ddpmpp", model_channels=32)})
    with pytest.raises(ConfigMismatchError, match="other shapes"):
        load_teacher_with_config(path)
    bad_precond = tmp_path / "bad.safetensors"
    save_checkpoint(bad_precond, teacher.model.state_dict(), {"precond": "edm", "network": cfg, "nonsense": 1})
    with pytest.raises(CheckpointFormatError, match="invalid teacher config"):
        load_teacher_with_config(bad_precond)


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    path = tmp_path / "t.safetensors"
    save_checkpoint(path, teacher.model.state_dict(), {"precond": "edm", "network": cfg})
    before = path.read_bytes()
    import pid_fast.io.atomic as atomic

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(3)}, {"precond": "edm", "network": cfg})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t.safetensors"]
    state_dict, config = load_checkpoint(path)
    assert config["network"] == cfg and set(state_dict) == set(teacher.model.state_dict())

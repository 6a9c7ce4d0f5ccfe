"""The safe EDM checkpoint importer, safetensors conversion, the `convert` command and
student initialisation.

The EDM pickles are built by tests/io/edm_fakes.py, without EDM's code, in EDM's layout; the
module_src they embed would create a marker file (and raise) if it were ever executed.
"""

import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from edm_fakes import Evil as _Evil
from edm_fakes import FakeEDMModules as _FakeEDMModules
from edm_fakes import edm_snapshot, make_teacher, randomize_

from pid_fast import io as ec
from pid_fast.cli import main
from pid_fast.io import edm_pickle
from pid_fast.io import (CheckpointFormatError, ConfigMismatchError, UnsafeCheckpointError,
                         check_network_config, infer_network_config, init_student_from_teacher,
                         load_checkpoint, load_edm_pickle, load_teacher, read_edm_checkpoint,
                         save_checkpoint, student_from_teacher)
from pid_fast.models.networks import build_network, network_config
from pid_fast.models.preconditioning import EDMPrecond, VEPrecond, VPPrecond

CASES = [  # (network config, preconditioning class, its kwargs)
    ("tiny-ddpmpp", EDMPrecond, dict(sigma_data=0.5)),
    ("tiny-ncsnpp", VPPrecond, dict()),
    ("tiny-adm", VEPrecond, dict(sigma_max=50.0)),
]


# ----------------------------------------------------------------------------------------
# Round trips.

@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("name, cls, kwargs", CASES)
def test_import_returns_the_original_weights_and_config(tmp_path, marker, name, cls, kwargs, protocol):
    teacher, cfg = make_teacher(name, cls, kwargs)
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(edm_snapshot(teacher, cfg, marker, protocol=protocol))

    ckpt = read_edm_checkpoint(path)
    original = teacher.model.state_dict()
    assert list(ckpt.state_dict) == list(original)                      # model. stripped, same order
    for key, value in original.items():
        assert torch.equal(ckpt.state_dict[key], value), key
    assert ckpt.dropped_keys == ("model.map_augment.weight",)
    assert ckpt.config["network"] == cfg                               # recorded kwargs, augment_dim dropped
    assert ckpt.config["precond"] == {EDMPrecond: "edm", VPPrecond: "vp", VEPrecond: "ve"}[cls]
    for field, value in kwargs.items():
        assert ckpt.config[field] == value
    assert not marker.exists() and "torch_utils" not in sys.modules


@pytest.mark.parametrize("name, cls, kwargs", CASES)
def test_converted_teacher_denoises_like_the_original(tmp_path, marker, name, cls, kwargs):
    teacher, cfg = make_teacher(name, cls, kwargs)
    src, dst = tmp_path / "snap.pkl", tmp_path / "teacher.safetensors"
    src.write_bytes(edm_snapshot(teacher, cfg, marker))
    ec.convert(src, dst)
    loaded = load_teacher(dst)
    assert type(loaded) is cls and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    labels = torch.tensor([1, 4, 7]) if cfg["label_dim"] else None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, labels), teacher(x, sigma, labels), atol=0, rtol=0)


def test_safetensors_file_holds_weights_and_config_metadata(tmp_path, marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", EDMPrecond, {})
    src, dst = tmp_path / "snap.pkl", tmp_path / "out.safetensors"
    src.write_bytes(edm_snapshot(teacher, cfg, marker))
    ec.convert(src, dst)
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert keys == set(teacher.model.state_dict())
    stored = json.loads(meta["pid_fast.config"])
    assert stored["precond"] == "edm" and stored["network"]["channel_mult"] == [1, 2]
    assert "sigma_max" not in stored                                      # unbounded -> default
    state_dict, config = load_checkpoint(dst)
    assert config["network"] == cfg                                       # tuples restored
    assert torch.equal(state_dict["enc.8x8_conv.weight"], teacher.model.enc["8x8_conv"].weight)


def test_config_is_inferred_from_shapes_without_recorded_arguments(tmp_path, marker):
    cases = [("tiny-ddpmpp", EDMPrecond, {}), ("tiny-ncsnpp", VPPrecond, {}),
             ("tiny-adm", EDMPrecond, {"channels_per_head": 64, "model_channels": 64})]
    for name, cls, overrides in cases:
        cfg = network_config(name, **overrides)
        teacher = cls(randomize_(build_network(cfg)).eval(), label_dim=cfg["label_dim"])
        blob = edm_snapshot(teacher, cfg, marker, record_init_args=False)
        ckpt = read_edm_checkpoint(blob)
        assert ckpt.config["network"] == dict(cfg, dropout=0.0), name  # dropout leaves no trace
        assert infer_network_config(teacher.model.state_dict()) == dict(cfg, dropout=0.0)


def test_adm_head_count_is_not_guessed(marker):
    # tiny-adm uses 16 channels per head, which the weights cannot reveal; EDM always uses 64.
    teacher, cfg = make_teacher("tiny-adm", EDMPrecond, {})
    with pytest.raises(ConfigMismatchError, match="head count cannot be inferred"):
        infer_network_config(teacher.model.state_dict())
    assert read_edm_checkpoint(edm_snapshot(teacher, cfg, marker)).config["network"] == cfg  # recorded


def test_published_configs_are_inferred_from_their_shapes():
    for name in ("cifar10-ddpmpp", "cifar10-ncsnpp", "imagenet64-adm"):
        cfg = network_config(name)
        sd = build_network(name, device="meta").state_dict()
        for key in sd:  # meta tensors carry no values: materialise the small FIR buffers
            if key.endswith("resample_filter"):
                f = torch.tensor(cfg.get("resample_filter", (1, 1)), dtype=torch.float32)
                sd[key] = (torch.outer(f, f) / f.sum() ** 2)[None, None]
        expected = dict(cfg, dropout=0.0)
        if name.endswith("adm"):
            expected["channels_per_head"] = 64
        assert infer_network_config(sd) == expected


def test_expected_config_mismatch_is_reported(tmp_path, marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", EDMPrecond, {})
    blob = edm_snapshot(teacher, cfg, marker)
    assert read_edm_checkpoint(blob, expect="tiny-ddpmpp").config["network"] == cfg
    with pytest.raises(ConfigMismatchError, match="embedding_type: 'fourier' vs 'positional'"):
        read_edm_checkpoint(blob, expect="tiny-ncsnpp")
    with pytest.raises(ConfigMismatchError, match="model_type"):
        read_edm_checkpoint(blob, expect="tiny-adm")


def test_recorded_arguments_that_contradict_the_weights_are_refused(marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", EDMPrecond, {})
    lie = {k: v for k, v in cfg.items() if k != "model_type"}
    lie["model_channels"] = 32
    blob = edm_snapshot(teacher, cfg, marker, extra_state={id(teacher.model): {"_init_kwargs": lie}})
    with pytest.raises(ConfigMismatchError, match="model_channels: 32 vs 16"):
        read_edm_checkpoint(blob)


def test_check_network_config_names_the_differences():
    sd = build_network("tiny-ddpmpp").state_dict()
    check_network_config(network_config("tiny-ddpmpp"), sd)
    with pytest.raises(ConfigMismatchError, match="missing"):
        check_network_config(network_config("tiny-ddpmpp", label_dim=10), sd)
    with pytest.raises(ConfigMismatchError, match="other shapes"):
        check_network_config(network_config("tiny-ddpmpp", model_channels=32), sd)


# ----------------------------------------------------------------------------------------
# Malicious pickles: refused, nothing executed.

def _evil_payloads(marker):
    touch = f"open({str(marker)!r}, 'w').write('pwned')"
    return [
        ("posix.system", _Evil(os.system, f"touch {marker}")),
        ("builtins.eval", _Evil(eval, touch)),
        ("builtins.exec", _Evil(exec, touch)),
        ("subprocess.Popen", _Evil(subprocess.Popen, ["touch", str(marker)])),
        ("subprocess.check_output", _Evil(subprocess.check_output, ["touch", str(marker)])),
        ("builtins.getattr", _Evil(getattr, "text", "upper")),
        ("torch.load", _Evil(torch.load, str(marker))),
        ("builtins.open", _Evil(open, str(marker), "w")),
    ]


@pytest.mark.parametrize("index", range(8))
def test_malicious_globals_are_refused_and_not_executed(tmp_path, marker, index):
    label, payload = _evil_payloads(marker)[index]
    name = f"{payload.fn.__module__}.{payload.fn.__qualname__}"  # e.g. posix.system, io.open
    assert name.endswith(label.split(".")[-1])
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": payload}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load {re.escape(name)}:"):
        read_edm_checkpoint(path)
    assert not marker.exists()


def test_payload_hidden_inside_an_edm_network_is_refused(marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", EDMPrecond, {})
    blob = edm_snapshot(teacher, cfg, marker,
                        extra_state={id(teacher): {"note": _Evil(os.system, f"touch {marker}")}})
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_edm_pickle(blob)
    assert not marker.exists()


def test_payload_inside_a_storage_blob_is_refused(marker):
    # torch.storage._load_from_bytes is allowed, but its bytes are read with weights_only=True.
    blob = pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2)
    outer = pickle.dumps(_Evil(torch.storage._load_from_bytes, blob), protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="storage blob"):
        load_edm_pickle(outer)
    assert not marker.exists()


def test_allowed_callables_validate_their_arguments():
    # A numpy object dtype would let pickle data smuggle arbitrary objects in.
    with pytest.raises(UnsafeCheckpointError, match="object dtype"):
        load_edm_pickle(pickle.dumps(np.dtype(object), protocol=4))
    # torch.nn names must be real torch.nn.Module classes.
    bad = b"\x80\x04c" + b"torch.nn.modules.container\n__builtins__\n" + b"."
    with pytest.raises(UnsafeCheckpointError, match="__builtins__"):
        load_edm_pickle(bad)
    # A malformed persistence call is a format error, not a crash.
    with _FakeEDMModules() as fake:
        blob = pickle.dumps(_Evil(fake.hook, {"type": "function"}), protocol=4)
    with pytest.raises(CheckpointFormatError, match="meta type"):
        load_edm_pickle(blob)


@pytest.mark.parametrize("target", [b"torch._utils\n_rebuild_tensor_v2\n", b"torch.storage\n_load_from_bytes\n",
                                    b"torch.nn.modules.container\nModuleDict\n", b"dnnlib.util\nEasyDict\n"])
def test_build_opcode_cannot_alter_the_readers_own_objects(target):
    # GLOBAL <target>; BUILD (None, {'__defaults__': (1,)}) would setattr on what find_class
    # returned; the reader hands out fresh handles, so nothing shared can change.
    before = (edm_pickle._rebuild_tensor_v2.__defaults__, edm_pickle._load_from_bytes.__defaults__)
    payload = b"\x80\x04c" + target + b"N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b."
    try:
        load_edm_pickle(payload)
    except CheckpointFormatError:
        pass
    assert (edm_pickle._rebuild_tensor_v2.__defaults__, edm_pickle._load_from_bytes.__defaults__) == before
    assert not hasattr(ec.ModuleStub, "__defaults__") and not hasattr(edm_pickle._EasyDictStub, "__defaults__")


def test_torch_load_is_only_used_with_weights_only(monkeypatch, marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", EDMPrecond, {})
    blob = edm_snapshot(teacher, cfg, marker)
    real_load, seen = torch.load, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    read_edm_checkpoint(blob)
    assert seen and all(flag is True for flag in seen)


# ----------------------------------------------------------------------------------------
# Damaged or foreign files.

def test_truncated_and_non_pickle_files_give_clear_errors(tmp_path, marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", EDMPrecond, {})
    blob = edm_snapshot(teacher, cfg, marker)
    for cut in (len(blob) // 2, len(blob) - 1, 10):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(blob[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
            read_edm_checkpoint(path)
    text = tmp_path / "notes.pkl"
    text.write_text("this is not a pickle\n")
    with pytest.raises(CheckpointFormatError, match="not a pickle"):
        read_edm_checkpoint(text)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty"):
        read_edm_checkpoint(empty)
    zipped = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2)}, zipped)
    with pytest.raises(CheckpointFormatError, match="zip archive"):
        read_edm_checkpoint(zipped)
    with pytest.raises(FileNotFoundError):
        read_edm_checkpoint(tmp_path / "missing.pkl")
    assert not marker.exists()


def test_unexpected_contents_are_reported(marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", EDMPrecond, {})
    blob = edm_snapshot(teacher, cfg, marker)
    with pytest.raises(CheckpointFormatError, match=r"no 'net' entry.*'ema'"):
        read_edm_checkpoint(blob, key="net")
    with pytest.raises(CheckpointFormatError, match="not an EDM persistent network"):
        read_edm_checkpoint(blob, key="dataset_kwargs")
    iddpm = edm_snapshot(teacher, cfg, marker, rename={id(teacher): "iDDPMPrecond"})
    with pytest.raises(CheckpointFormatError, match="iDDPMPrecond"):
        read_edm_checkpoint(iddpm)
    unet3d = edm_snapshot(teacher, cfg, marker, rename={id(teacher.model): "UNet3D"})
    with pytest.raises(CheckpointFormatError, match="unsupported network class 'UNet3D'"):
        read_edm_checkpoint(unet3d)
    with pytest.raises(TypeError, match="source"):
        load_edm_pickle(12345)


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointFormatError, match="safetensors"):
        load_checkpoint(bad)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(CheckpointFormatError, match="pid_fast.config"):
        load_checkpoint(plain)
    with pytest.raises(TypeError, match="config"):
        save_checkpoint(tmp_path / "x.safetensors", {"w": torch.ones(1)}, config="cifar")


# ----------------------------------------------------------------------------------------
# The command line.

def test_cli_convert(tmp_path, marker):
    teacher, cfg = make_teacher("tiny-adm", EDMPrecond, {})
    src, dst = tmp_path / "snap.pkl", tmp_path / "out.safetensors"
    src.write_bytes(edm_snapshot(teacher, cfg, marker, augment_dim=0))
    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert "DhariwalUNet with edm preconditioning" in result.output
    state_dict, config = load_checkpoint(dst)
    assert config["network"] == cfg and set(state_dict) == set(teacher.model.state_dict())

    again = runner.invoke(main, ["convert", str(src), str(dst)])
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert runner.invoke(main, ["convert", str(src), str(dst), "--overwrite", "--expect", "tiny-adm"]).exit_code == 0
    wrong = runner.invoke(main, ["convert", str(src), str(dst), "--overwrite", "--expect", "tiny-ddpmpp"])
    assert wrong.exit_code == 1 and "model_type" in wrong.output
    unknown = runner.invoke(main, ["convert", str(src), str(dst), "--overwrite", "--expect", "nope"])
    assert unknown.exit_code == 2 and "unknown config" in unknown.output


def test_cli_refuses_malicious_pickles(tmp_path, marker):
    src, dst = tmp_path / "evil.pkl", tmp_path / "out.safetensors"
    src.write_bytes(pickle.dumps({"ema": _Evil(os.system, f"touch {marker}")}, protocol=4))
    result = CliRunner().invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 1
    assert "unsafe checkpoint: refusing to load posix.system" in result.output
    assert not marker.exists() and not dst.exists()


# ----------------------------------------------------------------------------------------
# Student initialisation.

def test_student_initialised_from_teacher_is_a_copy():
    teacher, cfg = make_teacher("tiny-ddpmpp", EDMPrecond, {})
    student = build_network(cfg)
    report = init_student_from_teacher(student, teacher)
    assert report.skipped == () and set(report.copied) == set(student.state_dict())
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(student.state_dict()[key], value)
    with torch.no_grad():
        student.map_layer0.weight.add_(1.0)
    assert not torch.equal(student.map_layer0.weight, teacher.model.map_layer0.weight)


def test_student_from_converted_teacher(tmp_path, marker):
    teacher, cfg = make_teacher("tiny-ncsnpp", VPPrecond, {})
    src, dst = tmp_path / "snap.pkl", tmp_path / "teacher.safetensors"
    src.write_bytes(edm_snapshot(teacher, cfg, marker))
    ec.convert(src, dst)
    state_dict, config = load_checkpoint(dst)
    student = student_from_teacher(config, state_dict, dropout=0.2)      # non-weight field: allowed
    assert student.enc["8x8_block0"].dropout == 0.2
    for key, value in state_dict.items():
        assert torch.equal(student.state_dict()[key], value)


def test_student_with_a_different_config_is_a_clear_error():
    teacher, cfg = make_teacher("tiny-ddpmpp", EDMPrecond, {})
    other = network_config("tiny-ddpmpp", model_channels=32)
    student = build_network(other)
    with pytest.raises(ConfigMismatchError, match=r"other shapes.*model_channels: 32 vs 16"):
        init_student_from_teacher(student, teacher, student_config=other, teacher_config=cfg)
    with pytest.raises(ConfigMismatchError, match="strict=False"):
        init_student_from_teacher(build_network(network_config("tiny-ddpmpp", label_dim=10)), teacher)
    with pytest.raises(ConfigMismatchError, match="model_channels"):
        student_from_teacher(cfg, teacher.model.state_dict(), model_channels=32)
    # strict=False copies what fits: a conditional student from an unconditional teacher.
    cond = build_network(network_config("tiny-ddpmpp", label_dim=10))
    report = init_student_from_teacher(cond, teacher, strict=False)
    assert report.skipped == ("map_label.weight", "map_label.bias")
    assert torch.equal(cond.enc["8x8_conv"].weight, teacher.model.enc["8x8_conv"].weight)
    with pytest.raises(TypeError, match="student"):
        init_student_from_teacher(teacher.model.state_dict(), teacher)

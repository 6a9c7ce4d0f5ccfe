"""The importer's guards against a silently wrong teacher and against dangerous advice (issue 17),
and snapshots written the way the torch versions of EDM's release wrote them."""

import hashlib
import json
import os
import pickle
import re

import pytest
import torch
from click.testing import CliRunner
from edm_fakes import Evil, edm_snapshot, hostile_source, legacy_storage_blob, make_teacher

from pid_fast.cli import main
from pid_fast.io import (KNOWN_EDM_SOURCES, ConfigMismatchError, UnknownSourceError, UnsafeCheckpointError,
                         convert, load_checkpoint, load_edm_pickle, load_teacher, load_teacher_with_config,
                         read_checkpoint_metadata, read_edm_checkpoint)
from pid_fast.io.edm_config import check_expected_config, network_config_from_pickle
from pid_fast.io.edm_pickle import PersistentObject
from pid_fast.models import networks
from pid_fast.models.networks import build_network, network_config

# ----------------------------------------------------------------------------------------
# 1. ADM: EDM's DhariwalUNet has no channels_per_head argument (64 per head, fixed).


def _edm_adm_kwargs(cfg):
    """The constructor arguments EDM records for its ADM: no channels_per_head, no attention
    resolutions or embedding width when left at their defaults (train.py --arch=adm)."""
    keep = ("img_resolution", "in_channels", "out_channels", "label_dim", "model_channels", "channel_mult",
            "dropout")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in keep}


def test_the_imagenet64_adm_name_matches_what_the_reader_finds_in_edms_adm():
    # What read_edm_checkpoint computes for the released ADM snapshot, on shapes only (meta).
    cfg = network_config("imagenet64-adm")
    state_dict = build_network(cfg, device="meta").state_dict()
    recorded = dict(_edm_adm_kwargs(cfg), augment_dim=0)
    model = PersistentObject("DhariwalUNet", {"_init_kwargs": recorded}, 6, "0" * 64)
    found = network_config_from_pickle(model, state_dict)
    assert found["channels_per_head"] == 64
    check_expected_config("imagenet64-adm", found)                        # was: channels_per_head: None vs 64
    with pytest.raises(ConfigMismatchError, match="channels_per_head: 32 vs 64"):
        check_expected_config(dict(cfg, channels_per_head=32), found)     # a real difference is still caught


@pytest.fixture
def small_adm(monkeypatch):
    """A named ADM config written like 'imagenet64-adm' (no channels_per_head), small enough
    to pickle: 64 channels, so 64 channels per head is possible."""
    cfg = network_config("imagenet64-adm", img_resolution=8, label_dim=10, model_channels=64,
                         channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
    assert "channels_per_head" not in cfg
    monkeypatch.setitem(networks.NETWORK_CONFIGS, "small-adm", cfg)
    return cfg


def test_expect_an_adm_name_accepts_an_edm_adm_snapshot(tmp_path, marker, small_adm):
    teacher, cfg = make_teacher("small-adm", "EDMPrecond", {})
    blob = edm_snapshot(teacher, cfg, marker, augment_dim=0, recorded_kwargs=_edm_adm_kwargs(cfg))
    ckpt = read_edm_checkpoint(blob, expect="small-adm")
    assert ckpt.config["network"]["channels_per_head"] == 64
    with pytest.raises(ConfigMismatchError, match="channels_per_head: 16 vs 64"):
        read_edm_checkpoint(blob, expect=dict(cfg, channels_per_head=16))
    src, dst = tmp_path / "adm.pkl", tmp_path / "adm.safetensors"
    src.write_bytes(blob)
    result = CliRunner().invoke(main, ["convert", str(src), str(dst), "--expect", "small-adm"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------
# 2. The embedded network source is checked against the released EDM sources.

def test_known_sources_are_sha256_of_the_released_edm_files():
    real = {h: w for h, w in KNOWN_EDM_SOURCES.items() if w.startswith("NVlabs/edm")}
    assert len(real) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in real)
    assert all("training/networks.py" in where for where in real.values())


def _one_line_changed(marker):
    return hostile_source(marker).replace("\nraise", "\n# a fork's change\nraise", 1)


def test_a_source_that_differs_by_one_line_is_refused(tmp_path, marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    src = _one_line_changed(marker)
    digest = hashlib.sha256(src.encode()).hexdigest()
    blob = edm_snapshot(teacher, cfg, marker, module_src=src)
    with pytest.raises(UnknownSourceError) as info:
        read_edm_checkpoint(blob)
    message = str(info.value)
    assert message.startswith("ema (EDMPrecond) was pickled with a network module whose source is not a released "
                              "EDM version")
    assert digest in message and "allow_unknown_source=True" in message and "--allow-unknown-source" in message
    path = tmp_path / "fork.pkl"
    path.write_bytes(blob)
    with pytest.raises(UnknownSourceError):
        load_teacher(path)                                            # the trainer's loader checks it too
    assert not marker.exists()


def test_an_unknown_source_deep_in_the_network_is_found(marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    block = teacher.model.enc["8x8_block0"]
    blob = edm_snapshot(teacher, cfg, marker, sources={id(block): _one_line_changed(marker)})
    with pytest.raises(UnknownSourceError, match=r"^ema\.model\.enc\.8x8_block0 \(UNetBlock\)"):
        read_edm_checkpoint(blob)


def test_other_entries_of_the_snapshot_are_not_checked(marker):
    # loss_fn and augment_pipe come from EDM's loss.py / augment.py: only the network matters.
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    other, _ = make_teacher("tiny-ddpmpp", "EDMPrecond", {}, seed=1)
    blob = edm_snapshot(teacher, cfg, marker,
                        extra_state={}, sources={id(other): _one_line_changed(marker)})
    assert read_edm_checkpoint(blob).unknown_sources == ()


def test_accepting_an_unknown_source_is_explicit_and_recorded(tmp_path, marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    src = _one_line_changed(marker)
    digest = hashlib.sha256(src.encode()).hexdigest()
    path, out = tmp_path / "fork.pkl", tmp_path / "fork.safetensors"
    path.write_bytes(edm_snapshot(teacher, cfg, marker, module_src=src))
    ckpt = convert(path, out, allow_unknown_source=True)
    assert ckpt.unknown_sources == ({"object": "ema", "class_name": "EDMPrecond", "module_src_sha256": digest},)
    recorded = json.loads(read_checkpoint_metadata(out)["pid_fast.unknown_source_accepted"])
    assert recorded == [{"object": "ema", "class_name": "EDMPrecond", "module_src_sha256": digest}]
    state_dict, _ = load_checkpoint(out)
    assert torch.equal(state_dict["enc.8x8_conv.weight"], teacher.model.enc["8x8_conv"].weight)
    teacher2, _ = load_teacher_with_config(path, allow_unknown_source=True)
    assert torch.equal(teacher2.model.enc["8x8_conv"].weight, teacher.model.enc["8x8_conv"].weight)
    # A released source leaves no such record.
    known = tmp_path / "known.safetensors"
    convert_path = tmp_path / "known.pkl"
    convert_path.write_bytes(edm_snapshot(teacher, cfg, marker))
    convert(convert_path, known)
    assert "pid_fast.unknown_source_accepted" not in read_checkpoint_metadata(known)
    assert not marker.exists()


def test_cli_refuses_an_unknown_source_unless_allowed(tmp_path, marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    src, dst = tmp_path / "fork.pkl", tmp_path / "out.safetensors"
    src.write_bytes(edm_snapshot(teacher, cfg, marker, module_src=_one_line_changed(marker)))
    runner = CliRunner()
    refused = runner.invoke(main, ["convert", str(src), str(dst)])
    assert refused.exit_code == 1 and "Error: ema (EDMPrecond) was pickled" in refused.output
    assert "--allow-unknown-source" in refused.output and not dst.exists()
    accepted = runner.invoke(main, ["convert", str(src), str(dst), "--allow-unknown-source"])
    assert accepted.exit_code == 0, accepted.output
    assert "accepted an unknown network source for ema (EDMPrecond)" in accepted.output
    assert "pid_fast.unknown_source_accepted" in read_checkpoint_metadata(dst)


# ----------------------------------------------------------------------------------------
# 3. Refusing an unsafe storage blob gives no advice to load it unsafely.

def _evil_storage_snapshot(marker):
    blob = pickle.dumps(Evil(os.system, f"touch {marker}"), protocol=2)
    return pickle.dumps({"ema": Evil(torch.storage._load_from_bytes, blob)}, protocol=4)


def test_the_storage_refusal_says_what_and_why_only(marker):
    with pytest.raises(UnsafeCheckpointError) as info:
        load_edm_pickle(_evil_storage_snapshot(marker))
    message = str(info.value)
    assert message.startswith("refusing to load a storage blob: it references posix.system;")
    assert "may only hold tensor data" in message
    for advice in ("weights_only", "torch.load", "Re-running", "trusted source", "http"):
        assert advice not in message
    assert not marker.exists()


def test_cli_storage_refusal_gives_no_unsafe_advice(tmp_path, marker):
    src, dst = tmp_path / "evil.pkl", tmp_path / "out.safetensors"
    src.write_bytes(_evil_storage_snapshot(marker))
    result = CliRunner().invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 1 and "unsafe checkpoint: refusing to load a storage blob" in result.output
    assert "weights_only" not in result.output and "torch.load" not in result.output
    assert not marker.exists() and not dst.exists()


# ----------------------------------------------------------------------------------------
# Snapshots as older torch versions wrote them.

def test_the_hand_written_legacy_blob_is_torchs_own_layout():
    import io

    flat = torch.arange(6, dtype=torch.float32)
    buf = io.BytesIO()
    torch.save(flat.storage(), buf, _use_new_zipfile_serialization=False)
    ours = legacy_storage_blob(flat, location="cpu", long_size=4, key="k")
    # Same bytes up to the storage key torch derives from a memory address.
    theirs = re.sub(rb"X\x0e\x00\x00\x00\d{14}", b"X\x01\x00\x00\x00k", buf.getvalue())
    assert ours == theirs


@pytest.mark.parametrize("protocol", [2, 3, 4])
@pytest.mark.parametrize("name, cls, kwargs", [("tiny-ddpmpp", "EDMPrecond", {}), ("tiny-adm", "VEPrecond", {})])
def test_snapshot_pickled_by_old_torch_imports_exactly(tmp_path, marker, protocol, name, cls, kwargs):
    teacher, cfg = make_teacher(name, cls, kwargs)
    blob = edm_snapshot(teacher, cfg, marker, protocol=protocol, legacy_tensors=True)
    assert b"cuda:0" in blob and b"_rebuild_parameter" in blob             # old torch's layout, GPU storages
    ckpt = read_edm_checkpoint(blob)
    original = teacher.model.state_dict()
    assert list(ckpt.state_dict) == list(original)
    for key, value in original.items():
        assert ckpt.state_dict[key].device.type == "cpu"
        assert torch.equal(ckpt.state_dict[key], value), key
    path = tmp_path / "old.pkl"
    path.write_bytes(blob)
    loaded = load_teacher(path)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 10.0])
    labels = torch.tensor([1, 2]) if cfg["label_dim"] else None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, labels), teacher(x, sigma, labels), atol=0, rtol=0)


def test_tensors_sharing_one_old_storage_come_out_unshared(marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    first, second = teacher.model.enc["8x8_conv"], teacher.model.enc["8x8_block0"].conv0
    a, b = first.weight.numel(), second.weight.numel()
    shared = torch.randn(a + b)
    # Two parameters viewing one storage, at offsets 0 and a: pickled as ONE storage blob.
    first.weight = torch.nn.Parameter(shared[:a].view_as(first.weight))
    second.weight = torch.nn.Parameter(shared[a:].view_as(second.weight))
    blob = edm_snapshot(teacher, cfg, marker, legacy_tensors=True)
    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
    tensors = teacher.model.state_dict()
    assert blob.count(magic) == len(tensors) + 1 - 1          # + map_augment.weight, - the shared one
    sd = read_edm_checkpoint(blob).state_dict
    assert torch.equal(sd["enc.8x8_conv.weight"], first.weight)
    assert torch.equal(sd["enc.8x8_block0.conv0.weight"], second.weight)
    assert sd["enc.8x8_conv.weight"].untyped_storage().data_ptr() != \
        sd["enc.8x8_block0.conv0.weight"].untyped_storage().data_ptr()


def test_half_precision_old_storages(marker):
    teacher, cfg = make_teacher("tiny-ddpmpp", "EDMPrecond", {})
    teacher.model.half()
    blob = edm_snapshot(teacher, cfg, marker, legacy_tensors=True)
    assert b"HalfStorage" in blob
    sd = read_edm_checkpoint(blob).state_dict
    for key, value in teacher.model.state_dict().items():
        assert sd[key].dtype == value.dtype and torch.equal(sd[key], value), key

"""EDM2 snapshots (NVlabs/edm2) through the safe importer: synthetic snapshots in EDM2's layout
(tests/io/edm_fakes.py), conversion, the encoder's latent scaling, refused malicious files."""

import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from edm_fakes import (Evil, FakePersistent, edm2_snapshot, hostile_source, make_edm2_teacher, sha256,
                       stability_encoder)

from pid_fast.cli import main
from pid_fast.io import (ConfigMismatchError, UnknownSourceError, UnsafeCheckpointError, convert, edm_sources,
                         load_checkpoint, load_edm_pickle, load_teacher_with_config, module_state_dict,
                         read_edm_checkpoint)
from pid_fast.io.edm_config import infer_network_config
from pid_fast.io.pickle_values import ArrayStub
from pid_fast.models.edm2 import EDM2Precond
from pid_fast.models.networks import build_network, network_config

CFG = network_config("tiny-edm2", label_dim=5)


@pytest.fixture(autouse=True)
def edm2_test_source_is_known(marker, monkeypatch):
    """The synthetic snapshots embed `hostile_source(marker)`: known as EDM2's source for the test."""
    monkeypatch.setitem(edm_sources.KNOWN_EDM2_SOURCES, sha256(hostile_source(marker)), "tests: synthetic EDM2")


@pytest.fixture(scope="module")
def teacher():
    return make_edm2_teacher(CFG)


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(3, 3, 8, 8, generator=gen), torch.tensor([0.02, 0.9, 30.0]), torch.tensor([0, 2, 4]))


def test_known_edm2_source_is_the_released_networks_edm2():
    real = {h: w for h, w in edm_sources.KNOWN_EDM2_SOURCES.items() if w.startswith("NVlabs/edm2")}
    assert list(real) == ["7298880db4bf955d2941496cce3a554a970867b3eae4d22276cb1c293c131fa2"]
    assert "training/networks_edm2.py" in real[next(iter(real))]
    assert not set(real) & set(edm_sources.KNOWN_EDM_SOURCES)


def test_read_an_edm2_snapshot(teacher, marker):
    blob = edm2_snapshot(teacher, CFG, marker)
    ckpt = read_edm_checkpoint(blob)
    assert not marker.exists()  # the embedded source was never run
    assert ckpt.config["precond"] == "edm" and ckpt.config["sigma_data"] == 0.5 and ckpt.config["use_fp16"]
    assert ckpt.config["encoder"] == {"kind": "rgb"}
    net = ckpt.config["network"]
    assert net["model_type"] == "EDM2UNet" and net["in_channels"] == net["out_channels"] == 3
    assert {k: net[k] for k in ("label_dim", "model_channels", "channel_mult", "num_blocks", "attn_resolutions",
                                "channels_per_head")} == {k: CFG[k] for k in ("label_dim", "model_channels",
                                                                              "channel_mult", "num_blocks",
                                                                              "attn_resolutions", "channels_per_head")}
    assert ckpt.dropped_keys == ("logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight")
    half = {k: v.half().float() for k, v in teacher.model.state_dict().items()}  # EDM2 stores fp16
    assert list(ckpt.state_dict) == list(half)
    assert all(v.dtype == torch.float32 and torch.equal(v, half[k]) for k, v in ckpt.state_dict.items())


def test_loaded_teacher_denoises_like_edm2s_precond(teacher, marker, tmp_path):
    path = tmp_path / "edm2.pkl"
    path.write_bytes(edm2_snapshot(teacher, CFG, marker, protocol=5))
    loaded, config = load_teacher_with_config(path)
    reference = EDM2Precond(build_network(CFG), label_dim=5)
    full = module_state_dict(load_edm_pickle(path)["ema"])  # EDM2's names load as they are
    reference.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
    x, sigma, labels = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, labels), reference.eval()(x, sigma, labels))
        assert not torch.allclose(loaded(x, sigma, labels), loaded(x, sigma, None))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_stability_vae_encoder_is_recorded(teacher, marker):
    from pid_fast.eval.vae import latent_scaling

    blob = edm2_snapshot(teacher, CFG, marker, encoder=stability_encoder(record_kwargs=True))
    encoder = read_edm_checkpoint(blob).config["encoder"]
    scale, bias = latent_scaling()
    assert encoder["kind"] == "stability-vae" and encoder["vae_name"] == "stabilityai/sd-vae-ft-mse"
    assert encoder["scale"] == scale.tolist() and encoder["bias"] == bias.tolist()  # EDM2's float32 values
    other = read_edm_checkpoint(edm2_snapshot(teacher, CFG, marker,
                                              encoder=stability_encoder(raw_mean=(0, 0, 0, 1), final_std=1.0)))
    assert other.config["encoder"]["scale"] == pytest.approx([1 / 4.17, 1 / 4.62, 1 / 3.71, 1 / 3.28])
    assert other.config["encoder"]["bias"] == pytest.approx([0, 0, 0, -1 / 3.28])


def test_convert_cli_and_the_converted_file(teacher, marker, tmp_path):
    src, dst = tmp_path / "edm2.pkl", tmp_path / "edm2.safetensors"
    src.write_bytes(edm2_snapshot(teacher, CFG, marker, encoder=stability_encoder()))
    result = CliRunner().invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert "EDM2UNet with edm preconditioning" in result.output and "logvar_fourier, logvar_linear" in result.output
    assert "latent teacher" in result.output
    state_dict, config = load_checkpoint(dst)
    assert config["encoder"]["kind"] == "stability-vae" and config["network"]["model_type"] == "EDM2UNet"
    from_pkl, _ = load_teacher_with_config(src)
    from_file, _ = load_teacher_with_config(dst)
    x, sigma, labels = _inputs()
    with torch.no_grad():
        assert torch.equal(from_pkl(x, sigma, labels), from_file(x, sigma, labels))
    convert(src, tmp_path / "again.safetensors", expect=dict(CFG))
    with pytest.raises(ConfigMismatchError, match="model_channels: 32 vs 16"):
        read_edm_checkpoint(src, expect=dict(CFG, model_channels=32))


def test_without_recorded_arguments_the_config_is_read_off_the_weights(marker):
    cfg = network_config("tiny-edm2", model_channels=64, channels_per_head=64, channel_mult=(1,),
                         attn_resolutions=(8,), label_dim=0)
    teacher = make_edm2_teacher(cfg)
    ckpt = read_edm_checkpoint(edm2_snapshot(teacher, cfg, marker, record_init_args=False))
    found = ckpt.config["network"]
    assert (found["model_channels"], found["channel_mult"], found["attn_resolutions"], found["channels_per_head"],
            found["channel_mult_noise"], found["channel_mult_emb"]) == (64, (1,), (8,), 64, None, None)
    # 16 channels per head leave widths that EDM2's default 64 per head cannot have: not guessed
    with pytest.raises(ConfigMismatchError, match="64 channels per head"):
        infer_network_config(build_network(CFG).state_dict())


def test_a_modified_unet_is_refused(teacher, marker):
    recorded = dict(img_resolution=8, img_channels=3, label_dim=5, model_channels=16, channels_per_head=16)
    with pytest.raises(ConfigMismatchError, match="my_new_layer"):
        read_edm_checkpoint(edm2_snapshot(teacher, CFG, marker, recorded_kwargs=dict(recorded, my_new_layer=True)))
    with pytest.raises(ConfigMismatchError, match="do not fit"):  # recorded arguments the weights contradict
        read_edm_checkpoint(edm2_snapshot(teacher, CFG, marker, recorded_kwargs=dict(recorded, model_channels=32)))


def test_unknown_and_wrong_family_sources_are_refused(teacher, marker, monkeypatch):
    other = "print('a fork of networks_edm2.py')\n"
    with pytest.raises(UnknownSourceError, match="released EDM2 version"):
        read_edm_checkpoint(edm2_snapshot(teacher, CFG, marker, module_src=other))
    # a hash known as an EDM (2022) source does not vouch for EDM2's classes
    monkeypatch.setitem(edm_sources.KNOWN_EDM_SOURCES, sha256(other), "tests: EDM")
    with pytest.raises(UnknownSourceError):
        read_edm_checkpoint(edm2_snapshot(teacher, CFG, marker, module_src=other))
    ckpt = read_edm_checkpoint(edm2_snapshot(teacher, CFG, marker, module_src=other), allow_unknown_source=True)
    assert ckpt.unknown_sources[0]["class_name"] == "Precond"


def test_malicious_edm2_snapshots_are_refused_without_running_anything(teacher, marker):
    # In what is converted (the network, the encoder's latent scaling) an unknown global is refused.
    attack = dict(encoder=FakePersistent("StabilityVAEEncoder", {"scale": Evil(eval, "1")}))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load builtins.eval"):
        read_edm_checkpoint(edm2_snapshot(teacher, CFG, marker, **attack))
    # Other entries are skipped: the payloads become inert placeholders, named, never called.
    skipped = {
        "top level": (dict(top_extra={"x": Evil(os.system, f"touch {marker}")}), "x: posix.system"),
        "dataset kwargs": (dict(top_extra={"dataset_kwargs": {"class_name": Evil(exec, f"open({str(marker)!r}, 'w')")}}),
                           "dataset_kwargs: a dict"),
    }
    for what, (kwargs, named) in skipped.items():
        ckpt = read_edm_checkpoint(edm2_snapshot(teacher, CFG, marker, **kwargs))
        assert any(entry.startswith(named) for entry in ckpt.skipped), (what, ckpt.skipped)
    assert not marker.exists()


def _array_pickle(subtype_module, subtype_name, dtype="f4", data=b"\0" * 8):
    # numpy's _reconstruct(subtype, (0,), b'b') + BUILD((1, shape, dtype, False, data)), written by hand.
    dt = pickle.dumps(np.dtype(dtype), protocol=2)[2:-1]  # the dtype's opcodes without PROTO/STOP
    return (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nc" + f"{subtype_module}\n{subtype_name}\n".encode()
            + b"K\x00\x85C\x01b\x87R(K\x01K\x02\x85" + dt + b"\x89" + pickle.dumps(data, protocol=2)[2:-1]
            + b"tb.")


def test_numpy_arrays_are_rebuilt_safely():
    value = load_edm_pickle(_array_pickle("numpy", "ndarray"))
    assert value.array.tolist() == [0.0, 0.0] and not value.array.flags.writeable
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        load_edm_pickle(_array_pickle("os", "system"))
    with pytest.raises(UnsafeCheckpointError, match="dtype"):
        load_edm_pickle(_array_pickle("numpy", "ndarray", dtype="O"))
    with pytest.raises(Exception, match="bytes do not fill"):
        load_edm_pickle(_array_pickle("numpy", "ndarray", data=b"\0" * 7))
    assert isinstance(value, ArrayStub)


def test_a_safetensors_header_length_ending_in_0x80_is_not_taken_for_a_pickle(tmp_path):
    from pid_fast.io.teachers import _is_pickle

    path = tmp_path / "t.safetensors"
    path.write_bytes((0x1980).to_bytes(8, "little") + b"{" + b" " * 0x1980)  # first byte 0x80, like PROTO
    assert not _is_pickle(str(path))
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert _is_pickle(str(path))

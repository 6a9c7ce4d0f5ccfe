"""Teachers from files: EDM and EDM2 snapshots read safely (`read_edm_checkpoint`), their
conversion to pid_fast's safetensors format (`convert`), and the one teacher loader that the
trainer, the CLI and the demo use (`load_teacher_with_config` / `load_teacher`).

An EDM2 snapshot (NVlabs/edm2: {'ema': Precond, 'encoder', 'loss_fn', 'dataset_kwargs'}) becomes
EDMPrecond(EDM2UNet) (EDM2's Precond is EDM's preconditioning; its uncertainty head, unused by
D, is listed in `dropped_keys`), with weights in fp32 (EDM2 stores them in fp16) and the
snapshot's encoder recorded under config['encoder'] ({'kind': 'rgb'} or {'kind': 'stability-vae',
'vae_name', 'scale', 'bias'}: final latents = scale * raw latents + bias, pid_fast.eval.vae)."""

from __future__ import annotations

import collections
import json
import math
import os
from typing import IO, Any, Mapping, NamedTuple

import torch
from torch import nn

from pid_fast.io.edm_config import (_PRECOND_FIELDS, _PRECOND_NAMES, _json_float, _plain, check_expected_config,
                                    check_network_config, edm2_network_config_from_pickle,
                                    network_config_from_pickle)
from pid_fast.io.edm_pickle import (ModuleStub, PersistentObject, UnknownGlobal, convert_edm_state_dict, load_edm_pickle,
                                    module_state_dict, placeholders_in)
from pid_fast.io.pickle_values import ArrayStub
from pid_fast.io.edm_sources import check_sources
from pid_fast.io.errors import CheckpointFormatError, ConfigMismatchError, UnsafeCheckpointError
from pid_fast.io.safetensors_io import (UNKNOWN_SOURCE_METADATA_KEY, load_checkpoint, read_checkpoint_metadata,
                                        save_checkpoint)

__all__ = ["EDMCheckpoint", "read_edm_checkpoint", "convert", "load_teacher_with_config", "load_teacher",
           "recorded_loss_settings", "LOSS_SETTINGS_METADATA_KEY"]

# A converted snapshot of a student trained with pid_fast.integrations.edm.EDMPIDLoss records that
# loss's grid here (JSON), for its one-step sampler.
LOSS_SETTINGS_METADATA_KEY = "pid_fast.pid_loss"
_PID_EDM_LOSS = ("pid_fast.integrations.edm", "EDMPIDLoss")
_LOSS_SETTINGS = ("N", "sigma_min", "sigma_max", "rho", "sigma_data")


class EDMCheckpoint(NamedTuple):
    """A converted EDM or EDM2 snapshot: the raw network state_dict (no `model.` / `unet.`
    prefix, no map_augment), the teacher config {'precond', <precond kwargs>, 'use_fp16',
    'network'} (+ 'encoder' for EDM2), the dropped keys (EDM's map_augment, EDM2's logvar
    head), and the unknown network sources the caller accepted
    (records {'object', 'class_name', 'module_src_sha256'}; empty for released EDM code)."""
    state_dict: "collections.OrderedDict[str, torch.Tensor]"
    config: dict[str, Any]
    dropped_keys: tuple[str, ...]
    unknown_sources: tuple[dict[str, str], ...] = ()
    skipped: tuple[str, ...] = ()  # the snapshot's other entries, described ('loss_fn: ...')
    loss_settings: dict[str, Any] | None = None  # a pid_fast EDMPIDLoss's recorded grid (N, sigma_min, ...)


def _refuse_placeholders(obj: Any, where: str) -> None:
    # The converted network must hold only allow-listed objects: a placeholder there means the
    # file is malicious or not an EDM network (nothing was executed either way).
    found = placeholders_in(obj)
    if found:
        more = f" (and {len(found) - 1} other unknown global(s))" if len(found) > 1 else ""
        raise UnsafeCheckpointError(
            f"refusing to load {found[0]}: it is not on the allow-list of this EDM checkpoint reader (in {where}{more}; "
            f"the file may be malicious, or not an EDM network snapshot); nothing was executed")


def _describe_entry(value: Any) -> str:
    if isinstance(value, PersistentObject):
        return f"{value.class_name} (an EDM persistent object)"
    if isinstance(value, UnknownGlobal):
        return f"{type(value).qualified_name()} (not an EDM class: kept as an inert placeholder, nothing of it run)"
    if isinstance(value, type) and issubclass(value, UnknownGlobal):
        return f"{value.qualified_name()} (unknown global, not loaded)"
    if isinstance(value, ModuleStub):
        return value.qualified_name
    return f"a {type(value).__name__}"


def _skipped_entries(top: Any, key: str) -> tuple[str, ...]:
    if not isinstance(top, dict):
        return ()
    return tuple(f"{name}: {_describe_entry(value)}" for name, value in top.items() if name != key and value is not None)


def _loss_settings_of(top: Any) -> dict[str, Any] | None:
    """The grid recorded by a pid_fast EDMPIDLoss in the snapshot's 'loss_fn' (plain numbers only)."""
    loss = top.get("loss_fn") if isinstance(top, dict) else None
    if not isinstance(loss, UnknownGlobal) or (type(loss).pickle_module, type(loss).pickle_name) != _PID_EDM_LOSS:
        return None
    state = loss.state if isinstance(loss.state, dict) else {}
    settings = {k: state[k] for k in _LOSS_SETTINGS
                if isinstance(state.get(k), (int, float)) and not isinstance(state.get(k), bool)
                and math.isfinite(state[k])}
    return settings or None


def recorded_loss_settings(path: str | os.PathLike) -> dict[str, Any] | None:
    """The grid of the EDMPIDLoss that trained the network in ``path``: an EDM snapshot's
    'loss_fn', or the metadata `pid-fast convert` copied it to; None when none is recorded."""
    path = os.fspath(path)
    if _is_pickle(path):
        return _loss_settings_of(load_edm_pickle(path, unknown="placeholder"))
    text = read_checkpoint_metadata(path).get(LOSS_SETTINGS_METADATA_KEY)
    try:
        settings = json.loads(text) if text else None
    except json.JSONDecodeError:
        raise CheckpointFormatError(f"{path}: its {LOSS_SETTINGS_METADATA_KEY!r} metadata is not JSON") from None
    return settings if isinstance(settings, dict) else None


def _select_network(top: Any, key: str) -> PersistentObject:
    net = top
    if isinstance(top, dict):
        if key not in top:
            raise CheckpointFormatError(f"the pickle has no {key!r} entry (entries: {sorted(map(str, top))})")
        net = top[key]
    _refuse_placeholders(net, repr(key))
    if not isinstance(net, PersistentObject):
        raise CheckpointFormatError(f"entry {key!r} is a {type(net).__name__}, not an EDM persistent network")
    if net.class_name not in _PRECOND_NAMES and net.class_name != _EDM2_PRECOND:
        raise CheckpointFormatError(f"entry {key!r} is a {net.class_name}; supported preconditionings: "
                                    f"{sorted(_PRECOND_NAMES)} (EDM), {_EDM2_PRECOND!r} (EDM2)")
    return net


_EDM2_PRECOND = "Precond"  # EDM2's class: EDM's preconditioning of an EDM2 UNet


def _teacher_config(net: PersistentObject, network: dict[str, Any]) -> dict[str, Any]:
    # {'precond', 'use_fp16', <the preconditioning's recorded fields>, 'network'}.
    precond = "edm" if net.class_name == _EDM2_PRECOND else _PRECOND_NAMES[net.class_name]
    config: dict[str, Any] = {"precond": precond, "use_fp16": bool(net.state.get("use_fp16", False))}
    for field in _PRECOND_FIELDS[precond]:
        if field in net.state:
            config[field] = _json_float(_plain(net.state[field], f"{net.class_name}.{field}"))
    config = {k: v for k, v in config.items() if v is not None}  # unbounded sigma_max -> default
    label_dim = net.state.get("label_dim", network.get("label_dim", 0))
    if label_dim != network.get("label_dim", 0):
        raise ConfigMismatchError(f"{net.class_name}.label_dim={label_dim!r} but the network has "
                                  f"label_dim={network.get('label_dim')!r}")
    config["network"] = network
    return config


def read_edm_checkpoint(source: str | os.PathLike | bytes | IO[bytes], key: str = "ema",
                        expect: str | Mapping[str, Any] | None = None, *,
                        allow_unknown_source: bool = False) -> EDMCheckpoint:
    """Safely read an EDM `.pkl` and return its `key` network (default the EMA weights).

    `expect` (a NETWORK_CONFIGS name or a network config) is checked against the weights
    and raises ConfigMismatchError naming the differing fields. A network whose embedded
    source is not a released EDM version raises UnknownSourceError unless
    `allow_unknown_source` (see pid_fast.io.edm_sources).

    The snapshot's other entries are not converted: classes the reader does not know (e.g. a
    trainer's own `loss_fn`) become inert placeholders, nothing of them is run, and they are
    named in `skipped`. Any unknown global inside the converted network is refused."""
    top = load_edm_pickle(source, unknown="placeholder")
    net = _select_network(top, key)
    extras = dict(skipped=_skipped_entries(top, key), loss_settings=_loss_settings_of(top))
    if net.class_name == _EDM2_PRECOND:
        ckpt = _read_edm2(net, key, allow_unknown_source, top.get("encoder") if isinstance(top, dict) else None)
        if expect is not None:
            check_expected_config(expect, ckpt.config["network"])
        return ckpt._replace(**extras)
    accepted = check_sources(net, key, allow_unknown_source)
    full = module_state_dict(net)
    dropped = tuple(k for k in full if "map_augment" in k)
    state_dict = convert_edm_state_dict(full)
    model_obj = net.state.get("_modules", {}).get("model")
    if not isinstance(model_obj, PersistentObject):
        raise CheckpointFormatError(f"{net.class_name} has no persistent 'model' submodule")
    network = network_config_from_pickle(model_obj, state_dict)
    check_network_config(network, state_dict)
    config = _teacher_config(net, network)
    if expect is not None:
        check_expected_config(expect, network)
    return EDMCheckpoint(state_dict, config, dropped, tuple(accepted), **extras)


def _read_edm2(net: PersistentObject, key: str, allow_unknown_source: bool, encoder: Any) -> EDMCheckpoint:
    """An EDM2 Precond: `unet.*` weights (in fp32) and EDM2UNet config; the logvar head dropped."""
    accepted = check_sources(net, key, allow_unknown_source, family="EDM2")
    state_dict: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    dropped = []
    for name, tensor in module_state_dict(net).items():
        if name.startswith("unet."):
            state_dict[name[len("unet."):]] = tensor.float() if tensor.is_floating_point() else tensor
        elif name.startswith(("logvar_fourier.", "logvar_linear.")):
            dropped.append(name)
        else:
            raise CheckpointFormatError(f"unexpected key {name!r} in an EDM2 Precond (expected unet.* and logvar_*)")
    unet = net.state.get("_modules", {}).get("unet")
    if not isinstance(unet, PersistentObject):
        raise CheckpointFormatError("EDM2 Precond has no persistent 'unet' submodule")
    network = edm2_network_config_from_pickle(unet, state_dict)
    check_network_config(network, state_dict)
    config = _teacher_config(net, network)
    _refuse_placeholders(encoder, "'encoder'")  # converted too: its latent scaling
    described = _encoder_config(encoder)
    if described is not None:
        config["encoder"] = described
    return EDMCheckpoint(state_dict, config, tuple(dropped), tuple(accepted))


def _float_list(value: Any, where: str) -> list[float]:
    # EDM2 keeps the encoder's scale/bias as float32 numpy arrays (a scalar when broadcast).
    values = value.array.reshape(-1).tolist() if isinstance(value, ArrayStub) else _plain(value, where)
    values = list(values) if isinstance(values, (tuple, list)) else [values]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values):
        raise CheckpointFormatError(f"{where}: expected finite numbers, got {values!r}")
    return [float(v) for v in values]


def _encoder_config(encoder: Any) -> dict[str, Any] | None:
    """EDM2's encoder entry as data: {'kind': 'rgb'} (pixels in [-1, 1]) or {'kind':
    'stability-vae', 'vae_name', 'scale', 'bias'}; None when absent or of another class."""
    if not isinstance(encoder, PersistentObject):
        return None
    if encoder.class_name == "StandardRGBEncoder":
        return {"kind": "rgb"}
    if encoder.class_name != "StabilityVAEEncoder":
        return None
    state = encoder.state
    scale = _float_list(state.get("scale"), "encoder.scale")
    bias = _float_list(state.get("bias"), "encoder.bias")
    if any(v == 0 for v in scale):
        raise CheckpointFormatError("encoder.scale: a zero scale cannot be inverted")
    vae_name = state.get("vae_name")
    return {"kind": "stability-vae", "vae_name": vae_name if isinstance(vae_name, str) else None,
            "scale": scale, "bias": bias}


def convert(source: str | os.PathLike, destination: str | os.PathLike, key: str = "ema",
            expect: str | Mapping[str, Any] | None = None, *, allow_unknown_source: bool = False) -> EDMCheckpoint:
    """EDM .pkl -> pid_fast safetensors (what `pid-fast convert` runs). An accepted unknown
    network source is recorded under the file's 'pid_fast.unknown_source_accepted' metadata."""
    ckpt = read_edm_checkpoint(source, key=key, expect=expect, allow_unknown_source=allow_unknown_source)
    extra = {UNKNOWN_SOURCE_METADATA_KEY: json.dumps(list(ckpt.unknown_sources))} if ckpt.unknown_sources else {}
    if ckpt.loss_settings:
        extra[LOSS_SETTINGS_METADATA_KEY] = json.dumps(ckpt.loss_settings)
    save_checkpoint(destination, ckpt.state_dict, ckpt.config, extra_metadata=extra or None)
    return ckpt


def _is_pickle(path: str) -> bool:
    # EDM snapshots are pickles (first byte PROTO, 0x80); safetensors files start with an
    # 8-byte header length followed by '{'. Anything else goes by its file extension.
    # The safetensors test comes first: a header length whose low byte is 0x80 looks like PROTO.
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return False
    if head[:1] == b"\x80":
        return True
    return path.endswith(".pkl")


def load_teacher_with_config(path: str | os.PathLike, *, key: str = "ema", device: str | torch.device = "cpu",
                             allow_unknown_source: bool = False,
                             name: str = "teacher") -> tuple[nn.Module, dict[str, Any]]:
    """(frozen eval-mode preconditioned teacher on `device`, its teacher config) from an EDM or
    EDM2 snapshot .pkl (its `key` entry, read safely) or a file written by `pid-fast convert`.

    The weights are checked against the config and loaded strictly. `name` is how error
    messages call the path (e.g. 'teacher.path')."""
    from pid_fast.models.networks import build_denoiser

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no such file: {path!r} (it must be an EDM .pkl or a file written by "
                                f"`pid-fast convert`)")
    if _is_pickle(path):
        ckpt = read_edm_checkpoint(path, key=key, allow_unknown_source=allow_unknown_source)
        state_dict, config = ckpt.state_dict, ckpt.config
    else:
        state_dict, config = load_checkpoint(path)
    if not isinstance(config.get("network"), Mapping):
        raise CheckpointFormatError(f"{path}: its config has no 'network' entry")
    check_network_config(config["network"], state_dict)
    try:  # 'encoder' (EDM2) describes the data space, not the denoiser
        teacher = build_denoiser({k: v for k, v in config.items() if k != "encoder"}, device="meta")
    except ValueError as exc:
        raise CheckpointFormatError(f"{path}: invalid teacher config: {exc}") from None
    teacher.model.load_state_dict(state_dict, strict=True, assign=True)
    return teacher.to(device).eval().requires_grad_(False), config


def load_teacher(path: str | os.PathLike, device: str | torch.device = "cpu", *, key: str = "ema") -> nn.Module:
    """A frozen, eval-mode preconditioned teacher from an EDM .pkl or a converted safetensors
    file (see load_teacher_with_config)."""
    return load_teacher_with_config(path, key=key, device=device)[0]

"""EDM network configs: read from a snapshot's recorded constructor arguments, inferred from the
weights' names and shapes, and checked against the weights or against an expected config.

The weights determine most architecture fields (`_WEIGHT_FIELDS`); dropout, label_dropout and
ADM's attention head count leave no trace in them. A field a config leaves out means the
network's constructor default (`with_constructor_defaults`), so that a named config that
omits, say, ADM's `channels_per_head` and a snapshot that records the default agree.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from pid_fast.io.edm_pickle import PersistentObject
from pid_fast.io.errors import CheckpointFormatError, ConfigMismatchError
from pid_fast.models.networks import MODEL_TYPES, build_network

__all__ = ["infer_network_config", "check_network_config", "check_expected_config", "with_constructor_defaults",
           "network_config_from_pickle", "edm2_network_config_from_pickle"]

_PRECOND_NAMES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
_PRECOND_FIELDS = {
    "edm": ("sigma_min", "sigma_max", "sigma_data"),
    "vp": ("beta_d", "beta_min", "M", "epsilon_t"),
    "ve": ("sigma_min", "sigma_max"),
}
# Constructor arguments of EDM's networks that pid_fast's networks drop on purpose.
_DROPPED_NETWORK_KWARGS = ("augment_dim",)
_WEIGHT_FIELDS = {  # fields that the weights determine (dropout, label_dropout, ADM's head count do not)
    "SongUNet": ("img_resolution", "in_channels", "out_channels", "label_dim", "model_channels", "channel_mult",
                 "channel_mult_emb", "num_blocks", "attn_resolutions", "embedding_type", "channel_mult_noise",
                 "encoder_type", "decoder_type", "resample_filter"),
    "DhariwalUNet": ("img_resolution", "in_channels", "out_channels", "label_dim", "model_channels",
                     "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions"),
}
_ARCH_FIELDS = {  # fields that define the computation
    "SongUNet": _WEIGHT_FIELDS["SongUNet"],
    "DhariwalUNet": _WEIGHT_FIELDS["DhariwalUNet"] + ("channels_per_head",),
    "EDM2UNet": ("img_resolution", "in_channels", "out_channels", "label_dim", "model_channels", "channel_mult",
                 "channel_mult_noise", "channel_mult_emb", "num_blocks", "attn_resolutions", "label_balance",
                 "concat_balance", "channels_per_head", "res_balance", "attn_balance", "clip_act",
                 "resample_filter"),
}


def _plain(value: Any, where: str) -> Any:
    # Config values from a pickle: keep JSON-able primitives only (tuples for sequences).
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v, where) for v in value)
    raise CheckpointFormatError(f"{where}: unsupported config value of type {type(value).__name__}")


def _json_float(value: float) -> float | None:
    return None if isinstance(value, float) and math.isinf(value) else value


def infer_network_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Reconstruct a network config from the names and shapes of a raw network state_dict.

    dropout and label_dropout leave no trace in the weights and are set to 0. Neither
    does DhariwalUNet's attention head count: it is taken as EDM's fixed 64 channels per
    head, and a network whose attention widths rule that out cannot be inferred."""
    if "emb_fourier.freqs" in state_dict:  # EDM2's U-Net
        return _infer_edm2_config(state_dict)
    config = _infer_weight_fields(state_dict)
    if config["model_type"] == "DhariwalUNet":
        # EDM's ADM has out_channels // 64 heads, so its attention widths are multiples of 64.
        widths = sorted({tuple(v.shape)[1] for k, v in state_dict.items() if k.endswith(".qkv.weight")})
        if any(w % 64 for w in widths):
            raise ConfigMismatchError(f"infer_network_config: attention widths {widths} are not multiples of "
                                      f"EDM's 64 channels per head; the head count cannot be inferred from "
                                      f"weights, pass the network config explicitly")
        config["channels_per_head"] = 64
    return config



def _shape_reader(state_dict: Mapping[str, torch.Tensor]):
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ConfigMismatchError(f"infer_network_config: expected key {key!r} is missing")
        return tuple(state_dict[key].shape)
    return shape


def _encoder_levels(keys: set[str]) -> tuple[list[int], int]:
    """(resolutions of the encoder levels, highest first; blocks per level) from the key names."""
    enc = sorted({int(m.group(1)) for k in keys if (m := re.match(r"^enc\.(\d+)x\1_", k))}, reverse=True)
    if not enc:
        raise ConfigMismatchError("infer_network_config: no 'enc.<R>x<R>_*' keys; not an EDM U-Net state_dict")
    levels = [enc[0] >> level for level in range(len(enc))]
    if enc != levels:
        raise ConfigMismatchError(f"infer_network_config: encoder resolutions {enc} are not successive halvings")
    res0 = enc[0]
    num_blocks = len({m.group(1) for k in keys if (m := re.match(rf"^enc\.{res0}x{res0}_block(\d+)\.", k))})
    if num_blocks == 0:
        raise ConfigMismatchError("infer_network_config: networks with num_blocks=0 cannot be inferred")
    return levels, num_blocks


def _infer_weight_fields(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    # Everything in _WEIGHT_FIELDS, plus dropout = 0.
    keys, shape = set(state_dict), _shape_reader(state_dict)
    levels, num_blocks = _encoder_levels(keys)
    res0 = levels[0]
    conv_in = shape(f"enc.{res0}x{res0}_conv.weight")
    label_dim = shape("map_label.weight")[1] if "map_label.weight" in keys else 0
    emb_channels, noise_in = shape("map_layer0.weight")
    is_adm = "out_conv.weight" in keys
    # ADM's noise embedding has model_channels inputs; SongUNet's first conv has model_channels outputs.
    model_channels = noise_in if is_adm else conv_in[0]
    out_channels = shape("out_conv.weight")[0] if is_adm else shape(f"dec.{res0}x{res0}_aux_conv.weight")[0]
    mults = []
    for r in levels:
        width = shape(f"enc.{r}x{r}_block0.conv1.weight")[0]
        if width % model_channels:
            raise ConfigMismatchError(f"infer_network_config: block width {width} is not a multiple of "
                                      f"model_channels={model_channels}")
        mults.append(width // model_channels)
    if is_adm and conv_in[0] != mults[0] * model_channels:
        raise ConfigMismatchError("infer_network_config: inconsistent widths at the first level")
    config: dict[str, Any] = dict(
        model_type="DhariwalUNet" if is_adm else "SongUNet", img_resolution=res0, in_channels=conv_in[1],
        out_channels=out_channels, label_dim=label_dim, model_channels=model_channels, channel_mult=tuple(mults),
        channel_mult_emb=emb_channels // model_channels, num_blocks=num_blocks,
        attn_resolutions=tuple(r for r in levels if f"enc.{r}x{r}_block0.qkv.weight" in keys), dropout=0.0)
    if not is_adm:
        config.update(_song_unet_fields(state_dict, levels, noise_in // model_channels))
    return config


def _song_unet_fields(state_dict: Mapping[str, torch.Tensor], levels: list[int],
                      channel_mult_noise: int) -> dict[str, Any]:
    """SongUNet's embedding, encoder/decoder types and resampling filter, read off the weights."""
    keys = set(state_dict)
    names = {k.split(".")[1] for k in keys if k.startswith(("enc.", "dec."))}
    if any(n.endswith("_aux_residual") for n in names):
        encoder_type = "residual"
    elif any(n.endswith("_aux_skip") for n in names):
        encoder_type = "skip"
    else:
        encoder_type = "standard"
    fields: dict[str, Any] = dict(
        embedding_type="fourier" if "map_noise.freqs" in keys else "positional",
        channel_mult_noise=channel_mult_noise, encoder_type=encoder_type,
        decoder_type="skip" if any(n.endswith("_aux_up") for n in names) else "standard", resample_filter=(1, 1))
    if len(levels) > 1:
        # f2d = f f^T / sum(f)^2, so each row sums to f_i / sum(f): recover f up to scale.
        f2d = state_dict[f"enc.{levels[1]}x{levels[1]}_down.conv0.resample_filter"].double()[0, 0]
        f = f2d.sum(dim=1)
        f = f / f[0]
        rounded = f.round()
        fields["resample_filter"] = (tuple(int(v) for v in rounded) if torch.allclose(f, rounded, atol=1e-4)
                                     else tuple(float(v) for v in f))
    return fields


def _shape_table(module_or_sd: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    return {k: tuple(v.shape) for k, v in sd.items()}


def _describe_mismatch(expected: Mapping[str, tuple], actual: Mapping[str, tuple], limit: int = 8) -> str:
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    shapes = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:limit])})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (e.g. " +
                     ", ".join(f"{k}: {actual[k]} vs {expected[k]}" for k in shapes[:limit]) + ")")
    return "; ".join(parts)


def check_network_config(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ConfigMismatchError unless a network built from `config` has exactly the keys
    and shapes of `state_dict` (built on the meta device: no memory, no init cost)."""
    try:
        model = build_network(config, device="meta")
    except (TypeError, ValueError) as exc:
        raise ConfigMismatchError(f"invalid network config: {exc}") from exc
    problems = _describe_mismatch(_shape_table(model), _shape_table(state_dict))
    if problems:
        raise ConfigMismatchError(f"weights do not fit the {config.get('model_type')} config: {problems}")


def _config_difference(a: Mapping[str, Any], b: Mapping[str, Any], fields: Iterable[str]) -> list[str]:
    norm = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    return [f"{f}: {a.get(f)!r} vs {b.get(f)!r}" for f in fields if norm(a.get(f)) != norm(b.get(f))]



def with_constructor_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with every architecture field it leaves out set to the network constructor's
    default: an omitted field and its default value describe the same network."""
    full = dict(config)
    network_class = MODEL_TYPES.get(full.get("model_type"))
    if network_class is None:
        return full
    for name, parameter in inspect.signature(network_class.__init__).parameters.items():
        if name in _ARCH_FIELDS[full["model_type"]] and name not in full \
                and parameter.default is not inspect.Parameter.empty:
            full[name] = parameter.default
    return full


def check_expected_config(expected: str | Mapping[str, Any], network: Mapping[str, Any]) -> None:
    """Raise ConfigMismatchError naming every architecture field in which `network` differs
    from `expected` (a NETWORK_CONFIGS name or a network config); a field either leaves out
    counts as the constructor default."""
    from pid_fast.models.networks import network_config

    wanted = with_constructor_defaults(network_config(expected) if isinstance(expected, str) else expected)
    found = with_constructor_defaults(network)
    differences = _config_difference(wanted, found, _ARCH_FIELDS.get(found.get("model_type"), ()))
    if wanted.get("model_type") != found.get("model_type"):
        differences.insert(0, f"model_type: {wanted.get('model_type')!r} vs {found.get('model_type')!r}")
    if differences:
        name = f" {expected!r}" if isinstance(expected, str) else ""
        raise ConfigMismatchError(f"the checkpoint does not match the expected config{name} "
                                  f"(expected vs found): " + "; ".join(differences))


def network_config_from_pickle(model_obj: PersistentObject,
                               state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The network config of an unpickled EDM network: its recorded constructor arguments
    (EDM's `_init_kwargs`), completed and checked by what the weights determine."""
    model_type = model_obj.class_name
    if model_type not in MODEL_TYPES:
        raise CheckpointFormatError(f"unsupported network class {model_type!r} (supported: {sorted(MODEL_TYPES)})")
    inferred = _infer_weight_fields(state_dict)
    if inferred["model_type"] != model_type:
        raise ConfigMismatchError(f"the weights look like a {inferred['model_type']}, the pickle says {model_type}")
    init_kwargs = model_obj.state.get("_init_kwargs")
    if not isinstance(init_kwargs, Mapping):  # EDM's _record_init_args=False: shapes only
        return infer_network_config(state_dict)
    config: dict[str, Any] = {"model_type": model_type}
    for key, value in init_kwargs.items():
        if key in _DROPPED_NETWORK_KWARGS:
            continue
        config[str(key)] = _plain(value, f"{model_type} argument {key!r}")
    if model_type == "DhariwalUNet":
        config.setdefault("channels_per_head", 64)  # EDM's ADM has no such argument: 64 fixed
    # Arguments the recorded call left at their defaults are read off the weights, and
    # every recorded argument the weights determine must agree with them.
    for key, value in inferred.items():
        if key not in config and key != "dropout":
            config[key] = value
    differences = _config_difference(config, inferred, _WEIGHT_FIELDS[model_type])
    if differences:
        raise ConfigMismatchError(f"recorded {model_type} arguments disagree with the weights: "
                                  + "; ".join(differences))
    return config


# ----------------------------------------------------------------------------------------
# EDM2 (NVlabs/edm2 `UNet`): pid_fast's EDM2UNet calls EDM2's `img_channels` in_channels (and
# out_channels, equal to it). The weights fix the widths, the embedding sizes, the blocks and
# where attention is; the head count, dropout and the balances leave no trace in them.

def _infer_edm2_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """An EDM2UNet config read off the weights; 64 channels per attention head (EDM2's default)."""
    keys, shape = set(state_dict), _shape_reader(state_dict)
    levels, num_blocks = _encoder_levels(keys)
    conv_in = shape(f"enc.{levels[0]}x{levels[0]}_conv.weight")
    widths = [shape(f"enc.{r}x{r}_block0.conv_res1.weight")[0] for r in levels]
    model_channels = widths[0]  # taken as channel_mult[0] = 1, as in all of EDM2's configs
    if any(w % model_channels for w in widths):
        raise ConfigMismatchError(f"infer_network_config: EDM2 widths {widths} are not multiples of the first")

    def multiplier(channels: int, default: int, what: str) -> int | None:
        if channels == default:
            return None  # EDM2's "select based on channel_mult"
        if channels % model_channels:
            raise ConfigMismatchError(f"infer_network_config: {what} width {channels} is not a multiple of "
                                      f"model_channels={model_channels}")
        return channels // model_channels

    attn = tuple(r for r in levels if f"enc.{r}x{r}_block0.attn_qkv.weight" in keys)
    attn_widths = sorted({shape(k)[1] for k in keys if k.endswith(".attn_qkv.weight")})
    if any(w % 64 for w in attn_widths):
        raise ConfigMismatchError(f"infer_network_config: attention widths {attn_widths} are not multiples of "
                                  f"EDM2's default 64 channels per head; pass the network config explicitly")
    return dict(model_type="EDM2UNet", img_resolution=levels[0], in_channels=conv_in[1] - 1,
                out_channels=conv_in[1] - 1,
                label_dim=shape("emb_label.weight")[1] if "emb_label.weight" in keys else 0,
                model_channels=model_channels, channel_mult=tuple(w // model_channels for w in widths),
                channel_mult_noise=multiplier(shape("emb_fourier.freqs")[0], widths[0], "noise embedding"),
                channel_mult_emb=multiplier(shape("emb_noise.weight")[0], max(widths), "embedding"),
                num_blocks=num_blocks, attn_resolutions=attn, channels_per_head=64, dropout=0.0)


def edm2_network_config_from_pickle(unet_obj: PersistentObject,
                                    state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The EDM2UNet config of an unpickled EDM2 `UNet`: its recorded constructor arguments
    (`img_channels` renamed), every argument it left out at EDM2's default (pid_fast's are the
    same); inferred from the weights when nothing was recorded. Raises ConfigMismatchError for
    an argument EDM2's UNet does not have (a fork)."""
    if unet_obj.class_name != "UNet":
        raise CheckpointFormatError(f"EDM2 Precond wraps a {unet_obj.class_name!r}, expected EDM2's 'UNet'")
    init_kwargs = unet_obj.state.get("_init_kwargs")
    if not isinstance(init_kwargs, Mapping):
        return _infer_edm2_config(state_dict)
    config: dict[str, Any] = {"model_type": "EDM2UNet"}
    for key, value in init_kwargs.items():
        config["in_channels" if key == "img_channels" else str(key)] = _plain(value, f"UNet argument {key!r}")
    config.setdefault("out_channels", config.get("in_channels"))
    known = set(inspect.signature(MODEL_TYPES["EDM2UNet"].__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known - {"model_type"})
    if unknown:
        raise ConfigMismatchError(f"EDM2 UNet arguments {unknown} are not EDM2's (a modified network?)")
    return with_constructor_defaults(config)


"""Safe import of EDM `network-snapshot-*.pkl` checkpoints, conversion to safetensors,
and student initialisation from a teacher.

EDM pickles its networks with `torch_utils.persistence`: every network object is stored
as the call `_reconstruct_persistent_obj(meta)` with
meta = {type: 'class', version, module_src: <full Python source>, class_name, state: <__dict__>}.
Unpickling it the usual way executes `module_src`. Here the pickle is read by an
allow-listing `pickle.Unpickler` whose `find_class` only ever returns inert stand-ins:

- the persistence hook -> `PersistentObject(class_name, state)` (the source is never run);
- `torch.nn.modules.*` classes (e.g. ModuleDict) -> `ModuleStub`, which only records its state;
- tensor rebuild functions -> local functions building tensors from storages, where the
  storages (`torch.storage._load_from_bytes`) are legacy `torch.save` blobs read with
  `torch.load(..., weights_only=True)`;
- `collections.OrderedDict`, `builtins.set`/`frozenset`, numpy dtype/scalar (non-object),
  torch dtypes, `torch.Size`, `dnnlib.util.EasyDict` (as a plain dict) and, for
  protocol-2 pickles, `_codecs.encode(<str>, 'latin1')`.

Anything else (os.system, builtins.eval, subprocess.Popen, ...) raises
`UnsafeCheckpointError` before it can be called. Pickle's other way to run code, the BUILD
opcode, can only reach `__setstate__` of objects these callables return (stand-ins, numpy
dtypes, tensors), none of which calls into the pickle's data. The state_dict is then
rebuilt by walking `_parameters`, `_buffers` (minus `_non_persistent_buffers_set`) and
`_modules`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import pickle
import re
import struct
import sys
import warnings
from typing import IO, Any, Iterable, Mapping, NamedTuple

import torch
from torch import nn

from pid_fast.models.networks import MODEL_TYPES, build_network

__all__ = [
    "UnsafeCheckpointError", "CheckpointFormatError", "ConfigMismatchError", "PersistentObject", "ModuleStub",
    "SafeUnpickler", "load_edm_pickle", "module_state_dict", "convert_edm_state_dict", "EDMCheckpoint",
    "read_edm_checkpoint", "infer_network_config", "check_network_config", "save_checkpoint",
    "load_checkpoint", "load_teacher", "InitReport", "init_student_from_teacher", "student_from_teacher",
    "convert",
]

CONFIG_METADATA_KEY = "pid_fast.config"
FORMAT_METADATA_KEY = "pid_fast.format"
FORMAT_VERSION = "1"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle references something outside the allow-list; nothing was executed."""


class CheckpointFormatError(ValueError):
    """The file is not a (complete, well-formed) EDM pickle or pid_fast checkpoint."""


class ConfigMismatchError(ValueError):
    """Weights and an architecture config (or two networks) do not fit together."""


# ----------------------------------------------------------------------------------------
# Inert stand-ins returned by the unpickler.

class PersistentObject:
    """What an EDM persistent object unpickles to: its class name and state, nothing run.

    `module_src_sha256` identifies the embedded source without keeping or running it."""

    __slots__ = ("class_name", "state", "version", "module_src_sha256")

    def __init__(self, class_name: str, state: dict, version: Any, module_src_sha256: str):
        self.class_name = class_name
        self.state = state
        self.version = version
        self.module_src_sha256 = module_src_sha256

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r}, version={self.version!r})"


class ModuleStub:
    """Stand-in for an instance of a `torch.nn.modules.*` class (e.g. ModuleDict): it only
    records the state that pickle hands to `__setstate__`."""

    qualified_name = "torch.nn.Module"

    def __init__(self, *args: Any, **kwargs: Any):
        self.state: dict = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"{self.qualified_name}: expected a dict state, got {type(state).__name__}")
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleStub({self.qualified_name})"


class _EasyDictStub(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access; only the dict is kept)."""


def _module_stub_class(qualified_name: str) -> type:
    # A fresh inert subclass per reference (so that pickle's BUILD opcode, which may set
    # attributes on whatever find_class returned, cannot alter a shared class).
    return type(qualified_name.rsplit(".", 1)[-1] + "Stub", (ModuleStub,), {"qualified_name": qualified_name})


class _AllowedCall:
    """A fresh, immutable handle on an allow-listed function, one per reference in the
    pickle: BUILD cannot alter the shared function (its __defaults__, say) through it."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Any, name: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __setattr__(self, key: str, value: Any) -> None:
        raise CheckpointFormatError(f"refusing to set attribute {key!r} on {self._name}")

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


# ----------------------------------------------------------------------------------------
# Allow-listed callables. Each validates its arguments; none can reach arbitrary code.

def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"persistent object: meta must be a dict, got {type(meta).__name__}")
    if meta.get("type") != "class":
        raise CheckpointFormatError(f"persistent object: unsupported meta type {meta.get('type')!r} (expected 'class')")
    class_name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src", "")
    if not isinstance(class_name, str):
        raise CheckpointFormatError("persistent object: meta['class_name'] must be a str")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"persistent object {class_name}: meta['state'] must be a dict")
    if not isinstance(src, str):
        raise CheckpointFormatError(f"persistent object {class_name}: meta['module_src'] must be a str")
    # The source is hashed for identification only; it is never compiled or executed.
    digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
    return PersistentObject(class_name, state, meta.get("version"), digest)


def _load_from_bytes(blob: Any) -> Any:
    # A storage pickled with `pickle` is a legacy torch.save blob; weights_only=True
    # restricts that inner load to tensors, storages and primitive containers.
    if not isinstance(blob, (bytes, bytearray)):
        raise CheckpointFormatError(f"storage: expected bytes, got {type(blob).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"refusing to load a storage blob: {exc}") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/... on corrupt data
        raise CheckpointFormatError(f"corrupt storage blob: {type(exc).__name__}: {exc}") from None
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise CheckpointFormatError(f"storage blob holds a {type(storage).__name__}, not a storage")
    return storage


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                          for v in value):
        raise CheckpointFormatError(f"tensor: {what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise CheckpointFormatError(f"tensor: expected a storage, got {type(storage).__name__}")
    if backward_hooks:
        raise UnsafeCheckpointError("refusing to load a tensor with backward hooks")
    if metadata:
        raise CheckpointFormatError("tensor: unsupported tensor metadata")
    if isinstance(storage_offset, bool) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointFormatError(f"tensor: storage_offset must be a non-negative int, got {storage_offset!r}")
    size, stride = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointFormatError(f"tensor: size {size} and stride {stride} differ in length")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notice
        if isinstance(storage, torch.TypedStorage):
            dtype, untyped = storage.dtype, storage.untyped()
        else:
            dtype, untyped = torch.uint8, storage
    numel = untyped.nbytes() // torch.empty((), dtype=dtype).element_size()
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if last >= numel:
        raise CheckpointFormatError(f"tensor: size {size} / stride {stride} / offset {storage_offset} "
                                    f"run past a storage of {numel} elements")
    return torch.empty(0, dtype=dtype).set_(untyped, storage_offset, size, stride)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CheckpointFormatError(f"parameter: expected a tensor, got {type(data).__name__}")
    if backward_hooks:
        raise UnsafeCheckpointError("refusing to load a parameter with backward hooks")
    return data  # parameters are returned as plain tensors; only their values matter here


def _numpy_dtype(*args: Any) -> Any:
    import numpy as np

    if not args or not isinstance(args[0], str) or not all(isinstance(a, (bool, int)) for a in args[1:]):
        raise CheckpointFormatError(f"numpy.dtype: unexpected arguments {args!r}")
    dtype = np.dtype(args[0])
    if dtype.hasobject:
        raise UnsafeCheckpointError("refusing to load a numpy object dtype")
    return np.dtype(*args)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError(f"refusing to build a numpy scalar of dtype {dtype!r}")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise CheckpointFormatError(f"numpy scalar: expected {dtype.itemsize} bytes of data")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _codecs_encode(text: Any, encoding: Any = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(<str>, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,           # protocol-2 pickles use Python 2 module names
    ("__builtin__", "frozenset"): frozenset,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): torch.Size,
    ("dnnlib.util", "EasyDict"): _EasyDictStub,
    ("dnnlib", "EasyDict"): _EasyDictStub,
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allow-listed globals (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is _EasyDictStub:
            return type("EasyDict", (_EasyDictStub,), {})
        if isinstance(allowed, type):  # builtin types (OrderedDict, set, ...): immutable
            return allowed
        if allowed is not None:
            return _AllowedCall(allowed, f"{module}.{name}")
        if module == "torch" and _IDENTIFIER.match(name) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.nn.modules.") and _IDENTIFIER.match(name):
            # Only names of real torch.nn.Module subclasses, looked up in the already
            # imported torch module (nothing is imported on the pickle's behalf).
            real = getattr(sys.modules.get(module), name, None)
            if isinstance(real, type) and issubclass(real, nn.Module):
                return _module_stub_class(f"{module}.{name}")
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name}: it is not on the allow-list of this EDM checkpoint reader "
            f"(the file may be malicious, or not an EDM network snapshot); nothing was executed")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("refusing to load a persistent id (this is not an EDM pickle layout)")


# ----------------------------------------------------------------------------------------
# Reading an EDM pickle.

def _describe(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<stream>"


def _unpickle(stream: IO[bytes], where: str) -> Any:
    head = stream.read(4)
    if not head:
        raise CheckpointFormatError(f"{where}: the file is empty")
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointFormatError(f"{where}: this is a zip archive (a torch.save file?), not an EDM pickle; "
                                    f"load state_dicts saved by torch.save with torch.load(weights_only=True)")
    if head[0] != 0x80 or head[1:2] not in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointFormatError(f"{where}: not a pickle of protocol 2-5 (EDM snapshots are protocol-4 "
                                    f"pickles); first bytes {head!r}")
    stream.seek(stream.tell() - len(head))
    try:
        return SafeUnpickler(stream).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, RecursionError, OverflowError, MemoryError) as exc:
        raise CheckpointFormatError(f"{where}: truncated or corrupt pickle ({type(exc).__name__}: {exc})") from None


def load_edm_pickle(source: str | os.PathLike | bytes | IO[bytes]) -> Any:
    """Unpickle an EDM snapshot (a path, bytes, or a seekable binary stream) safely.

    Returns the top-level object (normally a dict with 'ema', 'loss_fn', ...), with every
    network replaced by a PersistentObject / ModuleStub tree holding plain tensors.
    Raises UnsafeCheckpointError for anything off the allow-list, CheckpointFormatError
    for files that are not complete pickles."""
    if isinstance(source, (bytes, bytearray)):
        return _unpickle(io.BytesIO(bytes(source)), "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"load_edm_pickle: no such file: {os.fspath(source)!r}")
        with open(source, "rb") as f:
            return _unpickle(f, os.fspath(source))
    if hasattr(source, "read") and hasattr(source, "seek"):
        return _unpickle(source, "<stream>")
    raise TypeError(f"load_edm_pickle: source must be a path, bytes or a binary stream, got {type(source).__name__}")


def _module_state(obj: Any, where: str) -> dict:
    if isinstance(obj, PersistentObject):
        state = obj.state
    elif isinstance(obj, ModuleStub):
        state = obj.state
    else:
        raise CheckpointFormatError(f"{where or '<root>'}: expected a network module, got {type(obj).__name__}")
    if not isinstance(state.get("_parameters", {}), Mapping) or not isinstance(state.get("_modules", {}), Mapping):
        raise CheckpointFormatError(f"{where or '<root>'}: the object is not a torch.nn.Module "
                                    f"(no _parameters/_modules in its state)")
    return state


def module_state_dict(obj: Any) -> "collections.OrderedDict[str, torch.Tensor]":
    """The state_dict of an unpickled module tree: parameters and persistent buffers of
    every submodule, keyed like `nn.Module.state_dict()`. Tensors are copied, so they
    share no storage."""
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    active: set[int] = set()

    def walk(node: Any, prefix: str) -> None:
        if id(node) in active:
            raise CheckpointFormatError(f"{prefix or '<root>'}: the module graph contains a cycle")
        active.add(id(node))
        state = _module_state(node, prefix.rstrip("."))
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        entries = list(state.get("_parameters", {}).items())
        entries += [(k, v) for k, v in state.get("_buffers", {}).items() if k not in non_persistent]
        for name, tensor in entries:
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointFormatError(f"{prefix}{name}: expected a tensor, got {type(tensor).__name__}")
            out[prefix + str(name)] = tensor.detach().clone()
        for name, child in state.get("_modules", {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")
        active.discard(id(node))

    walk(obj, "")
    return out


def convert_edm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "collections.OrderedDict[str, torch.Tensor]":
    """EDM preconditioner state_dict -> raw network state_dict for pid_fast: drop the
    `map_augment` keys (augmentation conditioning, unused at sampling/distillation time)
    and strip the `model.` prefix. Keys outside `model.` are refused (e.g. iDDPM's `u`)."""
    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    for key, value in state_dict.items():
        if "map_augment" in key:
            continue
        if not key.startswith("model."):
            raise CheckpointFormatError(f"unexpected key {key!r} outside the wrapped network 'model.'")
        out[key[len("model."):]] = value
    return out


# ----------------------------------------------------------------------------------------
# Architecture configs: from EDM's recorded constructor arguments, or inferred from shapes.

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


def _infer_weight_fields(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    # Everything in _WEIGHT_FIELDS, plus dropout = 0.
    keys = set(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ConfigMismatchError(f"infer_network_config: expected key {key!r} is missing")
        return tuple(state_dict[key].shape)

    enc = sorted({int(m.group(1)) for k in keys if (m := re.match(r"^enc\.(\d+)x\1_", k))}, reverse=True)
    if not enc:
        raise ConfigMismatchError("infer_network_config: no 'enc.<R>x<R>_*' keys; not an EDM U-Net state_dict")
    res0 = enc[0]
    levels = [res0 >> level for level in range(len(enc))]
    if enc != levels:
        raise ConfigMismatchError(f"infer_network_config: encoder resolutions {enc} are not successive halvings")
    num_blocks = len({m.group(1) for k in keys if (m := re.match(rf"^enc\.{res0}x{res0}_block(\d+)\.", k))})
    attn = tuple(r for r in levels if f"enc.{r}x{r}_block0.qkv.weight" in keys)
    conv_in = shape(f"enc.{res0}x{res0}_conv.weight")
    label_dim = shape("map_label.weight")[1] if "map_label.weight" in keys else 0
    emb_channels, noise_in = shape("map_layer0.weight")
    block_out = [shape(f"enc.{r}x{r}_block0.conv1.weight")[0] if num_blocks else None for r in levels]

    if "out_conv.weight" in keys:  # ADM
        model_channels = noise_in
        config: dict[str, Any] = dict(model_type="DhariwalUNet", img_resolution=res0, in_channels=conv_in[1],
                                      out_channels=shape("out_conv.weight")[0], label_dim=label_dim,
                                      model_channels=model_channels)
        mult0 = conv_in[0]
    else:
        model_channels = conv_in[0]
        config = dict(model_type="SongUNet", img_resolution=res0, in_channels=conv_in[1],
                      out_channels=shape(f"dec.{res0}x{res0}_aux_conv.weight")[0], label_dim=label_dim,
                      model_channels=model_channels)
        mult0 = None
    if num_blocks == 0:
        raise ConfigMismatchError("infer_network_config: networks with num_blocks=0 cannot be inferred")
    mults = []
    for out in block_out:
        if out % model_channels:
            raise ConfigMismatchError(f"infer_network_config: block width {out} is not a multiple of "
                                      f"model_channels={model_channels}")
        mults.append(out // model_channels)
    if mult0 is not None and mult0 != mults[0] * model_channels:
        raise ConfigMismatchError("infer_network_config: inconsistent widths at the first level")
    config.update(channel_mult=tuple(mults), channel_mult_emb=emb_channels // model_channels, num_blocks=num_blocks,
                  attn_resolutions=attn, dropout=0.0)

    if config["model_type"] == "DhariwalUNet":
        return config

    config["embedding_type"] = "fourier" if "map_noise.freqs" in keys else "positional"
    config["channel_mult_noise"] = noise_in // model_channels
    names = {k.split(".")[1] for k in keys if k.startswith(("enc.", "dec."))}
    if any(n.endswith("_aux_residual") for n in names):
        config["encoder_type"] = "residual"
    elif any(n.endswith("_aux_skip") for n in names):
        config["encoder_type"] = "skip"
    else:
        config["encoder_type"] = "standard"
    config["decoder_type"] = "skip" if any(n.endswith("_aux_up") for n in names) else "standard"
    config["resample_filter"] = (1, 1)
    if len(levels) > 1:
        # f2d = f f^T / sum(f)^2, so each row sums to f_i / sum(f): recover f up to scale.
        f2d = state_dict[f"enc.{levels[1]}x{levels[1]}_down.conv0.resample_filter"].double()[0, 0]
        f = f2d.sum(dim=1)
        f = f / f[0]
        rounded = f.round()
        config["resample_filter"] = (tuple(int(v) for v in rounded) if torch.allclose(f, rounded, atol=1e-4)
                                     else tuple(float(v) for v in f))
    return config


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


def _network_config_from_pickle(model_obj: PersistentObject, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
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


class EDMCheckpoint(NamedTuple):
    """A converted EDM snapshot: the raw network state_dict (no `model.` prefix, no
    map_augment) and the teacher config {'precond', <precond kwargs>, 'use_fp16', 'network'}."""
    state_dict: "collections.OrderedDict[str, torch.Tensor]"
    config: dict[str, Any]
    dropped_keys: tuple[str, ...]


def read_edm_checkpoint(source: str | os.PathLike | bytes | IO[bytes], key: str = "ema",
                        expect: str | Mapping[str, Any] | None = None) -> EDMCheckpoint:
    """Safely read an EDM `.pkl` and return its `key` network (default the EMA weights).

    `expect` (a NETWORK_CONFIGS name or a network config) is checked against the weights
    and raises ConfigMismatchError naming the differing fields."""
    top = load_edm_pickle(source)
    if isinstance(top, dict):
        if key not in top:
            raise CheckpointFormatError(f"the pickle has no {key!r} entry (entries: {sorted(map(str, top))})")
        net = top[key]
    else:
        net = top
    if not isinstance(net, PersistentObject):
        raise CheckpointFormatError(f"entry {key!r} is a {type(net).__name__}, not an EDM persistent network")
    precond = _PRECOND_NAMES.get(net.class_name)
    if precond is None:
        raise CheckpointFormatError(f"entry {key!r} is a {net.class_name}; supported preconditionings: "
                                    f"{sorted(_PRECOND_NAMES)}")
    full = module_state_dict(net)
    dropped = tuple(k for k in full if "map_augment" in k)
    state_dict = convert_edm_state_dict(full)
    model_obj = net.state.get("_modules", {}).get("model")
    if not isinstance(model_obj, PersistentObject):
        raise CheckpointFormatError(f"{net.class_name} has no persistent 'model' submodule")
    network = _network_config_from_pickle(model_obj, state_dict)
    check_network_config(network, state_dict)

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

    if expect is not None:
        from pid_fast.models.networks import network_config

        expected = network_config(expect) if isinstance(expect, str) else dict(expect)
        differences = _config_difference(expected, network, _ARCH_FIELDS.get(network["model_type"], ()))
        if expected.get("model_type") != network["model_type"]:
            differences.insert(0, f"model_type: {expected.get('model_type')!r} vs {network['model_type']!r}")
        if differences:
            name = f" {expect!r}" if isinstance(expect, str) else ""
            raise ConfigMismatchError(f"the checkpoint does not match the expected config{name} "
                                      f"(expected vs found): " + "; ".join(differences))
    return EDMCheckpoint(state_dict, config, dropped)


# ----------------------------------------------------------------------------------------
# safetensors files: raw network weights + the teacher config as JSON metadata.

def _config_to_json(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, allow_nan=False)


def _config_from_json(text: str) -> dict[str, Any]:
    def tuples(obj: Any) -> Any:
        if isinstance(obj, list):
            return tuple(tuples(v) for v in obj)
        if isinstance(obj, dict):
            return {k: tuples(v) for k, v in obj.items()}
        return obj

    return tuples(json.loads(text))


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Write `state_dict` (contiguous, unshared copies) to a safetensors file with the
    config stored as JSON under metadata key 'pid_fast.config'."""
    from safetensors.torch import save_file

    if not isinstance(config, Mapping):
        raise TypeError(f"save_checkpoint: config must be a mapping, got {type(config).__name__}")
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_checkpoint: state_dict[{k!r}] is a {type(v).__name__}, not a tensor")
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    metadata = {CONFIG_METADATA_KEY: _config_to_json(config), FORMAT_METADATA_KEY: FORMAT_VERSION}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_checkpoint(path: str | os.PathLike,
                    device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, config) from a file written by `save_checkpoint` / `pid-fast convert`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: no such file: {os.fspath(path)!r}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(os.fspath(path), device=str(device))
    except Exception as exc:  # safetensors raises its own SafetensorError on bad headers
        raise CheckpointFormatError(f"{os.fspath(path)}: not a readable safetensors file ({exc})") from None
    if CONFIG_METADATA_KEY not in metadata:
        raise CheckpointFormatError(f"{os.fspath(path)}: no {CONFIG_METADATA_KEY!r} metadata; "
                                    f"was it written by pid-fast convert?")
    return state_dict, _config_from_json(metadata[CONFIG_METADATA_KEY])


def load_teacher(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A frozen, eval-mode preconditioned teacher from a converted safetensors file."""
    from pid_fast.models.preconditioning import build_denoiser

    state_dict, config = load_checkpoint(path)
    check_network_config(config["network"], state_dict)
    teacher = build_denoiser(config, device="meta")
    teacher.model.load_state_dict(state_dict, strict=True, assign=True)
    return teacher.to(device).eval().requires_grad_(False)


def convert(source: str | os.PathLike, destination: str | os.PathLike, key: str = "ema",
            expect: str | Mapping[str, Any] | None = None) -> EDMCheckpoint:
    """EDM .pkl -> pid_fast safetensors (what `pid-fast convert` runs)."""
    ckpt = read_edm_checkpoint(source, key=key, expect=expect)
    save_checkpoint(destination, ckpt.state_dict, ckpt.config)
    return ckpt


# ----------------------------------------------------------------------------------------
# Student initialisation.

class InitReport(NamedTuple):
    copied: tuple[str, ...]
    skipped: tuple[str, ...]  # student entries left at their own initialisation


def _network_of(obj: Any, who: str) -> nn.Module | Mapping[str, torch.Tensor]:
    from pid_fast.models.preconditioning import Preconditioning

    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, Preconditioning):
        # A preconditioning wrapper: the student is initialised from its raw network.
        if not isinstance(obj.model, nn.Module):
            raise TypeError(f"init_student_from_teacher: {who} wraps no nn.Module network")
        return obj.model
    if isinstance(obj, nn.Module):
        return obj
    raise TypeError(f"init_student_from_teacher: {who} must be a module or a state_dict, got {type(obj).__name__}")


def init_student_from_teacher(student: nn.Module, teacher: nn.Module | Mapping[str, torch.Tensor], *,
                              strict: bool = True, student_config: Mapping[str, Any] | None = None,
                              teacher_config: Mapping[str, Any] | None = None) -> InitReport:
    """Copy the teacher's weights into the student (PID initialises the student as the
    teacher). Both may be raw networks, preconditioning wrappers or state_dicts.

    With `strict=True` any missing/unexpected key or shape difference raises
    ConfigMismatchError naming them (and the differing config fields when both configs
    are given). With `strict=False` the matching entries are copied and the report lists
    the student entries left at their own initialisation. Values are cast to the
    student's dtype/device; the teacher is never modified."""
    if not isinstance(student, nn.Module):
        raise TypeError(f"init_student_from_teacher: student must be an nn.Module, got {type(student).__name__}")
    student_net = _network_of(student, "student")
    teacher_sd = _network_of(teacher, "teacher")
    teacher_sd = teacher_sd.state_dict() if isinstance(teacher_sd, nn.Module) else teacher_sd
    target = student_net.state_dict()
    problems = _describe_mismatch(_shape_table(target), _shape_table(teacher_sd))
    if problems and strict:
        message = f"student and teacher weights differ: {problems}"
        if student_config is not None and teacher_config is not None:
            fields = sorted(set(student_config) | set(teacher_config))
            diff = _config_difference(student_config, teacher_config, fields)
            if diff:
                message += " | config differences (student vs teacher): " + "; ".join(diff)
        raise ConfigMismatchError(message + " (use strict=False to copy only the matching weights)")
    copied, skipped = [], []
    with torch.no_grad():
        for key, value in target.items():
            source = teacher_sd.get(key)
            if source is not None and tuple(source.shape) == tuple(value.shape):
                value.copy_(source.to(device=value.device, dtype=value.dtype))
                copied.append(key)
            else:
                skipped.append(key)
    return InitReport(tuple(copied), tuple(skipped))


def student_from_teacher(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                         device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """A raw student network with the teacher's architecture (`config` is a teacher config
    with a 'network' entry, or a network config), initialised from the teacher's weights.
    `overrides` change non-weight fields such as dropout; a change that alters the weights
    raises ConfigMismatchError."""
    network = dict(config["network"]) if "network" in config else dict(config)
    student_config = dict(network, **overrides)
    student = build_network(student_config, device=device)
    init_student_from_teacher(student, state_dict, student_config=student_config, teacher_config=network)
    return student

"""Safe reading of EDM `network-snapshot-*.pkl` pickles: an allow-listing unpickler.

EDM pickles its networks with `torch_utils.persistence`: every network object is stored
as the call `_reconstruct_persistent_obj(meta)` with
meta = {type: 'class', version, module_src: <full Python source>, class_name, state: <__dict__>}.
Unpickling it the usual way executes `module_src`. Here the pickle is read by an
allow-listing `pickle.Unpickler` whose `find_class` only ever returns inert stand-ins:

- the persistence hook -> `PersistentObject(class_name, state)` (the source is never run,
  only hashed: see edm_sources.py);
- `torch.nn.modules.*` classes (e.g. ModuleDict) -> `ModuleStub`, which only records its state;
- tensor rebuild functions -> local functions building tensors from storages, where the
  storages (`torch.storage._load_from_bytes`) are legacy `torch.save` blobs read with
  `torch.load(..., weights_only=True)`;
- `collections.OrderedDict`, `builtins.set`/`frozenset`, numpy dtypes, scalars and arrays
  (non-object; pickle_values.py), torch dtypes, `torch.Size`, `dnnlib.util.EasyDict` (as a
  plain dict) and, for protocol-2 pickles, `_codecs.encode(<str>, 'latin1')`.

The same reader serves EDM2's snapshots (NVlabs/edm2), written by the same persistence code:
a dict {'ema': Precond, 'encoder': StandardRGBEncoder or StabilityVAEEncoder, 'loss_fn',
'dataset_kwargs'}, every object of EDM2's classes a persistent object.

Anything else (os.system, builtins.eval, subprocess.Popen, ...) raises
`UnsafeCheckpointError` before it can be called; or, read with ``unknown="placeholder"`` (what
the snapshot importer does, so that a snapshot whose `loss_fn` is some trainer's own class still
converts), resolves to an `UnknownGlobal` placeholder: an inert object that only records the
name and the arguments and state pickle hands it, never calling anything. The importer then
refuses the network it converts if any placeholder sits inside it (`placeholders_in`). Pickle's other way to run code, the BUILD
opcode, can only reach `__setstate__` of objects these callables return (stand-ins, numpy
dtypes, tensors), none of which calls into the pickle's data. `module_state_dict` then
rebuilds a state_dict by walking `_parameters`, `_buffers` (minus
`_non_persistent_buffers_set`) and `_modules`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import re
import struct
import sys
import warnings
from typing import IO, Any, Mapping

import torch
from torch import nn

from pid_fast.io.errors import CheckpointFormatError, UnsafeCheckpointError
from pid_fast.io.pickle_values import NDArrayMarker, numpy_dtype, numpy_frombuffer, numpy_reconstruct, numpy_scalar

__all__ = ["PersistentObject", "ModuleStub", "UnknownGlobal", "SafeUnpickler", "load_edm_pickle", "module_state_dict",
           "convert_edm_state_dict", "placeholders_in", "UNKNOWN_GLOBALS"]

UNKNOWN_GLOBALS = ("refuse", "placeholder")

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


class UnknownGlobal:
    """Placeholder for a global that is not on the allow-list (lenient reading): whatever pickle
    does with it (call it, NEWOBJ, BUILD, append, item assignment) is only recorded. A fresh
    subclass per reference in the pickle names the global (``pickle_module``, ``pickle_name``)."""

    pickle_module = ""
    pickle_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "UnknownGlobal":
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:
        self.__dict__["items"].append(item)

    def extend(self, items: Any) -> None:
        self.__dict__["items"].extend(list(items) if isinstance(items, (list, tuple)) else [items])

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"].append((key, value))

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.pickle_module}.{cls.pickle_name}"

    def __repr__(self) -> str:
        return f"UnknownGlobal({self.qualified_name()})"


def _placeholder_class(module: str, name: str) -> type:
    return type("UnknownGlobal", (UnknownGlobal,), {"pickle_module": module, "pickle_name": name})


def placeholders_in(obj: Any, limit: int = 100000) -> list[str]:
    """The qualified names of the UnknownGlobal placeholders (instances or classes) anywhere
    inside ``obj`` (containers, persistent objects' and stand-ins' states), in order found."""
    found: list[str] = []
    seen: set[int] = set()
    stack = [obj]
    while stack and len(seen) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, type) and issubclass(node, UnknownGlobal):
            found.append(node.qualified_name())
        elif isinstance(node, UnknownGlobal):
            found.append(type(node).qualified_name())
            stack.extend([node.args, node.kwargs, node.state, node.items])
        elif isinstance(node, (PersistentObject, ModuleStub)):
            stack.append(node.state)
        elif isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
    return list(dict.fromkeys(found))


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



# torch's weights_only loader names the global it refused in its message, e.g.
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked".
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")


def _refusal_reason(exc: Exception) -> str:
    # Only the name of what was refused is kept from torch's message: the rest of it advises
    # re-running torch.load with weights_only=False, which must never be done with an
    # untrusted file.
    found = _REFUSED_GLOBAL.search(str(exc))
    if found:
        return f"it references {found.group(1)}"
    return "it holds an object that torch's tensor-only loader does not accept"


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
        raise UnsafeCheckpointError(f"refusing to load a storage blob: {_refusal_reason(exc)}; a storage may "
                                    f"only hold tensor data, so the file may be malicious; nothing was "
                                    f"executed") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/... on corrupt data
        detail = "" if "weights_only" in str(exc) else f": {exc}"  # never relay torch's load advice
        raise CheckpointFormatError(f"corrupt storage blob ({type(exc).__name__}{detail})") from None
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
    ("numpy", "dtype"): numpy_dtype,
    ("numpy.core.multiarray", "scalar"): numpy_scalar,
    ("numpy._core.multiarray", "scalar"): numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): numpy_frombuffer,
    ("numpy", "ndarray"): NDArrayMarker,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): torch.Size,
    ("dnnlib.util", "EasyDict"): _EasyDictStub,
    ("dnnlib", "EasyDict"): _EasyDictStub,
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allow-listed globals (see the module docstring); others
    raise UnsafeCheckpointError, or become UnknownGlobal placeholders with
    ``unknown="placeholder"``."""

    def __init__(self, file: IO[bytes], *, unknown: str = "refuse"):
        super().__init__(file)
        if unknown not in UNKNOWN_GLOBALS:
            raise ValueError(f"unknown must be one of {UNKNOWN_GLOBALS}, got {unknown!r}")
        self.unknown = unknown

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is _EasyDictStub or allowed is NDArrayMarker:  # a fresh class: BUILD cannot alter a shared one
            return type(name, (allowed,), {})
        if isinstance(allowed, type):  # builtin types (OrderedDict, set, ...) and inert markers
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
        if self.unknown == "placeholder":
            return _placeholder_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name}: it is not on the allow-list of this EDM checkpoint reader "
            f"(the file may be malicious, or not an EDM network snapshot); nothing was executed")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("refusing to load a persistent id (this is not an EDM pickle layout)")


# ----------------------------------------------------------------------------------------
# Reading an EDM pickle.

def _describe(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<stream>"


def _unpickle(stream: IO[bytes], where: str, unknown: str = "refuse") -> Any:
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
        return SafeUnpickler(stream, unknown=unknown).load()
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, RecursionError, OverflowError, MemoryError) as exc:
        raise CheckpointFormatError(f"{where}: truncated or corrupt pickle ({type(exc).__name__}: {exc})") from None


def load_edm_pickle(source: str | os.PathLike | bytes | IO[bytes], *, unknown: str = "refuse") -> Any:
    """Unpickle an EDM snapshot (a path, bytes, or a seekable binary stream) safely.

    Returns the top-level object (normally a dict with 'ema', 'loss_fn', ...), with every
    network replaced by a PersistentObject / ModuleStub tree holding plain tensors.
    Raises UnsafeCheckpointError for anything off the allow-list (``unknown="refuse"``) or
    makes it an inert UnknownGlobal placeholder (``unknown="placeholder"``; see
    ``placeholders_in``), CheckpointFormatError for files that are not complete pickles."""
    if unknown not in UNKNOWN_GLOBALS:
        raise ValueError(f"unknown must be one of {UNKNOWN_GLOBALS}, got {unknown!r}")
    if isinstance(source, (bytes, bytearray)):
        return _unpickle(io.BytesIO(bytes(source)), "<bytes>", unknown)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"load_edm_pickle: no such file: {os.fspath(source)!r}")
        with open(source, "rb") as f:
            return _unpickle(f, os.fspath(source), unknown)
    if hasattr(source, "read") and hasattr(source, "seek"):
        return _unpickle(source, "<stream>", unknown)
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

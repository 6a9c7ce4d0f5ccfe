"""Builders of synthetic EDM network snapshots for the importer's tests (no EDM code used).

Every pid_fast module pickles as the call
torch_utils.persistence._reconstruct_persistent_obj(meta) with
meta = {type: 'class', version, module_src, class_name, state}, exactly EDM's layout.
The embedded module_src (`hostile_source`) would create a marker file (and raise) if it were
ever executed; it is not EDM's released source, so the tests register its hash as known
(tests/io/conftest.py) or pass allow_unknown_source.

`legacy_tensors=True` pickles tensors the way torch 1.x did when EDM's snapshots were written:
_rebuild_tensor_v2 with six arguments (no metadata), _rebuild_parameter with three, and each
storage as torch.storage._load_from_bytes(<legacy torch.save blob>) written by hand here: pickle
protocol 2, torch's magic number and sys_info (with 'long': 8, as Linux builds of torch 1.x
recorded), a storage persistent id naming torch.<Type>Storage and its device (e.g. 'cuda:0'),
then the raw little-endian data.
"""

import collections
import hashlib
import io
import pickle
import struct
import sys
import types

import numpy as np
import torch

from pid_fast.models.networks import Linear, build_network, network_config

CASES = [  # (network config, preconditioning class name, its kwargs)
    ("tiny-ddpmpp", "EDMPrecond", dict(sigma_data=0.5)),
    ("tiny-ncsnpp", "VPPrecond", dict()),
    ("tiny-adm", "VEPrecond", dict(sigma_max=50.0)),
]


def randomize_(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net


def make_teacher(name, cls, kwargs, seed=0, **overrides):
    from pid_fast.models import preconditioning

    cls = getattr(preconditioning, cls) if isinstance(cls, str) else cls
    cfg = network_config(name, **overrides)
    net = randomize_(build_network(cfg), seed).eval()
    return cls(net, label_dim=cfg["label_dim"], **kwargs), cfg


def hostile_source(marker) -> str:
    return (f"open({str(marker)!r}, 'w').write('module_src was executed')\n"
            "raise RuntimeError('EDM module source must never be executed')\n")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FakeEDMModules:
    """Registers stand-in `torch_utils.persistence` modules while pickling (pickle saves
    functions by reference and checks they can be found); their hook records calls."""

    def __init__(self):
        self.calls = []
        self.pkg = types.ModuleType("torch_utils")
        self.mod = types.ModuleType("torch_utils.persistence")

        def _reconstruct_persistent_obj(meta):
            self.calls.append(meta)
            raise RuntimeError("the real persistence hook must never be called")

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        self.hook = _reconstruct_persistent_obj
        self.mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
        self.pkg.persistence = self.mod

    def __enter__(self):
        sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = self.pkg, self.mod
        return self

    def __exit__(self, *exc):
        del sys.modules["torch_utils"], sys.modules["torch_utils.persistence"]
        return False


_STORAGE_CLASSES = {torch.float32: "FloatStorage", torch.float16: "HalfStorage", torch.float64: "DoubleStorage",
                    torch.int64: "LongStorage"}


def legacy_storage_blob(flat: torch.Tensor, location: str = "cuda:0", long_size: int = 8, key: str = "0") -> bytes:
    """A torch 1.x `torch.save(storage, f)` blob (legacy, non-zip) for a 1-D contiguous tensor's data."""
    buf = io.BytesIO()
    sys_info = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=long_size))
    for obj in (torch.serialization.MAGIC_NUMBER, 1001, sys_info):
        pickle.dump(obj, buf, protocol=2)
    storage_class, sentinel = getattr(torch, _STORAGE_CLASSES[flat.dtype]), object()

    class StoragePickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage_class, key, location, flat.numel(), None) if obj is sentinel else None

    StoragePickler(buf, protocol=2).dump(sentinel)
    pickle.dump([key], buf, protocol=2)
    buf.write(struct.pack("<q", flat.numel()))
    buf.write(flat.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return buf.getvalue()


class _LegacyStorage:
    """One storage as old torch pickled it (shared by every tensor viewing it, like pickle's memo)."""

    def __init__(self, flat, location):
        self.blob = legacy_storage_blob(flat, location)

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.blob,)


class EDMPickler(pickle.Pickler):
    """Pickles pid_fast modules the way EDM's persistent classes do (see module docstring)."""

    def __init__(self, file, protocol, hook, module_src, extra_state, rename, sources=None, legacy_tensors=False,
                 location="cuda:0"):
        super().__init__(file, protocol=protocol)
        self.hook, self.module_src, self.extra_state, self.rename = hook, module_src, extra_state, rename
        self.sources, self.legacy_tensors, self.location = sources or {}, legacy_tensors, location
        self.storages = {}

    def _legacy_tensor(self, obj):
        if isinstance(obj, torch.nn.Parameter):
            return torch._utils._rebuild_parameter, (obj.detach(), obj.requires_grad, collections.OrderedDict())
        untyped = obj.untyped_storage()
        if untyped.data_ptr() not in self.storages:
            flat = torch.empty(0, dtype=obj.dtype).set_(untyped, 0, (untyped.nbytes() // obj.element_size(),))
            self.storages[untyped.data_ptr()] = _LegacyStorage(flat, self.location)
        return torch._utils._rebuild_tensor_v2, (self.storages[untyped.data_ptr()], obj.storage_offset(),
                                                 tuple(obj.shape), obj.stride(), False, collections.OrderedDict())

    def reducer_override(self, obj):
        if self.legacy_tensors and isinstance(obj, torch.Tensor):
            return self._legacy_tensor(obj)
        if isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith("pid_fast."):
            state = dict(obj.__dict__)
            state.update(self.extra_state.get(id(obj), {}))
            meta = dict(type="class", version=6, module_src=self.sources.get(id(obj), self.module_src),
                        class_name=self.rename.get(id(obj), type(obj).__name__), state=state)
            return self.hook, (meta,)
        return NotImplemented


def edm_snapshot(precond, network_cfg, marker, *, protocol=4, record_init_args=True, augment_dim=9,
                 extra_state=None, rename=None, module_src=None, sources=None, legacy_tensors=False,
                 recorded_kwargs=None):
    """Bytes of an EDM network-snapshot pickle holding `precond` as 'ema'.

    `recorded_kwargs` replaces the network's recorded constructor arguments (EDM's
    `_init_kwargs`); `sources` maps id(module) to the module_src embedded for that object."""
    model = precond.model
    extra = collections.defaultdict(dict)
    net_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in network_cfg.items() if k != "model_type"}
    if recorded_kwargs is not None:
        net_kwargs = dict(recorded_kwargs)
    if augment_dim:
        # EDM's CIFAR-10 networks carry map_augment (augmentation labels); the importer drops it.
        aug = Linear(augment_dim, model.map_layer0.in_features, bias=False)
        modules = collections.OrderedDict(model._modules)
        modules["map_augment"] = aug
        extra[id(model)]["_modules"] = modules
        net_kwargs["augment_dim"] = augment_dim
    if record_init_args:
        extra[id(model)].update(_init_args=(), _init_kwargs=net_kwargs)
        extra[id(precond)].update(_init_args=(), _init_kwargs=dict(img_resolution=network_cfg["img_resolution"]))
    # EDM's SongUNet passes skip_scale=np.sqrt(0.5): numpy scalars occur in real snapshots.
    first_block = next(m for m in model.modules() if type(m).__name__ == "UNetBlock")
    extra[id(first_block)]["skip_scale"] = np.sqrt(np.float64(0.5))
    for key, value in (extra_state or {}).items():
        extra[key].update(value)
    buf = io.BytesIO()
    with FakeEDMModules() as fake:
        data = dict(ema=precond, loss_fn=None, augment_pipe=None,
                    dataset_kwargs=dict(path="cifar10-32x32.zip", use_labels=False, xflip=False))
        src = module_src if module_src is not None else hostile_source(marker)
        EDMPickler(buf, protocol, fake.hook, src, extra, rename or {}, sources, legacy_tensors).dump(data)
    assert fake.calls == []
    return buf.getvalue()


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args

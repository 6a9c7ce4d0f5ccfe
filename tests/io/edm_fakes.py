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


# ----------------------------------------------------------------------------------------
# EDM2 snapshots (NVlabs/edm2): EasyDict(encoder=..., dataset_kwargs=..., loss_fn=..., ema=Precond),
# the network in fp16, every EDM2 object persistent. pid_fast's EDM2 classes pickle under EDM2's
# class names with only the attributes EDM2's objects have.

EDM2_CLASS_NAMES = {"EDM2Precond": "Precond", "EDM2UNet": "UNet", "EDM2Block": "Block", "MPConv": "MPConv",
                    "MPFourier": "MPFourier"}
# Attributes of pid_fast's EDM2 objects that EDM2's objects do not have.
_PID_ONLY_STATE = {"Precond": ("sigma_min", "sigma_max"), "UNet": ("in_channels", "out_channels", "label_dropout"),
                   "MPConv": ("in_channels", "_normalized"), "Block": ("in_channels",)}


class FakePersistent:
    """A persistent object of another EDM2 class (an encoder, the loss) given by name and state."""

    def __init__(self, class_name, state, module_src=None):
        self.class_name, self.state, self.module_src = class_name, state, module_src


class FakeDnnlib:
    """Registers a stand-in `dnnlib.util.EasyDict` while pickling (EDM2's top-level object)."""

    def __init__(self):
        self.pkg, self.util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
        self.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
        self.util.EasyDict, self.pkg.util = self.EasyDict, self.util

    def __enter__(self):
        sys.modules["dnnlib"], sys.modules["dnnlib.util"] = self.pkg, self.util
        return self

    def __exit__(self, *exc):
        del sys.modules["dnnlib"], sys.modules["dnnlib.util"]
        return False


class EDM2Pickler(EDMPickler):
    def reducer_override(self, obj):
        if isinstance(obj, FakePersistent):
            meta = dict(type="class", version=6, module_src=obj.module_src or self.module_src,
                        class_name=obj.class_name, state=dict(obj.state))
            return self.hook, (meta,)
        reduced = super().reducer_override(obj)
        if reduced is not NotImplemented and type(obj).__name__ in EDM2_CLASS_NAMES:
            meta = reduced[1][0]
            meta["class_name"] = self.rename.get(id(obj), EDM2_CLASS_NAMES[type(obj).__name__])
            for key in _PID_ONLY_STATE.get(meta["class_name"], ()):
                meta["state"].pop(key, None)
        return reduced


def stability_encoder(raw_mean=(5.81, 3.25, 0.12, -2.15), raw_std=(4.17, 4.62, 3.71, 3.28), final_mean=0.0,
                      final_std=0.5, module_src=None, record_kwargs=False):
    """EDM2's StabilityVAEEncoder state: scale/bias as float32 numpy arrays, the VAE not pickled."""
    scale = np.float32(final_std) / np.float32(raw_std)
    bias = np.float32(final_mean) - np.float32(raw_mean) * scale
    kwargs = dict(raw_mean=list(raw_mean), raw_std=list(raw_std)) if record_kwargs else {}
    return FakePersistent("StabilityVAEEncoder", dict(vae_name="stabilityai/sd-vae-ft-mse", scale=scale, bias=bias,
                                                      batch_size=8, _vae=None, _init_args=(), _init_kwargs=kwargs),
                          module_src)


def edm2_unet_kwargs(cfg):
    """What EDM2 records for its UNet: the interface arguments, model_channels, dropout, and any
    other argument that differs from EDM2's default."""
    from pid_fast.io.edm_config import with_constructor_defaults

    defaults = with_constructor_defaults({"model_type": "EDM2UNet"})
    kwargs = dict(img_resolution=cfg["img_resolution"], img_channels=cfg["in_channels"], label_dim=cfg["label_dim"],
                  model_channels=cfg["model_channels"], dropout=cfg.get("dropout", 0.0))
    for key, value in cfg.items():
        if key not in ("model_type", "in_channels", "out_channels") and key not in kwargs \
                and value != defaults.get(key, object()):
            kwargs[key] = list(value) if isinstance(value, tuple) else value
    return kwargs


def edm2_snapshot(precond, network_cfg, marker, *, encoder=None, protocol=4, record_init_args=True, fp16=True,
                  module_src=None, sources=None, rename=None, top_extra=None, recorded_kwargs=None):
    """Bytes of an EDM2 network-snapshot pickle holding `precond` (an EDM2Precond) as 'ema'.
    `recorded_kwargs` replaces the UNet's recorded constructor arguments; `sources` and `rename`
    map `precond`'s modules (by id) to their module_src / class name; `top_extra` adds entries."""
    import copy

    net = copy.deepcopy(precond).eval().requires_grad_(False)
    if fp16:
        net = net.to(torch.float16)  # EDM2 saves its snapshots in fp16
    unet_kwargs = edm2_unet_kwargs(network_cfg) if recorded_kwargs is None else dict(recorded_kwargs)
    extra = collections.defaultdict(dict)
    extra[id(net)].update(img_resolution=network_cfg["img_resolution"], img_channels=network_cfg["in_channels"])
    if record_init_args:
        extra[id(net.unet)].update(_init_args=(), _init_kwargs=unet_kwargs)
        extra[id(net)].update(_init_args=(), _init_kwargs=dict(unet_kwargs, use_fp16=net.use_fp16))
    src = module_src if module_src is not None else hostile_source(marker)
    # translate the sources / renames given for `precond`'s modules to the copy's
    by_name = {id(m): name for name, m in precond.named_modules()}
    copied = dict(net.named_modules())
    sources = {id(copied[by_name[k]]): v for k, v in (sources or {}).items()}
    rename = {id(copied[by_name[k]]): v for k, v in (rename or {}).items()}
    buf = io.BytesIO()
    with FakeEDMModules() as fake, FakeDnnlib() as dnnlib:
        data = dnnlib.EasyDict(encoder=encoder if encoder is not None else FakePersistent("StandardRGBEncoder", {}),
                               dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                              path="img64.zip", use_labels=True),
                               loss_fn=FakePersistent("EDM2Loss", dict(P_mean=-0.8, P_std=1.6, sigma_data=0.5)))
        data["ema"] = net
        data.update(top_extra or {})
        EDM2Pickler(buf, protocol, fake.hook, src, extra, rename, sources).dump(data)
    assert fake.calls == []
    return buf.getvalue()


def make_edm2_teacher(cfg, seed=0, gains=0.5):
    """An EDM2Precond around a randomly initialised EDM2UNet whose gains (0 at EDM2's init) are set
    to `gains`, so that its output depends on the input, the noise level and the class."""
    from pid_fast.models.edm2 import EDM2Precond

    torch.manual_seed(seed)
    unet = build_network(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim == 0:
                p.fill_(gains)
    return EDM2Precond(unet, label_dim=cfg["label_dim"], use_fp16=True).eval()

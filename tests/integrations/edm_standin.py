"""EDM-shaped stand-ins, written here from EDM's published interfaces (NVlabs/edm's code is
CC BY-NC-SA and is not copied): its preconditioning class's interface and a training loop that
makes the same calls as EDM's ``training/training_loop.py``:

- the loss from ``loss_kwargs`` by class name (dnnlib's construct_class_by_name);
- DDP of the preconditioned network (broadcast_buffers=False), per round
  ``loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=None)`` and
  ``loss.sum().mul(loss_scaling / batch_gpu_total).backward()``; NaN/inf gradients zeroed
  (``nan_to_num``), Adam, an EMA of the weights;
- snapshots: ``dict(ema=..., loss_fn=loss_fn, augment_pipe=None, dataset_kwargs=...)`` with the
  modules deep-copied to the CPU, pickled with ``pickle.dump`` through EDM's persistence layout
  (networks as ``_reconstruct_persistent_obj(meta)``: tests/io/edm_fakes.py's pickler), every
  other object (the loss) as plain pickle writes it.
"""

import collections
import copy
import importlib
import math
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "io"))
from edm_fakes import EDMPickler, FakeEDMModules, hostile_source, randomize_  # noqa: E402

from pid_fast.models.networks import build_network, network_config  # noqa: E402

NETWORK = "tiny-ddpmpp"


class EDMPrecond(nn.Module):
    """EDM's preconditioning interface (Karras et al. 2022, Table 1): attributes img_resolution,
    img_channels, label_dim, use_fp16, sigma_min, sigma_max, sigma_data, model, and
    forward(x, sigma, class_labels=None, force_fp32=False, **model_kwargs). Not pid_fast's class:
    the loss must recognise it by its interface."""

    def __init__(self, model, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.0,
                 sigma_max=float("inf"), sigma_data=0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_min, self.sigma_max, self.sigma_data = use_fp16, sigma_min, sigma_max, sigma_data
        self.model = model

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        labels = None if self.label_dim == 0 else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model(c_in * x, c_noise.flatten(), labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)


def make_network(seed=0, dropout=0.0):
    """(EDM-shaped EDMPrecond around a tiny pid_fast SongUNet with random weights, its config)."""
    cfg = network_config(NETWORK, dropout=dropout)
    torch.manual_seed(seed)
    net = randomize_(build_network(cfg), seed)
    return EDMPrecond(net, cfg["img_resolution"], cfg["in_channels"]), cfg


class _StandInPickler(EDMPickler):
    """EDMPickler that also writes the stand-in EDMPrecond as an EDM persistent object."""

    def reducer_override(self, obj):
        if isinstance(obj, EDMPrecond):
            state = dict(obj.__dict__)
            state.update(self.extra_state.get(id(obj), {}))
            meta = dict(type="class", version=6, module_src=self.module_src, class_name="EDMPrecond", state=state)
            return self.hook, (meta,)
        return super().reducer_override(obj)


def write_snapshot(path, data, network_cfg, marker):
    """EDM's snapshot: ``data`` pickled, networks as persistent objects whose module_src is
    ``hostile_source(marker)`` (it would create ``marker`` if anything ever ran it)."""
    extra = collections.defaultdict(dict)
    ema = data["ema"]
    net_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in network_cfg.items() if k != "model_type"}
    extra[id(ema.model)].update(_init_args=(), _init_kwargs=net_kwargs)
    with FakeEDMModules() as fake, open(path, "wb") as f:
        _StandInPickler(f, 4, fake.hook, hostile_source(marker), extra, {}).dump(data)
    assert fake.calls == []


def construct_class_by_name(class_name, **kwargs):
    """dnnlib.util.construct_class_by_name's role: import the module, call the class."""
    module, name = class_name.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**kwargs)


def training_loop(run_dir, *, loss_kwargs, steps=12, batch_size=8, lr=2e-3, ema_halflife_images=40, seed=0,
                  snapshot_steps=(), marker=None, loss_scaling=1.0):
    """EDM's loop, stand-in (see the module docstring); returns the per-step mean losses
    (averaged over ranks) and the snapshot paths (rank 0). The student starts as the teacher's
    copy (EDM's --transfer)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    batch_gpu_total = batch_size // world
    torch.manual_seed((seed * world + rank) % (1 << 31))
    net, cfg = make_network(seed=0)
    net.train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = construct_class_by_name(**loss_kwargs)
    ddp = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False) if world > 1 else net
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    shape = (batch_gpu_total, cfg["in_channels"], cfg["img_resolution"], cfg["img_resolution"])
    losses, snapshots = [], []
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        images = torch.zeros(shape)  # PID ignores the data; EDM would pass a dataset batch
        labels = torch.zeros(shape[0], 0)  # an unconditional dataset's labels
        loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=None)
        loss.sum().mul(loss_scaling / batch_gpu_total).backward()
        step_loss = loss.detach().mean().reshape(1)
        if world > 1:
            dist.all_reduce(step_loss)
        losses.append(float(step_loss) / world)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        ema_beta = 0.5 ** (batch_size / max(ema_halflife_images, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
        if step in snapshot_steps:
            data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=None,
                        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="none.zip"))
            for key, value in data.items():
                if isinstance(value, nn.Module):
                    data[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
            if rank == 0:
                path = os.path.join(run_dir, f"network-snapshot-{step * batch_size // 1000:06d}-{step:03d}.pkl")
                write_snapshot(path, data, cfg, marker)
                snapshots.append(path)
            del data
    return losses, snapshots, ema


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat_grad(module):
    return torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None])


def teacher_file(tmp_dir, marker):
    """An EDM snapshot of the teacher (the stand-in EDMPrecond, seed 0), as EDM's train.py writes."""
    teacher, cfg = make_network(seed=0)
    path = os.path.join(tmp_dir, "teacher.pkl")
    write_snapshot(path, dict(ema=teacher.eval(), loss_fn=None, augment_pipe=None, dataset_kwargs={}), cfg, marker)
    return path


__all__ = ["EDMPrecond", "make_network", "write_snapshot", "training_loop", "construct_class_by_name", "free_port",
           "init_process", "relative", "flat_grad", "teacher_file"]


# --------------------------------------------------------------------------------------------
# Process workers (torch.multiprocessing.spawn: module-level functions)

GLOBAL_BATCH = 8
KINDS = ("raw", "preconditioned", "bypass", "fsdp")


def gradient_batch():
    """The global batch of the gradient check: noise, grid indices (both ends included)."""
    noise = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 80.0
    return noise, torch.tensor([0, 3, 40, 90, 150, 200, 248, 249])


def gradient_student(kind):
    """(what the loss is called with, the module whose gradients are compared, the wrapper to keep
    alive) for one rank: DDP of the raw network, DDP of the EDM-shaped EDMPrecond, the raw
    network reached inside DDP(EDMPrecond) (``ddp.module.model``: DDP's hooks bypassed), or
    FSDP of the EDMPrecond."""
    edm, _ = make_network(seed=0)
    edm.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    wrap = (lambda m: nn.parallel.DistributedDataParallel(m, broadcast_buffers=False)) if world > 1 else (lambda m: m)
    if kind == "raw":
        ddp = wrap(edm.model)
        return ddp, edm.model, ddp
    if kind == "fsdp":  # FSDP (unsharded, so that every rank holds whole gradients) of the EDMPrecond
        if world == 1:
            return edm, edm.model, edm
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        fsdp = FullyShardedDataParallel(edm, sharding_strategy=ShardingStrategy.NO_SHARD,
                                        device_id=torch.device("cpu"), use_orig_params=True)
        return fsdp, edm.model, fsdp
    ddp = wrap(edm)
    if kind == "bypass":
        return (ddp.module if world > 1 else ddp).model, edm.model, ddp
    return ddp, edm.model, ddp


def gradient_teacher():
    from pid_fast.models.preconditioning import EDMPrecond as PidEDMPrecond

    teacher, _ = make_network(seed=0)
    return PidEDMPrecond(copy.deepcopy(teacher.model)).eval()


def rank_gradients(rank, world):
    """{kind: gradient} of the mean PID loss over this rank's rows of the global batch."""
    from pid_fast.loss import PIDLoss

    noise, indices = gradient_batch()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    pid = PIDLoss(gradient_teacher())
    out = {}
    for kind in KINDS:
        call, params, _keep = gradient_student(kind)
        pid.per_sample(call, noise[rows], indices=indices[rows]).mean().backward()
        out[kind] = flat_grad(params)
    return out


LOOP = dict(steps=20, batch_size=8, lr=1e-3, ema_halflife_images=40)


def dropin_worker(rank, world, port, out_dir, teacher_path, marker, snapshot_steps, loop=None):
    """One 2-process run for the tests: the DDP gradient check, then the EDM-shaped loop."""
    init_process(rank, world, port)
    try:
        torch.save(rank_gradients(rank, world), os.path.join(out_dir, f"grads-rank{rank}.pt"))
        loss_kwargs = dict(class_name="pid_fast.integrations.edm.EDMPIDLoss", teacher=teacher_path,
                           allow_unknown_source=True)  # the stand-in's module_src is not EDM's released one
        losses, snapshots, ema = training_loop(out_dir, loss_kwargs=loss_kwargs, marker=marker,
                                               snapshot_steps=snapshot_steps, **(loop or LOOP))
        if rank == 0:
            torch.save(dict(losses=losses, snapshots=snapshots, ema=ema.model.state_dict()),
                       os.path.join(out_dir, "loop-result.pt"))
    finally:
        dist.destroy_process_group()

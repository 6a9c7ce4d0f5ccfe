"""Precision modes of the student's pass (pid_fast.models.precision): one PID step per mode agrees
with fp32 within the mode's measured tolerance; fp32 islands really run in fp32 and leave the
network's state_dict, copies and pickles alone; bad names are refused naming the argument."""

import copy
import io
import os
import pickle

import pytest
import torch
from torch import nn

from pid_fast import PIDLoss
from pid_fast.models.networks import build_network
from pid_fast.models.precision import (ISLAND_PARTS, PRECISION_MODES, FP32Forward, autocast_for, fp32_islands,
                                       keep_fp32, needs_grad_scaler, precision_mode, prepare_network,
                                       tf32_allowed)

pytestmark = pytest.mark.usefixtures("one_thread")

# Measured on the digits network (student = copy of the teacher), batch 8 with grid indices
# spread over 0..249, 8 noise seeds, CPU autocast, teacher in fp32: the largest relative loss
# difference to fp32 and the smallest gradient cosine to fp32 were
#   bf16 3.0e-2 / 0.9866, bf16-mixed 3.4e-2 / 0.9925, fp16 6.4e-3 / 0.99985, fp16-mixed 7.2e-3 / 0.99993
# (fp32 and tf32 are the same computation on a CPU). Tolerances: twice the loss difference, and
# the cosine's distance from 1 three times (the cosine varies more between seeds).
LOSS_TOL = {"fp32": 1e-6, "tf32": 1e-6, "bf16": 6e-2, "bf16-mixed": 7e-2, "fp16": 1.5e-2, "fp16-mixed": 1.5e-2}
MIN_COSINE = {"fp32": 1 - 1e-6, "tf32": 1 - 1e-6, "bf16": 0.96, "bf16-mixed": 0.97, "fp16": 0.9995,
              "fp16-mixed": 0.9995}


@pytest.fixture(scope="module")
def digits_teacher():
    from pid_fast.demo.digits import DEFAULT_TEACHER
    from pid_fast.io import load_teacher

    return load_teacher(DEFAULT_TEACHER)


def tiny_net(name="tiny-ddpmpp", seed=0):
    torch.manual_seed(seed)
    net = build_network(name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # EDM zero-initialises the output layers: make every layer contribute
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net


def pid_step(loss_fn, net, noise, indices, mode):
    with autocast_for(mode, "cpu"):
        loss = loss_fn(net, noise, indices=indices)
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])
    return loss.detach(), grad


# ----------------------------------------------------------------------------------------
# One training step per mode.

@pytest.mark.parametrize("mode", PRECISION_MODES)
def test_mode_loss_and_gradient_agree_with_fp32(digits_teacher, mode):
    loss_fn = PIDLoss(digits_teacher, teacher_precision="fp32")
    noise = 80 * torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    indices = torch.linspace(0, 249, 8).round().long()  # includes i = N-1 (t2 > t)
    student = copy.deepcopy(digits_teacher.model).train().requires_grad_(True)
    loss32, grad32 = pid_step(loss_fn, copy.deepcopy(student), noise, indices, "fp32")
    net = prepare_network(copy.deepcopy(student), mode)
    loss, grad = pid_step(loss_fn, net, noise, indices, mode)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss - loss32) / loss32 <= LOSS_TOL[mode]
    assert grad @ grad32 / (grad.norm() * grad32.norm()) >= MIN_COSINE[mode]
    if mode.endswith("mixed"):
        assert fp32_islands(net), "a mixed mode installs fp32 islands"
    else:
        assert not fp32_islands(net)


def test_fp16_step_with_grad_scaler(digits_teacher):
    assert needs_grad_scaler("fp16") and needs_grad_scaler("fp16-mixed")
    net = prepare_network(copy.deepcopy(digits_teacher.model).train().requires_grad_(True), "fp16-mixed")
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    noise = 80 * torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with autocast_for("fp16-mixed", "cpu"):
        loss = PIDLoss(digits_teacher, teacher_precision="fp32")(net, noise, indices=torch.tensor([0, 90, 180, 249]))
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters())), "the step was applied"


def test_mode_table():
    assert PRECISION_MODES == ("fp32", "tf32", "bf16", "fp16", "bf16-mixed", "fp16-mixed")
    assert [m for m in PRECISION_MODES if needs_grad_scaler(m)] == ["fp16", "fp16-mixed"]
    assert [m for m in PRECISION_MODES if tf32_allowed(m)] == ["tf32"]
    assert precision_mode("bf16-mixed").autocast_dtype == torch.bfloat16
    assert precision_mode("fp16-mixed").fp32_parts == ("embedding", "modulation", "output")
    assert precision_mode("bf16-mixed").fp32_parts == ("embedding", "modulation", "output")
    assert precision_mode("fp32").autocast_dtype is None and precision_mode("tf32").autocast_dtype is None


def test_bad_names_raise_naming_the_argument():
    net = tiny_net()
    with pytest.raises(ValueError, match="precision"):
        precision_mode("fp64")
    with pytest.raises(ValueError, match="mode"):
        with autocast_for("half", "cpu"):
            pass
    with pytest.raises(ValueError, match="mode"):
        prepare_network(net, "bf16_mixed")
    with pytest.raises(ValueError, match="precision"):
        needs_grad_scaler(None)
    with pytest.raises(ValueError, match="parts"):
        keep_fp32(net, ["embedding", "trunk"])
    with pytest.raises(ValueError, match="parts"):  # a network without the named submodules
        keep_fp32(nn.Sequential(nn.Linear(2, 2)), ["output"])
    with pytest.raises(TypeError, match="device_type"):
        with autocast_for("bf16", torch.device("cpu")):
            pass


# ----------------------------------------------------------------------------------------
# fp32 islands.

@pytest.mark.parametrize("name", ["tiny-ddpmpp", "tiny-ncsnpp", "tiny-adm"])
def test_islands_state_dict_neutral_and_idempotent(name):
    net = tiny_net(name)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    keep_fp32(net, tuple(ISLAND_PARTS))
    islands = fp32_islands(net)
    assert "map_layer0" in islands and any(k.endswith(".affine") for k in islands)
    assert any(k.endswith(".skip") for k in islands) and any("out" in k or "aux" in k for k in islands)
    assert not any(k.endswith(("conv0", "conv1", "qkv")) for k in islands), "the trunk stays 16-bit"
    keep_fp32(net, tuple(ISLAND_PARTS))
    prepare_network(net, "bf16-mixed")  # a subset of the parts: nothing changes
    assert fp32_islands(net) == islands
    time_path = fp32_islands(prepare_network(tiny_net(name), "fp16-mixed"))
    assert set(time_path) < set(islands) and not any(k.endswith(".skip") for k in time_path)
    state = net.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    fresh = build_network(name)
    fresh.load_state_dict(state, strict=True)  # loads into a network without islands, and back
    net.load_state_dict(fresh.state_dict(), strict=True)


def test_islands_survive_deepcopy_and_pickle():
    net = keep_fp32(tiny_net())
    x, c = torch.randn(2, 3, 8, 8), torch.rand(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = net(x, c)
    for copied in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert fp32_islands(copied) == fp32_islands(net)
        assert copied.map_layer0.forward.module is copied.map_layer0  # the copy's own forward
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(copied(x, c), expected)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    assert list(torch.load(buffer)) == list(net.state_dict())


class _Recorder(nn.Module):
    """Records whether autocast is on and the input dtype inside its forward."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 4))
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
        return x @ self.weight


def test_island_forward_runs_without_autocast_on_fp32_inputs():
    holder = nn.Module()
    holder.map_layer0 = _Recorder()
    keep_fp32(holder, ["embedding"])
    assert isinstance(holder.map_layer0.__dict__["forward"], FP32Forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = holder.map_layer0(torch.randn(2, 4, dtype=torch.bfloat16))
    assert holder.map_layer0.seen == [(False, torch.float32)] and out.dtype == torch.float32
    assert list(holder.state_dict()) == ["map_layer0.weight"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_islands_output_fp32_while_trunk_stays_16bit(dtype):
    net = keep_fp32(tiny_net(), tuple(ISLAND_PARTS))
    seen = {}

    def hook(name):
        return lambda module, args, out: seen.__setitem__(name, out.dtype)

    watched = ["map_layer1", "enc.8x8_block0.affine", "enc.4x4_block0.skip", "dec.8x8_aux_conv",
               "enc.8x8_block0.conv0", "enc.8x8_block0.conv1", "dec.4x4_in0.qkv"]
    modules = dict(net.named_modules())
    for name in watched:
        modules[name].register_forward_hook(hook(name))
    with torch.autocast("cpu", dtype=dtype):
        out = net(torch.randn(2, 3, 8, 8), torch.rand(2))
    assert out.dtype == torch.float32  # F comes from the fp32 output conv
    assert {n: seen[n] for n in watched[:4]} == dict.fromkeys(watched[:4], torch.float32)
    assert {n: seen[n] for n in watched[4:]} == dict.fromkeys(watched[4:], dtype)


def test_islands_do_nothing_outside_autocast():
    net = tiny_net()
    x, c = torch.randn(2, 3, 8, 8), torch.rand(2)
    expected = net(x, c)
    assert torch.equal(keep_fp32(net)(x, c), expected)
    with autocast_for("fp32", "cpu"):
        assert torch.equal(net(x, c), expected)


def test_fp32_mode_turns_off_an_outer_autocast():
    net = tiny_net()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with autocast_for("fp32", "cpu"):
            assert net(torch.randn(2, 3, 8, 8), torch.rand(2)).dtype == torch.float32


def test_tf32_switches_set_and_restored():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with autocast_for("fp32", "cuda"):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with autocast_for("tf32", "cuda"):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# ----------------------------------------------------------------------------------------
# torch.compile and DDP.

def test_islands_under_torch_compile_eager_backend():
    net = keep_fp32(tiny_net())
    x, c = torch.randn(2, 3, 8, 8), torch.rand(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = net(x, c)
        compiled = torch.compile(net, backend="eager", fullgraph=True)
        got = compiled(x, c)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_islands_under_ddp(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{os.fspath(tmp_path / 'store')}", rank=0, world_size=1)
    try:
        net = prepare_network(tiny_net(), "bf16-mixed")
        model = nn.parallel.DistributedDataParallel(net)
        teacher = copy.deepcopy(tiny_net(seed=1))
        from pid_fast.models.preconditioning import EDMPrecond

        loss_fn = PIDLoss(EDMPrecond(teacher), teacher_precision="fp32")
        noise = 80 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        loss, grad = pid_step(loss_fn, model, noise, torch.tensor([5, 200]), "bf16-mixed")
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert fp32_islands(model) == ["module." + n for n in fp32_islands(net)]
    finally:
        dist.destroy_process_group()

"""PIDLoss / pid_distillation_loss against the spec's equations, and the LPIPS norm."""

import math
import os
import runpy
import warnings

import pytest
import torch
from torch import nn

from pid_fast.loss import PIDLoss, grid_times, pid_distillation_loss
from pid_fast.eval.lpips import LPIPSNorm
from pid_fast.models.preconditioning import EDMPrecond, GaussianDenoiser
from pid_fast.sampling import pid_grid

pytestmark = pytest.mark.usefixtures("one_thread")


T, SD = 80.0, 0.5
HERE = os.path.dirname(os.path.abspath(__file__))


class TinyNet(nn.Module):
    """A raw network F(x_in, c_noise, labels) with a few hundred parameters and outputs of
    order one (so that the loss is not a tiny difference of large numbers)."""

    def __init__(self, ch=3, label_dim=0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.emb = nn.Linear(1, ch)
        self.lab = nn.Linear(label_dim, ch) if label_dim else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.calls = []

    def forward(self, x, c_noise, labels=None):
        self.calls.append((x.shape[0], x.dtype))
        h = self.conv(x) + self.emb(c_noise.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        if self.lab is not None:
            h = h + self.lab(labels.to(x.dtype))[:, :, None, None]
        return torch.tanh(h)


def _rows(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def manual_loss(student, teacher, noise, i, N=250, norm="l2", huber_c=None, labels=None, lpips=None):
    """The spec, step by step, in plain autograd (student and teacher in noise's dtype)."""
    i2 = torch.where(i == N - 1, torch.full_like(i, N - 2), i + 1)
    grid = pid_grid(N, dtype=torch.float64)
    t, t2 = grid[i].to(noise.dtype), grid[i2].to(noise.dtype)
    c = 1 / math.sqrt(SD ** 2 + T ** 2)

    def x_theta(tt):
        F = student(c * noise, torch.log(tt) / 4, labels)
        return _rows(tt / T, noise) * noise + _rows(1 - tt / T, noise) * F

    y, y2 = x_theta(t), x_theta(t2)
    pred = y - _rows(t, y) * (y - y2) / _rows(t - t2, y)
    with torch.no_grad():  # EDM denoiser D = c_skip y + c_out F_teacher(c_in y, ln(t)/4)
        var = t ** 2 + SD ** 2
        G = teacher(_rows(var.rsqrt(), y) * y, torch.log(t) / 4, labels)
        target = _rows(SD ** 2 / var, y) * y + _rows(t * SD * var.rsqrt(), y) * G
    r = (pred - target).flatten(1)
    if norm == "l2":
        return r.square().mean(1)
    if norm == "l1":
        return r.abs().mean(1)
    if norm == "huber":
        return torch.sqrt(r.square().mean(1) + huber_c ** 2) - huber_c
    return lpips(pred, target)


class EDM64(EDMPrecond):
    """An EDM teacher evaluated in float64 (for checks against the equations)."""

    def model_dtype(self, device, force_fp32=False):
        return torch.float64

    def raw(self, x_in, c_noise, class_labels=None, force_fp32=False):
        return self.model(x_in.double(), c_noise.double(), class_labels)


def make(seed=0, label_dim=0, dtype=torch.float32):
    """(preconditioned teacher, student raw network, teacher raw network)."""
    net = TinyNet(label_dim=label_dim, seed=seed + 100).to(dtype)
    teacher = (EDM64 if dtype == torch.float64 else EDMPrecond)(net, label_dim=label_dim)
    student = TinyNet(label_dim=label_dim, seed=seed).to(dtype)
    return teacher, student, net


EDGE = torch.tensor([0, 1, 124, 247, 248, 249])


def grads(module):
    return [p.grad.clone() for p in module.parameters()]


def test_matches_spec_in_float64():
    teacher, student, net = make(dtype=torch.float64)
    noise = torch.randn(6, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * T
    ref = manual_loss(student, net, noise, EDGE)
    ref.mean().backward()
    g_ref = grads(student)
    student.zero_grad()
    pid = PIDLoss(teacher, backend="reference")
    loss = pid(student, noise, indices=EDGE)
    loss.backward()
    torch.testing.assert_close(pid.last_per_sample, ref.detach(), rtol=1e-9, atol=1e-12)
    for g, gr in zip(grads(student), g_ref):
        torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-10)
    assert loss.item() == pytest.approx(ref.mean().item(), rel=1e-10)


@pytest.mark.parametrize("norm,huber_c", [("l2", None), ("l1", None), ("huber", 0.03)])
def test_fused_cpu_backend_matches_spec(norm, huber_c):
    teacher, student, _ = make(seed=3)
    noise = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(2)) * T
    _, student64, net64 = make(seed=3, dtype=torch.float64)
    ref = manual_loss(student64, net64, noise.double(), EDGE, norm=norm, huber_c=huber_c)
    ref.mean().backward()
    pid = PIDLoss(teacher, norm=norm, huber_c=huber_c, backend="cpu")
    pid(student, noise, indices=EDGE).backward()
    torch.testing.assert_close(pid.last_per_sample.double(), ref.detach(), rtol=2e-3, atol=1e-5)
    for g, gr in zip(grads(student), grads(student64)):
        torch.testing.assert_close(g.double(), gr, rtol=5e-3, atol=1e-4)


def test_one_forward_of_2B_or_two_of_B_same_result():
    teacher, student, _ = make(seed=4)
    noise = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3)) * T
    idx = torch.tensor([0, 17, 200, 249])
    out = {}
    for batched in (True, False):
        student.calls.clear()
        student.zero_grad()
        loss = PIDLoss(teacher, batched=batched)(student, noise, indices=idx)
        loss.backward()
        out[batched] = (loss.detach(), grads(student), list(student.calls))
    assert out[True][2] == [(8, torch.float32)]
    assert out[False][2] == [(4, torch.float32), (4, torch.float32)]
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_grid_indices_times_and_last_index_edge():
    N = 5
    teacher, student, _ = make()
    pid = PIDLoss(teacher, N=N)
    noise = torch.randn(400, 3, 2, 2) * T
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = pid(student, noise, generator=g1)
    t_a = pid.last_t.clone()
    b = pid(student, noise, generator=g2)
    assert torch.equal(a, b) and torch.equal(t_a, pid.last_t)  # the generator decides the draw
    grid = pid_grid(N)
    i = torch.searchsorted(-grid, -pid.last_t)  # grid is decreasing
    assert torch.equal(grid[i], pid.last_t)
    assert set(i.tolist()) == set(range(N))  # every index 0..N-1 is drawn
    i2 = torch.where(i == N - 1, N - 2, i + 1)
    assert torch.equal(pid.last_t2, grid[i2])
    last = i == N - 1
    assert bool((pid.last_t2[last] > pid.last_t[last]).all())  # i = N-1: the neighbour is larger
    assert bool((pid.last_t2[~last] < pid.last_t[~last]).all())
    # grid_times is sampling.pid_time without its host sync
    torch.testing.assert_close(grid_times(torch.arange(250), 250, 0.002, 80.0, 7.0), pid_grid(250), rtol=0, atol=0)


class RecordingTeacher(EDMPrecond):
    """EDM teacher whose network runs in bfloat16 and records what it receives."""

    def __init__(self, model, label_dim=0):
        super().__init__(model.to(torch.bfloat16), label_dim=label_dim)
        self.seen = []

    def model_dtype(self, device, force_fp32=False):
        return torch.bfloat16

    def raw(self, x_in, c_noise, class_labels=None, force_fp32=False):
        self.seen.append(dict(x_in=x_in.clone(), c_noise=c_noise.clone(), labels=class_labels,
                              grad=torch.is_grad_enabled(), autocast=torch.is_autocast_enabled("cpu")))
        return super().raw(x_in, c_noise, class_labels, force_fp32)


def test_teacher_input_dtype_no_grad_and_no_autocast():
    teacher = RecordingTeacher(TinyNet(seed=9, label_dim=4), label_dim=4)
    student = TinyNet(seed=1, label_dim=4)
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * T
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 1]), 4).float()
    idx = torch.tensor([0, 100, 249])
    pid = PIDLoss(teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pid(student, noise, labels, indices=idx)
    loss.backward()
    (seen,) = teacher.seen
    assert seen["x_in"].dtype == torch.bfloat16 and not seen["grad"] and not seen["autocast"]
    assert not seen["x_in"].requires_grad
    assert torch.equal(seen["labels"], labels)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # the teacher's input is c_in(t) y with y = (t/T) n + (1 - t/T) F(t)
    t = pid.last_t
    with torch.no_grad():
        F = student(noise / math.sqrt(SD ** 2 + T ** 2), torch.log(t) / 4, labels)
    y = _rows(t / T, noise) * noise + _rows(1 - t / T, noise) * F
    expected = _rows((t ** 2 + SD ** 2).rsqrt(), y) * y
    torch.testing.assert_close(seen["x_in"].float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(seen["c_noise"], torch.log(t) / 4)


def test_labels_reach_both_student_halves():
    teacher, student, _ = make(label_dim=3)
    noise = torch.randn(2, 3, 4, 4) * T
    labels = torch.eye(3)[[2, 0]]
    got = []
    orig = student.forward
    student.forward = lambda x, c, lab=None: (got.append(lab), orig(x, c, lab))[1]
    PIDLoss(teacher)(student, noise, labels)
    assert torch.equal(got[0], torch.cat([labels, labels]))


def test_exact_ode_solution_has_small_loss():
    """For the Gaussian N(0, sd^2) teacher the PF-ODE solution is x(t) = c n sqrt(sd^2 + t^2);
    a student that returns it makes the PID residual vanish up to the finite-difference
    error, while the zero student does not."""
    c = 1 / math.sqrt(SD ** 2 + T ** 2)

    def exact(x_in, c_noise, labels=None):
        t = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        x = x_in * torch.sqrt(SD ** 2 + t ** 2)  # x_in = c n
        F = (x - (t / T) * x_in / c) / (1 - t / T).clamp_min(1e-12)
        return torch.where(t >= T * (1 - 1e-6), torch.zeros_like(F), F)

    teacher = GaussianDenoiser(0.0, SD)
    noise = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * T
    idx = torch.cat([torch.arange(0, 250, 4), torch.tensor([249])])  # 64 indices, both ends
    pid = PIDLoss(teacher, backend="reference")
    exact_loss = pid(exact, noise.double(), indices=idx).item()
    zero_loss = pid(lambda x, cn, lab=None: torch.zeros_like(x), noise.double(), indices=idx).item()
    assert exact_loss < 1e-3 * zero_loss
    # The residual of the exact solution is the finite-difference error, O(t2 - t): on a grid
    # 4x finer with the same times (N = 997: index 4i is index i of N = 250) the loss drops ~16x.
    fine = PIDLoss(teacher, N=997, backend="reference")(exact, noise.double(), indices=4 * idx).item()
    assert torch.equal(pid_grid(997, dtype=torch.float64)[4 * idx], pid_grid(250, dtype=torch.float64)[idx])
    assert 1 / 24 < fine / exact_loss < 1 / 10


def test_weighting_and_functional_form():
    teacher, student, _ = make(seed=5)
    noise = torch.randn(4, 3, 4, 4) * T
    idx = torch.tensor([3, 50, 120, 249])
    plain = pid_distillation_loss(student, teacher, noise, indices=idx)
    weighted, t, _ = pid_distillation_loss(student, teacher, noise, indices=idx, weighting=lambda t: 1 / t,
                                           return_times=True)
    torch.testing.assert_close(weighted, plain / t, rtol=1e-5, atol=0)
    pid = PIDLoss(teacher)
    loss = pid(student, noise, indices=idx)
    torch.testing.assert_close(loss, plain.mean())
    torch.testing.assert_close(pid.last_per_sample, plain.detach())


def test_callable_teacher():
    student = TinyNet(seed=2)
    gauss = GaussianDenoiser(0.0, SD)
    noise = torch.randn(3, 3, 4, 4) * T
    idx = torch.tensor([5, 60, 249])
    a = PIDLoss(lambda x, sigma, labels: gauss(x, sigma))(student, noise, indices=idx)
    b = PIDLoss(gauss)(student, noise, indices=idx)
    torch.testing.assert_close(a, b)


def test_bf16_autocast_close_to_fp32():
    teacher, student, _ = make(seed=6)
    noise = torch.randn(4, 3, 4, 4) * T
    idx = torch.tensor([10, 60, 150, 240])
    pid = PIDLoss(teacher)
    fp32 = pid(student, noise, indices=idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = pid(student, noise, indices=idx)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.3)


def test_argument_errors_name_the_argument():
    teacher, student, _ = make()
    noise = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="norm"):
        PIDLoss(teacher, norm="l3")
    with pytest.raises(ValueError, match="huber_c"):
        PIDLoss(teacher, norm="huber")
    with pytest.raises(ValueError, match="lpips"):
        PIDLoss(teacher, norm="lpips")
    with pytest.raises(ValueError, match="N"):
        PIDLoss(teacher, N=1)
    with pytest.raises(ValueError, match="sigma_min"):
        PIDLoss(teacher, sigma_min=90.0)
    with pytest.raises(TypeError, match="batched"):
        PIDLoss(teacher, batched="yes")
    pid = PIDLoss(teacher)
    with pytest.raises(TypeError, match="noise"):
        pid(student, noise.numpy())
    with pytest.raises(TypeError, match="noise"):
        pid(student, noise.long())
    with pytest.raises(TypeError, match="student"):
        pid("net", noise)
    with pytest.raises(ValueError, match="labels"):
        pid(student, noise, torch.zeros(3, 2))
    with pytest.raises(TypeError, match="indices"):
        pid(student, noise, indices=torch.zeros(2))
    with pytest.raises(ValueError, match="indices"):
        pid(student, noise, indices=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="student output"):
        pid(lambda x, c, lab=None: x[:, :1], noise)


def test_example_loop_runs(capsys):
    torch.manual_seed(0)
    runpy.run_path(os.path.join(HERE, "..", "..", "examples", "distill_loop.py"), run_name="__main__")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step")]
    assert len(lines) == 20
    losses = [float(ln.split()[3]) for ln in lines]
    assert all(math.isfinite(v) and v > 0 for v in losses)


# ------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def alex_weights(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return str(path)


def test_lpips_norm_matches_lpips_package(alex_weights):
    import lpips

    norm = LPIPSNorm(alex_weights, net="alex", resize=64)
    with warnings.catch_warnings():  # torchvision's notice about pretrained=False
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    sd = torch.load(alex_weights, weights_only=True)
    ref.net.load_state_dict({k: sd[f"features.{k.split('.')[1]}.{k.split('.')[2]}"]
                             for k in ref.net.state_dict()})
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    up = lambda x: torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    expected = ref(up(a), up(b)).reshape(2)
    torch.testing.assert_close(norm(a, b), expected, rtol=1e-4, atol=1e-6)
    assert torch.all(norm(a, a) == 0)
    norm.train()
    assert not norm.model.training  # a fixed metric: dropout stays off


def test_pid_loss_with_lpips_matches_spec(alex_weights):
    lp = LPIPSNorm(alex_weights, net="alex", resize=64)
    teacher, student, _ = make(seed=8)
    _, student64, net64 = make(seed=8, dtype=torch.float64)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * T
    idx = torch.tensor([0, 90, 249])
    pid = PIDLoss(teacher, norm="lpips", lpips=lp)
    pid(student, noise, indices=idx).backward()
    lp64 = LPIPSNorm(alex_weights, net="alex", resize=64).double()
    ref = manual_loss(student64, net64, noise.double(), idx, norm="lpips", lpips=lp64)
    ref.mean().backward()
    torch.testing.assert_close(pid.last_per_sample.double(), ref.detach(), rtol=1e-3, atol=1e-6)
    for g, gr in zip(grads(student), grads(student64)):
        torch.testing.assert_close(g.double(), gr, rtol=1e-2, atol=1e-5)
    assert all(p.grad is None for p in lp.parameters())


def test_lpips_weights_errors(tmp_path, alex_weights):
    with pytest.raises(ValueError, match="weights"):
        LPIPSNorm(None, net="alex")
    with pytest.raises(FileNotFoundError, match="not found"):
        LPIPSNorm(str(tmp_path / "missing.pth"), net="alex")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="readable"):
        LPIPSNorm(str(bad), net="alex")
    with pytest.raises(ValueError, match="backbone"):
        LPIPSNorm(alex_weights, net="squeeze")  # alexnet weights for a squeezenet backbone
    with pytest.raises(ValueError, match="net"):
        LPIPSNorm(alex_weights, net="resnet")
    full = tmp_path / "lpips-full.pth"
    torch.save(LPIPSNorm(alex_weights, net="alex", resize=32).model.state_dict(), full)
    LPIPSNorm(str(full), net="alex", resize=32)  # a full lpips.LPIPS state_dict also loads


class CastingTinyNet(TinyNet):
    """TinyNet with fp32 weights cast to the input's dtype in each layer (as in EDM's networks)."""

    def forward(self, x, c_noise, labels=None):
        w = {n: p.to(x.dtype) for n, p in self.named_parameters()}
        h = nn.functional.conv2d(x, w["conv.weight"], w["conv.bias"], padding=1)
        e = nn.functional.linear(c_noise.reshape(-1, 1).to(x.dtype), w["emb.weight"], w["emb.bias"])
        return torch.tanh(h + e[:, :, None, None])


class Fp16Teacher(RecordingTeacher):
    """A teacher whose own dtype is bf16 (like EDM's use_fp16 on CUDA), fp32 when forced."""

    def __init__(self, model):
        EDMPrecond.__init__(self, model)
        self.seen = []

    def model_dtype(self, device, force_fp32=False):
        return torch.float32 if force_fp32 else torch.bfloat16


@pytest.mark.parametrize("precision", [None, "fp32", "bf16"])
def test_teacher_precision(precision):
    """None: the teacher's own dtype, autocast off; "fp32": forced fp32; "bf16": under bf16
    autocast, the loss and gradients within bf16 rounding of the fp32 teacher's."""
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(6)) * T
    idx = torch.tensor([0, 7, 120, 249])
    losses, grads = {}, {}
    for p in ("fp32", precision):
        teacher = Fp16Teacher(CastingTinyNet(seed=9))
        student = TinyNet(seed=1)
        pid = PIDLoss(teacher, teacher_precision=p)
        loss = pid(student, noise, indices=idx)
        loss.backward()
        losses[p], grads[p] = loss.detach(), [q.grad.clone() for q in student.parameters()]
        (seen,) = teacher.seen
        assert seen["x_in"].dtype == (torch.bfloat16 if p is None else torch.float32)
        assert seen["autocast"] == (p == "bf16") and not seen["grad"]
    tol = dict(rtol=0, atol=0) if precision == "fp32" else dict(rtol=3e-2, atol=1e-3)
    torch.testing.assert_close(losses[precision], losses["fp32"], **tol)
    for g, g32 in zip(grads[precision], grads["fp32"]):
        torch.testing.assert_close(g, g32, rtol=tol["rtol"], atol=tol["atol"] * 10 + 3e-2 * float(g32.abs().max()))
    if precision is not None:
        assert f"teacher_precision={precision!r}" in repr(pid)


def test_teacher_precision_bad_value():
    teacher, student, _ = make()
    with pytest.raises(ValueError, match="teacher_precision"):
        PIDLoss(teacher, teacher_precision="fp16")
    with pytest.raises(ValueError, match="teacher_precision"):
        pid_distillation_loss(student, teacher, torch.randn(2, 3, 4, 4) * T, teacher_precision="half")


@pytest.mark.parametrize("teacher_precision", [None, "bf16"])
def test_whole_loss_compiles_fullgraph(teacher_precision):
    """torch.compile(fullgraph=True) of PIDLoss's forward (student pass, fused assemble, teacher,
    fused loss) gives the eager loss, and its backward the eager gradients."""
    from pid_fast.models.networks import build_network

    torch.manual_seed(0)
    teacher = EDMPrecond(build_network("tiny-ddpmpp"))
    student = build_network("tiny-ddpmpp")
    pid = PIDLoss(teacher, teacher_precision=teacher_precision)
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * T
    idx = torch.tensor([0, 5, 100, 249])

    def run(fn):
        student.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()  # through the compiled graph's backward
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    def forward():
        return pid(student, noise, indices=idx)

    eager_loss, eager_grads = run(forward)
    loss, grads = run(torch.compile(forward, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-7)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-6)

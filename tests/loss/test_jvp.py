"""derivative="jvp": the student's time derivative by forward-mode AD (pid_fast/loss/derivative.py).

One student evaluation at t and its JVP in c_noise give F(t2) = F(t) + dF/dc_noise dc_noise to
first order; the fused ops then run unchanged. Checked here: it converges to the "fd" loss as the
grid is refined (same draws), its gradients (through F(t) and through the tangent) match finite
differences in float64, and every network type runs a step in fp32 (and one under bf16 autocast).
"""

import copy
import math

import pytest
import torch
from torch import nn
import torch.autograd.forward_ad as fwAD

from pid_fast import pid_residual
from pid_fast.loss import DERIVATIVES, PIDLoss, grid_times, pid_distillation_loss, student_outputs
from pid_fast.loss.forward_ad_ops import ForwardADAttention, math_attention
from pid_fast.models.networks import build_network
from pid_fast.models.preconditioning import EDMPrecond, edm_coefficients
from pid_fast.sampling import pid_neighbour_index

pytestmark = pytest.mark.usefixtures("one_thread")

T, SD = 80.0, 0.5
C_IN = 1 / math.sqrt(SD ** 2 + T ** 2)
# Nested grids: index 4^k i of N_k = 249 4^k + 1 is the time of index i of N = 250 (same draws).
GRIDS = (250, 997, 3985)
INDICES = torch.tensor([0, 3, 60, 124, 200, 247, 249])  # both ends (t = T; t2 > t at N - 1)


class SmoothNet(nn.Module):
    """A small raw network F(x_in, c_noise, labels), smooth in c_noise, outputs of order one."""

    def __init__(self, channels=2, seed=0, hidden=3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(1, hidden)
        self.mod = nn.Linear(hidden, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        self.batches = []

    def forward(self, x, c_noise, labels=None):
        self.batches.append(x.shape[0])
        e = torch.sin(3 * self.emb(c_noise.reshape(-1, 1).to(x.dtype)))
        return torch.tanh(self.conv(x) * (1 + self.mod(e))[:, :, None, None])


class EDM64(EDMPrecond):
    """An EDM teacher evaluated in float64."""

    def model_dtype(self, device, force_fp32=False):
        return torch.float64

    def raw(self, x_in, c_noise, class_labels=None, force_fp32=False):
        return self.model(x_in.double(), c_noise.double(), class_labels)


def _pair64(seed=0):
    teacher = EDM64(SmoothNet(seed=seed + 50).double()).requires_grad_(False)
    return teacher, SmoothNet(seed=seed).double()


def _noise(batch, shape=(2, 4, 4), seed=1, dtype=torch.float64):
    return T * torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# --------------------------------------------------------------------------------------------
# Arguments.

def test_bad_derivative_names_raise():
    teacher, student = _pair64()
    noise = _noise(2)
    for bad in ("ad", "FD", None, 1):
        with pytest.raises(ValueError, match="derivative"):
            pid_distillation_loss(student, teacher, noise, derivative=bad, backend="reference")
        with pytest.raises(ValueError, match="derivative"):
            PIDLoss(teacher, derivative=bad)
    assert DERIVATIVES == ("fd", "jvp")
    pid = PIDLoss(teacher, derivative="jvp")
    assert pid.derivative == "jvp" and "derivative='jvp'" in repr(pid)


def test_jvp_is_one_student_evaluation_of_batch_B():
    teacher, student = _pair64()
    noise = _noise(5)
    PIDLoss(teacher, derivative="jvp", backend="reference")(student, noise)
    assert student.batches == [5]
    student.batches.clear()
    PIDLoss(teacher, backend="reference")(student, noise)  # fd: one forward of 2B
    assert student.batches == [10]


def test_wrong_student_output_shape_is_reported():
    teacher, _ = _pair64()
    with pytest.raises(ValueError, match="student output"):
        pid_distillation_loss(lambda x, c, lab: x[:, :1], teacher, _noise(2), derivative="jvp",
                              backend="reference")


# --------------------------------------------------------------------------------------------
# Convergence to the finite difference (float64, same draws on nested grids).

def _times(num_points, indices, dtype=torch.float64):
    i2 = pid_neighbour_index(indices, num_points)
    return (grid_times(indices, num_points, 0.002, T, 7.0, dtype),
            grid_times(i2, num_points, 0.002, T, 7.0, dtype))


def test_jvp_pair_is_the_first_order_expansion():
    """F(t) is the fd one exactly; F(t2) differs from the evaluated one by O(dc^2): a grid 4x
    finer cuts the gap ~16x."""
    _, student = _pair64()
    noise = _noise(len(INDICES))
    labels = lambda t: torch.log(t) / 4
    gaps = []
    for k, num_points in enumerate(GRIDS):
        t, t2 = _times(num_points, INDICES * 4 ** k)
        fd_t, fd_t2 = student_outputs(student, noise, None, t, t2, labels, C_IN, derivative="fd")
        jvp_t, jvp_t2 = student_outputs(student, noise, None, t, t2, labels, C_IN, derivative="jvp")
        torch.testing.assert_close(jvp_t, fd_t, rtol=1e-14, atol=1e-14)
        gaps.append(_rel(jvp_t2 - jvp_t, fd_t2 - fd_t))  # relative to the step F(t2) - F(t)
    assert gaps[0] < 0.2
    for coarse, fine in zip(gaps, gaps[1:]):
        assert 2.5 < coarse / fine < 6  # first order in the step: ~4x per 4x refinement


@pytest.mark.parametrize("norm,huber_c", [("l2", None), ("huber", 0.03)])
def test_jvp_loss_converges_to_fd_loss(norm, huber_c):
    """Same noises and times on nested grids: the jvp loss approaches the fd loss as N grows
    (the difference shrinks ~4x per 4x refinement: the O(dt) gap)."""
    teacher, student = _pair64()
    noise = _noise(len(INDICES))
    diffs = []
    for k, num_points in enumerate(GRIDS):
        kw = dict(num_points=num_points, indices=INDICES * 4 ** k, backend="reference", norm=norm,
                  huber_c=huber_c)
        fd = pid_distillation_loss(student, teacher, noise, **kw)
        jvp = pid_distillation_loss(student, teacher, noise, derivative="jvp", **kw)
        diffs.append(float(((jvp - fd).abs() / fd.abs()).max().detach()))
    assert diffs[-1] < 5e-3
    for coarse, fine in zip(diffs, diffs[1:]):
        assert 3 < coarse / fine < 5.5  # measured 3.9-4.0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_jvp_fused_backends_match_float64(backend):
    """The formed F(t2) feeds the fused CPU op (and the reference) unchanged: fp32 loss and
    gradients agree with the same jvp loss in float64."""
    teacher = EDMPrecond(SmoothNet(seed=9)).requires_grad_(False)
    teacher64 = EDM64(SmoothNet(seed=9).double()).requires_grad_(False)
    student, student64 = SmoothNet(seed=4), SmoothNet(seed=4).double()
    noise = _noise(len(INDICES), dtype=torch.float32)
    loss = PIDLoss(teacher, derivative="jvp", backend=backend)(student, noise, indices=INDICES)
    loss64 = PIDLoss(teacher64, derivative="jvp", backend="reference")(student64, noise.double(),
                                                                        indices=INDICES)
    (loss + loss64).backward()
    grad, grad64 = (torch.cat([p.grad.reshape(-1).double() for p in net.parameters()])
                    for net in (student, student64))
    # measured: fused 2e-7 / 2e-7, reference 2e-5 / 4e-5 (it rounds y, y2 to fp32 first).
    assert abs(float(loss) / float(loss64) - 1) < 1e-4
    assert _rel(grad, grad64) < 3e-4


# --------------------------------------------------------------------------------------------
# Gradients through F(t) and the tangent.

def _functional(student, weights):
    names = [n for n, _ in student.named_parameters()]
    return lambda x, c, lab: torch.func.functional_call(student, dict(zip(names, weights)), (x, c, lab))


def test_jvp_pair_gradients_gradcheck():
    """gradcheck (float64) of theta -> (F(t), F(t2) formed from the tangent): the backward goes
    through the primal and through the forward-mode tangent (reverse over forward)."""
    _, student = _pair64(seed=2)
    noise = _noise(3, shape=(2, 3, 3), seed=5)
    t, t2 = _times(250, torch.tensor([0, 100, 249]))
    params = tuple(p.detach().clone().requires_grad_(True) for p in student.parameters())

    def pair(*weights):
        return student_outputs(_functional(student, weights), noise, None, t, t2,
                               lambda s: torch.log(s) / 4, C_IN, derivative="jvp")

    assert torch.autograd.gradcheck(pair, params, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_jvp_loss_gradients_match_float64_finite_differences():
    """The loss's gradient w.r.t. the weights. The spec's target carries no gradient (nor its
    input y), so the reference is L(theta) = mean |pred(theta) - target(theta0)|^2 with the
    target frozen at theta0: gradcheck'd against finite differences, then compared with the
    gradient of pid_distillation_loss(derivative="jvp")."""
    teacher, student = _pair64(seed=2)
    noise = _noise(3, shape=(2, 3, 3), seed=5)
    indices = torch.tensor([0, 100, 249])
    t, t2 = _times(250, indices)
    coef = edm_coefficients(t)
    params = tuple(p.detach().clone().requires_grad_(True) for p in student.parameters())
    view = (-1, 1, 1, 1)

    def pred_target(weights):
        f_t, f_t2 = student_outputs(_functional(student, weights), noise, None, t, t2,
                                    lambda s: torch.log(s) / 4, C_IN, derivative="jvp")
        y = (t / T).reshape(view) * noise + (1 - t / T).reshape(view) * f_t.detach()
        teacher_out = teacher.raw(coef.c_in.reshape(view) * y, coef.c_noise)
        return pid_residual(noise, f_t, f_t2, teacher_out, t, t2, coef.c_skip, coef.c_out,
                            backend="reference")

    target0 = pred_target(params)[1].detach()

    def frozen_target_loss(*weights):
        return (pred_target(weights)[0] - target0).square().mean((1, 2, 3)).mean()

    # eps = 1e-5: the loss cancels terms of order T^2, so smaller steps are rounding-bound.
    assert torch.autograd.gradcheck(frozen_target_loss, params, eps=1e-5, atol=1e-8, rtol=1e-6)
    expected = torch.autograd.grad(frozen_target_loss(*params), params)
    loss = pid_distillation_loss(_functional(student, params), teacher, noise, indices=indices,
                                 derivative="jvp", backend="reference").mean()
    assert float(loss) == pytest.approx(float(frozen_target_loss(*params)), rel=1e-12)
    for g, g_ref in zip(torch.autograd.grad(loss, params), expected):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)


def test_jvp_gradient_approaches_fd_gradient():
    teacher, student = _pair64(seed=3)
    noise = _noise(len(INDICES), seed=7)

    def grad(derivative, k):
        student.zero_grad()
        pid_distillation_loss(student, teacher, noise, num_points=GRIDS[k], indices=INDICES * 4 ** k,
                              derivative=derivative, backend="reference").mean().backward()
        return torch.cat([p.grad.reshape(-1) for p in student.parameters()])

    errs = [_rel(grad("jvp", k), grad("fd", k)) for k in (0, 2)]
    assert errs[1] < errs[0] / 6 and errs[1] < 1e-2


# --------------------------------------------------------------------------------------------
# Every network type: one training step.

def _randomised(net, seed):
    """EDM zero-initialises the output layers (F would be ~0, its tangent exactly 0); redraw
    every nearly-zero weight so each layer contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2 and p.abs().max() < 1e-3:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return net


def _digits_config():
    from pid_fast.demo.teacher import DIGITS_NETWORK
    return DIGITS_NETWORK


NETWORKS = {
    "tiny-ddpmpp": (lambda: "tiny-ddpmpp", (3, 8, 8), 0),
    "tiny-ncsnpp": (lambda: "tiny-ncsnpp", (3, 8, 8), 0),
    "tiny-adm": (lambda: "tiny-adm", (3, 8, 8), 10),
    "digits": (_digits_config, (1, 16, 16), 0),
}


def _network_step(name, autocast=None, derivative="jvp", seed=0):
    config, shape, label_dim = NETWORKS[name]
    torch.manual_seed(seed)
    net = _randomised(build_network(config()), seed)
    teacher = EDMPrecond(copy.deepcopy(net), label_dim=label_dim).requires_grad_(False)
    student = net.train()
    noise = _noise(3, shape=shape, seed=seed, dtype=torch.float32)
    labels = None if not label_dim else nn.functional.one_hot(torch.tensor([1, 4, 7]), label_dim).float()
    pid = PIDLoss(teacher, derivative=derivative)
    dtype = {"fp16": torch.float16}.get(autocast, torch.bfloat16)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast is not None):
        loss = pid(student, noise, labels, indices=torch.tensor([0, 120, 249]))
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])
    return loss.detach(), grad


@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_network_tangent_is_the_derivative(name):
    """float64: the forward-mode tangent of every network (attention and softmax on the jvp
    pass's math paths) matches a central difference in c_noise."""
    config, shape, label_dim = NETWORKS[name]
    torch.manual_seed(0)
    net = _randomised(build_network(config()), 0).double()
    x = torch.randn(2, *shape, dtype=torch.float64)
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    labels = None if not label_dim else torch.eye(label_dim, dtype=torch.float64)[:2]
    with ForwardADAttention(), fwAD.dual_level():
        _, tangent = fwAD.unpack_dual(net(x, fwAD.make_dual(c, torch.ones_like(c)), labels))
    # The U-Nets' attention runs in fp32 even in a float64 network, so a central difference
    # is rounding-bound for small h (~1e-7 / h) and truncation-bound for large h (~h^2 F''';
    # large for NCSN++, whose random Fourier features turn fast in c_noise): take the better
    # of two steps (measured 1e-4 - 1e-3).
    errors = [_rel(tangent, (net(x, c + h, labels) - net(x, c - h, labels)) / (2 * h)) for h in (1e-3, 1e-4)]
    assert min(errors) < 3e-3


@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_network_runs_a_jvp_step(name):
    loss, grad = _network_step(name)
    fd_loss, fd_grad = _network_step(name, derivative="fd")
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().max() > 0
    if name != "tiny-ncsnpp":
        # At N = 250 the two differ by the O(dt) gap, a few percent. Not for NCSN++ with random
        # weights: its Fourier embedding (scale 16) turns by ~1 radian per grid step of c_noise,
        # so F(t2) - F(t) is no longer close to the tangent times the step; N = 250 does not
        # resolve it and "fd" (the chord) and "jvp" (the tangent) differ by O(1).
        assert abs(float(loss / fd_loss) - 1) < 0.1
        assert float(grad @ fd_grad / (grad.norm() * fd_grad.norm())) > 0.95


def test_jvp_step_under_bf16_autocast():
    """SongUNet with attention under bf16 autocast (where SDPA picks a fused CPU kernel without
    a forward-mode formula; the jvp pass runs a math path); F(t2) is formed in fp32."""
    loss, grad = _network_step("tiny-ddpmpp", autocast="bf16")
    ref_loss, ref_grad = _network_step("tiny-ddpmpp")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(float(loss / ref_loss) - 1) < 0.1
    assert float(grad @ ref_grad / (grad.norm() * ref_grad.norm())) > 0.98


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_16bit_norm_tangents_are_finite_and_match_float32(norm, dtype):
    """float16 group/layer norm forward-mode formulas overflow (rstd**3 in float16) for activations
    of std 0.01 and return NaN tangents; the jvp pass computes 16-bit norms in float32."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4) * 0.01
    tangent = torch.randn_like(x)
    F = nn.functional
    call = (lambda v: F.group_norm(v, 2)) if norm == "group" else (lambda v: F.layer_norm(v, (4, 4)))
    with ForwardADAttention(), fwAD.dual_level():
        out = call(fwAD.make_dual(x.to(dtype), tangent.to(dtype)))
        primal, tan = fwAD.unpack_dual(out)
    with fwAD.dual_level():
        ref_primal, ref_tan = fwAD.unpack_dual(call(fwAD.make_dual(x.to(dtype).float(), tangent.to(dtype).float())))
    assert primal.dtype == tan.dtype == dtype and torch.isfinite(tan).all()
    torch.testing.assert_close(tan.float(), ref_tan, rtol=2e-2, atol=2e-2 * ref_tan.abs().max().item())
    torch.testing.assert_close(primal.float(), ref_primal, rtol=2e-2, atol=2e-2)


def test_jvp_step_under_fp16_autocast_is_finite():
    """A SongUNet jvp step under float16 autocast: finite loss and gradient close to fp32's (its
    GroupNorms' float16 forward-mode formulas alone would make the tangent NaN)."""
    loss, grad = _network_step("tiny-ddpmpp", autocast="fp16")
    ref_loss, ref_grad = _network_step("tiny-ddpmpp")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(float(loss / ref_loss) - 1) < 0.1
    assert float(grad @ ref_grad / (grad.norm() * ref_grad.norm())) > 0.98


def test_jvp_forms_f_t2_in_float32_under_autocast():
    """Under bf16 autocast the network returns bf16; F(t2) - F(t) (~1e-2 of F at N = 250) would
    round away in bf16, so both come back in float32 and their difference is the tangent step."""
    _, student = _pair64()
    student = student.float()
    noise = _noise(len(INDICES), dtype=torch.float32)
    t, t2 = _times(250, INDICES, torch.float32)
    labels = lambda s: torch.log(s) / 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert student(noise * C_IN, labels(t), None).dtype == torch.bfloat16
        f_t, f_t2 = student_outputs(student, noise, None, t, t2, labels, C_IN, derivative="jvp")
    assert f_t.dtype == f_t2.dtype == torch.float32
    step = f_t2.double() - f_t.double()
    f64_t, f64_t2 = student_outputs(student.double(), noise.double(), None, t.double(), t2.double(), labels,
                                    C_IN, derivative="jvp")
    assert _rel(step, f64_t2 - f64_t) < 0.05  # bf16 rounds the tangent (~0.4%), not the step away

# --------------------------------------------------------------------------------------------
# The math paths of the jvp pass.

@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
def test_math_attention_matches_sdpa(mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    kwargs = {"scale": 0.3}
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(5, 5, generator=g) > 0.3
        kwargs["attn_mask"][:, 0] = True  # no fully masked row
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(5, 5, generator=g)
    elif mask == "causal":
        kwargs["is_causal"] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(math_attention(q, k, v, **kwargs), expected, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: a bf16 result, like SDPA's
        assert math_attention(q, k, v).dtype == torch.bfloat16


def test_softmax_backward_through_the_tangent():
    """Inside ForwardADAttention, softmax's tangent can be differentiated (pytorch#162350)."""
    w = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 1, 1, dtype=torch.float64)

    def tangent_of(weight):
        with ForwardADAttention(), fwAD.dual_level():
            out = torch.softmax(weight * fwAD.make_dual(c, torch.ones_like(c)), -1)
            return fwAD.unpack_dual(out).tangent

    assert torch.autograd.gradcheck(lambda weight: tangent_of(weight), (w,))


# --------------------------------------------------------------------------------------------
# torch.compile and DDP.

def _tiny_step_setup():
    torch.manual_seed(0)
    teacher = EDMPrecond(_randomised(build_network("tiny-ddpmpp"), 1)).requires_grad_(False)
    student = _randomised(build_network("tiny-ddpmpp"), 2)
    noise = _noise(3, shape=(3, 8, 8), dtype=torch.float32)
    return PIDLoss(teacher, derivative="jvp"), student, noise, torch.tensor([0, 120, 249])


def _loss_and_grad(student, fn):
    student.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters()]


def test_jvp_under_torch_compile():
    """The jvp pass runs eagerly under torch.compile (a graph break); the rest compiles, and the
    loss and gradients are the eager ones."""
    pid, student, noise, idx = _tiny_step_setup()
    forward = lambda: pid(student, noise, indices=idx)
    eager_loss, eager_grads = _loss_and_grad(student, forward)
    loss, grads = _loss_and_grad(student, torch.compile(forward, backend="aot_eager"))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-7)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-6)


def test_jvp_under_ddp(tmp_path):
    """DDP (default settings: it copies buffers in place at each forward) wraps the student."""
    import os

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pid, student, noise, idx = _tiny_step_setup()
    eager_loss, eager_grads = _loss_and_grad(student, lambda: pid(student, noise, indices=idx))
    dist.init_process_group("gloo", init_method=f"file://{os.fspath(tmp_path / 'store')}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(student)
        loss, grads = _loss_and_grad(student, lambda: pid(model, noise, indices=idx))
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    for g, ge in zip(grads, eager_grads):
        torch.testing.assert_close(g, ge, rtol=1e-6, atol=1e-8)

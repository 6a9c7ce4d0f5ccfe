"""Preconditioning wrappers, the denoiser adapters, the analytic Gaussian denoiser and the
PID student coefficients."""

import math

import pytest
import torch

from pid_fast.models.networks import build_denoiser, build_network, network_config
from pid_fast.models.preconditioning import (Coefficients, Denoiser, EDMPrecond, FunctionDenoiser, GaussianDenoiser,
                                      Preconditioning, VEPrecond, VPPrecond, as_denoiser, sigma_vector,
                                      student_coefficients)


class RecordingNet(torch.nn.Module):
    """F(x_in, c_noise, labels) = 0.5 x_in + c_noise, recording its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_in, c_noise, class_labels):
        self.calls.append((x_in.clone(), c_noise.clone(), None if class_labels is None else class_labels.clone()))
        return 0.5 * x_in + c_noise.reshape(-1, 1, 1, 1)


SIGMAS = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)


def test_edm_coefficients_match_table_1():
    sd = 0.5
    c = EDMPrecond(RecordingNet(), sigma_data=sd).coefficients(SIGMAS)
    assert isinstance(c, Coefficients) and all(v.shape == (4,) for v in c)
    torch.testing.assert_close(c.c_skip, sd ** 2 / (SIGMAS ** 2 + sd ** 2))
    torch.testing.assert_close(c.c_out, SIGMAS * sd / (SIGMAS ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c.c_in, 1 / (SIGMAS ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c.c_noise, SIGMAS.log() / 4)
    # Identity of EDM's choice: c_out^2 = sd^2 sigma^2 / (sigma^2 + sd^2) = c_skip sigma^2.
    torch.testing.assert_close(c.c_out ** 2, c.c_skip * SIGMAS ** 2)


def test_vp_and_ve_coefficients():
    vp = VPPrecond(RecordingNet())
    c = vp.coefficients(SIGMAS)
    torch.testing.assert_close(c.c_skip, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c.c_out, -SIGMAS)
    torch.testing.assert_close(c.c_in, 1 / (SIGMAS ** 2 + 1).sqrt())
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t)
    torch.testing.assert_close(c.c_noise, 999 * vp.sigma_inv(SIGMAS))
    # sigma(1) = sqrt(exp(beta_d / 2 + beta_min) - 1)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-5)
    assert vp.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)), rel=1e-3)

    ve = VEPrecond(RecordingNet())
    c = ve.coefficients(SIGMAS)
    torch.testing.assert_close(c.c_out, SIGMAS)
    torch.testing.assert_close(c.c_in, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c.c_noise, (SIGMAS / 2).log())
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)


@pytest.mark.parametrize("precond_cls", [EDMPrecond, VPPrecond, VEPrecond])
def test_denoiser_is_c_skip_x_plus_c_out_F(precond_cls):
    net = RecordingNet()
    pre = precond_cls(net)
    x = torch.randn(4, 3, 2, 2)
    sigma = SIGMAS.float()
    D = pre(x, sigma)
    c = pre.coefficients(sigma)
    x_in, c_noise, labels = net.calls[-1]
    view = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    torch.testing.assert_close(x_in, view(c.c_in) * x)
    torch.testing.assert_close(c_noise, c.c_noise)
    assert labels is None
    torch.testing.assert_close(D, view(c.c_skip) * x + view(c.c_out) * (0.5 * x_in + view(c.c_noise)))
    torch.testing.assert_close(pre.raw(x_in, c_noise), 0.5 * x_in + view(c.c_noise))


def test_sigma_forms_and_labels():
    net = RecordingNet()
    pre = EDMPrecond(net, label_dim=3)
    x = torch.randn(2, 3, 2, 2)
    a = pre(x, 0.7)
    b = pre(x, torch.tensor([0.7, 0.7]))
    c = pre(x, torch.full((2, 1, 1, 1), 0.7, dtype=torch.float64))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert torch.equal(net.calls[0][2], torch.zeros(2, 3))           # None -> "no class" zeros
    pre(x, 0.7, torch.tensor([2, 0]))
    assert torch.equal(net.calls[-1][2], torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    with pytest.raises(ValueError, match="sigma"):
        pre(x, torch.ones(3))
    with pytest.raises(TypeError, match="sigma"):
        pre(x, "0.7")
    with pytest.raises(ValueError, match="class_labels"):
        pre(x, 0.7, torch.tensor([1, 2, 0]))
    with pytest.raises(TypeError, match="x must be a tensor"):
        pre([1.0], 0.7)
    assert sigma_vector(2, 3).tolist() == [2.0, 2.0, 2.0]


def test_precond_with_real_network_and_fp32_output():
    cfg = network_config("tiny-adm")
    net = build_network(cfg).eval()
    pre = EDMPrecond(net, label_dim=10)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        D = pre(x, torch.tensor([0.5, 20.0]), torch.tensor([1, 2]))
    assert D.shape == x.shape and D.dtype == torch.float32
    # ADM's zero-initialised output layer makes F = 0 at init, so D = c_skip x.
    torch.testing.assert_close(D, (pre.coefficients(torch.tensor([0.5, 20.0])).c_skip.reshape(-1, 1, 1, 1)
                                   * x.float()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_use_fp16_runs_network_in_half_on_cuda():
    net = RecordingNet()
    pre = EDMPrecond(net, use_fp16=True).cuda()
    D = pre(torch.randn(2, 3, 4, 4, device="cuda"), 1.0)
    assert net.calls[-1][0].dtype == torch.float16 and D.dtype == torch.float32
    pre(torch.randn(2, 3, 4, 4, device="cuda"), 1.0, force_fp32=True)
    assert net.calls[-1][0].dtype == torch.float32


def test_function_denoiser_adapter():
    seen = {}

    def my_teacher(x, sigma, labels):
        seen["sigma"], seen["labels"] = sigma, labels
        return x / (1 + sigma.reshape(-1, 1)) ** 2

    den = as_denoiser(my_teacher, label_dim=4)
    assert isinstance(den, FunctionDenoiser) and isinstance(den, Preconditioning)
    x = torch.randn(3, 5, dtype=torch.float64)
    out = den(x, 1.0, "anything")
    torch.testing.assert_close(out, x / 4)
    assert out.dtype == torch.float64 and seen["sigma"].shape == (3,) and seen["labels"] == "anything"
    c = den.coefficients(torch.tensor([1.0, 2.0]))
    assert c.c_skip.tolist() == [0, 0] and c.c_out.tolist() == [1, 1] and c.c_noise.tolist() == [1, 2]
    # D == c_skip x + c_out raw(c_in x, c_noise) holds for the adapter too.
    torch.testing.assert_close(den.raw(x, torch.ones(3, dtype=torch.float64)), out)

    with pytest.raises(ValueError, match="output must have shape"):
        as_denoiser(lambda x, s, l: x[:, :2])(x, 1.0)
    with pytest.raises(TypeError, match="callable"):
        as_denoiser(3.0)


def test_as_denoiser_wraps_raw_networks_and_passes_preconditionings():
    net = RecordingNet()
    pre = as_denoiser(net, precond="ve", sigma_max=50.0)
    assert isinstance(pre, VEPrecond) and pre.model is net and pre.sigma_max == 50.0
    assert as_denoiser(pre) is pre
    with pytest.raises(ValueError, match="precond must be one of"):
        as_denoiser(net, precond="ddim")
    with pytest.raises(ValueError, match="already preconditioned"):
        as_denoiser(pre, precond="edm")
    assert isinstance(pre, Denoiser) and isinstance(lambda x, s, l=None: x, Denoiser)


def test_build_denoiser_from_config():
    cfg = {"precond": "edm", "sigma_data": 0.4, "use_fp16": False, "network": network_config("tiny-ddpmpp")}
    den = build_denoiser(cfg)
    assert isinstance(den, EDMPrecond) and den.sigma_data == 0.4 and den.label_dim == 0
    with pytest.raises(ValueError, match="precond"):
        build_denoiser(dict(cfg, precond="rf"))
    with pytest.raises(ValueError, match="invalid options"):
        build_denoiser(dict(cfg, beta_d=3.0))


def test_gaussian_denoiser_is_the_posterior_mean():
    torch.manual_seed(0)
    mean, std, sigma = 0.3, 0.5, 0.8
    g = GaussianDenoiser(mean, std)
    # Monte Carlo E[x0 | x] along a bin of x values: regress x0 on x (exact for Gaussians).
    x0 = g.sample((200_000,), dtype=torch.float64)
    x = x0 + sigma * torch.randn_like(x0)
    slope = torch.cov(torch.stack([x, x0]))[0, 1] / x.var()
    intercept = x0.mean() - slope * x.mean()
    grid = torch.linspace(-1, 1, 5, dtype=torch.float64)
    D = g(grid[:, None], sigma)[:, 0]
    torch.testing.assert_close(D, intercept + slope * grid, atol=1e-2, rtol=0)
    # Tweedie: D = x + sigma^2 grad log p_sigma(x), p_sigma = N(mean, std^2 + sigma^2).
    torch.testing.assert_close(D, grid - sigma ** 2 * (grid - mean) / (std ** 2 + sigma ** 2))


def test_gaussian_ode_solution_solves_the_pf_ode():
    g = GaussianDenoiser(torch.tensor([0.2, -0.4]), 0.5)
    x_T = torch.tensor([[80.0, -40.0], [3.0, 7.0]], dtype=torch.float64)
    s = torch.tensor([2.0, 0.7], dtype=torch.float64)
    x = g.ode_solution(x_T, 80.0, s)
    h = 1e-5
    dxds = (g.ode_solution(x_T, 80.0, s + h) - g.ode_solution(x_T, 80.0, s - h)) / (2 * h)
    torch.testing.assert_close(dxds, (x - g(x, s)) / s.reshape(-1, 1), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(g.ode_solution(x, s, 80.0), x_T)               # the flow is invertible
    torch.testing.assert_close(g.ode_solution(x_T, 80.0, 80.0), x_T)
    with pytest.raises(ValueError, match="std"):
        GaussianDenoiser(0.0, 0.0)


def test_student_coefficients():
    t = torch.tensor([80.0, 40.0, 0.002])
    a, b, c = student_coefficients(t, sigma_max=80.0, sigma_data=0.5)
    torch.testing.assert_close(a, t / 80)
    torch.testing.assert_close(b, 1 - t / 80)
    torch.testing.assert_close(c, torch.full((3,), 1 / math.sqrt(0.25 + 6400)))
    assert (a[0].item(), b[0].item()) == (1.0, 0.0)                    # boundary condition at T
    assert student_coefficients(40.0).a.tolist() == [0.5]
    with pytest.raises(ValueError, match="sigma_max"):
        student_coefficients(t, sigma_max=0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        student_coefficients(t, sigma_data=-1)
    with pytest.raises(TypeError, match="t"):
        student_coefficients("80")


def test_invalid_preconditioning_arguments():
    with pytest.raises(TypeError, match="model must be callable"):
        EDMPrecond(42)
    with pytest.raises(TypeError, match="model must be callable"):
        EDMPrecond(None)
    with pytest.raises(ValueError, match="label_dim"):
        EDMPrecond(RecordingNet(), label_dim=-1)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(RecordingNet(), sigma_data=0.0)

"""The analytic Gaussian-mixture teacher: its closed-form denoiser, the exact PF-ODE
solution, its samples, and the MLP student's shapes. PID's one-step student against it (the
error falls as N grows) is tested in tests/demo/test_analytic_sweep.py."""

import math

import pytest
import torch

from pid_fast.models.analytic import GaussianMixtureDenoiser, MLPStudent, default_mixture
from pid_fast.models.preconditioning import GaussianDenoiser
from pid_fast.sampling import heun_sample


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

f64 = torch.float64


def _z(n, dim=2, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=f64)


def test_single_component_is_the_gaussian_denoiser():
    mix = GaussianMixtureDenoiser([[0.3, -0.2]], 0.2)
    gauss = GaussianDenoiser(torch.tensor([0.3, -0.2], dtype=f64), 0.2)
    x = _z(16) * 3
    for sigma in (0.002, 0.4, 80.0):
        s = torch.tensor(sigma, dtype=f64)
        torch.testing.assert_close(mix(x, s), gauss(x, s), rtol=1e-12, atol=1e-12)
    # The numerical ODE solution reproduces the closed form of the single Gaussian.
    x_T = _z(16, seed=1) * 80
    torch.testing.assert_close(mix.ode_solution(x_T, 80.0, 0.002), gauss.ode_solution(x_T, 80.0, 0.002),
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("sigma", [0.005, 0.3, 2.0, 80.0])
def test_tweedie_identity(sigma):
    """D(x; sigma) = x + sigma^2 grad log p_sigma(x): the denoiser is the exact posterior mean."""
    mix = GaussianMixtureDenoiser(torch.tensor([[0.5, 0.1], [-0.4, 0.3], [0.0, -0.6]]), [0.1, 0.2, 0.05],
                                  [0.5, 0.3, 0.2])
    s = torch.tensor(sigma, dtype=f64)
    x = (_z(32, seed=2) * (0.3 + sigma)).requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_density(x, s).sum(), x)
    torch.testing.assert_close(mix(x.detach(), s), x.detach() + s ** 2 * grad, rtol=1e-9, atol=1e-9)


def test_log_density_is_normalised():
    # Riemann sum of p_sigma over a fine 2-D grid ~ 1.
    mix = default_mixture()
    g = torch.linspace(-3, 3, 301, dtype=f64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    mass = mix.log_density(pts, torch.tensor(0.3, dtype=f64)).exp().sum() * (g[1] - g[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-3)


def test_ode_solution_is_converged_and_matches_a_fine_heun_solve():
    mix = default_mixture()
    z = _z(32, seed=3)
    exact = mix.ode_solution(z * 80, 80.0, 0.002)
    tighter = mix.ode_solution(z * 80, 80.0, 0.002, tol=1e-11)
    assert float((exact - tighter).abs().max()) < 1e-7
    # EDM's Heun sampler ends with x(0) = D(x(sigma_min); sigma_min); its second-order error
    # shrinks ~4x per doubling of the steps towards the same point.
    final = mix(exact, torch.tensor(0.002, dtype=f64))
    err = [float((heun_sample(mix, z, num_steps=n) - final).abs().max()) for n in (64, 128, 256)]
    assert err[0] > err[1] > err[2] and err[2] < 2e-3


def test_flow_carries_noise_to_the_mixture():
    """The PF-ODE's endpoints are distributed as the data: each mode gets its weight, with the
    component's spread."""
    mix = default_mixture(std=0.1)
    z = _z(1000, seed=4)
    x = mix.ode_solution(z * 80, 80.0, 0.002, tol=1e-6)
    nearest = torch.cdist(x, mix.means).argmin(1)
    frac = torch.bincount(nearest, minlength=4).to(f64) / x.shape[0]
    assert torch.allclose(frac, torch.full((4,), 0.25, dtype=f64), atol=0.055)  # 4 standard errors
    spread = (x - mix.means[nearest]).std(0)
    assert torch.allclose(spread, torch.full((2,), 0.1, dtype=f64), atol=0.015)


def test_mlp_student_shapes():
    net = MLPStudent(4, hidden=16, depth=2)
    out = net(torch.randn(3, 4), torch.randn(3))
    assert out.shape == (3, 4)
    img = MLPStudent(16, hidden=16)(torch.randn(2, 1, 4, 4), torch.randn(2))
    assert img.shape == (2, 1, 4, 4)


def test_bad_input():
    with pytest.raises(ValueError, match="means"):
        GaussianMixtureDenoiser(torch.zeros(3))
    with pytest.raises(ValueError, match="stds"):
        GaussianMixtureDenoiser(torch.zeros(2, 2), [0.1, -0.1])
    with pytest.raises(ValueError, match="stds"):
        GaussianMixtureDenoiser(torch.zeros(2, 2), [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureDenoiser(torch.zeros(2, 2), 0.1, [1.0])
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureDenoiser(torch.zeros(2, 2), 0.1, [-1.0, 2.0])
    mix = default_mixture()
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        mix(torch.zeros(4, 3), 1.0)
    with pytest.raises(TypeError, match="x must be a tensor"):
        mix.ode_solution([[0.0, 0.0]], 80.0, 0.002)
    with pytest.raises(ValueError, match="sigma_end"):
        mix.ode_solution(torch.zeros(2, 2, dtype=f64), 80.0, 0.0)
    with pytest.raises(ValueError, match="num"):
        mix.sample(0)
    with pytest.raises(ValueError, match="dim"):
        default_mixture(dim=0)


def test_sample_matches_weights():
    mix = GaussianMixtureDenoiser(torch.tensor([[-1.0], [1.0]]), 0.01, [0.8, 0.2])
    x = mix.sample(4000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4000, 1) and x.dtype == f64
    assert float((x > 0).double().mean()) == pytest.approx(0.2, abs=0.03)
    assert math.isclose(float(x[x > 0].std()), 0.01, rel_tol=0.15)

"""The analytic Gaussian-mixture teacher: its closed-form denoiser, the exact PF-ODE
solution, and PID's one-step student against it (the error falls as N grows)."""

import math
import os

import pytest
import torch

from pid_fast.models.analytic import (GaussianMixtureDenoiser, MLPStudent, default_mixture, distill, endpoint_error,
                               pid_grid_euler, sweep_n)
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


def test_pid_grid_euler_converges_at_first_order():
    mix = default_mixture()
    z = _z(128, seed=5)
    exact = mix.ode_solution(z * 80, 80.0, 0.002)
    err = {N: float((pid_grid_euler(mix, z, N) - exact).square().mean().sqrt()) for N in (2, 8, 32, 128, 512)}
    assert err[2] > err[8] > err[32] > err[128] > err[512]
    assert err[128] / err[512] == pytest.approx(4.0, rel=0.3)  # O(1/N)


def test_student_endpoint_error_falls_with_N():
    """The paper's trend on an exact reference. N = 2 pins the student to a single Euler step
    (the mixture's mean region); N = 64 brings the one-step output close to the exact x(sigma_min).
    Fixed seeds; across training seeds the ratios below vary by a few percent, and the margins
    asserted are 1.5x to 4x below the measured ones (rmse 0.50 / 0.21 / 0.08, fd 0.50 / 0.062 / 0.0006)."""
    mix = default_mixture()
    z = _z(500, seed=6)
    exact = mix.ode_solution(z * 80, 80.0, 0.002)
    res = {}
    for N in (2, 4, 64):
        student = distill(mix, N, steps=1000, batch_size=128, lr=3e-3, seed=0)
        res[N] = endpoint_error(student, mix, z, exact=exact)
    assert res[2]["rmse"] > 1.5 * res[4]["rmse"]
    assert res[4]["rmse"] > 1.5 * res[64]["rmse"]
    assert res[2]["fd"] > 4 * res[4]["fd"]
    assert res[4]["fd"] > 20 * res[64]["fd"]
    # With N = 2 the loss's grid conditions leave no freedom: the student is Euler's 1-step answer.
    euler = pid_grid_euler(mix, z, 2)
    assert abs(res[2]["rmse"] - float((euler - exact).square().mean().sqrt())) < 0.05


def test_sweep_n_fd_falls_monotonically():
    rows = sweep_n((2, 4, 16, 64), num_eval=500, steps=600, batch_size=128)
    fds = [r["fd"] for r in rows]
    assert all(a > 1.5 * b for a, b in zip(fds, fds[1:]))  # measured ratios ~8, 13, 3-4 (seeds 0, 1)
    assert all(r["euler_rmse"] < r0["euler_rmse"] for r0, r in zip(rows, rows[1:]))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PID_FAST_SLOW") != "1", reason="slow (~1 min): set PID_FAST_SLOW=1")
def test_sweep_n_longer_training_reaches_small_endpoint_error():
    rows = sweep_n((2, 4, 8, 16, 64), num_eval=1000, steps=2000, batch_size=256)
    fds = [r["fd"] for r in rows]
    assert all(a > b for a, b in zip(fds, fds[1:]))
    assert rows[-1]["rmse"] < 0.1


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
    with pytest.raises(TypeError, match="teacher"):
        distill(GaussianDenoiser(), 4)
    with pytest.raises(ValueError, match="steps"):
        distill(mix, 4, steps=0)
    with pytest.raises(ValueError, match="N"):
        distill(mix, 1, steps=1)
    with pytest.raises(ValueError, match="Ns"):
        sweep_n([])
    with pytest.raises(ValueError, match="dim"):
        default_mixture(dim=0)


def test_sample_matches_weights():
    mix = GaussianMixtureDenoiser(torch.tensor([[-1.0], [1.0]]), 0.01, [0.8, 0.2])
    x = mix.sample(4000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4000, 1) and x.dtype == f64
    assert float((x > 0).double().mean()) == pytest.approx(0.2, abs=0.03)
    assert math.isclose(float(x[x > 0].std()), 0.01, rel_tol=0.15)

"""PID's one-step student against the analytic Gaussian-mixture teacher (pid_fast.demo.analytic_sweep):
Euler on PID's grid converges at first order, and the student's endpoint error falls as N grows."""

import os

import pytest
import torch

from pid_fast.demo.analytic_sweep import distill, endpoint_error, pid_grid_euler, sweep_n
from pid_fast.models.analytic import default_mixture
from pid_fast.models.preconditioning import GaussianDenoiser


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

f64 = torch.float64


def _z(n, dim=2, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=f64)


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


def test_bad_input():
    mix = default_mixture()
    with pytest.raises(TypeError, match="teacher"):
        distill(GaussianDenoiser(), 4)
    with pytest.raises(ValueError, match="steps"):
        distill(mix, 4, steps=0)
    with pytest.raises(ValueError, match="N"):
        distill(mix, 1, steps=1)
    with pytest.raises(ValueError, match="Ns"):
        sweep_n([])


def test_distill_with_the_jvp_derivative_learns():
    """The Gaussian-mixture distillation runs with derivative='jvp' and its student moves
    toward the exact ODE endpoint (a few steps, far from converged)."""
    teacher = default_mixture()
    z = torch.randn((256, *teacher.sample_shape), generator=torch.Generator().manual_seed(3))
    before = endpoint_error(distill(teacher, 16, steps=1, seed=0, derivative="jvp"), teacher, z)["rmse"]
    after = endpoint_error(distill(teacher, 16, steps=200, seed=0, derivative="jvp"), teacher, z)["rmse"]
    assert after < 0.9 * before
    with pytest.raises(ValueError, match="derivative"):
        distill(teacher, 16, steps=1, derivative="central")

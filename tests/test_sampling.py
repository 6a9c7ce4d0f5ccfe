"""Time grids, teacher samplers against the exact Gaussian PF-ODE solution, per-seed noise
and the PID student's one-step sampling / trajectory."""

import math

import pytest
import torch

from pid_fast.models.networks import build_network, network_config
from pid_fast.models.preconditioning import EDMPrecond, GaussianDenoiser, edm_coefficients
from pid_fast.sampling import (euler_sample, heun_sample, karras_sigmas, ode_sample, pid_grid,
                               pid_neighbour_index, pid_time, sample_pid_times, seeded_latents, seeded_randn,
                               student_sample, student_trajectory)


def reference_time(i, n, smin=0.002, smax=80.0, rho=7.0):
    return (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


# ----------------------------------------------------------------------------------------
# Grids.

def test_pid_grid_endpoints_and_formula():
    t = pid_grid(250, dtype=torch.float64)
    assert t.shape == (250,)
    assert t[0].item() == pytest.approx(80.0, rel=1e-12) and t[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert bool((t[1:] < t[:-1]).all())
    for i in (0, 1, 17, 124, 248, 249):
        assert t[i].item() == pytest.approx(reference_time(i, 250), rel=1e-12)
    assert pid_time(torch.tensor([5, 249]), 250).dtype == torch.float32


def test_pid_neighbour_rule_including_last_index():
    n = 250
    i = torch.arange(n)
    i2 = pid_neighbour_index(i, n)
    assert torch.equal(i2[:-1], i[:-1] + 1)
    assert i2[-1].item() == n - 2                                       # the edge: t2 > t there
    t, t2 = pid_time(i, n, dtype=torch.float64), pid_time(i2, n, dtype=torch.float64)
    assert bool((t2[:-1] < t[:-1]).all()) and t2[-1] > t[-1]
    assert bool((i2 >= 0).all() and (i2 <= n - 1).all())
    assert pid_neighbour_index(torch.tensor([0, 1]), 2).tolist() == [1, 0]


def test_sample_pid_times_is_seeded_and_covers_the_edge():
    gen = torch.Generator().manual_seed(0)
    i, i2, t, t2 = sample_pid_times(4000, 10, generator=gen)
    assert i.min().item() == 0 and i.max().item() == 9 and len(torch.unique(i)) == 10
    torch.testing.assert_close(t, pid_time(i, 10))
    torch.testing.assert_close(t2, pid_time(pid_neighbour_index(i, 10), 10))
    assert bool((t2[i == 9] > t[i == 9]).all()) and bool((t2[i < 9] < t[i < 9]).all())
    again = sample_pid_times(4000, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], i)


def test_karras_sigmas_match_edm_grid():
    t = karras_sigmas(18)
    assert t.shape == (19,) and t.dtype == torch.float64 and t[-1] == 0
    assert t[0].item() == pytest.approx(80.0) and t[17].item() == pytest.approx(0.002)
    for i in (3, 9):
        assert t[i].item() == pytest.approx(reference_time(i, 18), rel=1e-12)
    assert karras_sigmas(18, append_zero=False).shape == (18,)
    assert karras_sigmas(1).tolist() == [80.0, 0.0]
    rounded = karras_sigmas(4, round_sigma=lambda s: s.round())
    assert rounded[:-1].tolist() == [round(reference_time(i, 4)) for i in range(4)]


def test_grid_argument_errors():
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(18, sigma_min=100.0)
    with pytest.raises(ValueError, match="rho"):
        pid_grid(10, rho=-1.0)
    with pytest.raises(ValueError, match="num_points"):
        pid_grid(1)
    with pytest.raises(TypeError, match="integer"):
        pid_time(torch.tensor([0.5]), 10)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        pid_time(torch.tensor([10]), 10)
    with pytest.raises(TypeError, match="integer"):
        pid_neighbour_index(torch.tensor([1.0]), 10)


# ----------------------------------------------------------------------------------------
# Teacher samplers on an analytic Gaussian teacher, whose PF-ODE solution is exact:
# x(sigma) = mean + (x(T) - mean) sqrt(s^2 + sigma^2) / sqrt(s^2 + T^2).

class CountingDenoiser(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.sigmas = inner, 0, []

    @property
    def sigma_min(self):
        return self.inner.sigma_min

    @property
    def sigma_max(self):
        return self.inner.sigma_max

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        self.sigmas.append(float(sigma[0]))
        return self.inner(x, sigma, labels)


@pytest.fixture
def gaussian():
    torch.manual_seed(0)
    return GaussianDenoiser(0.3 * torch.randn(3, 4, 4), 0.5)


def _error(sample, exact, mean):
    # The ODE is linear in x - mean, so the solver's error is a fixed fraction of the
    # displacement x - mean whatever z is: measure it relative to that displacement.
    return ((sample - exact).norm() / (exact - mean).norm()).item()


def test_heun_18_steps_is_35_evaluations_and_close_to_exact(gaussian):
    z = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    exact = gaussian.ode_solution(80.0 * z, 80.0, 0.0)
    counter = CountingDenoiser(gaussian)
    x = heun_sample(counter, z)
    assert counter.calls == 35
    assert counter.sigmas[0] == pytest.approx(80.0) and min(counter.sigmas) == pytest.approx(0.002)
    assert x.dtype == torch.float64 and x.shape == z.shape
    # 18 steps is EDM's budget, not a converged solve: the relative error is 5.5% here
    # (the same, to the last bit, as EDM's edm_sampler); see the convergence test below.
    assert _error(x, exact, gaussian.mean) < 0.06


def test_heun_converges_at_second_order_and_euler_at_first(gaussian):
    z = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    exact = gaussian.ode_solution(80.0 * z, 80.0, 0.0)
    heun = [_error(heun_sample(gaussian, z, num_steps=n), exact, gaussian.mean) for n in (18, 36, 72)]
    euler = [_error(euler_sample(gaussian, z, num_steps=n), exact, gaussian.mean) for n in (18, 36, 72)]
    assert heun[1] / heun[0] < 0.3 and heun[2] / heun[1] < 0.3          # ~1/4 per halving
    assert 0.4 < euler[1] / euler[0] < 0.6 and 0.4 < euler[2] / euler[1] < 0.6  # ~1/2 per halving
    assert all(h < e for h, e in zip(heun, euler))
    assert euler[0] < 0.2                                                # measured 0.154 at 18 steps
    # An accurate solve: 600 Heun steps agree with the exact solution to 1e-4 (measured 3e-5).
    assert _error(heun_sample(gaussian, z, num_steps=600), exact, gaussian.mean) < 1e-4


def test_euler_uses_one_evaluation_per_step(gaussian):
    counter = CountingDenoiser(gaussian)
    euler_sample(counter, torch.randn(2, 3, 4, 4), num_steps=7)
    assert counter.calls == 7


def test_sampler_through_edm_preconditioning(gaussian):
    # The same Gaussian teacher written as a raw network F behind EDMPrecond:
    # F = (D - c_skip x) / c_out with x = x_in / c_in and sigma = exp(4 c_noise).
    def raw(x_in, c_noise, labels):
        sigma = (4 * c_noise.double()).exp()
        c = edm_coefficients(sigma)
        x = x_in.double() / c.c_in.reshape(-1, 1, 1, 1)
        D = gaussian(x, sigma)
        return ((D - c.c_skip.reshape(-1, 1, 1, 1) * x) / c.c_out.reshape(-1, 1, 1, 1)).float()

    z = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    a = heun_sample(EDMPrecond(raw), z)
    b = heun_sample(gaussian, z)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_sampler_respects_the_denoiser_sigma_range(gaussian):
    counter = CountingDenoiser(gaussian)
    gaussian.sigma_max = 10.0
    x = euler_sample(counter, torch.ones(1, 3, 4, 4), num_steps=3)
    assert counter.sigmas[0] == pytest.approx(10.0)
    torch.testing.assert_close(x, euler_sample(gaussian, torch.ones(1, 3, 4, 4), num_steps=3, sigma_max=10.0))


def test_sampler_argument_errors(gaussian):
    z = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="solver"):
        ode_sample(gaussian, z, solver="rk4")
    with pytest.raises(TypeError, match="denoiser"):
        ode_sample("teacher", z)
    with pytest.raises(ValueError, match="latents"):
        heun_sample(gaussian, torch.zeros(0, 3))
    with pytest.raises(ValueError, match="num_steps"):
        heun_sample(gaussian, z, num_steps=0)


# ----------------------------------------------------------------------------------------
# Seeds.

def test_seeded_noise_is_independent_of_batch():
    full = seeded_randn([7, 8, 9], (3, 4, 4))
    assert full.shape == (3, 3, 4, 4)
    torch.testing.assert_close(seeded_randn([8], (3, 4, 4))[0], full[1], atol=0, rtol=0)
    torch.testing.assert_close(seeded_randn([9, 7], (3, 4, 4)), full[[2, 0]], atol=0, rtol=0)
    assert not torch.equal(full[0], full[1])
    with pytest.raises(ValueError, match="seeds"):
        seeded_randn([], (3,))
    with pytest.raises(TypeError, match="seeds"):
        seeded_randn([1.5], (3,))


def test_seeded_latents_with_labels():
    z, labels = seeded_latents([1, 2, 3, 4], (3, 8, 8), label_dim=10)
    z1, l1 = seeded_latents([3], (3, 8, 8), label_dim=10)
    torch.testing.assert_close(z1[0], z[2], atol=0, rtol=0)
    assert torch.equal(l1[0], labels[2])
    assert labels.shape == (4, 10) and torch.equal(labels.sum(1), torch.ones(4))
    # Latents are drawn first, so they equal the unconditional ones for the same seed.
    torch.testing.assert_close(seeded_latents([3], (3, 8, 8))[0], z1, atol=0, rtol=0)
    assert seeded_latents([3], (3, 8, 8))[1] is None


def test_teacher_samples_do_not_depend_on_batch_size():
    net = build_network(network_config("tiny-ddpmpp")).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = EDMPrecond(net)
    with torch.no_grad():
        many = heun_sample(teacher, seeded_randn([10, 11, 12], (3, 8, 8)), num_steps=3)
        one = heun_sample(teacher, seeded_randn([11], (3, 8, 8)), num_steps=3)
    torch.testing.assert_close(one[0], many[1], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------
# Student.

class RecordingStudent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_in, c_noise, labels):
        self.calls.append((x_in.clone(), c_noise.clone(), labels))
        return torch.tanh(x_in) + c_noise.reshape(-1, 1, 1, 1)


def test_student_trajectory_parametrization():
    student = RecordingStudent()
    n = 80.0 * torch.randn(3, 3, 4, 4)
    t = torch.tensor([80.0, 10.0, 0.002])
    x = student_trajectory(student, n, t, "labels")
    x_in, c_noise, labels = student.calls[-1]
    c = 1 / math.sqrt(0.25 + 80.0 ** 2)
    torch.testing.assert_close(x_in, c * n)
    torch.testing.assert_close(c_noise, t.log() / 4)
    assert labels == "labels"
    F_ = torch.tanh(c * n) + (t.log() / 4).reshape(-1, 1, 1, 1)
    view = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x, view / 80 * n + (1 - view / 80) * F_)
    torch.testing.assert_close(x[0], n[0], atol=0, rtol=0)               # x(T) = n exactly
    # Custom c_noise rule (e.g. a VP teacher's).
    student_trajectory(student, n, 5.0, noise_labels=lambda s: 2 * s)
    torch.testing.assert_close(student.calls[-1][1], torch.full((3,), 10.0))


def test_student_sample_is_one_call_at_sigma_min_and_clamped():
    student = RecordingStudent()
    z = torch.randn(5, 3, 4, 4)
    x = student_sample(student, z)
    assert len(student.calls) == 1
    torch.testing.assert_close(student.calls[0][1], torch.full((5,), math.log(0.002) / 4))
    unclamped = student_sample(student, z, clamp=False)
    torch.testing.assert_close(unclamped, student_trajectory(student, 80.0 * z, 0.002))
    torch.testing.assert_close(x, unclamped.clamp(-1, 1))
    assert unclamped.abs().max() > 1 and x.abs().max() <= 1


def test_student_argument_errors():
    with pytest.raises(TypeError, match="student"):
        student_trajectory(None, torch.zeros(1, 3), 1.0)
    with pytest.raises(ValueError, match="noise"):
        student_trajectory(RecordingStudent(), torch.zeros(0, 3), 1.0)
    with pytest.raises(ValueError, match="t"):
        student_trajectory(RecordingStudent(), torch.zeros(2, 3, 4, 4), torch.ones(3))
    with pytest.raises(ValueError, match="output must have shape"):
        student_trajectory(lambda x, c, l: x[:, :1], torch.zeros(2, 3, 4, 4), 1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        student_sample(RecordingStudent(), torch.zeros(1, 3), sigma_min=90.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_noise_and_sampling_on_cuda(gaussian):
    full = seeded_randn([7, 8, 9], (3, 4, 4), device="cuda")
    assert full.device.type == "cuda"
    torch.testing.assert_close(seeded_randn([8], (3, 4, 4), device="cuda")[0], full[1], atol=0, rtol=0)
    gaussian = gaussian.cuda()
    x = heun_sample(gaussian, full)
    exact = gaussian.ode_solution(80.0 * full.double(), 80.0, 0.0)
    assert x.device.type == "cuda" and _error(x, exact, gaussian.mean) < 0.06
    i, i2, t, t2 = sample_pid_times(64, 10, device="cuda")
    assert t.device.type == "cuda" and bool((i2[i == 9] == 8).all())

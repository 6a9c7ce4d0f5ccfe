"""PIDLoss with a guided teacher (pid_fast.guided): the fused residual forms the guided target
from the two teacher outputs, and a student trained on a guided class-conditional Gaussian
mixture lands on the guided ODE's exact endpoint, not the unguided one."""

import pytest
import torch
from torch import nn

from pid_fast import PIDLoss, guided
from pid_fast.demo.analytic_sweep import distill, endpoint_error
from pid_fast.models.analytic import GaussianMixtureDenoiser, MLPStudent
from pid_fast.models.preconditioning import EDMPrecond, FunctionDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """A raw class-conditional network F(x_in, c_noise, labels) for (B, 2, H, W) images."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.label = nn.Linear(3, 2)

    def forward(self, x, c_noise, labels=None):
        return torch.tanh(self.conv(x) * (1 + c_noise.reshape(-1, 1, 1, 1)) + self.label(labels)[:, :, None, None])


def _batch(batch=6):
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(batch, 2, 6, 6, generator=g) * 80
    labels = nn.functional.one_hot(torch.randint(0, 3, (batch,), generator=g), 3).float()
    indices = torch.tensor([0, 1, 50, 120, 248, 249])[:batch]  # both ends of the grid (t2 > t at the last)
    return noise, labels, indices


def _student():
    return EDMPrecond(TinyNet(seed=5), label_dim=3)


@pytest.mark.parametrize("how", ["autoguidance", "cfg", "interval"])
@pytest.mark.parametrize("norm", ["l2", "huber"])
def test_fused_guided_loss_equals_the_unfused_guided_denoiser(how, norm):
    """The loss with the guided teacher (two raw outputs into the fused op) equals the loss with
    the same guided denoiser seen as a plain callable D_w (no fusion), values and gradients."""
    main, guide = EDMPrecond(TinyNet(seed=0), label_dim=3), EDMPrecond(TinyNet(seed=1), label_dim=3)
    teacher = {"autoguidance": lambda: guided(main, guide, 2.5),
               "cfg": lambda: guided(main, main, 3.0, guide_labels="zeros"),
               "interval": lambda: guided(main, guide, 2.0, interval=(0.5, 10.0))}[how]()
    noise, labels, indices = _batch()
    student = _student()
    huber_c = 0.03 if norm == "huber" else None
    fused = PIDLoss(teacher, norm=norm, huber_c=huber_c, student_parametrization="preconditioned")
    plain = PIDLoss(FunctionDenoiser(lambda x, s, l: teacher(x, s, l), label_dim=3), norm=norm, huber_c=huber_c,
                    student_parametrization="preconditioned", noise_labels=None)
    losses, grads = [], []
    for loss_fn in (fused, plain):
        student.zero_grad()
        loss = loss_fn.per_sample(student, noise, labels, indices=indices)
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-3, atol=1e-5)


def test_scale_one_is_the_unguided_loss_bit_for_bit():
    main, guide = EDMPrecond(TinyNet(seed=0), label_dim=3), EDMPrecond(TinyNet(seed=1), label_dim=3)
    noise, labels, indices = _batch()
    student = _student()
    a = PIDLoss(guided(main, guide, 1.0)).per_sample(student, noise, labels, indices=indices)
    b = PIDLoss(main).per_sample(student, noise, labels, indices=indices)
    assert torch.equal(a, b)


def _class_mixture():
    means = torch.tensor([[0.5, 0.2], [0.2, 0.5], [-0.5, -0.2], [-0.2, -0.5]], dtype=torch.float64)
    return GaussianMixtureDenoiser(means, 0.2, classes=[0, 0, 1, 1])


def test_student_of_the_guided_mixture_lands_on_the_guided_endpoint():
    """Classifier-free guidance at w = 3 on a class-conditional mixture: the exact guided ODE's
    endpoint differs from the conditional one's by 0.15 RMS per coordinate; the student distilled
    from the guided teacher (800 steps, N = 64) is 0.024 from the guided endpoint, 0.16 from the
    conditional one."""
    mixture = _class_mixture()
    teacher = guided(mixture, mixture, 3.0, guide_labels="zeros")
    student = distill(teacher, 64, steps=800, batch_size=128, lr=3e-3, seed=0)
    g = torch.Generator().manual_seed(11)
    z = torch.randn(400, 2, generator=g, dtype=torch.float64)
    labels = nn.functional.one_hot(torch.randint(0, 2, (400,), generator=g), 2).double()
    exact_guided = mixture.ode_solution(z * 80, 80.0, 0.002, class_labels=labels, denoiser=teacher, tol=1e-6)
    exact_cond = mixture.ode_solution(z * 80, 80.0, 0.002, class_labels=labels, tol=1e-6)
    gap = float((exact_guided - exact_cond).square().mean().sqrt())
    to_guided = endpoint_error(student, teacher, z, labels=labels, exact=exact_guided)["rmse"]
    to_cond = endpoint_error(student, teacher, z, labels=labels, exact=exact_cond)["rmse"]
    print(f"guided-vs-conditional endpoint gap {gap:.4f}; student rmse to guided {to_guided:.4f}, "
          f"to conditional {to_cond:.4f}")
    assert gap > 0.1  # measured 0.153
    assert to_guided < 0.06 and to_guided < 0.3 * to_cond  # measured 0.024 and 0.159

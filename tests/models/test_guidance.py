"""pid_fast.guided: D_w = D_g + w (D_m - D_g), with classifier-free guidance in one 2B batch,
the guidance interval, and the class-conditional Gaussian mixture whose guided ODE is exact."""

import pytest
import torch
from torch import nn

from pid_fast import GuidedDenoiser, guided
from pid_fast.models.analytic import GaussianMixtureDenoiser
from pid_fast.models.preconditioning import EDMPrecond, VPPrecond


class TinyNet(nn.Module):
    """A raw network F(x_in, c_noise, labels) that depends on all three."""

    def __init__(self, channels=2, label_dim=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.label = nn.Linear(label_dim, channels) if label_dim else None
        self.calls = []

    def forward(self, x, c_noise, labels=None):
        self.calls.append(x.shape[0])
        h = self.conv(x) * (1 + c_noise.reshape(-1, 1, 1, 1))
        if self.label is not None:
            h = h + self.label(labels)[:, :, None, None]
        return torch.tanh(h)


def _edm(seed=0, label_dim=3):
    return EDMPrecond(TinyNet(label_dim=label_dim, seed=seed), label_dim=label_dim)


def _inputs(batch=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 2, 6, 6, generator=g) * 3
    sigma = torch.exp(torch.randn(batch, generator=g) * 2)
    labels = nn.functional.one_hot(torch.randint(0, 3, (batch,), generator=g), 3).float()
    return x, sigma, labels


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 2.5])
def test_autoguidance_equals_the_formula(scale):
    main, guide = _edm(0), _edm(1)
    x, sigma, labels = _inputs()
    with torch.no_grad():
        expected = guide(x, sigma, labels) + scale * (main(x, sigma, labels) - guide(x, sigma, labels))
        got = guided(main, guide, scale)(x, sigma, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_scale_one_is_the_main_teacher_bit_for_bit_and_zero_the_guide():
    main, guide = _edm(0), _edm(1)
    x, sigma, labels = _inputs()
    with torch.no_grad():
        assert torch.equal(guided(main, guide, 1.0)(x, sigma, labels), main(x, sigma, labels))
        # (a Python float scale and raw(): the same)
        c = main.coefficients(sigma)
        x_in = c.c_in.reshape(-1, 1, 1, 1) * x
        assert torch.equal(guided(main, guide, 1).raw(x_in, c.c_noise, labels), main.raw(x_in, c.c_noise, labels))
        g_m, g_g = guided(main, guide, 0.0).raw_pair(x_in, c.c_noise, labels)
        assert torch.equal(guided(main, guide, 0.0).raw(x_in, c.c_noise, labels), g_g)


def test_classifier_free_guidance_runs_one_batch_of_2b():
    main = _edm(0)
    x, sigma, labels = _inputs()
    teacher = guided(main, main, 3.0, guide_labels="zeros")
    assert isinstance(teacher, GuidedDenoiser) and teacher.shares_network
    main.model.calls.clear()
    with torch.no_grad():
        got = teacher(x, sigma, labels)
    assert main.model.calls == [2 * x.shape[0]]
    with torch.no_grad():
        uncond = main(x, sigma, torch.zeros_like(labels))
        expected = uncond + 3.0 * (main(x, sigma, labels) - uncond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a null label given as one tensor, class indices as labels
    null = torch.tensor([0.0, 0.0, 1.0])
    with torch.no_grad():
        got = guided(main, main, 2.0, guide_labels=null)(x, sigma, labels.argmax(1))
        expected = main(x, sigma, null.expand(5, 3)) + 2.0 * (main(x, sigma, labels) - main(x, sigma, null.expand(5, 3)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(list(teacher.parameters())) == len(list(main.parameters()))  # registered once


def test_interval_applies_guidance_inside_only():
    main, guide = _edm(0), _edm(1)
    x, _, labels = _inputs(4)
    sigma = torch.tensor([0.05, 0.3, 2.0, 40.0])
    teacher = guided(main, guide, 4.0, interval=(0.2, 5.0))
    assert teacher.guidance_scale(sigma).tolist() == [1.0, 4.0, 4.0, 1.0]
    with torch.no_grad():
        got = teacher(x, sigma, labels)
        plain = guided(main, guide, 4.0)(x, sigma, labels)
        alone = main(x, sigma, labels)
    torch.testing.assert_close(got[1:3], plain[1:3])
    assert torch.equal(got[[0, 3]], alone[[0, 3]])
    with pytest.raises(ValueError, match="interval"):
        teacher.raw(x, sigma, labels)


def test_guides_of_another_parametrisation_combine_as_denoisers():
    main, guide = _edm(0), VPPrecond(TinyNet(seed=2), label_dim=3)
    x, sigma, labels = _inputs()
    teacher = guided(main, guide, 1.5)
    with torch.no_grad():
        expected = guide(x, sigma, labels) + 1.5 * (main(x, sigma, labels) - guide(x, sigma, labels))
        got = teacher(x, sigma, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_themselves():
    main = _edm(0)
    with pytest.raises(ValueError, match="guide_labels"):
        guided(main, main, 2.0)
    with pytest.raises(ValueError, match="scale"):
        guided(main, _edm(1), float("nan"))
    with pytest.raises(ValueError, match="scale"):
        guided(main, _edm(1), True)
    with pytest.raises(ValueError, match="interval"):
        guided(main, _edm(1), 2.0, interval=(5.0, 1.0))
    with pytest.raises(ValueError, match="interval"):
        guided(main, _edm(1), 2.0, interval=(1.0,))
    with pytest.raises(TypeError, match="guide_labels"):
        guided(main, main, 2.0, guide_labels="empty")
    with pytest.raises(TypeError, match="guide"):
        guided(main, 3, 2.0)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional = _edm(0, label_dim=0)
        guided(unconditional, unconditional, 2.0, guide_labels="zeros")


def _class_mixture():
    means = torch.tensor([[0.6, 0.0], [0.0, 0.6], [-0.6, 0.0], [0.0, -0.6]], dtype=torch.float64)
    return GaussianMixtureDenoiser(means, 0.15, classes=[0, 0, 1, 1])


def test_class_conditional_mixture_and_its_guided_ode():
    gm = _class_mixture()
    assert gm.label_dim == 2
    x = torch.randn(6, 2, dtype=torch.float64)
    sigma = torch.full((6,), 0.7, dtype=torch.float64)
    labels = nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 0, 1]), 2).double()
    class0 = GaussianMixtureDenoiser(gm.means[:2], 0.15)
    torch.testing.assert_close(gm(x, sigma, labels)[::2], class0(x[::2], sigma[::2]))
    torch.testing.assert_close(gm(x, sigma, torch.zeros_like(labels)), gm(x, sigma))  # zeros: unconditional
    teacher = guided(gm, gm, 3.0, guide_labels="zeros")
    with torch.no_grad():
        expected = gm(x, sigma) + 3.0 * (gm(x, sigma, labels) - gm(x, sigma))
    torch.testing.assert_close(teacher(x, sigma, labels), expected)
    assert teacher(x, sigma, labels).dtype == torch.float64
    # The guided ODE's endpoint is pushed further into its class than the conditional one's.
    z = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    end_guided = gm.ode_solution(z, 80.0, 0.002, class_labels=labels, denoiser=teacher, tol=1e-6)
    end_cond = gm.ode_solution(z, 80.0, 0.002, class_labels=labels, tol=1e-6)
    assert (end_guided - end_cond).abs().max() > 1e-3
    direction = torch.where(labels[:, :1] > 0, gm.means[0] + gm.means[1], gm.means[2] + gm.means[3])
    assert bool(((end_guided * direction).sum(1) >= (end_cond * direction).sum(1) - 1e-9).all())

"""EDM2's U-Net and preconditioning (pid_fast/models/edm2.py): published parameter counts, EDM2's
state_dict layout, the magnitude-preserving operations, forced weight normalisation, and PID with
an EDM2 teacher and student (fd and jvp derivatives)."""

import copy
import math

import pytest
import torch

from pid_fast.loss import PIDLoss
from pid_fast.models.edm2 import EDM2Precond, EDM2UNet, MPConv, mp_cat, mp_silu, mp_sum, normalize, resample
from pid_fast.models.networks import NETWORK_CONFIGS, build_network, count_parameters, network_config
from pid_fast.models.preconditioning import EDMPrecond

pytestmark = pytest.mark.usefixtures("one_thread")

# EDM2 README / paper (Karras et al. 2024, Tables 2-3): millions of parameters of the img64 models.
PUBLISHED_IMG64_MPARAMS = {"xs": 125, "s": 280, "m": 498, "l": 777, "xl": 1119}
# What these configs build (measured on the meta device; the published numbers are these, rounded).
MEASURED_IMG64 = {"xs": 124_710_821, "s": 280_209_253, "m": 497_803_045, "l": 777_492_197, "xl": 1_119_276_709}
TINY = dict(model_type="EDM2UNet", img_resolution=8, in_channels=3, out_channels=3, label_dim=0, model_channels=8,
            channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=8)


def tiny_unet(seed=0, gains=0.5, **over):
    """A tiny EDM2 U-Net with its gains (0 at EDM2's init, which makes F = 0) set to `gains`."""
    torch.manual_seed(seed)
    net = build_network(dict(TINY, **over))
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(gains)
    return net


@pytest.mark.parametrize("size", sorted(PUBLISHED_IMG64_MPARAMS))
def test_img64_parameter_counts_are_the_published_ones(size):
    net = build_network(f"edm2-img64-{size}", device="meta")
    count = count_parameters(net)
    assert count == MEASURED_IMG64[size]
    assert round(count / 1e6) == PUBLISHED_IMG64_MPARAMS[size]
    # The latent (img512) model of the same size differs only in its 4 input and output channels.
    latent = count_parameters(build_network(f"edm2-img512-{size}", device="meta"))
    assert latent - count == 2 * 9 * NETWORK_CONFIGS[f"edm2-img64-{size}"]["model_channels"]


def test_state_dict_has_edm2s_names_and_shapes():
    unet = build_network("edm2-img64-s", device="meta")
    precond = EDM2Precond(unet, label_dim=1000)
    shapes = {k: tuple(v.shape) for k, v in precond.state_dict().items()}
    assert len(shapes) == 203  # EDM2's Precond(img64-s) state_dict has 203 entries
    assert list(shapes)[:4] == ["unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases",
                                "unet.emb_noise.weight"]
    assert list(shapes)[-3:] == ["logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight"]
    expected = {"unet.out_gain": (), "unet.emb_noise.weight": (768, 192), "unet.emb_label.weight": (768, 1000),
                "unet.enc.64x64_conv.weight": (192, 4, 3, 3), "unet.enc.32x32_down.emb_gain": (),
                "unet.enc.32x32_block0.conv_skip.weight": (384, 192, 1, 1),
                "unet.enc.16x16_block2.attn_qkv.weight": (1728, 576, 1, 1),
                "unet.dec.8x8_in0.attn_proj.weight": (768, 768, 1, 1), "unet.dec.8x8_in1.emb_linear.weight": (768, 768),
                "unet.dec.64x64_block3.conv_res0.weight": (192, 384, 3, 3), "unet.out_conv.weight": (3, 192, 3, 3),
                "logvar_linear.weight": (1, 128)}
    assert {k: shapes[k] for k in expected} == expected
    assert "unet.dec.8x8_in1.attn_qkv.weight" not in shapes and "unet.enc.32x32_block0.attn_qkv.weight" not in shapes
    assert not any(k.endswith(".bias") for k in shapes)  # EDM2 has no biases
    assert precond.model is precond.unet


def test_magnitude_preserving_operations():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 64, 16, 16, generator=gen), torch.randn(4, 32, 16, 16, generator=gen)
    rms = lambda x: x.square().mean().sqrt().item()  # noqa: E731
    assert rms(mp_silu(a)) == pytest.approx(1, abs=0.03)
    assert rms(mp_sum(a, torch.randn(a.shape, generator=gen), t=0.3)) == pytest.approx(1, abs=0.03)
    cat = mp_cat(a, b, t=0.3)
    assert cat.shape == (4, 96, 16, 16) and rms(cat) == pytest.approx(1, abs=0.03)
    # b's share of the squared magnitude is t^2 / ((1-t)^2 + t^2)
    assert cat[:, 64:].square().sum() / cat.square().sum() == pytest.approx(0.09 / 0.58, abs=0.01)
    unit = normalize(3 * a)
    assert unit.square().mean(dim=(1, 2, 3)).sqrt() == pytest.approx(torch.ones(4), abs=1e-3)
    assert normalize(a, dim=1).square().mean(dim=1).sqrt() == pytest.approx(torch.ones(4, 16, 16), abs=1e-3)
    conv = MPConv(64, 48, kernel=(3, 3))
    assert rms(conv(a)[:, :, 1:-1, 1:-1]) == pytest.approx(1, abs=0.05)  # unit in, unit out (away from padding)
    assert torch.equal(MPConv(64, 48, kernel=())(a[:, :, 0, 0], gain=0), torch.zeros(4, 48))
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(resample(x, mode="down"), torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(resample(x, mode="up"), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert resample(x) is x


def test_forced_weight_normalisation_once_per_update():
    net = tiny_unet().train()
    layer = net.enc["8x8_block0"].conv_res0
    with torch.no_grad():
        layer.weight.mul_(3)
    x, c = torch.randn(2, 3, 8, 8), torch.tensor([0.1, -0.4])
    eval_out = copy.deepcopy(net).eval()(x, c)
    out1 = net(x, c)
    # the stored weights now have unit RMS per output channel; the output did not change (up to
    # normalize's eps = 1e-4, which weighs more on a unit-RMS weight than on the 3x one)
    rows = layer.weight.flatten(1)
    torch.testing.assert_close(rows.square().mean(1).sqrt(), torch.ones(rows.shape[0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out1, eval_out, atol=1e-3, rtol=0)
    # a second forward before the backward (PID's unbatched fd) leaves the saved weights alone
    out2 = net(x, c + 0.01)
    (out1.square().sum() + out2.square().sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # an optimizer step changes the weights: the next forward re-normalises them
    torch.optim.SGD(net.parameters(), lr=1.0).step()
    assert not torch.allclose(layer.weight.flatten(1).square().mean(1), torch.ones(rows.shape[0]), atol=1e-3)
    net(x, c)
    torch.testing.assert_close(layer.weight.flatten(1).square().mean(1).sqrt(), torch.ones(rows.shape[0]),
                               atol=1e-3, rtol=0)
    before = [p.clone() for p in net.parameters()]
    net.eval()(x, c)  # eval mode never writes
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_precond_matches_edm_preconditioning_and_logvar():
    unet = tiny_unet(label_dim=5).eval()
    edm2 = EDM2Precond(copy.deepcopy(unet), label_dim=5)
    plain = EDMPrecond(unet, label_dim=5, sigma_data=0.5)
    x, sigma, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 1.0, 50.0]), torch.tensor([0, 2, 4])
    torch.testing.assert_close(edm2(x, sigma, labels), plain(x, sigma, labels))
    denoised, logvar = edm2(x, sigma, labels, return_logvar=True)
    assert logvar.shape == (3, 1, 1, 1) and torch.isfinite(logvar).all()
    assert not torch.allclose(plain(x, sigma, labels), plain(x, sigma, None))  # the class matters
    assert not torch.allclose(plain(x, sigma, labels), plain(x, sigma * 2, labels))  # so does sigma
    # EDM2's layout loads into a fresh EDM2Precond, strictly
    fresh = EDM2Precond(tiny_unet(seed=3, label_dim=5), label_dim=5)
    fresh.load_state_dict(edm2.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x, sigma, labels), denoised)


def test_label_dropout_zeroes_the_class_in_training():
    net = tiny_unet(label_dim=5, label_dropout=1.0)
    x, c, labels = torch.randn(2, 3, 8, 8), torch.zeros(2), torch.tensor([1, 3])
    net.train()
    dropped = net(x, c, labels)
    net.eval()
    torch.testing.assert_close(dropped, net(x, c, None), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(net(x, c, labels), net(x, c, None))


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="out_channels"):
        EDM2UNet(img_resolution=8, in_channels=3, out_channels=1)
    with pytest.raises(ValueError, match="divisible"):
        EDM2UNet(img_resolution=6, in_channels=3, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="channels_per_head"):
        build_network(dict(TINY, channels_per_head=5))
    assert network_config("tiny-edm2")["model_type"] == "EDM2UNet"


def test_jvp_of_the_student_matches_finite_differences():
    import torch.autograd.forward_ad as fwAD

    from pid_fast.loss.forward_ad_ops import ForwardADAttention

    net = tiny_unet().eval()
    x, c = torch.randn(2, 3, 8, 8), torch.tensor([-0.5, 0.7])
    with ForwardADAttention(), fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(net(x, fwAD.make_dual(c, torch.ones_like(c))))
    eps = 1e-3
    central = (net(x, c + eps) - net(x, c - eps)) / (2 * eps)
    torch.testing.assert_close(primal, net(x, c))
    torch.testing.assert_close(tangent, central, atol=2e-3 * tangent.abs().max().item(), rtol=0)


@pytest.mark.parametrize("derivative", ["fd", "jvp"])
def test_pid_steps_with_an_edm2_teacher_lower_the_loss(derivative):
    teacher = EDMPrecond(tiny_unet(seed=0, label_dim=4), label_dim=4).eval().requires_grad_(False)
    student = copy.deepcopy(teacher.model).train().requires_grad_(True)
    with torch.no_grad():  # start away from the teacher so that there is something to learn
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loss_fn = PIDLoss(teacher, N=20, derivative=derivative, backend="reference")
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(4, (8,), generator=gen)
    indices = torch.arange(8) * 2 + 1
    losses = []
    for _ in range(12):
        loss = loss_fn(student, noise * 80.0, labels, indices=indices)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_mixed_precision_islands_find_edm2_time_path():
    """fp16-mixed / bf16-mixed (the CUDA default is fp16-mixed) keep EDM2's noise/label
    embedding, each block's emb_linear and out_conv in fp32; keep_fp32 raised before."""
    from pid_fast.models.networks import build_network
    from pid_fast.models.precision import FP32Forward, keep_fp32

    net = keep_fp32(build_network("tiny-edm2"), ["embedding", "modulation", "output", "stream"])
    islands = {n for n, m in net.named_modules() if isinstance(m.__dict__.get("forward"), FP32Forward)}
    for suffix in ("emb_noise", "emb_linear", "out_conv", "conv_skip"):
        assert any(n.endswith(suffix) for n in islands), (suffix, sorted(islands))

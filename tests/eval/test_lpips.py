"""LPIPSNorm against independent implementations: piq's LPIPS(replace_pooling=True), the
reference's norm, for pooling="avg"; the lpips package for pooling="max". Same random weights,
saved in the formats a user has, loaded into both; nothing touches the network."""

import socket
import types

import pytest
import torch
from torch.nn import functional as F

from pid_fast.eval.lpips import LPIPSNorm, AvgPoolVGG16LPIPS

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")  # one_thread: tests/conftest.py

HEAD_CHANNELS = (64, 128, 256, 512, 512)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("LPIPS tests must not touch the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def random_vgg16_features(seed):
    """torchvision's VGG16 conv stack with random weights (VGG's own init, small random biases)."""
    torch.manual_seed(seed)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    for layer in features:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            torch.nn.init.normal_(layer.bias, std=0.01)
    return features


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Backbone in torchvision's vgg16 state_dict layout (features.<i>.*; the 500 MB classifier,
    which LPIPS ignores, left out), heads as piq's list and as the lpips package's vgg.pth."""
    root = tmp_path_factory.mktemp("lpips")
    features = random_vgg16_features(seed=0)
    backbone = root / "vgg16-random.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, backbone)
    g = torch.Generator().manual_seed(1)
    heads = [torch.rand(1, c, 1, 1, generator=g) * 0.2 for c in HEAD_CHANNELS]
    piq_heads, lpips_heads = root / "lpips_weights.pt", root / "vgg.pth"
    torch.save(heads, piq_heads)
    torch.save({f"lin{k}.model.1.weight": h for k, h in enumerate(heads)}, lpips_heads)
    return types.SimpleNamespace(backbone=str(backbone), piq_heads=str(piq_heads),
                                 lpips_heads=str(lpips_heads), root=root)


def piq_lpips(monkeypatch, files):
    """piq.LPIPS(replace_pooling=True, reduction="none") as the reference builds it, with its two
    downloads (torchvision's vgg16 and the heads from piq's release URL) served from our files."""
    piq = pytest.importorskip("piq")
    import piq.perceptual

    def local_vgg16(*args, **kwargs):  # stands in for torchvision.models.vgg16(pretrained=True)
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        sd = torch.load(files.backbone, weights_only=True)
        features.load_state_dict({k[len("features."):]: v for k, v in sd.items()})
        return types.SimpleNamespace(features=features)

    def local_heads(url, *args, **kwargs):  # stands in for torch.hub.load_state_dict_from_url
        assert url == piq.LPIPS._weights_url
        return torch.load(files.piq_heads, weights_only=True)

    monkeypatch.setattr(piq.perceptual, "vgg16", local_vgg16)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", local_heads)
    return piq.LPIPS(replace_pooling=True, reduction="none")


def reference_norm(lpips, pred, target, size=224):
    """The reference's LPIPS norm (PID's karras_diffusion.py): bilinear resize, [-1,1] -> [0,1]."""
    pred = F.interpolate(pred, size=size, mode="bilinear")
    target = F.interpolate(target, size=size, mode="bilinear")
    return lpips((pred + 1) / 2.0, (target + 1) / 2.0)


def image_pair(batch, side, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(batch, 3, side, side, generator=g, dtype=dtype) * 2 - 1
    target = (pred + 0.3 * torch.randn(pred.shape, generator=g, dtype=dtype)).clamp(-1, 1)
    return pred, target


def loss_and_grad(norm, pred, target, weights):
    """Per-sample losses and d(sum_i weights_i * loss_i)/d pred (distinct weights keep samples apart)."""
    pred = pred.clone().requires_grad_(True)
    loss = norm(pred, target)
    (loss * weights).sum().backward()
    return loss.detach(), pred.grad


# ------------------------------------------------------------------------------------------
# pooling="avg" == piq's LPIPS(replace_pooling=True), the reference

def test_avg_pool_lpips_matches_piq_fp32_at_224(monkeypatch, weight_files):
    ours = LPIPSNorm(weight_files.backbone, lin_weights=weight_files.piq_heads)
    assert ours.pooling == "avg" and ours.resize == 224 and isinstance(ours.model, AvgPoolVGG16LPIPS)
    ref = piq_lpips(monkeypatch, weight_files)
    pred, target = image_pair(2, 32, seed=2)
    weights = torch.tensor([0.7, 1.3])
    loss, grad = loss_and_grad(ours, pred, target, weights)
    ref_loss, ref_grad = loss_and_grad(lambda p, t: reference_norm(ref, p, t), pred, target, weights)
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    assert torch.all(loss > 0) and torch.isfinite(grad).all() and grad.abs().max() > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())


def test_avg_pool_lpips_matches_piq_fp64(monkeypatch, weight_files):
    ours = LPIPSNorm(weight_files.backbone, lin_weights=weight_files.lpips_heads, resize=64).double()
    ref = piq_lpips(monkeypatch, weight_files)  # piq casts its network to the input's dtype
    pred, target = image_pair(3, 20, seed=3, dtype=torch.float64)
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    loss, grad = loss_and_grad(ours, pred, target, weights)
    ref_loss, ref_grad = loss_and_grad(lambda p, t: reference_norm(ref, p, t, size=64), pred, target, weights)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9 * ref_grad.abs().max().item())


def test_avg_pool_lpips_heads_and_backbone_formats_agree(weight_files):
    pred, target = image_pair(2, 32, seed=4)
    expected = LPIPSNorm(weight_files.backbone, lin_weights=weight_files.piq_heads, resize=None)(pred, target)
    # the lpips package's vgg.pth layout for the heads
    got = LPIPSNorm(weight_files.backbone, lin_weights=weight_files.lpips_heads, resize=None)(pred, target)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a full lpips.LPIPS vgg state_dict (net.slice<k>.<i>.*, lin<k>.model.1.weight) in one file
    sd = torch.load(weight_files.backbone, weights_only=True)
    slices = {range(0, 4): 1, range(4, 9): 2, range(9, 16): 3, range(16, 23): 4, range(23, 30): 5}
    full = {}
    for key, value in sd.items():
        index = int(key.split(".")[1])
        k = next(s for r, s in slices.items() if index in r)
        full[f"net.slice{k}.{key[len('features.'):]}"] = value
    full.update(torch.load(weight_files.lpips_heads, weights_only=True))
    full_path = weight_files.root / "lpips-full.pth"
    torch.save(full, full_path)
    got = LPIPSNorm(str(full_path), resize=None)(pred, target)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # its own state_dict round-trips as a single weights file
    own_path = weight_files.root / "own.pth"
    torch.save(LPIPSNorm(weight_files.backbone, lin_weights=weight_files.piq_heads).model.state_dict(), own_path)
    torch.testing.assert_close(LPIPSNorm(str(own_path), resize=None)(pred, target), expected, rtol=0, atol=0)


def test_avg_pool_lpips_default_heads_come_from_the_lpips_package(weight_files):
    pytest.importorskip("lpips")
    from pid_fast.eval.lpips import _lpips_package_heads_file

    package_file = _lpips_package_heads_file()
    pred, target = image_pair(2, 32, seed=5)
    got = LPIPSNorm(weight_files.backbone, resize=None)(pred, target)
    expected = LPIPSNorm(weight_files.backbone, lin_weights=package_file, resize=None)(pred, target)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, LPIPSNorm(weight_files.backbone, lin_weights=weight_files.piq_heads,
                                          resize=None)(pred, target))


def test_avg_pool_lpips_basic_properties(weight_files):
    norm = LPIPSNorm(weight_files.backbone, lin_weights=weight_files.piq_heads, resize=None)
    pred, target = image_pair(3, 32, seed=6)
    d = norm(pred, target)
    assert d.shape == (3,) and torch.all(d > 0)
    assert torch.all(norm(pred, pred) == 0)
    torch.testing.assert_close(norm(target, pred), d, rtol=1e-6, atol=0)  # symmetric
    torch.testing.assert_close(norm(pred[1:2], target[1:2]), d[1:2], rtol=1e-5, atol=0)  # per sample
    norm.train()
    assert not norm.model.training
    assert all(not p.requires_grad for p in norm.parameters())
    assert "pooling='avg'" in repr(norm)


def test_zero_feature_vector_gets_a_finite_gradient():
    # piq divides by sqrt(sum_c f^2) + 1e-10; at an all-zero feature vector the value is 0 but
    # sqrt's derivative makes the gradient NaN. Ours: the same values, a finite gradient.
    g = torch.Generator().manual_seed(7)
    features = torch.rand(4, 8, 3, 3, generator=g, dtype=torch.float64)
    features[0, :, 1, 1] = 0
    features[3, :, 0, 2] = 0
    head = torch.rand(1, 8, 1, 1, generator=g, dtype=torch.float64)

    def piq_formula(f):
        unit = f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)
        return ((unit[:2] - unit[2:]) ** 2 * head).mean(dim=(2, 3))

    ours_in, piq_in = features.clone().requires_grad_(True), features.clone().requires_grad_(True)
    ours = AvgPoolVGG16LPIPS._layer_distance(ours_in, head, 2)
    expected = piq_formula(piq_in)
    torch.testing.assert_close(ours, expected, rtol=1e-14, atol=0)
    ours.sum().backward()
    expected.sum().backward()
    assert torch.isfinite(ours_in.grad).all() and not torch.isfinite(piq_in.grad).all()
    nonzero = features.pow(2).sum(1, keepdim=True).expand_as(features) > 0
    torch.testing.assert_close(ours_in.grad[nonzero], piq_in.grad[nonzero], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# pooling="max": today's behaviour, the lpips package's network

def test_max_pool_lpips_is_the_lpips_package(weight_files):
    lpips = pytest.importorskip("lpips")
    import warnings

    norm = LPIPSNorm(weight_files.backbone, pooling="max", lin_weights=weight_files.lpips_heads, resize=None)
    assert norm.pooling == "max" and isinstance(norm.model, lpips.LPIPS)
    with warnings.catch_warnings():  # torchvision's notice about pretrained=False
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False, model_path=weight_files.lpips_heads)
    sd = torch.load(weight_files.backbone, weights_only=True)
    ref.net.load_state_dict({k: sd[f"features.{k.split('.', 1)[1]}"] for k in ref.net.state_dict()})
    pred, target = image_pair(2, 32, seed=8)
    torch.testing.assert_close(norm(pred, target), ref(pred, target).reshape(2), rtol=1e-6, atol=0)
    # piq's heads file (a list) works for "max" too
    piq_file = LPIPSNorm(weight_files.backbone, pooling="max", lin_weights=weight_files.piq_heads, resize=None)
    torch.testing.assert_close(piq_file(pred, target), norm(pred, target), rtol=0, atol=0)
    avg = LPIPSNorm(weight_files.backbone, lin_weights=weight_files.lpips_heads, resize=None)
    assert not torch.allclose(avg(pred, target), norm(pred, target), rtol=1e-2)


def test_pooling_defaults_and_errors(tmp_path, weight_files):
    torch.manual_seed(0)
    alex = tmp_path / "alexnet-random.pth"
    torch.save({k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items()
                if k.startswith("features.")}, alex)
    assert LPIPSNorm(str(alex), net="alex", resize=32).pooling == "max"
    with pytest.raises(ValueError, match="only for net='vgg'"):
        LPIPSNorm(str(alex), net="alex", pooling="avg")
    with pytest.raises(ValueError, match="pooling must be one of"):
        LPIPSNorm(weight_files.backbone, pooling="mean")
    with pytest.raises(ValueError, match="VGG16 backbone"):
        LPIPSNorm(str(alex), net="vgg")  # alexnet weights for the average-pool VGG16
    with pytest.raises(FileNotFoundError, match="lin_weights"):
        LPIPSNorm(weight_files.backbone, lin_weights=str(tmp_path / "missing.pt"))
    no_heads = tmp_path / "no-heads.pt"
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, no_heads)
    with pytest.raises(ValueError, match="5 LPIPS VGG heads"):
        LPIPSNorm(weight_files.backbone, lin_weights=str(no_heads))
    with pytest.raises(ValueError, match="does not hold the LPIPS vgg heads"):  # lpips would ignore it
        LPIPSNorm(weight_files.backbone, pooling="max", lin_weights=str(no_heads))
    wrong = tmp_path / "wrong-heads.pt"
    torch.save([torch.ones(1, c + 1, 1, 1) for c in HEAD_CHANNELS], wrong)
    with pytest.raises(ValueError, match="5 LPIPS VGG heads"):
        LPIPSNorm(weight_files.backbone, lin_weights=str(wrong))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="readable"):
        LPIPSNorm(weight_files.backbone, lin_weights=str(bad))

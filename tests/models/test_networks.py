"""EDM U-Nets: parameter counts and state_dict layout of the published configs, and the
behaviour of the layers on small configs."""

import math

import pytest
import torch
import torch.nn.functional as F

from pid_fast.models.networks import (NETWORK_CONFIGS, Conv2d, DhariwalUNet, SongUNet, UNetBlock, build_network,
                               count_parameters, network_config)

TINY = ["tiny-ddpmpp", "tiny-ncsnpp", "tiny-adm"]


def randomize_(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    # EDM zero-initialises the output layers; perturb every weight so outputs are non-trivial.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


def labels_for(cfg, batch):
    return F.one_hot(torch.arange(batch) % cfg["label_dim"], cfg["label_dim"]).float() if cfg["label_dim"] else None


# ----------------------------------------------------------------------------------------
# Published configs (built on the meta device: no memory).
# The counts are those of EDM's training/networks.py for the same arguments, without
# map_augment (EDM's CIFAR-10 snapshots add augment_dim * noise_channels = 9 * 128 = 1152
# more, 55,733,891 in all; pid_fast drops that layer at import).

@pytest.mark.parametrize("name, expected", [
    ("cifar10-ddpmpp", 55_732_739),        # EDM paper: 55.73M
    ("cifar10-ddpmpp-cond", 55_734_147),   # + map_label 10 x 128 + 128
    ("cifar10-ncsnpp", 56_395_523),
    ("imagenet64-adm", 295_899_267),       # EDM paper: 295.90M
])
def test_published_parameter_counts(name, expected):
    net = build_network(name, device="meta")
    assert count_parameters(net) == expected


def test_ddpmpp_cifar10_state_dict_layout():
    sd = build_network("cifar10-ddpmpp", device="meta").state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["map_layer0.weight"] == (512, 128)              # emb = 4 * 128, positional 128
    assert shapes["map_layer1.weight"] == (512, 512)
    assert shapes["enc.32x32_conv.weight"] == (128, 3, 3, 3)
    assert shapes["enc.32x32_block0.skip.weight"] == (256, 128, 1, 1)  # 128 -> 2 * 128
    assert shapes["enc.32x32_block0.affine.weight"] == (256, 512)      # no adaptive scale
    assert shapes["enc.16x16_down.conv0.resample_filter"] == (1, 1, 2, 2)
    assert shapes["enc.16x16_down.skip.weight"] == (256, 256, 1, 1)    # resample_proj=True
    assert shapes["enc.16x16_block0.qkv.weight"] == (768, 256, 1, 1)
    assert "enc.32x32_block0.qkv.weight" not in shapes                 # attention only at 16x16
    assert "dec.8x8_in0.qkv.weight" in shapes and "dec.8x8_in1.qkv.weight" not in shapes
    assert "dec.16x16_block4.qkv.weight" in shapes and "dec.16x16_block3.qkv.weight" not in shapes
    assert shapes["dec.32x32_block0.conv0.weight"] == (256, 512, 3, 3)  # skip concatenation
    assert shapes["dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)
    assert "map_label.weight" not in shapes and not any("map_augment" in k for k in shapes)
    assert len(shapes) == 424                                          # as in EDM (without map_augment)


def test_ncsnpp_and_adm_state_dict_layout():
    ncsn = {k: tuple(v.shape) for k, v in build_network("cifar10-ncsnpp", device="meta").state_dict().items()}
    assert ncsn["map_noise.freqs"] == (128,)                           # 2 * 128 channels -> 128 freqs
    assert ncsn["map_layer0.weight"] == (512, 256)
    assert ncsn["enc.16x16_aux_residual.weight"] == (256, 3, 3, 3)
    assert ncsn["enc.16x16_aux_residual.resample_filter"] == (1, 1, 4, 4)
    assert ncsn["enc.8x8_aux_residual.weight"] == (256, 256, 3, 3)

    adm = {k: tuple(v.shape) for k, v in build_network("imagenet64-adm", device="meta").state_dict().items()}
    assert adm["map_layer0.weight"] == (768, 192)
    assert adm["map_label.weight"] == (768, 1000) and "map_label.bias" not in adm
    assert adm["enc.64x64_conv.weight"] == (192, 3, 3, 3)
    assert adm["enc.64x64_block0.affine.weight"] == (384, 768)         # adaptive scale and shift
    assert "enc.64x64_block0.qkv.weight" not in adm
    assert adm["enc.32x32_block0.qkv.weight"] == (1152, 384, 1, 1)
    assert adm["enc.8x8_block0.qkv.weight"] == (2304, 768, 1, 1)
    assert adm["dec.8x8_in0.qkv.weight"] == (2304, 768, 1, 1)
    assert adm["out_conv.weight"] == (3, 192, 3, 3)
    assert adm["enc.32x32_down.conv0.resample_filter"] == (1, 1, 2, 2)


def test_adm_head_count_follows_channels_per_head():
    net = build_network("imagenet64-adm", device="meta")
    assert net.enc["32x32_block0"].num_heads == 384 // 64
    assert net.enc["8x8_block0"].num_heads == 768 // 64
    song = build_network("cifar10-ddpmpp", device="meta")
    assert song.enc["16x16_block0"].num_heads == 1


def test_named_config_is_a_copy():
    cfg = network_config("tiny-ddpmpp", dropout=0.3)
    cfg["model_channels"] = 999
    assert NETWORK_CONFIGS["tiny-ddpmpp"]["model_channels"] == 16
    assert cfg["dropout"] == 0.3 and NETWORK_CONFIGS["tiny-ddpmpp"]["dropout"] == 0.0


# ----------------------------------------------------------------------------------------
# Behaviour on small configs.

@pytest.mark.parametrize("name", TINY)
def test_forward_shape_dtype_and_batch_independence(name):
    torch.manual_seed(0)
    cfg = network_config(name)
    net = randomize_(build_network(cfg)).eval()
    x = torch.randn(3, 3, 8, 8)
    noise = torch.randn(3)
    labels = labels_for(cfg, 3)
    with torch.no_grad():
        out = net(x, noise, labels)
        single = net(x[1:2], noise[1:2], labels[1:2] if labels is not None else None)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(out[1:2], single, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_output_depends_on_noise_level(name):
    cfg = network_config(name)
    net = randomize_(build_network(cfg)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = net(x, torch.full((2,), -1.0), labels_for(cfg, 2))
        b = net(x, torch.full((2,), 1.0), labels_for(cfg, 2))
    assert (a - b).abs().max() > 1e-3


def test_integer_class_labels_equal_one_hot():
    cfg = network_config("tiny-adm")
    net = randomize_(build_network(cfg)).eval()
    x, noise = torch.randn(4, 3, 8, 8), torch.randn(4)
    idx = torch.tensor([0, 3, 9, 3])
    with torch.no_grad():
        a = net(x, noise, idx)
        b = net(x, noise, F.one_hot(idx, 10).float())
        c = net(x, noise, F.one_hot(torch.tensor([1, 3, 9, 3]), 10).float())
    torch.testing.assert_close(a, b)
    assert (a[0] - c[0]).abs().max() > 1e-4 and torch.allclose(a[1:], c[1:], atol=1e-5)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, noise, torch.zeros(4, 7))


def test_dropout_only_in_training():
    cfg = network_config("tiny-ddpmpp", dropout=0.5)
    net = randomize_(build_network(cfg))
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2)
    net.train()
    torch.manual_seed(1)
    a = net(x, noise)
    torch.manual_seed(2)
    b = net(x, noise)
    assert (a - b).abs().max() > 1e-4
    net.eval()
    torch.testing.assert_close(net(x, noise), net(x, noise), atol=0, rtol=0)


def test_gradients_reach_every_parameter():
    cfg = network_config("tiny-ncsnpp")
    net = randomize_(build_network(cfg))
    net(torch.randn(2, 3, 8, 8), torch.randn(2)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_low_precision_activations_keep_fp32_weights():
    cfg = network_config("tiny-ddpmpp")
    net = randomize_(build_network(cfg)).eval()
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2)
    with torch.no_grad():
        ref = net(x, noise)
        low = net(x.bfloat16(), noise.bfloat16())
    assert low.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_group_norm_keeps_the_autocast_dtype(monkeypatch):
    """Under autocast the norms run in the autocast dtype with autocast off (CUDA autocast would
    upcast them to fp32 activations), outside it in the input's dtype; the network's output
    under bf16 autocast stays within bf16 rounding of fp32."""
    from pid_fast.models import layers

    calls = []
    real = F.group_norm

    def recording(x, *args, **kwargs):
        calls.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(layers.F, "group_norm", recording)
    net = randomize_(build_network(network_config("tiny-ddpmpp"))).eval()
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2)
    with torch.no_grad():
        ref = net(x, noise)
        assert calls and set(calls) == {(torch.float32, False)}
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, noise)
    assert calls and set(calls) == {(torch.bfloat16, False)}
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_attention_matches_explicit_softmax():
    # EDM's attention: qkv channels laid out [head, head_dim, 3]; w = softmax_k(q.k / sqrt(d)).
    torch.manual_seed(0)
    block = randomize_(UNetBlock(32, 32, emb_channels=8, attention=True, channels_per_head=8,
                                 init_zero=dict(init_weight=1)), scale=0.1).eval()
    assert block.num_heads == 4
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 8)
    with torch.no_grad():
        out = block(x, emb)
        # Reference: recompute the block step by step.
        h = block.conv0(F.silu(block.norm0(x)))
        scale, shift = block.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(shift + block.norm1(h) * (scale + 1))
        y = (block.conv1(h) + x) * block.skip_scale
        q, k, v = block.qkv(block.norm2(y)).reshape(2 * 4, 8, 3, 16).unbind(2)
        w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(8), dim=2)
        a = torch.einsum("nqk,nck->ncq", w, v).reshape(2, 32, 4, 4)
        ref = (block.proj(a) + y) * block.skip_scale
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_resampling_layers():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True)
    up = Conv2d(3, 3, kernel=0, up=True)
    # The (1, 1) filter is 2x2 box averaging down and nearest-neighbour up.
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    assert list(dict(down.named_buffers())) == ["resample_filter"]
    assert "resample_filter" not in Conv2d(3, 3, kernel=3).state_dict()
    # The (1, 3, 3, 1) filter has unit DC gain: a constant image stays constant inside.
    fir = Conv2d(3, 3, kernel=0, down=True, resample_filter=(1, 3, 3, 1))
    assert fir.resample_filter.shape == (1, 1, 4, 4)
    torch.testing.assert_close(fir(torch.ones(1, 3, 8, 8))[..., 1:-1, 1:-1], torch.ones(1, 3, 2, 2))
    with pytest.raises(ValueError, match="up and down"):
        Conv2d(3, 3, kernel=3, up=True, down=True)


def test_fused_residual_downsampling_matches_its_definition():
    # fused down: convolve at full resolution (padding w_pad + f_pad), then FIR with stride 2.
    torch.manual_seed(0)
    conv = Conv2d(3, 5, kernel=3, down=True, resample_filter=(1, 3, 3, 1), fused_resample=True)
    x = torch.randn(1, 3, 8, 8)
    y = F.conv2d(x, conv.weight, padding=2)
    y = F.conv2d(y, conv.resample_filter.tile([5, 1, 1, 1]), groups=5, stride=2) + conv.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(conv(x), y)
    assert conv(x).shape == (1, 5, 4, 4)


def test_invalid_configs_are_reported():
    with pytest.raises(ValueError, match="unknown name"):
        network_config("cifar100-huge")
    with pytest.raises(ValueError, match="model_type"):
        build_network(dict(network_config("tiny-ddpmpp"), model_type="UNet3D"))
    with pytest.raises(ValueError, match="invalid config"):
        build_network(network_config("tiny-ddpmpp", not_an_option=1))
    with pytest.raises(ValueError, match="img_resolution"):
        build_network(network_config("tiny-ddpmpp", img_resolution=6, channel_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="embedding_type"):
        SongUNet(8, 3, 3, embedding_type="learned")
    with pytest.raises(TypeError, match="config"):
        build_network(42)
    with pytest.raises(ValueError, match="channel_mult"):
        DhariwalUNet(8, 3, 3, channel_mult=())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", TINY)
def test_cuda_half_precision_matches_fp32(name, monkeypatch):
    # cuDNN runs fp32 convolutions in TF32 by default; compare true fp32 with the CPU.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = network_config(name)
    net = randomize_(build_network(cfg)).eval()
    x, noise, labels = torch.randn(4, 3, 8, 8), torch.randn(4), labels_for(cfg, 4)
    with torch.no_grad():
        ref = net(x, noise, labels)
        gpu = net.cuda()
        labels_gpu = labels.cuda() if labels is not None else None
        out32 = gpu(x.cuda(), noise.cuda(), labels_gpu)
        # As EDM's use_fp16: fp16 activations, fp32 noise labels and class labels.
        out16 = gpu(x.cuda().half(), noise.cuda(), labels_gpu)
    torch.testing.assert_close(out32.cpu(), ref, atol=1e-4, rtol=1e-4)
    assert out16.dtype == torch.float16
    assert (out16.float().cpu() - ref).abs().max() < 0.02 * ref.abs().max()

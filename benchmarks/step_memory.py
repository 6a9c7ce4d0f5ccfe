"""Estimate the per-GPU memory of one PID training step, without a GPU.

Everything runs on the ``meta`` device (shapes only, no memory, no compute): the student's
forward of batch 2 x microbatch records every tensor autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``), the LPIPS network (VGG16 at 224 x 224, with
gradient to its input) likewise, and the persistent state is counted from the parameter
counts: student weights + gradients + optimizer state (RAdam/Adam: 2 tensors per weight) +
one copy per EMA rate, the teacher's weights (and LPIPS's). The teacher's own activations
run under no_grad and are freed layer by layer, so they are not counted; neither are the
CUDA context (~0.5 GiB), allocator fragmentation and cuDNN workspaces: add ~10-20%.

    python benchmarks/step_memory.py --network cifar10-ddpmpp --microbatch 64 --lpips
    python benchmarks/step_memory.py --network imagenet64-adm --microbatch 32 --lpips --label-dim 1000
    python benchmarks/step_memory.py --network sd15-unet --microbatch 4 --precision bf16   # text-to-image
    python benchmarks/step_memory.py --network edm2-img512-xxl --parallel fsdp --world-size 8
    python benchmarks/step_memory.py --table          # ddp vs fsdp at 8 ranks, markdown (ESTIMATES)

Per rank under ``--parallel`` (``per_rank``). ddp: every rank holds all of the above, plus DDP's
gradient buckets (one more fp32 copy of the gradients: gradient_as_bucket_view is off). fsdp
(config parallel 'fsdp', pid_fast.train.sharding): the student's weights, gradients, optimizer
state and EMAs, and with teacher sharding the teacher's weights, are divided by the number of
ranks; on top, the forward/backward gathers about two FSDP units (the current block and the
prefetched next one) of the student to full size with their unsharded gradients, and two of the
teacher's. Activations do not shrink with sharding. Estimates, not measurements.

A diffusers UNet (``--network sd15-unet``: Stable Diffusion 1.5's UNet2DConditionModel config,
859.5M parameters, 4 x 64 x 64 latents, 77 x 768 CLIP embeddings; or ``--network diffusers:PATH``
with a UNet's config.json) is built on the meta device the same way and run with
encoder_hidden_states [2 x microbatch, text length, cross_attention_dim]. A text-to-image run keeps
its prompt embeddings on the host (pid_fast.train.prompts: a step copies the rows it draws), never
loads the text encoder on a GPU, and loads the VAE only on the process that writes sample grids, so
none of them is counted; the teacher's classifier-free-guidance batch (2 x 2 x microbatch under
no_grad) is transient like every teacher activation.
"""

from __future__ import annotations

import argparse
import json

import torch

from pid_fast.models.networks import build_network, count_parameters, network_config

GIB = 1024 ** 3


def _saved_bytes(run) -> int:
    """Bytes of the distinct tensors autograd saves while ``run()`` builds its graph."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()  # tensors saved twice (views, or by two ops) count once
        seen[storage._cdata] = max(seen.get(storage._cdata, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def _activation_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# Stable Diffusion 1.5's UNet2DConditionModel (its unet/config.json, the keys that shape it)
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "norm_num_groups": 32}
SD15_TEXT = (77, 768)  # CLIP ViT-L/14's tokens and width


def diffusers_unet_config(network: str) -> dict | None:
    """The UNet2DConditionModel config of 'sd15-unet' or 'diffusers:PATH' (a config.json), else None."""
    if network == "sd15-unet":
        return dict(SD15_UNET)
    if network.startswith("diffusers:"):
        with open(network[len("diffusers:"):]) as f:
            return {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    return None


def diffusers_estimate(unet_cfg: dict, microbatch: int, precision: str, text_len: int) -> tuple[int, int]:
    """(parameters, saved bytes) of a diffusers UNet2DConditionModel's forward of batch 2 x microbatch
    with encoder_hidden_states, built and run on the meta device."""
    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_cfg).requires_grad_(True)
    params = sum(p.numel() for p in unet.parameters())
    dtype = _activation_dtype(precision)
    size, ch = int(unet_cfg["sample_size"]), int(unet_cfg["in_channels"])
    x = torch.empty(2 * microbatch, ch, size, size, device="meta", dtype=dtype)
    timesteps = torch.empty(2 * microbatch, device="meta", dtype=dtype)
    text = torch.empty(2 * microbatch, text_len, int(unet_cfg["cross_attention_dim"]), device="meta", dtype=dtype)
    if dtype != torch.float32:  # the 16-bit copies of the fp32 master weights that the layers use: the
        unet = unet.to(dtype)   # saved-tensor hooks see them (linear/conv save their weight), so they count once
    return params, _saved_bytes(lambda: unet(x, timesteps, encoder_hidden_states=text))


def student_activations(net_cfg: dict, microbatch: int, precision: str) -> int:
    net = build_network(net_cfg, device="meta").requires_grad_(True)
    res, ch = int(net_cfg["img_resolution"]), int(net_cfg["in_channels"])
    dtype = _activation_dtype(precision)
    label_dim = int(net_cfg.get("label_dim", 0))
    x = torch.empty(2 * microbatch, ch, res, res, device="meta", dtype=dtype)
    c_noise = torch.empty(2 * microbatch, device="meta", dtype=dtype)
    labels = torch.empty(2 * microbatch, label_dim, device="meta", dtype=dtype) if label_dim else None
    if dtype != torch.float32:  # the weights stay fp32 (master copy); layers cast them
        return _saved_bytes(lambda: net(x, c_noise, labels)) + 2 * count_parameters(net)
    return _saved_bytes(lambda: net(x, c_noise, labels))


def lpips_activations(microbatch: int, resize: int = 224) -> tuple[int, int]:
    """(saved bytes, parameter count) of VGG16's feature trunk on (pred, target) at ``resize``
    with gradient to pred (the target branch runs without gradient)."""
    from torchvision.models import vgg16

    features = vgg16().features.to("meta").requires_grad_(False)
    pred = torch.empty(microbatch, 3, resize, resize, device="meta", requires_grad=True)
    return _saved_bytes(lambda: features(pred)), sum(p.numel() for p in features.parameters())


def estimate(network: str, microbatch: int, precision: str, lpips: bool, ema_rates: int,
             label_dim: int | None, text_len: int = SD15_TEXT[0]) -> dict:
    unet_cfg = diffusers_unet_config(network)
    if unet_cfg is not None:
        params, student_saved = diffusers_estimate(unet_cfg, microbatch, precision, text_len)
    else:
        net_cfg = network_config(network) if label_dim is None else network_config(network, label_dim=label_dim)
        params = count_parameters(build_network(net_cfg, device="meta"))
        student_saved = student_activations(net_cfg, microbatch, precision)
    weight_bytes = 4 * params  # fp32 master weights
    persistent = {
        "student weights": weight_bytes,
        "student gradients": weight_bytes,
        "optimizer state (2 per weight)": 2 * weight_bytes,
        f"EMA copies ({ema_rates})": ema_rates * weight_bytes,
        "teacher weights": weight_bytes,
    }
    activations = {"student (batch 2 x %d)" % microbatch: student_saved}
    if lpips:
        saved, lpips_params = lpips_activations(microbatch)
        activations["LPIPS VGG16 at 224 (batch %d)" % microbatch] = saved
        persistent["LPIPS weights"] = 4 * lpips_params
    total = sum(persistent.values()) + sum(activations.values())
    return {"network": network, "parameters": params, "microbatch": microbatch, "precision": precision,
            "persistent_gib": {k: v / GIB for k, v in persistent.items()},
            "activations_gib": {k: v / GIB for k, v in activations.items()},
            "total_gib": total / GIB}


def _largest_unit(network: str, label_dim: int | None) -> int:
    """Parameters of the largest FSDP unit of a pid_fast network (pid_fast.train.sharding.fsdp_units;
    the root's own parameters count as one unit)."""
    from pid_fast.train.sharding import fsdp_units

    net_cfg = network_config(network) if label_dim is None else network_config(network, label_dim=label_dim)
    net = build_network(net_cfg, device="meta")
    units = [sum(p.numel() for p in unit.parameters()) for unit in fsdp_units(net)]
    return max(units + [count_parameters(net) - sum(units)])


def per_rank(out: dict, parallel: str, world_size: int, largest_unit: int, teacher_sharding: bool = True) -> dict:
    """``estimate``'s one-GPU numbers as one rank's of ``world_size`` under ddp or fsdp (see above)."""
    persistent = dict(out["persistent_gib"])
    weight_gib = 4 * out["parameters"] / GIB
    if parallel == "ddp":
        persistent["DDP gradient buckets"] = weight_gib if world_size > 1 else 0.0
    else:
        for key in persistent:
            if key.startswith(("student", "optimizer", "EMA")) or (key == "teacher weights" and teacher_sharding):
                persistent[key] /= world_size
        gathered = 2 if out["precision"] in ("bf16", "fp16") else 4  # pure 16-bit modes gather 16-bit weights
        persistent["FSDP gathered units (student: 2 x (weights + grads))"] = 2 * largest_unit * (gathered + 4) / GIB
        if gathered == 2:  # ... so autocast keeps no 16-bit copy of every weight (estimate's 2 bytes/param)
            out = {**out, "activations_gib": {k: v - 2 * out["parameters"] / GIB if k.startswith("student") else v
                                              for k, v in out["activations_gib"].items()}}
        if teacher_sharding:
            persistent["FSDP gathered units (teacher: 2 x weights)"] = 2 * largest_unit * 4 / GIB
    total = sum(persistent.values()) + sum(out["activations_gib"].values())
    return {**out, "parallel": parallel, "world_size": world_size, "persistent_gib": persistent, "total_gib": total}


TABLE_CASES = (("edm2-img512-xxl", None, 8, "bf16"), ("imagenet64-adm", 1000, 32, "fp16"))


def table(world_size: int = 8, ema_rates: int = 2) -> str:
    """The markdown table of TABLE_CASES, ddp vs fsdp at ``world_size`` ranks (estimates)."""
    lines = [f"Per-rank memory of one PID step at {world_size} ranks, {ema_rates} EMAs, l2 norm. ESTIMATES from "
             f"parameter counts and a meta-device trace of the student's saved activations (not measured; add "
             f"~10-20% for the CUDA context, fragmentation and workspaces):", "",
             "| network | params | microbatch / precision | parallel | weights, grads, optimizer, EMAs, teacher, "
             "buckets/gathered units (GiB) | student activations (GiB) | total per rank (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for network, label_dim, microbatch, precision in TABLE_CASES:
        one_gpu = estimate(network, microbatch, precision, False, ema_rates, label_dim)
        unit = _largest_unit(network, label_dim)
        for parallel in ("ddp", "fsdp"):
            out = per_rank(one_gpu, parallel, world_size, unit)
            state, acts = sum(out["persistent_gib"].values()), sum(out["activations_gib"].values())
            lines.append(f"| {network} | {out['parameters'] / 1e9:.2f}B | {microbatch} / {precision} | {parallel} "
                         f"| {state:.1f} | {acts:.1f} | {out['total_gib']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", default="cifar10-ddpmpp",
                   help="a pid_fast network name, sd15-unet, or diffusers:PATH (a UNet2DConditionModel config.json)")
    p.add_argument("--text-len", type=int, default=SD15_TEXT[0], help="a diffusers UNet's text tokens")
    p.add_argument("--microbatch", type=int, default=64, help="samples per accumulation round and GPU")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--lpips", action="store_true", help="count the LPIPS norm's VGG16")
    p.add_argument("--ema-rates", type=int, default=3)
    p.add_argument("--label-dim", type=int, default=None)
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default=None, help="one rank's memory under ddp or fsdp")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--replicated-teacher", action="store_true", help="fsdp with teacher_sharding false")
    p.add_argument("--table", action="store_true", help="ddp vs fsdp for edm2-img512-xxl and imagenet64-adm")
    args = p.parse_args()
    if args.table:
        print(table(args.world_size))
        return
    out = estimate(args.network, args.microbatch, args.precision, args.lpips, args.ema_rates, args.label_dim,
                   args.text_len)
    if args.parallel:
        out = per_rank(out, args.parallel, args.world_size, _largest_unit(args.network, args.label_dim),
                       not args.replicated_teacher)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

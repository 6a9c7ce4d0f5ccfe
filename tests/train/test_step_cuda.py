"""The trainer's fast GPU step (precision 'bf16': bf16 student and teacher; channels_last
'auto': NHWC networks; and torch.compile of the student) against the plain fp32 step on the same GPU.
Skipped without a GPU; run by benchmarks/gpu_check.sh."""

import json

import numpy as np
import pytest
import torch

from pid_fast.models.networks import build_network, network_config
from pid_fast.models.preconditioning import EDMPrecond
from pid_fast.train import apply_overrides, load_latest_checkpoint, train

NET = {"name": "tiny-ddpmpp", "model_channels": 16, "channel_mult": [1, 2], "attn_resolutions": [8]}


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(run_dir / "log.jsonl")]


@pytest.mark.cuda
@pytest.mark.parametrize("over", [{"precision": "bf16"}, {"precision": "bf16", "compile": True}],
                         ids=["bf16", "bf16+compile"])
def test_fast_gpu_step_matches_fp32_step(tmp_path, over):
    torch.manual_seed(0)
    teacher = EDMPrecond(build_network(network_config(**NET)))
    cfg = {"device": "cuda", "teacher": {"kind": "network", "network": NET, "precond": "edm", "seed": 0},
           "student": {"init": "teacher", "network": None}, "batch_size": 32, "total_steps": 6,
           "log_every": 1, "checkpoint_every": 6, "snapshot_every": 0, "progress": False,
           "ema_rates": [0.9], "optimizer": {"lr": 1e-4}}
    plain = apply_overrides(cfg, {"precision": "fp32", "channels_last": False, "loss.teacher_precision": None})
    train(plain, tmp_path / "plain", teacher=teacher)
    train(apply_overrides(cfg, over), tmp_path / "fast", teacher=teacher)
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "fast")
    assert len(a) == len(b) == 6 and np.all(np.isfinite(b))
    np.testing.assert_allclose(b, a, rtol=5e-2, atol=1e-4)
    (_, sa), (_, sb) = load_latest_checkpoint(tmp_path / "plain"), load_latest_checkpoint(tmp_path / "fast")
    for k, v in sa["model"].items():
        assert sb["model"][k].dtype == torch.float32  # fp32 master weights
        torch.testing.assert_close(sb["model"][k], v, rtol=0, atol=2e-3)


@pytest.mark.cuda
def test_pid_step_has_no_host_sync():
    """One fast step (PIDLoss with the fused ops, bf16 student and teacher, RAdam) never waits
    for the GPU: CUDA's sync debug mode turns any synchronising call into an error."""
    from pid_fast.loss import PIDLoss

    torch.manual_seed(0)
    net = build_network(network_config(**NET), device="cuda")
    teacher = EDMPrecond(net).eval().requires_grad_(False)
    student = build_network(network_config(**NET), device="cuda").train()
    pid = PIDLoss(teacher, norm="l2", teacher_precision="bf16")
    opt = torch.optim.RAdam(student.parameters(), lr=1e-4)
    noise = torch.randn(8, 3, 8, 8, device="cuda") * 80.0

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = pid(student, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step()  # first call: lazy initialisations (kernels, optimizer state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(torch.isfinite(x)) for x in losses)

"""EDM2's power-function EMA: the exponent of a sigma_rel, the averaging profile of the per-step
update, post-hoc reconstruction against a directly tracked power EMA, and the trainer's snapshots."""

import numpy as np
import pytest
import torch
from torch import nn

from pid_fast.train import apply_overrides, list_checkpoints, load_student, train
from pid_fast.train.power_ema import (PowerEMA, gamma_to_sigma_rel, list_snapshots, reconstruct, save_snapshot,
                                      sigma_rel_to_gamma, solve_coefficients, write_reconstructions)

pytestmark = pytest.mark.usefixtures("one_thread")

NET = {"name": "tiny-ddpmpp", "model_channels": 8, "channel_mult": [1], "attn_resolutions": []}


def test_sigma_rel_and_gamma():
    # EDM2's table: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.07, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    for bad in (0.0, -0.1, 0.29):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


class Scalar(nn.Module):
    def __init__(self, value=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value], dtype=torch.float64))


def test_update_averages_with_the_power_profile():
    """After t updates the power EMA weighs the weights of step k by (k^(g+1) - (k-1)^(g+1)) / t^(g+1)."""
    model = Scalar()
    ema = PowerEMA(model, [0.1])
    gamma, t = ema.gammas[0], 37
    for k in range(1, t + 1):
        model.w.data.fill_(float(k) ** 0.5)  # the weights after step k
        ema.update(model, k)
    k = np.arange(1, t + 1, dtype=np.float64)
    expected = float(((k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1) * k ** 0.5).sum())
    assert float(ema.models[0.1].w) == pytest.approx(expected, rel=1e-10)


def _trajectory(steps, dim=64, seed=0):
    """Weights after each step: a drift plus a random walk (a training run's character)."""
    g = torch.Generator().manual_seed(seed)
    walk = torch.randn(steps, dim, generator=g, dtype=torch.float64).cumsum(0) * 0.05
    drift = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None] * torch.randn(dim, generator=g, dtype=torch.float64)
    return walk + drift


class Vector(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))


@pytest.mark.parametrize("sigma_rel, step", [(0.07, 400), (0.15, 400), (0.035, 300)])
def test_reconstruction_matches_a_tracked_power_ema(tmp_path, sigma_rel, step):
    """Two stored sigma_rels (0.05, 0.10) every 20 steps rebuild a third one, tracked directly."""
    steps, dim = 400, 64
    path = _trajectory(steps, dim)
    model = Vector(dim)
    stored, direct = PowerEMA(model, [0.05, 0.10]), PowerEMA(model, [sigma_rel])
    meta = {"note": "test"}
    for k in range(1, steps + 1):
        model.w.data.copy_(path[k - 1])
        stored.update(model, k)
        direct.update(model, k)
        if k % 20 == 0:
            save_snapshot(str(tmp_path), k, stored, meta)
        if k == step:
            tracked = direct.models[sigma_rel].w.detach().clone()
    state, info = reconstruct(tmp_path, sigma_rel, step)
    assert info["step"] == step and all(term["step"] <= step for term in info["terms"])
    rebuilt = state["w"].double()
    # within 0.5% of the spread of the weights over the run (measured: 0.01-0.16%)
    spread = float((path[: step] - tracked).norm(dim=1).mean())
    assert float((rebuilt - tracked).norm()) < 0.005 * spread
    assert info["student"] == meta


def test_reconstructing_a_stored_profile_returns_it():
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)] * 3
    steps = [100, 100, 200, 200, 300, 300]
    x = solve_coefficients(gammas, steps, gammas[3], 200)
    np.testing.assert_allclose(x, np.eye(6)[3], atol=1e-6)


def test_trainer_stores_power_emas_and_they_reconstruct(tmp_path):
    cfg = {"device": "cpu", "teacher": {"kind": "network", "network": NET, "precond": "edm", "seed": 0},
           "student": {"init": "random", "network": NET, "seed": 1}, "batch_size": 4, "total_steps": 12,
           "log_every": 4, "checkpoint_every": 6, "snapshot_every": 0, "progress": False, "ema_rates": [0.9],
           "optimizer": {"lr": 1e-3}, "power_ema": {"sigma_rels": [0.05, 0.1], "snapshot_every": 4}}
    train(cfg, tmp_path / "run")
    assert [s for s, _ in list_snapshots(tmp_path / "run")] == [4, 8, 12]
    # resuming from step 6 gives the same power EMAs as the uninterrupted run
    train(apply_overrides(cfg, {"total_steps": 6}), tmp_path / "split")
    train(cfg, tmp_path / "split", resume=True)
    a = torch.load(dict(list_checkpoints(tmp_path / "run"))[12], weights_only=True)["power_ema"]
    b = torch.load(dict(list_checkpoints(tmp_path / "split"))[12], weights_only=True)["power_ema"]
    assert a.keys() == b.keys() == {"0.05", "0.1"}
    for key in a:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name])
    # the stored sigma_rel at a snapshot step comes back; the written checkpoint loads as a student
    state, _ = reconstruct(tmp_path / "run", 0.1, 12)
    for name, value in state.items():
        torch.testing.assert_close(value, a["0.1"][name], rtol=1e-5, atol=1e-6)
    paths = write_reconstructions(tmp_path / "run", [0.08], tmp_path / "post", steps=[8, 12])
    assert [p.endswith(f"checkpoint-{s:09d}.pt") for p, s in zip(paths, (8, 12))] == [True, True]
    net, meta = load_student(paths[-1])
    assert meta["step"] == 12 and sum(p.numel() for p in net.parameters()) > 0
    with pytest.raises(ValueError, match="no power-EMA snapshot"):
        reconstruct(tmp_path / "run", 0.1, 2)


def test_power_ema_config_is_checked():
    from pid_fast.train import resolve_config

    with pytest.raises(ValueError, match="power_ema.sigma_rels"):
        resolve_config({"power_ema": {"sigma_rels": [0.5]}})
    with pytest.raises(ValueError, match="power_ema.snapshot_every"):
        resolve_config({"power_ema": {"snapshot_every": -1}})


def test_cli_power_ema(tmp_path):
    from click.testing import CliRunner

    from pid_fast.cli import main

    cfg = {"device": "cpu", "teacher": {"kind": "network", "network": NET, "precond": "edm", "seed": 0},
           "student": {"init": "random", "network": NET, "seed": 1}, "batch_size": 4, "total_steps": 4,
           "log_every": 2, "checkpoint_every": 4, "snapshot_every": 0, "progress": False, "ema_rates": [0.9],
           "power_ema": {"sigma_rels": [0.05, 0.1], "snapshot_every": 2}}
    train(cfg, tmp_path / "run")
    res = CliRunner().invoke(main, ["power-ema", str(tmp_path / "run"), str(tmp_path / "post"), "--sigma-rel", "0.07",
                                    "--sigma-rel", "0.2", "--step", "4"])
    assert res.exit_code == 0, res.output
    assert "2 reconstructed checkpoint(s)" in res.output
    assert [s for s, _ in list_checkpoints(tmp_path / "post" / "sigma_rel-0.0700")] == [4]
    res = CliRunner().invoke(main, ["power-ema", str(tmp_path / "run"), str(tmp_path / "post"), "--sigma-rel", "0.5"])
    assert res.exit_code != 0 and "sigma_rel must be in" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["power-ema", str(empty), str(tmp_path / "post"), "--sigma-rel", "0.1"])
    assert res.exit_code != 0 and "no power-ema" in res.output

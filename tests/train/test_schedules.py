"""The learning-rate schedule, the grid-index sampler (uniform, importance, adaptive weighting)
and the coarse-to-fine grid schedule, alone and inside the trainer (exact resume, logged lr)."""

import json

import pytest
import torch

from pid_fast.loss.distillation import grid_times
from pid_fast.train import apply_overrides, list_checkpoints, resolve_config, train
from pid_fast.train.schedules import GridIndexSampler, check_coarse_to_fine, grid_size_at, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")

NET = {"name": "tiny-ddpmpp", "model_channels": 8, "channel_mult": [1], "attn_resolutions": []}


def test_lr_factor():
    assert [lr_factor(s) for s in (0, 10, 10_000)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, warmup_steps=4) for s in (0, 1, 3, 4, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    # EDM2's decay: constant until decay_steps, then 1 / sqrt(step / decay_steps)
    assert lr_factor(50, schedule="inv_sqrt", decay_steps=100) == 1.0
    assert lr_factor(400, schedule="inv_sqrt", decay_steps=100) == pytest.approx(0.5)
    assert lr_factor(1, warmup_steps=4, schedule="inv_sqrt", decay_steps=1) == pytest.approx(0.5)
    # cosine: from 1 to 0 at decay_steps, after the warm-up
    assert [lr_factor(s, schedule="cosine", decay_steps=100) for s in (0, 50, 100, 200)] == pytest.approx(
        [1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert lr_factor(0, warmup_steps=4, schedule="cosine", decay_steps=100) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, schedule="linear")


def test_coarse_to_fine_levels():
    levels = check_coarse_to_fine([[100, 4], [300, 84]], 250)
    assert [grid_size_at(s, 250, levels) for s in (0, 99, 100, 299, 300, 10_000)] == [4, 4, 84, 84, 250, 250]
    assert grid_size_at(5, 250, []) == 250
    # a nested grid: every coarse time is a time of the fine grid (the teacher sees the same times)
    coarse = grid_times(torch.arange(84), 84, 0.002, 80.0, 7.0, torch.float64)
    fine = grid_times(torch.arange(0, 250, 3), 250, 0.002, 80.0, 7.0, torch.float64)
    torch.testing.assert_close(coarse, fine, rtol=1e-12, atol=0)
    for bad in ([[100, 50]], [[100, 84], [50, 4]], [[100, 250]], [[100, 1]], "84", [[100]]):
        with pytest.raises(ValueError, match="coarse_to_fine"):
            check_coarse_to_fine(bad, 250)


def test_uniform_sampler_is_the_reference_draw():
    sampler = GridIndexSampler(250)
    a = sampler.draw_indices(torch.Generator().manual_seed(3), 64)
    b = torch.randint(0, 250, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and sampler.weights_for(a) is None and not sampler.uses_losses


def test_importance_sampling_follows_the_losses_and_stays_unbiased():
    N = 10
    sampler = GridIndexSampler(N, "importance", decay=0.0, uniform_mix=0.2)
    losses = torch.arange(1, N + 1, dtype=torch.float32)  # index i has loss i + 1
    sampler.observe(torch.arange(N), losses)
    probs = sampler._probabilities(N)
    torch.testing.assert_close(probs, 0.8 * losses.double() / losses.sum() + 0.02)
    draws = sampler.draw_indices(torch.Generator().manual_seed(0), 20_000)
    counts = torch.bincount(draws, minlength=N).double() / 20_000
    torch.testing.assert_close(counts, probs, atol=0.01, rtol=0)
    # E_p[w loss] = the uniform mean loss: weights 1 / (N p_i)
    weights = sampler.weights_for(torch.arange(N)).double()
    assert float((probs * weights * losses.double()).sum()) == pytest.approx(float(losses.mean()))


def test_adaptive_weighting_equalises_the_indices():
    sampler = GridIndexSampler(5, "uniform", "adaptive", decay=0.5)
    sampler.observe(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 2.0, 4.0, 8.0]))
    w = sampler.weights_for(torch.arange(5)).double()
    means = torch.tensor([1.0, 2.0, 4.0, 8.0, 15.0 / 4], dtype=torch.float64)  # unseen index 4: the mean of the seen
    torch.testing.assert_close(w * means, torch.full((5,), float(means.mean()), dtype=torch.float64))


def test_coarse_level_reads_and_feeds_the_fine_statistics():
    sampler = GridIndexSampler(250, "importance", decay=0.0)
    sampler.observe(torch.tensor([0, 1, 83]), torch.tensor([1.0, 5.0, 2.0]), n=84)  # coarse indices
    assert [float(sampler.count[i]) for i in (0, 3, 249, 1, 2)] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert float(sampler.loss_sum[3]) == 5.0
    assert sampler.draw_indices(torch.Generator().manual_seed(0), 100, n=84).max() < 84


def _config(**over):
    cfg = {"device": "cpu", "teacher": {"kind": "network", "network": NET, "precond": "edm", "seed": 0},
           "student": {"init": "random", "network": NET, "seed": 1}, "batch_size": 4, "total_steps": 8,
           "log_every": 1, "checkpoint_every": 4, "snapshot_every": 0, "progress": False, "ema_rates": [0.9],
           "optimizer": {"lr": 1e-3}}
    return apply_overrides(cfg, over)


@pytest.mark.parametrize("indices_per_noise", [1, 2])
def test_trainer_schedules_resume_exactly(tmp_path, indices_per_noise):
    """Warm-up + inverse-sqrt lr, importance sampling with adaptive weighting and a coarse level
    (with 1 and 2 grid points per noise): the logged lr follows the schedule, and a run resumed at
    step 4 equals the uninterrupted one."""
    cfg = _config(**{"lr_schedule": {"warmup_steps": 2, "decay": "inv_sqrt", "decay_steps": 4},
                     "grid": {"sampling": "importance", "weighting": "adaptive", "coarse_to_fine": [[3, 84]],
                              "indices_per_noise": indices_per_noise}})
    train(cfg, tmp_path / "full")
    train(apply_overrides(cfg, {"total_steps": 4}), tmp_path / "split")
    train(cfg, tmp_path / "split", resume=True)
    a = torch.load(dict(list_checkpoints(tmp_path / "full"))[8], weights_only=True)
    b = torch.load(dict(list_checkpoints(tmp_path / "split"))[8], weights_only=True)
    for key in ("model", "grid_sampler"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name])
    assert float(a["grid_sampler"]["count"].sum()) > 0
    # every drawn index is observed: 8 steps x 4 noises x k points, decayed by stats_decay
    assert float(a["grid_sampler"]["count"].sum()) == pytest.approx(
        4 * indices_per_noise * sum(0.99 ** s for s in range(8)), rel=1e-5)
    logs = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    lrs = {r["step"]: r["lr"] for r in logs if "lr" in r}
    # the lr logged at step s is the one the step s - 1 (0-based) used
    assert lrs[1] == pytest.approx(0.5e-3) and lrs[2] == pytest.approx(1e-3)
    assert lrs[8] == pytest.approx(1e-3 / (7 / 4) ** 0.5)
    split_logs = [json.loads(line) for line in open(tmp_path / "split" / "log.jsonl")]
    assert [r["loss"] for r in split_logs if "loss" in r] == [r["loss"] for r in logs if "loss" in r]


def test_uniform_default_is_the_reference_run(tmp_path):
    """The grid/lr keys at their reference values train exactly as without them."""
    base = _config(total_steps=2, checkpoint_every=2)
    explicit = apply_overrides(base, {"grid.sampling": "uniform", "grid.coarse_to_fine": [],
                                      "lr_schedule.decay": "constant", "lr_schedule.warmup_steps": 0})
    train(base, tmp_path / "a")
    train(explicit, tmp_path / "b")
    a = torch.load(dict(list_checkpoints(tmp_path / "a"))[2], weights_only=True)["model"]
    b = torch.load(dict(list_checkpoints(tmp_path / "b"))[2], weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad, key", [({"lr_schedule": {"decay": "linear"}}, "lr_schedule.decay"),
                                      ({"lr_schedule": {"warmup_steps": -1}}, "lr_schedule.warmup_steps"),
                                      ({"grid": {"sampling": "sorted"}}, "grid.sampling"),
                                      ({"grid": {"weighting": "snr"}}, "grid.weighting"),
                                      ({"grid": {"uniform_mix": 0}}, "grid.uniform_mix"),
                                      ({"grid": {"indices_per_noise": 0}}, "grid.indices_per_noise"),
                                      ({"grid": {"coarse_to_fine": [[10, 50]]}}, "grid.coarse_to_fine")])
def test_schedule_config_is_checked(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        resolve_config(bad)

"""The learning-rate schedule, the grid-index sampler (uniform, importance, adaptive and endpoint weighting)
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


@pytest.mark.parametrize("power", [1.0, 2.0, -1.0])
def test_endpoint_weighting_is_each_index_share_of_the_end_point(power):
    """w_i = (|t_i - t_i2| / t_i)^power over its grid mean, i2 the spec's neighbour (N - 2 for the
    last index), on the grid in use (a coarse level's own spacing); fixed, so nothing is observed."""
    times = (0.002, 80.0, 7.0)
    for n in (250, 84):
        sampler = GridIndexSampler(250, "uniform", "endpoint", times=times, power=power)
        i = torch.arange(n)
        t, t_next = grid_times(i, n, *times, dtype=torch.float64), grid_times(i + 1, n, *times, dtype=torch.float64)
        share = (t - t_next) / t
        share[-1] = (grid_times(torch.tensor(n - 2), n, *times, dtype=torch.float64) - t[-1]) / t[-1]
        expected = share ** power / (share ** power).mean()
        picked = torch.tensor([[0, n - 1], [n // 2, n - 2]])
        w = sampler.weights_for(picked, n)
        assert w.dtype == torch.float32 and w.shape == (2, 2)
        torch.testing.assert_close(w.double(), expected[picked], rtol=1e-6, atol=0)
        ratio = float(w[0, 1] / w[0, 0])  # sigma_min's index against T's: > 1 for power > 0, < 1 below
        assert (ratio > 4 ** power) if power > 0 else (ratio < 4 ** power)
        assert not sampler.uses_losses
    # with importance sampling the two factors multiply
    both = GridIndexSampler(5, "importance", "endpoint", times=times, power=power)
    both.observe(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 2.0, 4.0, 8.0]))
    only = GridIndexSampler(5, "importance", times=times)
    only.observe(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 2.0, 4.0, 8.0]))
    idx = torch.arange(5)
    torch.testing.assert_close(both.weights_for(idx).double(),
                               only.weights_for(idx).double() * both.endpoint_weights(5), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="times"):
        GridIndexSampler(5, "uniform", "endpoint")
    with pytest.raises(ValueError, match="weighting"):
        GridIndexSampler(5, "uniform", "snr", times=times)


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


def test_trainer_endpoint_weighting_uses_the_loss_grid(tmp_path, monkeypatch):
    """grid.weighting 'endpoint' in the trainer: each step's weights are the endpoint weights of
    the loss's own grid (the teacher's sigma range, rho, N) at the drawn indices; a resumed run
    equals the uninterrupted one."""
    seen = []
    original = GridIndexSampler.weights_for

    def recording(self, indices, n=None):
        weights = original(self, indices, n)
        seen.append((self.times, self.power, indices.clone(), weights))
        return weights

    monkeypatch.setattr(GridIndexSampler, "weights_for", recording)
    cfg = _config(**{"grid": {"weighting": "endpoint", "weighting_power": 2.0}, "loss": {"N": 40}})
    train(cfg, tmp_path / "full")
    assert len(seen) == 8
    expected = GridIndexSampler(40, "uniform", "endpoint", times=(0.002, 80.0, 7.0), power=2.0).endpoint_weights()
    for times, power, indices, weights in seen:
        assert times == pytest.approx((0.002, 80.0, 7.0)) and power == 2.0
        torch.testing.assert_close(weights.double(), expected[indices], rtol=1e-6, atol=0)
    train(apply_overrides(cfg, {"total_steps": 4}), tmp_path / "split")
    train(cfg, tmp_path / "split", resume=True)
    a = torch.load(dict(list_checkpoints(tmp_path / "full"))[8], weights_only=True)["model"]
    b = torch.load(dict(list_checkpoints(tmp_path / "split"))[8], weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_scale_groups_follow_the_patterns(tmp_path):
    """optimizer.lr_scale: the first matching pattern's factor times the scheduled lr, every
    other parameter at the base lr; the groups are in the checkpoint (resume keeps them)."""
    from pid_fast.train.builders import lr_scale_groups

    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    groups = lr_scale_groups(net.named_parameters(), {"0.*": 3.0, "*.bias": 0.5}, 1e-3)
    by_scale = {g["lr_scale"]: g for g in groups}
    assert set(by_scale) == {3.0, 0.5, 1.0} and by_scale[1.0]["params"] == [net[1].weight]
    assert [p is q for p, q in zip(by_scale[3.0]["params"], net[0].parameters())] == [True, True]
    assert by_scale[0.5]["params"] == [net[1].bias] and by_scale[0.5]["lr"] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match=r"optimizer\.lr_scale.*'map_\*'"):
        lr_scale_groups(net.named_parameters(), {"map_*": 2.0}, 1e-3)

    cfg = _config(**{"optimizer.lr_scale": {"map_*": 3.0}, "lr_schedule": {"warmup_steps": 4},
                     "total_steps": 2, "checkpoint_every": 2})
    train(cfg, tmp_path / "run")
    state = torch.load(dict(list_checkpoints(tmp_path / "run"))[2], weights_only=True)
    lrs = sorted((g["lr_scale"], g["lr"], len(g["params"])) for g in state["optimizer"]["param_groups"])
    names = [n for n in state["model"] if n.startswith("map_")]  # the state dict holds parameters only
    assert [s for s, _, _ in lrs] == [1.0, 3.0] and lrs[1][2] == len(names) > 0
    # the second step (0-based 1) ran at 2/4 of the lr, the map_* group at 3x that
    assert lrs[0][1] == pytest.approx(0.5e-3) and lrs[1][1] == pytest.approx(1.5e-3)
    plain = _config(total_steps=2, checkpoint_every=2, lr_schedule={"warmup_steps": 4})
    train(plain, tmp_path / "plain")
    a = torch.load(dict(list_checkpoints(tmp_path / "plain"))[2], weights_only=True)["model"]
    b = state["model"]
    assert any(not torch.equal(a[n], b[n]) for n in names)  # the scaled group moved differently


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
                                      ({"grid": {"weighting_power": 0}}, "grid.weighting_power"),
                                      ({"optimizer": {"lr_scale": {"map_*": 0}}}, "optimizer.lr_scale"),
                                      ({"optimizer": {"lr_scale": ["map_*"]}}, "optimizer.lr_scale"),
                                      ({"grid": {"uniform_mix": 0}}, "grid.uniform_mix"),
                                      ({"grid": {"indices_per_noise": 0}}, "grid.indices_per_noise"),
                                      ({"grid": {"coarse_to_fine": [[10, 50]]}}, "grid.coarse_to_fine")])
def test_schedule_config_is_checked(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        resolve_config(bad)

"""The drop-in loss inside an EDM-shaped training loop on 2 gloo processes: DDP gradients,
EDMPIDLoss (EDM's interface, picklable), snapshots converted and sampled in one step."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

import edm_standin as standin
from pid_fast.cli import main
from pid_fast.integrations.edm import EDMPIDLoss, one_step_generator
from pid_fast.io import load_edm_pickle, load_teacher, read_edm_checkpoint
from pid_fast.io.edm_pickle import UnknownGlobal
from pid_fast.loss import PIDLoss
from pid_fast.sampling import seeded_latents

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One run on 2 gloo processes (spawning costs seconds): the DDP gradient check, then the
    EDM-shaped loop with EDMPIDLoss and a snapshot at its last step."""
    from edm_fakes import hostile_source, sha256
    from pid_fast.io import edm_sources

    out = tmp_path_factory.mktemp("dropin")
    marker = out / "executed.txt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(edm_sources.KNOWN_EDM_SOURCES, sha256(hostile_source(marker)), "tests: stand-in snapshots")
        teacher_path = standin.teacher_file(str(out), marker)
        mp.spawn(standin.dropin_worker, nprocs=2, join=True,
                 args=(2, standin.free_port(), str(out), teacher_path, str(marker), (standin.LOOP["steps"],)))
        yield out, teacher_path, marker


def test_ddp_gradients_are_averaged_over_ranks_and_equal_one_process_on_the_whole_batch(two_processes):
    out, _, _ = two_processes
    ranks = [torch.load(out / f"grads-rank{r}.pt") for r in range(2)]
    single = standin.rank_gradients(0, 1)  # one process, the whole global batch
    for kind in ("raw", "preconditioned", "fsdp"):
        assert standin.relative(ranks[0][kind], ranks[1][kind]) <= 1e-6, kind
        assert standin.relative(ranks[0][kind], single[kind]) <= 1e-4, kind
    # DDP(EDMPrecond) called through: the same gradients as DDP of the raw network
    assert standin.relative(ranks[0]["preconditioned"], ranks[0]["raw"]) <= 2e-3
    # reaching ddp.module.model bypasses DDP's hooks: every rank keeps its own gradients
    assert standin.relative(ranks[0]["bypass"], ranks[1]["bypass"]) > 0.1


def _probe_loss(teacher, model):
    """The PID loss of a raw network on a fixed batch spread over the grid."""
    probe = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(123)) * 80
    with torch.no_grad():
        return float(PIDLoss(teacher)(model.eval(), probe, indices=torch.linspace(0, 249, 64).round().long()))


def test_edm_shaped_loop_trains_snapshots_convert_and_sample_in_one_step(two_processes, tmp_path):
    run_dir, teacher_path, marker = two_processes
    steps = standin.LOOP["steps"]
    result = torch.load(run_dir / "loop-result.pt")
    losses, (snapshot,) = result["losses"], result["snapshots"]
    assert len(losses) == steps and all(np.isfinite(losses))

    teacher = load_teacher(teacher_path)
    initial, _ = standin.make_network(seed=0)  # the student starts as the teacher (EDM's --transfer)
    trained, _ = standin.make_network(seed=0)
    trained.model.load_state_dict(result["ema"])
    assert _probe_loss(teacher, trained.model) < 0.7 * _probe_loss(teacher, initial.model)

    # the snapshot: ema converted, the pickled loss_fn an inert placeholder recording its grid
    top = load_edm_pickle(snapshot, unknown="placeholder")
    assert isinstance(top["loss_fn"], UnknownGlobal) and top["loss_fn"].state["sigma_max"] == 80.0
    converted = tmp_path / "student.safetensors"
    result = CliRunner().invoke(main, ["convert", snapshot, str(converted)])
    assert result.exit_code == 0, result.output
    assert "skipped loss_fn: pid_fast.integrations.edm.EDMPIDLoss (not an EDM class: kept as an inert" in result.output
    assert "skipped dataset_kwargs: a dict" in result.output
    ckpt = read_edm_checkpoint(snapshot)
    for key, value in ckpt.state_dict.items():
        assert torch.equal(value, result_ema(run_dir)[key]), key

    # one-step samples: x = (t/T) n + (1 - t/T) F(c n, ln(t)/4) at t = sigma_min, from both files
    seeds = [0, 1, 2, 3]
    z, _ = seeded_latents(seeds, (3, 8, 8), 0)
    t, T, sd = 0.002, 80.0, 0.5
    n = T * z
    with torch.no_grad():
        F = trained.model.eval()(n / (sd ** 2 + T ** 2) ** 0.5, torch.full((4,), np.log(t) / 4), None)
    expected = ((t / T) * n + (1 - t / T) * F).clamp(-1, 1)
    for source in (snapshot, str(converted)):
        out = tmp_path / f"samples-{os.path.basename(source)}.npz"
        run = CliRunner().invoke(main, ["sample", source, str(out), "--num", "4", "--batch", "4", "--device", "cpu"])
        assert run.exit_code == 0, run.output
        x = torch.from_numpy(np.load(out)["x"])
        assert (x - expected).abs().max() <= 1e-5, source
    net, meta = one_step_generator(converted)
    assert (meta["sigma_min"], meta["sigma_max"], meta["sigma_data"]) == (0.002, 80.0, 0.5)
    assert not marker.exists()


def result_ema(run_dir):
    return torch.load(run_dir / "loop-result.pt")["ema"]


def test_edm_loss_pickles_as_settings_and_the_teachers_path(tmp_path, marker):
    teacher_path = standin.teacher_file(str(tmp_path), marker)
    loss_fn = EDMPIDLoss(teacher=teacher_path)
    student, _ = standin.make_network(seed=0)
    images = torch.zeros(4, 3, 8, 8)
    torch.manual_seed(0)
    before = loss_fn(net=student, images=images, labels=torch.zeros(4, 0))
    blob = pickle.dumps(loss_fn)
    assert len(blob) < 2000  # no teacher weights in a snapshot
    clone = pickle.loads(blob)
    assert clone._loss is None  # rebuilt from the path on the first call
    torch.manual_seed(0)
    after = clone(net=student, images=images, labels=torch.zeros(4, 0))
    assert before.shape == images.shape and torch.equal(before, after)
    # EDM's reduction: the per-element mean is the PID loss; sum / B is C H W times it
    # (each sample's loss broadcast over its elements: equal means up to the summation order)
    per_sample = before[:, 0, 0, 0]
    assert torch.equal(before, per_sample[:, None, None, None].expand_as(before))
    torch.testing.assert_close(before.mean(), per_sample.mean(), rtol=1e-6, atol=0)
    assert json.loads(json.dumps({"teacher": loss_fn.teacher}))  # EDM writes loss_kwargs as JSON


def test_edm_loss_errors_name_the_argument(tmp_path, marker):
    teacher_path = standin.teacher_file(str(tmp_path), marker)
    with pytest.raises(FileNotFoundError, match="teacher: no such file"):
        EDMPIDLoss(teacher=str(tmp_path / "missing.pkl"))
    with pytest.raises(ValueError, match="norm must be one of"):
        EDMPIDLoss(teacher=teacher_path, norm="l3")
    with pytest.raises(ValueError, match="sigma_data=0.3 but the teacher"):
        EDMPIDLoss(teacher=teacher_path, sigma_data=0.3)
    loss_fn = EDMPIDLoss(teacher=teacher_path)
    student, _ = standin.make_network(seed=0)
    with pytest.raises(ValueError, match=r"augment_pipe: PID trains without data.*--augment=0"):
        loss_fn(net=student, images=torch.zeros(2, 3, 8, 8), augment_pipe=object())
    dropout_student, _ = standin.make_network(seed=0, dropout=0.13)
    with pytest.raises(ValueError, match=r"train-mode randomness.*--dropout=0"):
        loss_fn(net=dropout_student.train(), images=torch.zeros(2, 3, 8, 8))


def test_sample_refuses_other_weights_for_an_edm_snapshot(tmp_path, marker):
    teacher_path = standin.teacher_file(str(tmp_path), marker)
    run = CliRunner().invoke(main, ["sample", teacher_path, str(tmp_path / "x.npz"), "--weights", "model",
                                    "--device", "cpu"])
    assert run.exit_code == 1 and "holds one network, its EMA; pass 'auto' or 'ema'" in run.output


def test_convert_skips_unknown_and_malicious_entries_without_running_them(tmp_path, marker):
    from edm_fakes import Evil

    teacher, cfg = standin.make_network(seed=0)
    data = dict(ema=teacher.eval(), loss_fn=Evil(os.system, f"touch {marker}"),
                augment_pipe=Evil(eval, f"open({str(marker)!r}, 'w')"), dataset_kwargs={})
    src = tmp_path / "snap.pkl"
    standin.write_snapshot(src, data, cfg, marker)
    dst = tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["convert", str(src), str(dst)])
    assert result.exit_code == 0, result.output
    assert "skipped loss_fn: posix.system" in result.output and "skipped augment_pipe: builtins.eval" in result.output
    assert dst.exists() and not marker.exists()
    # the same payload inside the converted network is refused, still without running it
    bad = tmp_path / "bad.pkl"
    teacher.evil = Evil(os.system, f"touch {marker}")
    standin.write_snapshot(bad, dict(ema=teacher), cfg, marker)
    refused = CliRunner().invoke(main, ["convert", str(bad), str(tmp_path / "bad.safetensors")])
    assert refused.exit_code == 1 and "unsafe checkpoint: refusing to load posix.system" in refused.output
    assert not marker.exists()

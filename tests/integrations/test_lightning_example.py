"""examples/lightning_pid.py: PIDLoss inside a PyTorch Lightning module. On 2 CPU processes
(torchrun, gloo, Lightning's DDP) each process draws its own noise and both end with the weights
of one process that averages the two processes' gradients by hand; a run resumed from a Lightning
checkpoint ends with the uninterrupted run's student and EMA, bit for bit."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from edm_standin import free_port

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "lightning_pid.py")

pytest.importorskip("pytorch_lightning")


def _example():
    spec = importlib.util.spec_from_file_location("lightning_pid", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, tmp_path, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launch = [sys.executable, EXAMPLE] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
         str(free_port()), EXAMPLE]
    run = subprocess.run(launch + args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def _by_hand(example, steps: int, world: int) -> dict:
    """What DDP over ``world`` processes computes, in one process: each step, every rank's loss on
    its own inputs, gradients averaged over the ranks, one RAdam step, one EMA update."""
    module = example.PIDModule()
    optimizer = module.configure_optimizers()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for rank in range(world):
            g = example.step_generator(module.seed, step, rank)
            noise = torch.randn((module.batch, *module.shape), generator=g) * module.pid.sigma_max
            (module.pid(module.student, noise, generator=g) / world).backward()
        optimizer.step()
        example.update_ema(module.ema, module.student, module.ema_rate)
    return {"student": module.student.state_dict(), "ema": module.ema.state_dict()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k][n].double() - b[k][n].double()).abs().max()) for k in a for n in a[k])


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.double().reshape(-1) for v in state.values()])


def _rel_update_diff(a: dict, b: dict, start: dict) -> float:
    """|a - b| over |b - start| for the students' weights (L2): how far apart two runs' updates are."""
    return float((_flat(a["student"]) - _flat(b["student"])).norm() / (_flat(b["student"]) - _flat(start)).norm())


def test_lightning_ddp_on_two_processes_averages_the_gradients(tmp_path):
    out = _run(["--steps", "3", "--save", str(tmp_path / "ddp.pt")], tmp_path, nproc=2)
    rows = re.findall(r"process (\d) of 2: step 3 loss ([-+\d.e]+) weights checksum ([-+\d.e]+)", out)
    assert sorted(r[0] for r in rows) == ["0", "1"], out
    losses = {rank: float(loss) for rank, loss, _ in rows}
    assert losses["0"] != losses["1"]  # each process drew its own noise
    assert len({checksum for *_, checksum in rows}) == 1  # yet the weights agree

    ddp = torch.load(tmp_path / "ddp.pt")
    example = _example()
    start = example.PIDModule().student.state_dict()
    reference = _by_hand(example, steps=3, world=2)
    assert _rel_update_diff(ddp, reference, start) < 1e-4
    assert _max_diff(ddp, reference) < 1e-6
    single = _by_hand(example, steps=3, world=1)  # control: rank 0's gradients alone
    assert _rel_update_diff(ddp, single, start) > 0.1


def test_lightning_resume_from_its_checkpoint_is_exact(tmp_path):
    _run(["--steps", "4", "--ckpt-dir", "ck", "--every", "2", "--save", "full.pt"], tmp_path)
    assert (tmp_path / "ck" / "epoch=0-step=2.ckpt").exists()
    _run(["--steps", "4", "--resume", str(tmp_path / "ck" / "epoch=0-step=2.ckpt"), "--save", "resumed.pt"], tmp_path)
    full, resumed = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    assert _max_diff(full, resumed) == 0.0
    two = torch.load(tmp_path / "ck" / "epoch=0-step=2.ckpt", weights_only=False)["state_dict"]
    student_at_2 = {k[len("student."):]: v for k, v in two.items() if k.startswith("student.")}
    assert _max_diff({"s": full["student"]}, {"s": student_at_2}) > 0  # the resumed run did train 2 more steps

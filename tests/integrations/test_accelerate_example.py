"""examples/accelerate_pid.py on 2 CPU processes (torchrun, gloo): accelerate's prepare wraps the
bare diffusers UNet student in DDP, PIDLoss is called through it, and both processes end with the
same weights although each drew its own noise (gradients averaged)."""

import os
import re
import subprocess
import sys

import pytest

from edm_standin import free_port

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "accelerate_pid.py")


def test_the_accelerate_example_trains_on_two_cpu_processes_with_synchronised_weights():
    pytest.importorskip("accelerate")
    pytest.importorskip("diffusers")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), EXAMPLE, "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"step \d+  loss ([-+\d.]+(?:e[-+]\d+)?)", run.stdout)]
    assert len(losses) == 2 and all(v == v and abs(v) < float("inf") for v in losses)  # printed by process 0 only
    sums = dict(re.findall(r"process (\d) of 2: weights checksum ([-+\d.]+(?:e[-+]\d+)?)", run.stdout))
    assert sorted(sums) == ["0", "1"] and sums["0"] == sums["1"], run.stdout

"""The drop-in loss inside other people's trainers.

    edm.py   NVlabs/edm's training loop: EDMPIDLoss (EDM's loss interface, picklable into
             snapshots) and EDM snapshots as one-step generators (`pid-fast sample` / `fid`)

The plain ``pid_fast.loss.PIDLoss`` already takes the student as any trainer holds it (DDP,
FSDP, torch.compile, accelerate; raw or preconditioned): examples/accelerate_pid.py.
"""

from pid_fast.integrations.edm import EDMPIDLoss, one_step_generator

__all__ = ["EDMPIDLoss", "one_step_generator"]

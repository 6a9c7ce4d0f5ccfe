"""PID inside a plain, user-written training loop (runs on the CPU in a few seconds)."""
import copy

import torch

from pid_fast.loss import PIDLoss
from pid_fast.models.networks import build_network
from pid_fast.models.preconditioning import EDMPrecond

torch.manual_seed(0)
teacher = EDMPrecond(build_network("tiny-ddpmpp"))  # your trained teacher (e.g. pid_fast.io.load_teacher(path))
student = copy.deepcopy(teacher.model).train().requires_grad_(True)  # PID starts from the teacher's weights
pid = PIDLoss(teacher, N=250, norm="l2")  # freezes the teacher
opt = torch.optim.RAdam(student.parameters(), lr=2e-4)
for step in range(20):
    noise = torch.randn(8, 3, 8, 8) * pid.sigma_max  # n = T z, z ~ N(0, I)
    loss = pid(student, noise)  # one student forward of batch 2B, the teacher without grad
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    print(f"step {step:2d}  loss {loss.item():.5f}  worst sample {pid.last_per_sample.max().item():.5f}")

"""PID as the loss of an accelerate loop: the student is what accelerate's prepare returns (DDP
over all processes), passed to PIDLoss as it is; gradients are averaged over the processes.

    torchrun --nproc-per-node 2 examples/accelerate_pid.py [STEPS]      (2 CPU processes, gloo)
    accelerate launch --num_processes 8 examples/accelerate_pid.py      (8 GPUs)

A real teacher replaces the tiny random UNet (UNet2DModel.from_pretrained(..., subfolder="unet")).
"""
import copy
import sys

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel

from pid_fast.loss import PIDLoss
from pid_fast.models.diffusers_adapter import DiffusersDenoiser

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: several CPU processes (gloo)
torch.manual_seed(0)  # the same teacher on every process
unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=4)
teacher = DiffusersDenoiser.from_scheduler(unet, DDPMScheduler())  # D(x, sigma) of UNet + schedule
pid = PIDLoss(teacher, sigma_min=teacher.sigma_min).to(accelerator.device)  # frozen teacher inside
student = copy.deepcopy(unet).train().requires_grad_(True)  # a bare diffusers UNet, as the teacher
optimizer = torch.optim.RAdam(student.parameters(), lr=2e-4)
student, optimizer = accelerator.prepare(student, optimizer)  # DDP on several processes

torch.manual_seed(1 + accelerator.process_index)  # each process its own noise
for step in range(steps):
    noise = torch.randn(4, 1, 8, 8, device=accelerator.device) * pid.sigma_max  # n = T z, no data
    loss = pid(student, noise)  # called through DDP: gradients are all-reduced
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    accelerator.print(f"step {step}  loss {loss.item():.5f}", flush=True)
checksum = sum(float(p.detach().double().sum()) for p in accelerator.unwrap_model(student).parameters())
print(f"process {accelerator.process_index} of {accelerator.num_processes}: weights checksum {checksum!r}", flush=True)

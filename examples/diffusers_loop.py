"""PID in a diffusers-style training loop (runs on the CPU in a few seconds; accelerate optional).

Where a diffusers script trains a UNet with
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
PID distils a trained UNet into a one-step student with no data: the lines marked "PID" below.
With a real teacher, load it instead of the tiny random one:
    unet = UNet2DModel.from_pretrained("path/to/pipeline", subfolder="unet", local_files_only=True)
    noise_scheduler = DDPMScheduler.from_pretrained("path/to/pipeline", subfolder="scheduler")
"""
import copy

import torch
from diffusers import DDPMScheduler, UNet2DModel

from pid_fast.loss import PIDLoss
from pid_fast.models.diffusers_adapter import DiffusersDenoiser
from pid_fast.sampling import student_sample

try:  # accelerate is optional here: without it the loop is plain PyTorch on one device
    from accelerate import Accelerator
except ImportError:
    Accelerator = None

torch.manual_seed(0)
unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=4)  # your trained teacher (see above)
noise_scheduler = DDPMScheduler(prediction_type="epsilon")

teacher = DiffusersDenoiser.from_scheduler(unet, noise_scheduler)  # PID: D(x, sigma) of the UNet + schedule
student = copy.deepcopy(teacher.model).train().requires_grad_(True)  # PID: the student starts as the teacher
pid = PIDLoss(teacher, N=250, sigma_min=teacher.sigma_min, sigma_max=80.0)  # PID: the loss (teacher frozen)
optimizer = torch.optim.RAdam(student.parameters(), lr=2e-4)

accelerator = Accelerator() if Accelerator is not None else None
device = accelerator.device if accelerator is not None else torch.device("cpu")
if accelerator is not None:
    student, optimizer = accelerator.prepare(student, optimizer)
pid = pid.to(device)

for step in range(10):
    noise = torch.randn(8, 1, 16, 16, device=device) * pid.sigma_max  # PID: n = T z, no images needed
    loss = pid(student, noise)  # PID: replaces the MSE on the noise prediction
    optimizer.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    optimizer.step()
    print(f"step {step}  loss {loss.item():.5f}")

# One-step samples in [-1, 1]; `pid-fast export-diffusers` writes a trainer's student as a
# save_pretrained folder plus the constants of this call (pid_fast/io/diffusers_io.py).
student = accelerator.unwrap_model(student) if accelerator is not None else student
with torch.no_grad():
    images = student_sample(student.eval(), torch.randn(4, 1, 16, 16, device=device), sigma_min=pid.sigma_min,
                            sigma_max=pid.sigma_max, noise_labels=pid.noise_labels)
print("one-step samples:", tuple(images.shape))

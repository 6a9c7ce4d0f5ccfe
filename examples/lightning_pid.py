"""PID as the loss of a PyTorch Lightning module: the student, the EMA and the PID loss (with its
frozen teacher) are submodules; Lightning's DDP wraps the module and calls training_step through
the wrapper, so gradients are averaged over the processes. PID needs no data: each step's noise
and grid indices come from a generator seeded by (seed, step, rank), so a run resumed from a
Lightning checkpoint (`--resume`) draws what the uninterrupted run would have drawn.

    python examples/lightning_pid.py --steps 20                           (1 CPU process)
    torchrun --nproc-per-node 2 examples/lightning_pid.py --steps 20      (2 CPU processes, gloo)
    python examples/lightning_pid.py --steps 40 --resume CKPT             (continue a run)

A real teacher replaces the random tiny network (e.g. pid_fast.io.load_teacher(path)).
"""
import argparse
import copy
import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from pid_fast.loss import PIDLoss
from pid_fast.models.networks import build_network
from pid_fast.models.preconditioning import EDMPrecond
from pid_fast.train.ema import update_ema


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one process's inputs at one step (noise, then the grid indices)."""
    return torch.Generator().manual_seed(seed + 1_000_003 * rank + step)


class PIDModule(pl.LightningModule):
    def __init__(self, batch: int = 4, lr: float = 2e-4, ema_rate: float = 0.99, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)  # the same teacher (and so the same student) on every process
        teacher = EDMPrecond(build_network("tiny-ddpmpp"))  # your trained teacher
        self.student = copy.deepcopy(teacher.model).train().requires_grad_(True)  # starts at the teacher
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.pid = PIDLoss(teacher, N=250, norm="l2")  # freezes the teacher
        self.batch, self.lr, self.ema_rate, self.seed = batch, lr, ema_rate, seed
        net = teacher.model
        self.shape = (net.in_channels, net.img_resolution, net.img_resolution)

    def training_step(self, _, batch_idx):
        g = step_generator(self.seed, self.global_step, self.global_rank)
        noise = torch.randn((self.batch, *self.shape), generator=g) * self.pid.sigma_max  # n = T z, no data
        loss = self.pid(self.student, noise.to(self.device), generator=g)  # the grid indices from g too
        self.log("loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: Lightning runs the callbacks' on_train_batch_end (the
        # ModelCheckpoint) before the module's, so a checkpoint would miss this step's EMA update.
        update_ema(self.ema, self.student, self.ema_rate)

    def configure_optimizers(self):
        return torch.optim.RAdam(self.student.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(_Steps(), batch_size=None)


class _Steps(IterableDataset):
    """PID is data-free: an endless stream of placeholders, one per step."""

    def __iter__(self):
        while True:
            yield torch.zeros(())


def trainer(steps: int, ckpt_dir=None, every: int = 0) -> pl.Trainer:
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's processes (Lightning reads its env)
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1)] \
        if ckpt_dir else []
    return pl.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=steps,
                      logger=False, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      log_every_n_steps=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ckpt-dir", default=None, help="write Lightning checkpoints here")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps (with --ckpt-dir)")
    parser.add_argument("--resume", default=None, help="a Lightning checkpoint to continue from")
    parser.add_argument("--save", default=None, help="write the final student and EMA weights here (rank 0)")
    args = parser.parse_args(argv)
    module = PIDModule()
    fit = trainer(args.steps, args.ckpt_dir, args.every)
    fit.fit(module, ckpt_path=args.resume)
    checksum = sum(float(p.detach().double().sum()) for p in module.student.parameters())
    print(f"process {fit.global_rank} of {fit.world_size}: step {fit.global_step} "
          f"loss {float(fit.callback_metrics['loss']):.5f} weights checksum {checksum!r}", flush=True)
    if args.save and fit.global_rank == 0:
        torch.save({"student": module.student.state_dict(), "ema": module.ema.state_dict()}, args.save)


if __name__ == "__main__":
    main()

"""The training loop: ``train(config, run_dir)`` runs PID distillation as configured.

One step is the data path (``_Run.train_step``):

    draw the step's inputs (noise z, grid indices i, class labels) from (seed, step)
    -> for each accumulation round, this rank's rows of them:
         PIDLoss: the student at t and t2 as one batch of 2B -> assemble -> teacher
                  -> residual and loss (one fused pass)
         -> backward (DDP all-reduces the gradients on the last round only)
    -> clip -> optimizer -> EMA

and at log/checkpoint steps only (``_Run.sync_point``): read the loss window, stop on a
non-finite loss, log, checkpoint, snapshot.

Determinism. The random inputs of step s (the noise z, the grid indices i and the class
labels of the whole global batch) are drawn from a generator seeded with (seed, s), and each
rank / accumulation round takes its slice of them. Hence
- a resumed run sees exactly the inputs the uninterrupted run would have seen, and with the
  model, EMAs, optimizer and RNG states restored from the checkpoint it ends with
  bit-identical parameters on the CPU;
- W processes with accumulation A compute the gradient of the same global batch as one
  process (up to the summation order of the all-reduce).

Host syncs. The loop never reads the loss on every step: losses and the first non-finite
step are accumulated on the device (``LossWindow``) and read every ``log_every`` steps and
before every checkpoint, so a checkpoint is only written after the check passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from pid_fast.eval.images import save_image_grid
from pid_fast.models.diffusers_adapter import is_latent_network
from pid_fast.models.precision import autocast_for, needs_grad_scaler, prepare_network
from pid_fast.models.preconditioning import Preconditioning
from pid_fast.sampling import seeded_latents, student_sample
from pid_fast.train.builders import (build_loss, build_optimizer, build_student, build_teacher, given_teacher,
                                     resolve_precision, student_metadata)
from pid_fast.train.checkpoint import (CHECKPOINT_FORMAT, checkpoint_path, load_latest_checkpoint,
                                       read_checkpoint, remove_stale_temporaries, rng_state, save_checkpoint,
                                       seed_rngs, set_rng_state)
from pid_fast.train.config import check_resume_config, resolve_config
from pid_fast.train.distributed import (DistContext, all_gather_objects, all_reduce_sum, barrier,
                                        grad_sync, process_group, wrap_ddp)
from pid_fast.train.ema import EMA
from pid_fast.train.loss_window import LossWindow
from pid_fast.train.power_ema import PowerEMA, save_snapshot
from pid_fast.train.prompts import check_resumed_text, pipeline_decoder, prepare_text_conditions
from pid_fast.train.schedules import GridIndexSampler, grid_size_at, lr_factor
from pid_fast.train.sharded_checkpoint import load_sharded_state, read_sharded_meta, save_sharded_checkpoint
from pid_fast.train.sharding import device_mesh, full_state_dict, shard_network, total_grad_norm
from pid_fast.train.tracking import Trackers, check_trackers

__all__ = ["train", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing a checkpoint."""

    def __init__(self, step: int, value: float, last_checkpoint: Optional[str]):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                else "no checkpoint had been written yet")
        super().__init__(f"non-finite loss ({value}) at step {step}: training stopped; {kept}. Lower the "
                         f"learning rate, enable clip_grad_norm or use precision='fp32', then resume.")


def train(config: Optional[Mapping[str, Any]], run_dir: str | os.PathLike, *, resume: bool = False,
          teacher: Optional[Preconditioning] = None, threads: Optional[int] = None) -> dict:
    """Run PID distillation as configured (see DEFAULT_CONFIG) in ``run_dir``.

    resume: continue from the newest checkpoint of ``run_dir`` (a fresh start when there is
    none). teacher: a teacher object to use instead of building config['teacher'] (the config
    still describes the student). threads: torch CPU threads for this run (None: on a resume,
    the count the checkpoint recorded, else torch's current count); a resume with another count
    than the checkpoint's warns that it is no longer a bitwise continuation. torch's thread
    count is restored on return. Under torchrun (WORLD_SIZE > 1) or an initialised process
    group, trains with DDP, or with FSDP2 when config['parallel'] is 'fsdp' (also in one process).
    Returns a summary dict (step, loss, images_per_s, checkpoint).
    Raises NonFiniteLossError when the loss stops being finite.
    """
    cfg = resolve_config(config)
    run_dir = os.fspath(run_dir)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: expected None or an int >= 1, got {threads!r}")
    threads_before = torch.get_num_threads()
    try:
        with process_group(cfg["device"], single_process_group=cfg["parallel"] == "fsdp") as ctx, \
                _flush_denormals(ctx.device):
            run = _Run(cfg, run_dir, ctx, resume, teacher, threads)
            try:
                return run.run()
            finally:
                run.trackers.close()  # (also when the loss stops being finite)
    finally:
        torch.set_num_threads(threads_before)


@contextlib.contextmanager
def _flush_denormals(device: torch.device):
    """On the CPU, denormal floats are flushed to zero while training (they slow CPUs ~10x)."""
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


# --------------------------------------------------------------------------------------------
# The step's inputs: a function of (seed, step) only


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s inputs (a mix of the run's seed and the step)."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def draw_inputs(generator: torch.Generator, seed: int, global_batch: int, shape, num_points: int,
                label_dim: int, device, sampler: Optional[GridIndexSampler] = None, indices_per_noise: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The random inputs of one step for the whole global batch: latents z ~ N(0, I), grid
    indices i ~ UniformInt{0..N-1} (or as ``sampler`` draws them on the num_points grid) and
    uniform one-hot class labels (None if unconditional). With ``indices_per_noise`` k > 1 the
    indices are (global_batch, k): k independent grid points on each noise's trajectory."""
    generator.manual_seed(seed)
    noise = torch.randn((global_batch, *shape), generator=generator, device=device)
    count = global_batch * indices_per_noise
    if sampler is None:
        grid_indices = torch.randint(0, num_points, (count,), generator=generator, device=device)
    else:
        grid_indices = sampler.draw_indices(generator, count, num_points, device)
    if indices_per_noise > 1:
        grid_indices = grid_indices.reshape(global_batch, indices_per_noise)
    labels = None
    if label_dim:
        classes = torch.randint(0, label_dim, (global_batch,), generator=generator, device=device)
        labels = F.one_hot(classes, label_dim).float()
    return noise, grid_indices, labels


def _repeat_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row of ``x`` k times in a row (rows r, r, ..., r+1, ...): the layout of (B, k) indices."""
    return x if k == 1 else x.repeat_interleave(k, dim=0)


def _per_round_batch(global_batch: int, world_size: int, accum_rounds: int) -> int:
    """Rows per process and accumulation round."""
    if global_batch % (world_size * accum_rounds):
        raise ValueError(f"config['batch_size'] ({global_batch}) must be divisible by world_size x accum "
                         f"({world_size} x {accum_rounds})")
    return global_batch // (world_size * accum_rounds)


def _step_forward(loss_fn: nn.Module, model: nn.Module, sigma_max: float, compile_cfg: Any, world_size: int):
    """(model, loss_forward): the student as the loss calls it, and (noise z, labels, grid
    indices) -> the per-sample losses of those rows, compiled as config['compile'] says."""
    backend = None if compile_cfg is False else ("inductor" if compile_cfg is True else compile_cfg)
    if backend is not None and world_size > 1:  # DDP's bucketing needs the compiled frame to be its own module
        model = torch.compile(model, backend=backend)

    def loss_forward(noise, labels, grid_indices):
        # The student's input is n = T z; PIDLoss runs the student (2B), assemble, teacher, residual, norm.
        return loss_fn.per_sample(model, noise * sigma_max, labels, indices=grid_indices)

    if backend is not None and world_size == 1:  # the whole forward: student, fused ops and teacher in one graph
        loss_forward = torch.compile(loss_forward, backend=backend)
    return model, loss_forward


def _read_for_resume(path: str) -> dict:
    """A checkpoint as resume reads it: a .pt file whole; of a sharded folder only meta.pt (the
    shards are loaded into the sharded run, ``_Run._restore``)."""
    return read_sharded_meta(path) if os.path.isdir(path) else read_checkpoint(path)


# --------------------------------------------------------------------------------------------
# One run


class _Run:
    """One training run: its config, folder and process; the student, teacher (inside the
    loss), optimizer and EMAs; and where it stands (step, last checkpoint)."""

    def __init__(self, cfg: dict, run_dir: str, ctx: DistContext, resume: bool,
                 teacher: Optional[Preconditioning], threads: Optional[int] = None):
        self.run_dir, self.ctx = run_dir, ctx
        self.global_batch, self.accum_rounds = cfg["batch_size"], cfg["accum"]
        self.per_round_batch = _per_round_batch(self.global_batch, ctx.world_size, self.accum_rounds)
        self._prepare_run_dir()
        found = load_latest_checkpoint(run_dir, read=_read_for_resume) if resume else None
        self.last_checkpoint, checkpoint = found or (None, None)
        self.cfg = cfg if checkpoint is None else check_resume_config(checkpoint["config"], cfg)
        recorded = {} if checkpoint is None else checkpoint.get("machine", {})
        self._set_threads(threads, recorded.get("cpu_threads"))
        self._build(teacher, recorded)
        if checkpoint is not None:  # a text run's prompts and encoder must be the run's
            check_resumed_text(checkpoint.get("student", {}).get("text"), self.text, self.last_checkpoint)
        self.step = self._restore(checkpoint)
        del found, checkpoint  # (the loaded state's memory is free before training starts)
        self.model, self.loss_forward = _step_forward(
            self.loss_fn, self.net if self.sharded else wrap_ddp(self.net, ctx), float(self.cfg["loss"]["sigma_max"]),
            self.cfg["compile"], ctx.world_size)
        self.log_path = os.path.join(run_dir, "log.jsonl")
        if ctx.rank == 0:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(self.cfg, f, indent=2)
        # Fixed noise for the snapshots (per-seed generators: independent of the training RNG).
        self.snapshot_noise, self.snapshot_labels = seeded_latents(
            range(self.cfg["snapshot_num"]), self.image_shape, self.label_dim, device=ctx.device)
        if self.text is not None:  # a text teacher: the first prompts' embeddings
            self.snapshot_labels = self.text.first(self.cfg["snapshot_num"], ctx.device)
        self._decoder = None  # a latent teacher's VAE, loaded by the first snapshot (rank 0 only)
        self.last_log = {"loss": None, "images_per_s": None}
        self.grad_norm: Optional[torch.Tensor] = None  # the last step's, when clipping or a dashboard needs it
        self.trackers = Trackers(self.cfg["log"], run_dir, self.cfg, ctx.rank, resume_step=self.step)

    def _prepare_run_dir(self) -> None:
        if self.ctx.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            remove_stale_temporaries(self.run_dir)
        barrier(self.ctx)

    def _set_threads(self, threads: Optional[int], recorded: Optional[int]) -> None:
        """The CPU thread count of this run (pid_fast.train.threads): ``threads`` when given,
        else the resumed run's; a count other than the resumed run's warns once."""
        if self.ctx.device.type != "cpu":
            return
        if threads is None:
            threads = recorded if recorded is not None else torch.get_num_threads()
        if recorded is not None and threads != recorded and self.ctx.rank == 0:
            warnings.warn(f"resuming {self.last_checkpoint} with {threads} CPU threads, but the run used {recorded}: "
                          f"CPU kernels reduce in another order, so the resumed run is not the bitwise "
                          f"continuation of the run (omit --threads to keep {recorded})", stacklevel=4)
        torch.set_num_threads(threads)

    def _warn_machine_changes(self, recorded: Mapping[str, Any]) -> None:
        """One warning when the resumed run trained on another kind of machine: another device,
        number of processes (the all-reduce sums in another order) or CPU instruction set
        (another kernel)."""
        changed = [f"{key} {recorded[key]!r} -> {self.machine[key]!r}" for key in ("device", "world_size", "cpu_capability")
                   if key in recorded and recorded[key] != self.machine[key]]
        if changed and self.ctx.rank == 0:
            warnings.warn(f"resuming {self.last_checkpoint} on another machine ({'; '.join(changed)}): the resumed "
                          f"run is not the bitwise continuation of the run", stacklevel=5)

    def _build(self, teacher: Optional[Preconditioning], recorded: Mapping[str, Any]) -> None:
        """The teacher, the student, the loss, the optimizer and the EMAs; the 'auto' precision
        settings as the resumed run resolved them (``recorded``), else for this device."""
        cfg, device = self.cfg, self.ctx.device
        # a text teacher's prompt embeddings, cached in the run folder (rank 0 encodes, the others read)
        self.text = prepare_text_conditions(cfg["teacher"], self.run_dir, self.ctx)
        if teacher is not None:
            teacher, teacher_net = given_teacher(teacher, cfg["teacher"], device)
        else:
            teacher, teacher_net = build_teacher(cfg["teacher"], device,
                                                 None if self.text is None else self.text.negative)
        net, net_cfg = build_student(cfg["student"], teacher, teacher_net, device)
        modes = resolve_precision(cfg, device, recorded)
        self.machine = {"device": device.type, **modes,
                        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
                        "world_size": self.ctx.world_size, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        self._warn_machine_changes(recorded)
        if modes["channels_last"]:  # (the fused ops take any layout; convolutions prefer NHWC)
            net = net.to(memory_format=torch.channels_last)
            teacher = teacher.to(memory_format=torch.channels_last)
        self.precision = modes["precision"]
        self.net = prepare_network(net, self.precision)  # fp32 islands of a mixed mode (before DDP/compile)
        # fp16 modes: dynamic loss scaling (fp16's range is narrow); None otherwise
        self.grad_scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(self.precision) else None
        self.loss_fn = build_loss(cfg["loss"], teacher, device, modes["teacher_precision"])
        self.ema = EMA(net, cfg["ema_rates"])
        sigma_rels = cfg["power_ema"]["sigma_rels"]
        self.power_ema = PowerEMA(net, sigma_rels) if sigma_rels else None
        check_trackers(cfg["log"])  # on every rank, before any collective
        self.sharded = cfg["parallel"] == "fsdp"
        if self.sharded:
            self._shard(teacher_net)
        self.optimizer = build_optimizer(net.named_parameters(), cfg["optimizer"], device)  # (after sharding: DTensors)
        grid = cfg["grid"]
        self.grid_sampler = GridIndexSampler(cfg["loss"]["N"], grid["sampling"], grid["weighting"],
                                             decay=grid["stats_decay"], uniform_mix=grid["uniform_mix"], device=device,
                                             times=(self.loss_fn.sigma_min, self.loss_fn.sigma_max, self.loss_fn.rho),
                                             power=grid["weighting_power"])
        self.student_meta = student_metadata(net_cfg, teacher, cfg["loss"], self.loss_fn.sigma_data)
        if self.text is not None:
            self.student_meta["text"] = self.text.metadata()
        self.label_dim, self.image_shape = self.student_meta["label_dim"], tuple(self.student_meta["shape"])

    def _shard(self, teacher_net: Optional[nn.Module]) -> None:
        """parallel 'fsdp': the student, its EMA copies (sharded alike, so their update is local)
        and, with teacher_sharding (default), the teacher's network, each per block then root."""
        mesh = device_mesh(self.ctx.device)
        shard_network(self.net, mesh, self.precision)
        for copies in (self.ema, self.power_ema):
            for copy in ({} if copies is None else copies.models).values():
                shard_network(copy, mesh)
        if self.cfg["teacher_sharding"] is not False and isinstance(teacher_net, nn.Module) \
                and any(True for _ in teacher_net.parameters()):
            shard_network(teacher_net, mesh)

    def _emas(self) -> dict:
        return {"ema": self.ema, **({} if self.power_ema is None else {"power_ema": self.power_ema})}

    def _restore(self, checkpoint: Optional[Mapping[str, Any]]) -> int:
        """The step to start from: the checkpoint's, with the student, EMAs, optimizer and this
        rank's RNG state restored; or 0, with the RNGs seeded with seed + rank."""
        if checkpoint is None:
            seed_rngs(self.cfg["seed"] + self.ctx.rank)
            return 0
        if checkpoint.get("sharded"):  # model, optimizer and EMAs from this rank's shards
            load_sharded_state(self.last_checkpoint, self.net, self.optimizer, self._emas())
        else:
            self.net.load_state_dict(checkpoint["model"])
            self.ema.load_state_dict(checkpoint["ema"])
            if self.power_ema is not None:
                self.power_ema.load_state_dict(checkpoint["power_ema"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if "grid_sampler" in checkpoint:
            self.grid_sampler.load_state_dict(checkpoint["grid_sampler"])
        if self.grad_scaler is not None and "grad_scaler" in checkpoint:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
        states = checkpoint["rng"]
        set_rng_state(states[self.ctx.rank] if self.ctx.rank < len(states) else states[0], self.ctx.device)
        return int(checkpoint["step"])

    # ---- the loop

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        self.progress_bar = tqdm(total=cfg["total_steps"], initial=self.step, unit="step", dynamic_ncols=True,
                                 disable=not cfg["progress"] or self.ctx.rank != 0, desc="pid distill")
        if self.step == 0 and self.last_checkpoint is None:
            self.snapshot(0)
        window = LossWindow(self.step, self.ctx.device)
        generator = torch.Generator(self.ctx.device)
        while self.step < cfg["total_steps"]:
            window.add(self.train_step(generator))
            self.step += 1
            self.progress_bar.update(1)
            final = self.step == cfg["total_steps"]
            do_checkpoint = self.step % cfg["checkpoint_every"] == 0 or final
            if self.step % cfg["log_every"] == 0 or do_checkpoint:
                self.sync_point(window, do_checkpoint, final)
            elif self._snapshot_due(final):
                self.snapshot(self.step)
            every = cfg["power_ema"]["snapshot_every"]
            if self.power_ema is not None and every and (self.step % every == 0 or final):
                self._save_power_ema_snapshot()
        self.progress_bar.close()
        barrier(self.ctx)
        return {"step": self.step, "loss": self.last_log["loss"], "images_per_s": self.last_log["images_per_s"],
                "checkpoint": self.last_checkpoint, "run_dir": self.run_dir}

    def train_step(self, generator: torch.Generator) -> torch.Tensor:
        """One optimizer step on the global batch of ``self.step``; returns its loss as a device
        tensor (no host sync)."""
        cfg, accum_rounds, sampler = self.cfg, self.accum_rounds, self.grid_sampler
        grid_size = grid_size_at(self.step, cfg["loss"]["N"], cfg["grid"]["coarse_to_fine"])
        self.loss_fn.N = grid_size  # a coarse level's grid is nested in the N-point grid
        k = cfg["grid"]["indices_per_noise"]
        noise, grid_indices, labels = draw_inputs(generator, step_seed(cfg["seed"], self.step), self.global_batch,
                                                  self.image_shape, grid_size, self.label_dim, self.ctx.device,
                                                  sampler, indices_per_noise=k)
        if self.text is not None:  # the step's prompts, drawn from (seed, step) alone
            labels = self.text.draw(step_seed(cfg["seed"], self.step), self.global_batch, self.ctx.device)
        weights = sampler.weights_for(grid_indices, grid_size)  # shaped like grid_indices
        step_loss = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        # the per-sample losses of the global batch, only for a sampler that learns from them
        losses = (torch.zeros(grid_indices.shape, dtype=torch.float32, device=self.ctx.device)
                  if sampler.uses_losses else None)
        for round_index in range(accum_rounds):
            rows = self._rows(round_index)
            with grad_sync(self.model, self.ctx, sync=round_index == accum_rounds - 1):
                with self._autocast():
                    # k grid points per noise: each noise (and its label) repeated k times, one pass of k x rows
                    per_sample = self.loss_forward(_repeat_rows(noise[rows], k),
                                                   None if labels is None else _repeat_rows(labels[rows], k),
                                                   grid_indices[rows].reshape(-1))
                    loss = (per_sample if weights is None else per_sample * weights[rows].reshape(-1)).mean()
                self._backward(loss / accum_rounds)
            step_loss += loss.detach().float() / accum_rounds
            if losses is not None:
                losses[rows] = per_sample.detach().float().reshape(losses[rows].shape)
        if losses is not None:  # every rank folds in the whole global batch's losses
            all_reduce_sum(losses, self.ctx)
            sampler.observe(grid_indices.reshape(-1), losses.reshape(-1), grid_size)
        self._set_lr(self.step)
        self._optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.net)
        if self.power_ema is not None:
            self.power_ema.update(self.net, self.step + 1)
        return step_loss

    def _save_power_ema_snapshot(self) -> None:
        """power-ema-<step>.pt (rank 0; sharded EMAs are gathered on every rank first)."""
        state = full_state_dict(self.power_ema.state_dict()) if self.sharded else None
        if self.ctx.rank == 0:
            save_snapshot(self.run_dir, self.step, self.power_ema, self.student_meta, state)

    def _set_lr(self, step: int) -> None:
        schedule = self.cfg["lr_schedule"]
        lr = self.cfg["optimizer"]["lr"] * lr_factor(step, schedule["warmup_steps"], schedule["decay"],
                                                     schedule["decay_steps"])
        for group in self.optimizer.param_groups:  # (optimizer.lr_scale: per-group factors)
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def _rows(self, round_index: int) -> slice:
        """This rank's rows of the global batch in accumulation round ``round_index``: the batch is
        cut into accum_rounds x world_size blocks of per_round_batch rows, round-major."""
        block = round_index * self.ctx.world_size + self.ctx.rank
        return slice(block * self.per_round_batch, (block + 1) * self.per_round_batch)

    def _autocast(self):
        return autocast_for(self.precision, self.ctx.device.type)

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()

    def _optimizer_step(self) -> None:
        """Clip (on unscaled gradients) and step; with loss scaling, a step whose gradients
        overflowed is skipped and the scale lowered (GradScaler)."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        clip, log = self.cfg["clip_grad_norm"], self.cfg["log"]
        wanted = clip is not None or log["tensorboard"] or log["wandb"]  # the same on every rank: collective
        if self.sharded and wanted:  # the norm of the whole sharded model
            self.grad_norm = total_grad_norm(self.net.parameters(), clip)
        elif clip is not None:
            self.grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        elif wanted:
            self.grad_norm = total_grad_norm(self.net.parameters())
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    # ---- sync points: log, checkpoint, snapshot

    def sync_point(self, window: LossWindow, do_checkpoint: bool, final: bool) -> None:
        """Read the loss window (the host sync), stop on a non-finite loss, then log, write a
        checkpoint when due and a snapshot when due."""
        stats = window.read(self.ctx, self.global_batch)
        if stats.bad_step is not None:
            self.progress_bar.close()
            self._log({"step": stats.bad_step, "event": "non-finite loss", "last_checkpoint": self.last_checkpoint})
            raise NonFiniteLossError(stats.bad_step, stats.bad_loss, self.last_checkpoint)
        self.last_log = {"loss": stats.loss, "images_per_s": stats.images_per_s}
        self.progress_bar.set_postfix(loss=f"{stats.loss:.4g}", img_s=f"{stats.images_per_s:.1f}")
        grad_norm = None if self.grad_norm is None else float(self.grad_norm)
        self._log({"step": self.step, "loss": stats.loss, "images_per_s": stats.images_per_s,
                   "lr": self.optimizer.param_groups[0]["lr"], "time": time.time(),
                   **({} if grad_norm is None else {"grad_norm": grad_norm})})
        self.trackers.scalars(self.step, {"loss": stats.loss, "lr": self.optimizer.param_groups[0]["lr"],
                                          "grad_norm": grad_norm, "images_per_s": stats.images_per_s})
        if do_checkpoint:
            self.last_checkpoint = self.save_checkpoint()
        if self._snapshot_due(final):
            self.snapshot(self.step)
        window.reset()

    def _log(self, record: Mapping[str, Any]) -> None:
        """One line of log.jsonl (rank 0)."""
        if self.ctx.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> str:
        """The checkpoint of this step, written by rank 0 with every rank's RNG state (under fsdp a
        sharded folder, every rank writing its shards); its path."""
        rng_states = all_gather_objects(rng_state(self.ctx.device), self.ctx)
        if self.sharded:
            return save_sharded_checkpoint(
                self.run_dir, self.step, self.net, self.optimizer, self._emas(),
                {"step": self.step, "config": self.cfg, "world_size": self.ctx.world_size, "machine": self.machine,
                 "student": self.student_meta, "grid_sampler": self.grid_sampler.state_dict(), "rng": rng_states,
                 **({} if self.grad_scaler is None else {"grad_scaler": self.grad_scaler.state_dict()})},
                rank=self.ctx.rank, keep=self.cfg["keep_checkpoints"], barrier=lambda: barrier(self.ctx))
        if self.ctx.rank == 0:
            save_checkpoint(self.run_dir, self.step, {
                "format": CHECKPOINT_FORMAT, "step": self.step, "config": self.cfg, "world_size": self.ctx.world_size,
                "machine": self.machine,  # what this start chose from the machine: reused on resume
                "student": self.student_meta, "model": self.net.state_dict(), "ema": self.ema.state_dict(),
                **({} if self.power_ema is None else {"power_ema": self.power_ema.state_dict()}),
                "grid_sampler": self.grid_sampler.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng_states,
                **({} if self.grad_scaler is None else {"grad_scaler": self.grad_scaler.state_dict()})},
                keep=self.cfg["keep_checkpoints"])
        return checkpoint_path(self.run_dir, self.step)

    def _snapshot_due(self, final: bool) -> bool:
        every = self.cfg["snapshot_every"]
        return bool(every) and (self.step % every == 0 or final)

    def snapshot(self, at_step: int) -> None:
        """A PNG grid of one-step samples from the fixed snapshot noise (rank 0; under fsdp every
        rank runs the sharded student's forward, rank 0 keeps the images)."""
        if not self.cfg["snapshot_every"] or (self.ctx.rank != 0 and not self.sharded):
            return
        loss_cfg = self.cfg["loss"]
        self.net.eval()
        with torch.no_grad():
            x = student_sample(self.net, self.snapshot_noise, self.snapshot_labels, sigma_min=loss_cfg["sigma_min"],
                               sigma_max=loss_cfg["sigma_max"], sigma_data=self.loss_fn.sigma_data,
                               noise_labels=self.loss_fn.noise_labels,
                               clamp=self.text is None and not is_latent_network(self.student_meta["network"]))
            if self.ctx.rank != 0:
                self.net.train()
                return
            if self.text is not None:  # latents: decoded through the pipeline's VAE
                if self._decoder is None:
                    self._decoder = pipeline_decoder(self.text.info["pipeline"], self.ctx.device)
                x = self._decoder(x)
        self.net.train()
        if x.shape[1] in (1, 3):
            save_image_grid(x, os.path.join(self.run_dir, f"samples-{at_step:09d}.png"))
            self.trackers.images(at_step, x)

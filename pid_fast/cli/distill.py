"""`pid-fast distill` and `pid-fast sample`: click commands around pid_fast.train.
``register(group)`` attaches them to a click group (the `pid-fast` group of
pid_fast/cli/__init__.py).

    pid-fast distill --config configs/tiny-cpu.json --run-dir runs/tiny --total-steps 200
    torchrun --nproc_per_node 8 -m pid_fast.cli distill --config configs/cifar10-uncond.json --run-dir runs/c10
    pid-fast distill --config configs/cifar10-uncond.json --run-dir runs/c10 --resume
    pid-fast sample runs/tiny samples.npz --num 1000 --weights ema-0.999
    pid-fast sample --teacher ddpm-folder/ teacher.npz --sampler heun --steps 18   # teacher samples
    pid-fast export-diffusers runs/ddpm one-step/    # a diffusers student as a save_pretrained folder
"""

from __future__ import annotations

import os
import pickle

import click

from pid_fast.cli.requirements import require
from pid_fast.models.precision import PRECISION_MODES

__all__ = ["distill", "sample", "export_diffusers", "register"]

# What a missing or unreadable file (teacher, LPIPS weights, checkpoint) or a bad value raises
# before training starts; a command turns them into one `Error: ...` line.
_FILE_ERRORS = (FileNotFoundError, ValueError, pickle.UnpicklingError)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _resolve(config_path, overrides, named) -> dict:
    """The validated config: the file, then the --set overrides, then the named options."""
    from pid_fast.train import apply_overrides, load_config, resolve_config

    try:
        config = load_config(config_path) if config_path else {}
        config = apply_overrides(config, list(overrides))
        return resolve_config(apply_overrides(config, named))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


def _require_for(config) -> None:
    """The optional packages this config's run needs, checked before any work."""
    modules = ["PIL"] if config["snapshot_every"] > 0 else []  # the sample grids
    loss = config["loss"]
    avg_pooling = loss["lpips_pooling"] == "avg" or (loss["lpips_pooling"] is None and loss["lpips_net"] == "vgg")
    if loss["norm"] == "lpips" and not (avg_pooling and loss["lpips_lin_weights"]):
        modules.append("lpips")  # max pooling's network, or the default heads file (vgg.pth) it ships
    require("lpips", *modules)
    if config["log"]["tensorboard"]:
        require("tensorboard", "tensorboard")
    if config["teacher"]["kind"] == "diffusers":
        require("diffusers", "diffusers")


def _echo_sigma_range(config, run_dir, resume) -> None:
    """Print the PID grid's sigma range and the teacher's (pid_fast.train.builders.teacher_sigma_range):
    loss.sigma_min / sigma_max, else a resumed run's (its config.json), else the teacher's default."""
    import json

    from pid_fast.train.builders import teacher_sigma_range

    loss = dict(config["loss"])
    stored = os.path.join(run_dir, "config.json")
    if resume and (loss["sigma_min"] is None or loss["sigma_max"] is None) and os.path.isfile(stored):
        with open(stored) as f:
            ran = json.load(f).get("loss", {})
        loss = {k: ran.get(k) if loss[k] is None else loss[k] for k in ("sigma_min", "sigma_max")}
    try:
        default, own = teacher_sigma_range(config["teacher"])
    except _FILE_ERRORS as exc:  # e.g. a missing teacher folder
        raise click.ClickException(str(exc)) from None
    low, high = (default[0] if loss["sigma_min"] is None else loss["sigma_min"],
                 default[1] if loss["sigma_max"] is None else loss["sigma_max"])
    if _rank() == 0:
        click.echo(f"PID sigma range: {low:.6g} .. {high:.6g} (the teacher's: {own[0]:.6g} .. {own[1]:.6g}; "
                   f"loss.sigma_min / sigma_max, null for the teacher's own)")


def _choose_threads(config, threads, run_dir, resume):
    """The CPU thread count of the run (pid_fast.train.threads.choose_threads: --threads, else
    the resumed run's, else OMP_NUM_THREADS, else timed on the student), printed with the
    reason; None off the CPU (torch's count, --threads when given)."""
    import torch

    from pid_fast.train.threads import choose_threads, pick_threads_for_config, recorded_threads

    on_cpu = config["device"] == "cpu" or (config["device"] == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return threads
    recorded = recorded_threads(run_dir) if resume else None
    try:
        threads, why = choose_threads(threads, recorded, os.environ, lambda: pick_threads_for_config(config))
    except _FILE_ERRORS as exc:  # e.g. a missing teacher file
        raise click.ClickException(str(exc)) from None
    if _rank() == 0:
        click.echo(f"CPU threads: {threads} ({why})")
    return threads


@click.command("distill")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON (or YAML with PyYAML) config; unspecified keys take the defaults of "
                   "pid_fast.train.DEFAULT_CONFIG.")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for checkpoints, log.jsonl, sample grids and config.json.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --run-dir (fresh start if none).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config entry, e.g. --set optimizer.lr=1e-4 --set loss.norm=huber (repeatable; "
                   "values are parsed as JSON when they parse).")
@click.option("--total-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, default=None, help="Global batch size (all ranks, all accumulation rounds).")
@click.option("--accum", type=int, default=None, help="Gradient accumulation rounds per step.")
@click.option("--lr", type=float, default=None, help="Learning rate.")
@click.option("--precision", type=click.Choice(["auto", *PRECISION_MODES]), default=None,
              help="The student pass's precision (README: Precision; auto: fp16-mixed on CUDA, fp32 on the CPU).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--checkpoint-every", type=int, default=None, help="Write a checkpoint every K steps.")
@click.option("--snapshot-every", type=int, default=None, help="Write a PNG grid of one-step samples every K steps.")
@click.option("--log-every", type=int, default=None, help="Log loss and images/s every K steps.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default on the CPU: the resumed run's count, else OMP_NUM_THREADS when set, "
                   "else the faster of 1 and all cores, timed at start-up).")
@click.option("--parallel", type=click.Choice(["ddp", "fsdp"]), default=None,
              help="Data parallelism: ddp (every rank holds everything) or fsdp (FSDP2: student, optimizer state "
                   "and EMAs sharded per U-Net block; sharded DCP checkpoints). Default: the config's (ddp).")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard events to RUN_DIR/tensorboard (log.tensorboard).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def distill(config_path, run_dir, resume, overrides, total_steps, batch_size, accum, lr, precision, device, seed,
            checkpoint_every, snapshot_every, log_every, threads, parallel, tensorboard, no_progress) -> None:
    """Distil a diffusion teacher into a one-step student with PID."""
    from pid_fast.train import NonFiniteLossError, train

    named = {"total_steps": total_steps, "batch_size": batch_size, "accum": accum, "optimizer.lr": lr,
             "precision": precision, "device": device, "seed": seed, "checkpoint_every": checkpoint_every,
             "snapshot_every": snapshot_every, "log_every": log_every, "parallel": parallel}
    named = {k: v for k, v in named.items() if v is not None}
    if tensorboard:
        named["log.tensorboard"] = True
    if no_progress:
        named["progress"] = False
    config = _resolve(config_path, overrides, named)
    _require_for(config)
    _echo_sigma_range(config, run_dir, resume)
    threads = _choose_threads(config, threads, run_dir, resume)
    try:
        summary = train(config, run_dir, resume=resume, threads=threads)  # (restores torch's thread count)
    except NonFiniteLossError as exc:
        raise click.ClickException(str(exc)) from None
    except _FILE_ERRORS as exc:  # a missing teacher, an incompatible config on resume, ...
        raise click.ClickException(str(exc)) from None
    if _rank() == 0:
        loss = "n/a" if summary["loss"] is None else f"{summary['loss']:.6g}"
        ips = "n/a" if summary["images_per_s"] is None else f"{summary['images_per_s']:.1f}"
        click.echo(f"done: step {summary['step']}, loss {loss}, {ips} images/s, checkpoint {summary['checkpoint']}")


def _write_samples(x, labels, seeds, out: str, prompts=()) -> None:
    """OUT as PNGs or an .npz; a text model's .npz also holds each image's prompt ('prompts')."""
    import numpy as np

    from pid_fast.eval.images import save_images, to_uint8

    if out.endswith(".npz"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        extra = {"prompts": np.asarray([prompts[k % len(prompts)] for k in range(len(seeds))])} if prompts else {}
        np.savez(out, images=to_uint8(x), x=x.numpy(), seeds=np.asarray(seeds, dtype=np.int64),
                 labels=np.asarray([] if labels is None else labels.numpy(), dtype=np.int64), **extra)
    else:
        save_images(x, out, [f"{s:06d}" for s in seeds])


@click.command("sample")
@click.argument("paths", nargs=-1, required=True, metavar="[CHECKPOINT] OUT")
@click.option("--num", type=int, default=64, show_default=True, help="Number of images.")
@click.option("--seed-start", type=int, default=0, show_default=True,
              help="Image k uses seed seed_start + k (its latents and class label depend only on it).")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--weights", default="auto", show_default=True,
              help="'auto' (the slowest EMA that has forgotten the initial weights, else 'model'), 'model', "
                   "'ema' (the slowest EMA) or 'ema-<rate>', e.g. ema-0.9999.")
@click.option("--class-label", type=int, default=None, help="Fixed class for class-conditional models.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--vae", default=None, metavar="DIR", type=click.Path(exists=True, file_okay=False),
              help="A latent student (e.g. EDM2 img512): decode its samples with this local "
                   "diffusers AutoencoderKL folder (EDM2's latent scaling; a diffusers student's, e.g. a DiT's: the VAE's scaling_factor; pid_fast.eval.vae).")
@click.option("--teacher", "teacher_source", default=None, metavar="CONFIG|FOLDER|FILE",
              type=click.Path(exists=True),
              help="Sample a teacher instead of a student (then only OUT is given): a trainer config (its "
                   "'teacher'), a local diffusers folder or a teacher file (EDM .pkl, `pid-fast convert` output).")
@click.option("--sampler", type=click.Choice(["heun", "euler"]), default=None,
              help="--teacher: the ODE solver (default heun; diffusers' HeunDiscreteScheduler / "
                   "EulerDiscreteScheduler on grid 'scheduler').")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="--teacher: sampling steps (default 18; Heun makes 2 steps - 1 teacher calls).")
@click.option("--grid", type=click.Choice(["scheduler", "karras"]), default=None,
              help="--teacher: 'scheduler' (a diffusers teacher's own sigmas, timesteps and initial noise scale: "
                   "the samples diffusers gives; its default) or 'karras' (EDM's grid; the default otherwise).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="A text-to-image student or teacher: the prompt (repeatable: image k takes prompt k mod the "
                   "number given), encoded by the pipeline's text encoder; the latents are decoded by its VAE.")
def sample(paths, num, seed_start, batch, weights, class_label, device, vae, teacher_source, sampler, steps,
           grid, prompts) -> None:
    """One-step samples from a training CHECKPOINT (a file or a run folder; or an EDM snapshot .pkl
    trained with pid_fast's EDMPIDLoss, or its `pid-fast convert` file) into OUT, or with
    --teacher the teacher's ODE samples from the same per-seed latents: a folder of PNGs, or an
    .npz with 'images' (uint8 NHWC), 'x' (float32 NCHW in [-1, 1], unquantised), 'seeds' and 'labels'."""
    from pid_fast.cli.common import pick_device

    if num < 1:
        raise click.BadParameter("must be >= 1", param_hint="--num")
    if batch < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batch")
    wanted = 1 if teacher_source is not None else 2
    if len(paths) != wanted:
        raise click.UsageError(f"expected {'OUT (with --teacher)' if wanted == 1 else 'CHECKPOINT OUT'}, got "
                               f"{len(paths)} path(s): {' '.join(paths)}")
    if teacher_source is None:
        for option, value in (("--sampler", sampler), ("--steps", steps), ("--grid", grid)):
            if value is not None:
                raise click.UsageError(f"{option} applies to teacher samples only (with --teacher)")
    elif vae is not None:
        raise click.UsageError("--vae applies to student samples only (not with --teacher)")
    out = paths[-1]
    device = pick_device(device)
    if not out.endswith(".npz"):
        require(None, "PIL")  # PNG files
    if vae is not None:
        require("diffusers", "diffusers")
    seeds = list(range(seed_start, seed_start + num))
    if teacher_source is not None:
        _sample_teacher(teacher_source, out, seeds, batch, class_label, device, sampler or "heun", steps or 18, grid,
                        list(prompts))
        return
    checkpoint = paths[0]
    if not os.path.exists(checkpoint):
        raise click.BadParameter(f"Path {checkpoint!r} does not exist.", param_hint="'CHECKPOINT'")
    from pid_fast.eval.checkpoints import load_scored_student
    from pid_fast.train import generate

    try:
        net, meta, used = load_scored_student(checkpoint, weights=weights, device=device)
        decode, embeddings = None, _prompt_conditions(meta.get("text"), prompts, len(seeds), device)
        if embeddings is not None:  # a text student: latents decoded by its pipeline's VAE
            from pid_fast.train.prompts import pipeline_decoder
            decode = pipeline_decoder(meta["text"]["pipeline"], device)
        elif vae is not None:  # a latent student: its samples go through the VAE
            from pid_fast.eval.vae import student_decoder
            decode = student_decoder(vae, net, device=device)
        x, labels = generate(net, meta, seeds, batch=batch, device=device, class_label=class_label, decode=decode,
                             embeddings=embeddings)
    except (*_FILE_ERRORS, RuntimeError, ImportError) as exc:  # a damaged .pt; a diffusers student without diffusers
        raise click.ClickException(str(exc)) from None
    _write_samples(x, labels, seeds, out, list(prompts) if embeddings is not None else ())
    how = f"{used}, picked by the 'auto' rule" if weights == "auto" else used
    click.echo(f"{num} samples from {meta['path']} (step {meta['step']}, weights {how}) -> {out}")


def _prompt_conditions(text, prompts, count, device):
    """The prompt embeddings of a text student or teacher (``text``: its {'pipeline': folder}, or
    None), one per sample; a usage error for --prompt with other models or none with a text model."""
    if text is None:
        if prompts:
            raise click.UsageError("--prompt applies to text-to-image students and teachers only")
        return None
    if not prompts:
        raise click.UsageError(f"this model is text-conditioned (pipeline {text['pipeline']}): pass --prompt TEXT")
    from pid_fast.train.prompts import encode_for_sampling

    return encode_for_sampling(text["pipeline"], prompts, count, device)


def _sample_teacher(source, out, seeds, batch, class_label, device, solver, steps, grid, prompts=()) -> None:
    """`sample --teacher`: the teacher's ODE samples (pid_fast.train.teacher_samples); a
    text-to-image teacher's from --prompt, decoded by its VAE."""
    from pid_fast.train.prompts import pipeline_decoder, source_pipeline
    from pid_fast.train.teacher_samples import default_grid, load_sampling_teacher, teacher_samples

    if os.path.isdir(source):
        require("diffusers", "diffusers")
    try:
        teacher, shape, label_dim = load_sampling_teacher(source, device)
        pipeline = source_pipeline(source)
        embeddings = _prompt_conditions(None if pipeline is None else {"pipeline": pipeline}, prompts, len(seeds),
                                        device)
        decode = None if pipeline is None else pipeline_decoder(pipeline, device)
        grid = grid or default_grid(teacher)
        x, labels = teacher_samples(teacher, shape, label_dim, seeds, solver=solver, num_steps=steps, grid=grid,
                                    batch=batch, device=device, class_label=class_label, embeddings=embeddings,
                                    decode=decode)
    except (*_FILE_ERRORS, RuntimeError, ImportError) as exc:
        raise click.ClickException(str(exc)) from None
    _write_samples(x, labels, seeds, out, list(prompts) if embeddings is not None else ())
    calls = 2 * steps - 1 if solver == "heun" else steps
    click.echo(f"{len(seeds)} teacher samples from {source} ({solver}, {steps} steps = {calls} teacher calls, "
               f"grid {grid}) -> {out}")


@click.command("export-diffusers")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--weights", default="auto", show_default=True,
              help="'auto' (as for `sample`), 'model', 'ema' (the slowest EMA) or 'ema-<rate>'.")
@click.option("--overwrite", is_flag=True, help="Write into OUT even if it exists.")
def export_diffusers(checkpoint, out, weights, overwrite) -> None:
    """Export the diffusers student of a training CHECKPOINT (a file or a run folder) to OUT, a
    one-step diffusers pipeline: DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)
    loads it offline (OUT/model_index.json, OUT/pipeline_pid_one_step.py, OUT/unet/), and
    OUT/pid_one_step.json holds the constants of the one-step sample (pid_fast.io.diffusers_io)."""
    from pid_fast.cli.common import check_out
    from pid_fast.eval.checkpoints import load_scored_student
    from pid_fast.io.diffusers_io import export_one_step
    from pid_fast.models.diffusers_adapter import DiffusersUNet

    require("diffusers", "diffusers")
    check_out(out, overwrite)
    try:
        net, meta, used = load_scored_student(checkpoint, weights=weights, device="cpu")
    except (*_FILE_ERRORS, RuntimeError, ImportError) as exc:
        raise click.ClickException(str(exc)) from None
    if not isinstance(net, DiffusersUNet):
        raise click.ClickException(f"{meta['path']}: its student is not a diffusers UNet (teacher kind 'diffusers' "
                                   f"trains one); nothing to export")
    if meta.get("text"):  # a text-to-image student: with the teacher's text encoder, tokenizer and VAE
        from pid_fast.io.text_export import export_text_to_image

        try:
            settings = export_text_to_image(net, meta, out)
        except (*_FILE_ERRORS, OSError) as exc:  # e.g. the recorded teacher pipeline moved away
            raise click.ClickException(str(exc)) from None
        click.echo(f"student of {meta['path']} (step {meta['step']}, weights {used}) -> {out}: a one-step "
                   f"text-to-image diffusers pipeline (DiffusionPipeline.from_pretrained({out!r}, "
                   f"trust_remote_code=True)(prompt); text encoder, tokenizer and VAE copied from "
                   f"{meta['text']['pipeline']})")
        return
    settings = export_one_step(net, meta, out)
    click.echo(f"student of {meta['path']} (step {meta['step']}, weights {used}) -> {out}: a one-step diffusers "
               f"pipeline (DiffusionPipeline.from_pretrained({out!r}, trust_remote_code=True); timestep "
               f"{settings['timestep']:.4g}, settings in pid_one_step.json)")


def register(group: click.Group) -> None:
    """Attach `distill`, `sample`, `power-ema`, `teacher-share` and `export-diffusers` to a click group (e.g.
    pid_fast.cli.main)."""
    from pid_fast.cli.power_ema import power_ema, teacher_share

    group.add_command(distill)
    group.add_command(sample)
    group.add_command(power_ema)  # EDM2's post-hoc EMA of a run's power-EMA snapshots
    group.add_command(teacher_share)  # a checkpoint blended with the run's initial weights
    group.add_command(export_diffusers)

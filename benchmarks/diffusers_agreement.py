"""Teacher samples against diffusers' own loops, and the export round trip through DiffusionPipeline.

1. Sampler agreement: a tiny random UNet2DModel (1 x 16 x 16, seed 0) under DDPMScheduler configs
   (epsilon / v_prediction x timestep_spacing leading / linspace / trailing, clip_sample off; plus
   zero terminal SNR, SD's scaled_linear with steps_offset 1, and EDMEulerScheduler), 16 latents:
   pid_fast's heun_sample / euler_sample with grid="scheduler" against diffusers' loop
   (scale_model_input -> UNet -> step, as its pipelines write it) with HeunDiscreteScheduler /
   EulerDiscreteScheduler (EDMEulerScheduler for the EDM teacher) built from the same config,
   from the same latents. Relative RMSE = ||mine - diffusers|| / ||diffusers||. The last column is
   heun_sample with grid="karras" (EDM's grid clipped to the teacher's range and capped at 80, start
   80 z; heun_sample's only grid before grid="scheduler", now the default for such teachers)
   against diffusers' Heun loop.
2. Export round trip: a 4-step PID run of the epsilon/leading teacher, `pid-fast sample` (8 seeds),
   `pid-fast export-diffusers`, then DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)
   with one generator per seed: max |pipeline - pid-fast sample|.

    OMP_NUM_THREADS=1 python benchmarks/diffusers_agreement.py     # writes results/diffusers_agreement.md
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile

import numpy as np
import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OUT_MD = os.path.join(RESULTS, "diffusers_agreement.md")
STEPS = 18
BATCH = 16


def tiny_unet(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


@torch.no_grad()
def diffusers_loop(unet, scheduler, z, steps):
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def rel_rmse(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt())


def agreement_rows(diffusers):
    from pid_fast.models.diffusers_adapter import denoiser_from_scheduler
    from pid_fast.sampling import ode_sample

    unet = tiny_unet(diffusers)
    z = torch.randn(BATCH, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    cases = [(f"DDPM linear, {p}, {s}", diffusers.DDPMScheduler(prediction_type=p, timestep_spacing=s,
                                                                 clip_sample=False))
             for p in ("epsilon", "v_prediction") for s in ("leading", "linspace", "trailing")]
    cases += [("DDPM zero terminal SNR, v_prediction, trailing",
               diffusers.DDPMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                       rescale_betas_zero_snr=True, clip_sample=False)),
              ("SD scaled_linear, epsilon, leading, steps_offset 1",
               diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, clip_sample=False)),
              ("EDMEulerScheduler, v_prediction, sigma_data 0.5",
               diffusers.EDMEulerScheduler(prediction_type="v_prediction"))]
    rows = []
    for name, scheduler in cases:
        teacher = denoiser_from_scheduler(unet, scheduler)
        edm = type(scheduler).__name__ == "EDMEulerScheduler"
        zero_snr = bool(scheduler.config.get("rescale_betas_zero_snr", False))
        row = {"teacher": name}
        for solver, loop_class in (("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")):
            if edm or (zero_snr and solver == "heun"):  # no EDM Heun / zero-SNR Heun loop in diffusers
                row[solver] = None
                continue
            reference = diffusers_loop(unet, getattr(diffusers, loop_class).from_config(scheduler.config), z, STEPS)
            with torch.no_grad():
                mine = ode_sample(teacher, z, solver=solver, num_steps=STEPS, grid="scheduler")
            row[solver] = (rel_rmse(mine, reference), float((mine - reference).abs().max()))
            if solver == "heun":
                with torch.no_grad():
                    row["karras"] = rel_rmse(ode_sample(teacher, z, solver="heun", num_steps=STEPS, grid="karras"),
                                             reference)
        if edm:
            reference = diffusers_loop(unet, diffusers.EDMEulerScheduler.from_config(scheduler.config), z, STEPS)
            with torch.no_grad():
                mine = ode_sample(teacher, z, solver="euler", num_steps=STEPS, grid="scheduler")
            row["euler"] = (rel_rmse(mine, reference), float((mine - reference).abs().max()))
        rows.append(row)
        print(row, flush=True)
    return rows


def dit_rows(diffusers):
    """A tiny random DiTTransformer2DModel (2 x 16 x 16 latents, patch 2, learned sigma, 5 classes):
    diffusers' loop calls it with integer classes (the null class 5 for the unconditional row) and
    steps with the prediction half of its output, as DiTPipeline does."""
    from pid_fast.models.diffusers_adapter import denoiser_from_scheduler, diffusers_loop as reference_loop
    from pid_fast.sampling import ode_sample

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                          num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=5).eval()
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False)
    teacher = denoiser_from_scheduler(dit, scheduler)
    z = torch.randn(BATCH, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    classes = torch.arange(BATCH) % 5
    rows = []
    for name, class_labels, labels in (("classes 0..4", classes, torch.nn.functional.one_hot(classes, 5).float()),
                                       ("null class", torch.full((BATCH,), 5), torch.zeros(BATCH, 5))):
        row = {"teacher": f"DiT (learned sigma), DDPM linear, epsilon, leading, {name}"}
        for solver in ("euler", "heun"):  # diffusers' Euler / Heun loop (pid_fast's diffusers_loop)
            with torch.no_grad():
                x = reference_loop(dit, scheduler.config, z, solver=solver, num_steps=STEPS, class_labels=class_labels)
                mine = ode_sample(teacher, z, labels, solver=solver, num_steps=STEPS, grid="scheduler")
            row[solver] = (rel_rmse(mine, x), float((mine - x).abs().max()))
        rows.append(row)
        print(row, flush=True)
    return rows


def export_round_trip(diffusers):
    from click.testing import CliRunner

    from pid_fast.cli import main
    from pid_fast.train import train

    with tempfile.TemporaryDirectory() as work:
        folder, run, out = (os.path.join(work, name) for name in ("teacher", "run", "one-step"))
        diffusers.DDPMPipeline(unet=tiny_unet(diffusers), scheduler=diffusers.DDPMScheduler()).save_pretrained(folder)
        train({"device": "cpu", "teacher": {"kind": "diffusers", "path": folder}, "loss": {"N": 50},
               "batch_size": 4, "total_steps": 4, "snapshot_every": 0, "progress": False, "ema_rates": [0.9],
               "optimizer": {"lr": 1e-3}}, run)
        runner = CliRunner()
        res = runner.invoke(main, ["sample", run, os.path.join(work, "s.npz"), "--num", "8", "--weights", "model"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(main, ["export-diffusers", run, out, "--weights", "model"])
        assert res.exit_code == 0, res.output
        pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
        x = pipe(generator=[torch.Generator().manual_seed(s) for s in range(8)], output_type="latent").images
        sampled = np.load(os.path.join(work, "s.npz"))["x"]
        files = sorted(os.listdir(out))
        return {"pipeline": type(pipe).__name__, "files": files,
                "max_abs": float(np.abs(x.numpy() - sampled).max()), "sample_range": float(np.abs(sampled).max())}


def _fmt(cell):
    return "n/a" if cell is None else f"{cell[0]:.1e} (max {cell[1]:.1e})"


def main() -> None:
    import diffusers

    torch.set_num_threads(1)
    rows = agreement_rows(diffusers) + dit_rows(diffusers)
    export = export_round_trip(diffusers)
    lines = [
        "# diffusers teachers: samples against diffusers' loops, and the export round trip",
        "",
        "`OMP_NUM_THREADS=1 python benchmarks/diffusers_agreement.py` (CPU; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}).",
        "",
        f"Tiny random UNet2DModel (1 x 16 x 16, 16/32 channels, attention at 8x8, seed 0), {BATCH} latents, "
        f"{STEPS} steps. Relative RMSE of pid_fast's sampler with `grid=\"scheduler\"` to diffusers' own loop "
        "(HeunDiscreteScheduler / EulerDiscreteScheduler, EDMEulerScheduler for the EDM teacher, built from "
        "the teacher's scheduler config) from the same latents; in brackets the max absolute difference. "
        "Last column: `heun_sample(..., grid=\"karras\")` (EDM's grid capped at 80, start 80 z; the only "
        "grid before `grid=\"scheduler\"`, which is now the default for a teacher with a scheduler) against "
        "diffusers' Heun loop.",
        "",
        "| teacher scheduler | Euler, grid=scheduler | Heun, grid=scheduler | Heun, grid=karras |",
        "|---|---|---|---|",
    ]
    for row in rows:
        karras = row.get("karras")
        lines.append(f"| {row['teacher']} | {_fmt(row['euler'])} | {_fmt(row['heun'])} | "
                     f"{'n/a' if karras is None else f'{karras:.1%}'} |")
    lines += [
        "",
        "DiT rows: a tiny random DiTTransformer2DModel (2 x 16 x 16 latents, patch 2, learned sigma, 5 "
        "classes, seed 0) called by diffusers' loop with integer classes and stepped with the prediction half "
        "of its output (as DiTPipeline); pid_fast's denoiser gets one-hot labels, all-zero for the null class.",
        "",
        "n/a: diffusers has no loop of that kind (no EDM Heun scheduler; HeunDiscreteScheduler has no "
        "rescale_betas_zero_snr, so a zero-terminal-SNR teacher's Heun samples use Euler's grid).",
        "",
        "## Export round trip",
        "",
        "A 4-step PID run of the DDPM (epsilon, leading) teacher, `pid-fast sample RUN s.npz --num 8`, "
        "`pid-fast export-diffusers RUN OUT`, then "
        "`DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)(generator=[Generator().manual_seed(s) "
        "for s in range(8)], output_type=\"latent\")`:",
        "",
        f"- loaded class: `{export['pipeline']}`; OUT holds {', '.join(f'`{f}`' for f in export['files'])}",
        f"- max |pipeline - pid-fast sample| = {export['max_abs']:.1e} (samples in [-{export['sample_range']:.2f}, "
        f"{export['sample_range']:.2f}])",
        "",
    ]
    os.makedirs(RESULTS, exist_ok=True)
    with open(OUT_MD, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

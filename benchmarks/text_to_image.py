"""Text-to-image PID on the tiny random pipeline of the tests (issue 29's closing numbers; CPU only).

The pipeline is tests/text/text_pipeline.py's: a random UNet2DConditionModel on 4 x 8 x 8
latents (cross-attention width 16), a 2-layer CLIPTextModel (12 tokens x 16), a 2-block
AutoencoderKL (16 x 16 RGB), SD's scaled_linear EulerDiscreteScheduler; 16 short prompts.

1. Step time with and without cached embeddings: the trainer's own step (`_Run.train_step`,
   classifier-free guidance w = 4: the teacher runs on 2B), median over timed steps after warm-up,
   against the same step plus what a trainer without the cache would add: encoding the step's
   drawn prompts with the text encoder; and the time a text encoder of SD-1.5's size (CLIP ViT-L/14,
   123M parameters, random weights) takes on one step's prompts. Wall time on this machine's CPU
   with 1 thread.
2. RMSE to the teacher: the per-sample RMSE between the student's one-step latents and the guided
   teacher's Heun samples (18 steps, EDM's grid on the PID range) from the same noise and prompt
   (pid_fast.eval.text_to_image.rmse_to_teacher), for the student before training (the teacher's
   copy) and after a short `train` run; evaluation seeds 10000.. (not the training noise). Beside
   it the RMSE of the trivial answer T z (the ODE's start point): the random teacher's ODE moves its
   samples little, so that is the bar a student must beat to have learnt anything of the teacher.

    OMP_NUM_THREADS=1 python benchmarks/text_to_image.py            # writes results/text_to_image.json
    OMP_NUM_THREADS=1 python benchmarks/text_to_image.py --sd15-encoder-only   # the SD-1.5-sized encoder alone
    python benchmarks/step_memory.py --network sd15-unet --microbatch 4 --precision bf16 --ema-rates 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "text"))  # the tiny pipeline the tests build

PROMPTS = ["a red cat", "the blue sea", "a tree", "the sun", "a dog", "the moon", "a house", "the rain",
           "a ship", "a bird", "the snow", "a road", "a fish", "the sky", "a lamp", "a boat"]


def _config(pipeline, prompts, steps, batch, lr, scale):
    return {"device": "cpu", "seed": 0,
            "teacher": {"kind": "diffusers", "path": pipeline, "prompts": prompts,
                        "guidance": {"scale": scale, "guide": "unconditional"}},
            "loss": {"N": 250}, "batch_size": batch, "total_steps": steps, "log_every": max(1, steps // 10),
            "checkpoint_every": steps, "keep_checkpoints": 1, "snapshot_every": 0, "progress": False,
            "ema_rates": [0.99], "optimizer": {"lr": lr}}


def step_times(pipeline, prompts_file, batch, scale, warmup, timed):
    """Median seconds of (a step with the cache, a step with its prompts encoded as well, encoding a
    step's prompts alone); the two kinds of step alternate so that drifts of a shared machine hit both."""
    from pid_fast.io.text_conditioning import load_text_encoder
    from pid_fast.train.config import resolve_config
    from pid_fast.train.distributed import process_group
    from pid_fast.train.loop import _Run, step_seed

    cfg = resolve_config(_config(pipeline, prompts_file, warmup + 2 * timed, batch, 1e-4, scale))
    encoder = load_text_encoder(pipeline)
    with tempfile.TemporaryDirectory() as run_dir, process_group("cpu") as ctx:
        run = _Run(cfg, run_dir, ctx, False, None, threads=1)
        generator = torch.Generator()

        def step(encode: bool) -> float:
            start = time.perf_counter()
            if encode:  # what the cache saves: the text encoder on the step's drawn prompts
                rows = run.text.indices(step_seed(cfg["seed"], run.step), batch)
                encoder([run.text.prompts[int(i)] for i in rows])
            run.train_step(generator)
            run.step += 1
            return time.perf_counter() - start

        for _ in range(warmup):
            step(False)
        cached, encoded = [], []
        for _ in range(timed):
            cached.append(step(False))
            encoded.append(step(True))
        encode_only = []
        for _ in range(timed):
            start = time.perf_counter()
            encoder([run.text.prompts[i % len(run.text.prompts)] for i in range(batch)])
            encode_only.append(time.perf_counter() - start)
    return statistics.median(cached), statistics.median(encoded), statistics.median(encode_only)


def sd15_encoder_seconds(batch: int, repeats: int = 3) -> float:
    """Median seconds to encode ``batch`` prompts (77 tokens) with a CLIPTextModel of SD-1.5's text
    encoder's size (CLIP ViT-L/14: width 768, 12 layers, 123M parameters; random weights: the time is
    the same): what a trainer without the cache adds to every step at that scale."""
    import transformers

    torch.manual_seed(0)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77)).eval()
    ids = torch.randint(0, 49408, (batch, 77))
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def rmse_before_after(pipeline, prompts_file, steps, batch, lr, scale, num, teacher_steps, run_dir):
    from pid_fast.eval.text_to_image import rmse_to_teacher
    from pid_fast.sampling import seeded_latents
    from pid_fast.train import build_teacher, load_student, resolve_config, train
    from pid_fast.train.prompts import text_conditions

    cfg = _config(pipeline, prompts_file, steps, batch, lr, scale)
    start = time.perf_counter()
    summary = train(cfg, run_dir, threads=1)
    train_s = time.perf_counter() - start
    tcfg = resolve_config(cfg)["teacher"]
    text = text_conditions(tcfg, None)
    teacher, _ = build_teacher(tcfg, torch.device("cpu"), text.negative)
    embeddings = text.embeddings[torch.arange(num) % len(text.prompts)]
    seeds = range(10000, 10000 + num)
    out = {"train_steps": steps, "train_seconds": train_s, "final_loss": summary["loss"]}
    for weights in ("model", "ema"):
        net, meta = load_student(run_dir, weights=weights)
        rmse, _, reference = rmse_to_teacher(net, meta, teacher, embeddings, seeds, num_steps=teacher_steps)
        out[f"rmse_after_{weights}"] = float(rmse.mean())
    initial = teacher.main.model  # the student's initial weights: a copy of the teacher's UNet
    rmse0, _, reference = rmse_to_teacher(initial, meta, teacher, embeddings, seeds, num_steps=teacher_steps)
    # the trivial one-step answer, the start point T z itself: how far the teacher's ODE moves its samples
    z, _ = seeded_latents(seeds, meta["shape"])  # (the latents rmse_to_teacher starts both from)
    start_rmse = (meta["sigma_max"] * z - reference).square().flatten(1).mean(1).sqrt()
    out.update(rmse_before=float(rmse0.mean()), rmse_of_start_point=float(start_rmse.mean()),
               teacher_latent_rms=float(reference.square().mean().sqrt()),
               sigma_range=[meta["sigma_min"], meta["sigma_max"]])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400, help="training steps of the RMSE run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scale", type=float, default=4.0, help="classifier-free guidance w")
    p.add_argument("--num", type=int, default=64, help="evaluation samples")
    p.add_argument("--teacher-steps", type=int, default=18)
    p.add_argument("--out", default=os.path.join(HERE, "results", "text_to_image.json"))
    p.add_argument("--sd15-encoder-only", action="store_true",
                   help="only time an SD-1.5-sized text encoder on one step's prompts (sd15_encoder_seconds)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.sd15_encoder_only:
        print(json.dumps({"batch": args.batch, "sd15_encoder_seconds_per_step": sd15_encoder_seconds(args.batch)}))
        return
    from text_pipeline import save_prompts, save_text_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipeline = save_text_pipeline(os.path.join(tmp, "sd-tiny"))
        prompts = save_prompts(os.path.join(tmp, "prompts.txt"), PROMPTS)
        cached, encoded, encode_only = step_times(pipeline, prompts, args.batch, args.scale, warmup=5, timed=20)
        sd15_encoder = sd15_encoder_seconds(args.batch)
        result = {"machine": f"{platform.processor() or platform.machine()}, CPU, 1 thread, torch {torch.__version__}",
                  "batch": args.batch, "guidance_scale": args.scale,
                  "step_seconds_cached": cached, "step_seconds_encoding_each_step": encoded,
                  "encoder_seconds_per_step": encode_only, "sd15_encoder_seconds_per_step": sd15_encoder,
                  **rmse_before_after(pipeline, prompts, args.steps, args.batch, args.lr, args.scale, args.num,
                                      args.teacher_steps, os.path.join(tmp, "run"))}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

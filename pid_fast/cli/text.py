"""Text-to-image evaluation commands (pid_fast.eval.text_to_image; nothing is downloaded):

    pid-fast clip-score samples.npz --clip CLIP_FOLDER          # the prompts stored by sample --prompt
    pid-fast text-eval RUN --prompts prompts.txt --num 64 --steps 18 [--clip CLIP_FOLDER]

``text-eval`` samples the run's student and its (guided) teacher from the same noise and prompts
(image k: seed k, prompt k mod the number of prompts) and prints the mean per-sample RMSE between
their latents, with the CLIP score of both when --clip is given.
"""

from __future__ import annotations

import json
import os

import click

from pid_fast.cli.requirements import require

__all__ = ["clip_score", "text_eval", "register"]


@click.command("clip-score")
@click.argument("samples", type=click.Path(exists=True, dir_okay=False))
@click.option("--clip", "clip_folder", required=True, type=click.Path(exists=True, file_okay=False),
              help="A local CLIP folder (transformers CLIPModel + tokenizer, save_pretrained).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="The prompts (image k takes prompt k mod the number given); default: the .npz's 'prompts'.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def clip_score(samples, clip_folder, prompts, device) -> None:
    """CLIP score (100 x cosine, clipped at 0; mean and per-image in JSON) of an .npz of images
    written by `pid-fast sample --prompt` against their prompts."""
    import numpy as np
    import torch

    from pid_fast.cli.common import pick_device
    from pid_fast.eval.text_to_image import ClipScorer

    require("text", "transformers")
    data = np.load(samples)
    if "x" not in data:
        raise click.ClickException(f"{samples}: no 'x' array (write it with pid-fast sample ... OUT.npz)")
    images = torch.from_numpy(data["x"])
    if not prompts:
        if "prompts" not in data:
            raise click.UsageError(f"{samples} holds no prompts (not written by sample --prompt): pass --prompt")
        prompts = [str(p) for p in data["prompts"]]
    prompts = [prompts[k % len(prompts)] for k in range(images.shape[0])]
    try:
        scores = ClipScorer(clip_folder, pick_device(device))(images, prompts)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"clip_score": float(scores.mean()), "num": len(prompts),
                           "per_image": [round(float(s), 4) for s in scores]}))


@click.command("text-eval")
@click.argument("run", type=click.Path(exists=True))
@click.option("--prompts", "prompts_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Prompt file (.txt / .jsonl / .parquet); image k takes prompt k mod their number.")
@click.option("--num", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--steps", type=click.IntRange(min=2), default=18, show_default=True, help="The teacher's Heun steps.")
@click.option("--weights", default="auto", show_default=True, help="As for `pid-fast sample`.")
@click.option("--clip", "clip_folder", default=None, type=click.Path(exists=True, file_okay=False),
              help="Also the CLIP score of the student's and the teacher's decoded images.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def text_eval(run, prompts_file, num, steps, weights, clip_folder, device) -> None:
    """RMSE of a text-to-image student's one-step latents to its guided teacher's Heun samples from
    the same noise and prompts (and the CLIP score of both with --clip), as JSON."""
    from pid_fast.cli.common import pick_device
    from pid_fast.eval.checkpoints import load_scored_student
    from pid_fast.eval.text_to_image import ClipScorer, rmse_to_teacher
    from pid_fast.io.text_conditioning import read_prompts
    from pid_fast.train.builders import build_teacher
    from pid_fast.train.checkpoint import load_latest_checkpoint, read_checkpoint
    from pid_fast.train.prompts import encode_for_sampling, negative_embedding, pipeline_decoder

    require("diffusers", "diffusers")
    require("text", "transformers")
    device = pick_device(device)
    try:
        net, meta, used = load_scored_student(run, weights=weights, device=device)
        if not meta.get("text"):
            raise click.UsageError(f"{run}: not a text-to-image run (its checkpoint has no prompts)")
        found = load_latest_checkpoint(run) if os.path.isdir(run) else (run, read_checkpoint(run))
        tcfg = found[1]["config"]["teacher"]
        teacher, _ = build_teacher(tcfg, device, negative_embedding(tcfg, device))
        prompts = read_prompts(prompts_file, name="--prompts")
        embeddings = encode_for_sampling(meta["text"]["pipeline"], prompts, num, device)
        rmse, student, reference = rmse_to_teacher(net, meta, teacher, embeddings, range(num), num_steps=steps,
                                                   device=device)
        result = {"run": str(meta["path"]), "step": meta["step"], "weights": used, "num": num, "teacher_steps": steps,
                  "rmse_to_teacher": float(rmse.mean()), "rmse_to_teacher_std": float(rmse.std()) if num > 1 else 0.0,
                  "teacher_latent_rms": float(reference.square().mean().sqrt())}
        if clip_folder is not None:
            decode, scorer = pipeline_decoder(meta["text"]["pipeline"], device), ClipScorer(clip_folder, device)
            per_image = [prompts[k % len(prompts)] for k in range(num)]
            result["clip_score_student"] = float(scorer(decode(student.to(device)), per_image).mean())
            result["clip_score_teacher"] = float(scorer(decode(reference.to(device)), per_image).mean())
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result))


def register(group: click.Group) -> None:
    """Attach `clip-score` and `text-eval` to a click group."""
    group.add_command(clip_score)
    group.add_command(text_eval)

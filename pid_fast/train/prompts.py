"""The conditions of a text-to-image run: its prompts' cached embeddings, drawn per step.

PID needs no data, but a text-conditioned teacher needs its conditions. config['teacher.prompts']
names the prompt set; the embeddings of every prompt (and of the negative prompt, the unconditional
input of classifier-free guidance) are encoded once and cached in the run folder
(pid_fast.io.text_conditioning.cached_embeddings), so a step never runs the text encoder.

Step s draws the prompt of each row of its global batch uniformly from a CPU generator seeded by
(seed, s) alone (a stream of its own, not the noise generator's), then gathers the embeddings and
copies them to the device: a resumed run draws exactly the prompts the uninterrupted run would
have (the prompt order is a function of the run's seed and the step, so the checkpoint's step is
its RNG state), and W processes with accumulation A see the prompts of one process.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch

from pid_fast.io.text_conditioning import cached_embeddings, is_text_pipeline, read_prompts, text_pipeline_parts

__all__ = ["TextConditions", "text_conditions", "prepare_text_conditions", "pipeline_decoder", "uses_text",
           "encode_for_sampling", "negative_embedding", "source_pipeline", "check_resumed_text",
           "EMBEDDINGS_DIR", "prompt_seed"]

EMBEDDINGS_DIR = "text_embeddings"  # inside the run folder


def uses_text(tcfg: Mapping[str, Any]) -> bool:
    """Whether config['teacher'] is a text-conditioned diffusers pipeline (or gives prompts)."""
    return tcfg.get("kind") == "diffusers" and (tcfg.get("prompts") is not None or is_text_pipeline(tcfg["path"]))


def prompt_seed(step_seed: int) -> int:
    """The seed of a step's prompt draw from the step's seed: another stream than the noise's."""
    return (step_seed * 0x94D049BB133111EB + 0x5EED) % (1 << 63)


class TextConditions:
    """The prompts of a run and their embeddings (CPU, float32): ``draw`` gives a step's rows."""

    def __init__(self, prompts: list[str], embeddings: torch.Tensor, negative: torch.Tensor, info: Mapping[str, Any]):
        if embeddings.shape[0] != len(prompts):
            raise ValueError(f"text conditions: {len(prompts)} prompts but {embeddings.shape[0]} embeddings")
        self.prompts, self.embeddings, self.negative, self.info = prompts, embeddings, negative, dict(info)

    @property
    def embedding_shape(self) -> tuple[int, int]:
        return tuple(self.embeddings.shape[1:])

    def indices(self, step_seed: int, global_batch: int) -> torch.Tensor:
        """The prompt index of each row of a step's global batch (uniform, from the step's seed only)."""
        generator = torch.Generator().manual_seed(prompt_seed(step_seed))
        return torch.randint(0, len(self.prompts), (global_batch,), generator=generator)

    def draw(self, step_seed: int, global_batch: int, device: torch.device) -> torch.Tensor:
        """The embeddings [global_batch, L, D] of a step's prompts, on ``device`` (no host sync)."""
        rows = self.embeddings[self.indices(step_seed, global_batch)]
        return rows.to(device, non_blocking=True)

    def first(self, count: int, device: torch.device) -> torch.Tensor:
        """The embeddings of prompts 0, 1, ... (cycled) for ``count`` fixed samples (the snapshots)."""
        rows = torch.arange(count) % len(self.prompts)
        return self.embeddings[rows].to(device)

    def metadata(self) -> dict:
        """What the checkpoint records (the student samples from a prompt with the same encoder)."""
        return {"pipeline": self.info["pipeline"], "num_prompts": len(self.prompts),
                "embedding_shape": list(self.embedding_shape), "negative_prompt": self.info["negative_prompt"],
                "encoder_sha256": self.info["encoder_sha256"], "prompts_sha256": self.info["prompts_sha256"]}


def text_conditions(tcfg: Mapping[str, Any], cache_dir: Optional[str], device: torch.device | str = "cpu", *,
                    write: bool = True) -> Optional[TextConditions]:
    """The TextConditions of config['teacher'] (None for a teacher without text): prompts from
    teacher.prompts, the negative prompt from teacher.guidance.negative_prompt ('' when unset),
    embeddings cached in ``cache_dir`` (None: encode without caching)."""
    if not uses_text(tcfg):
        return None
    path = os.path.abspath(tcfg["path"])
    if not is_text_pipeline(path):
        raise ValueError(f"config['teacher.prompts'] is set but the UNet of {tcfg['path']!r} is not text-conditioned "
                         f"(a UNet2DConditionModel); drop teacher.prompts")
    text_pipeline_parts(path)  # names a missing text_encoder/, tokenizer/ or vae/
    if tcfg.get("prompts") is None:
        raise ValueError(f"config['teacher.prompts'] is required: {tcfg['path']!r} is a text-conditioned pipeline "
                         f"(UNet2DConditionModel), and PID draws its conditions from a prompt set (a text file with "
                         f"one prompt per line, or a .jsonl / .parquet file with a 'prompt' column)")
    prompts = read_prompts(tcfg["prompts"])
    negative_prompt = (tcfg.get("guidance") or {}).get("negative_prompt") or ""
    embeddings, negative, info = cached_embeddings(
        path, prompts, negative_prompt, cache_dir, device=device, write=write)
    info = dict(info, pipeline=path, negative_prompt=negative_prompt)
    return TextConditions(prompts, embeddings, negative, info)


def prepare_text_conditions(tcfg: Mapping[str, Any], run_dir: str, ctx: Any) -> Optional[TextConditions]:
    """The run's TextConditions (None without text), cached in RUN_DIR/text_embeddings: rank 0
    encodes and writes the cache, the other ranks read it after a barrier."""
    from pid_fast.train.distributed import barrier

    if not uses_text(tcfg):
        return None
    cache_dir = os.path.join(run_dir, EMBEDDINGS_DIR)
    conditions = text_conditions(tcfg, cache_dir, ctx.device) if ctx.rank == 0 else None
    barrier(ctx)
    return conditions if conditions is not None else text_conditions(tcfg, cache_dir, ctx.device, write=False)


def pipeline_decoder(pipeline: str, device: torch.device | str = "cpu"):
    """Latents -> images in [-1, 1] through the VAE of a text-to-image pipeline folder (its vae/,
    with the VAE's scaling_factor, as diffusers' pipelines decode)."""
    from pid_fast.eval.vae import ScaledLatentDecoder

    return ScaledLatentDecoder.from_path(os.path.join(pipeline, "vae"), device=device)


def encode_for_sampling(pipeline: str, prompts: list[str], count: int,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Embeddings [count, L, D] for ``count`` samples: sample k takes prompt k mod len(prompts),
    encoded by the text encoder of the pipeline folder (as the trainer encodes)."""
    from pid_fast.io.text_conditioning import load_text_encoder

    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: one or more prompt strings, got {prompts!r}")
    encoded = load_text_encoder(pipeline, device)(list(prompts))
    return encoded[torch.arange(count) % len(prompts)]


def negative_embedding(tcfg: Mapping[str, Any], device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
    """The unconditional input [1, L, D] of a guided text teacher of config['teacher'] (its
    guidance.negative_prompt, '' when unset), encoded without the prompt set; None for other teachers."""
    from pid_fast.io.text_conditioning import load_text_encoder

    if tcfg.get("kind") != "diffusers" or not is_text_pipeline(tcfg["path"]) or tcfg.get("guidance") is None:
        return None
    negative_prompt = tcfg["guidance"].get("negative_prompt") or ""
    return load_text_encoder(tcfg["path"], device)([negative_prompt])


def source_pipeline(source: str | os.PathLike) -> Optional[str]:
    """The text-to-image pipeline folder of a `pid-fast sample --teacher` source (a folder, or a
    trainer config whose teacher is one), else None."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return os.path.abspath(source) if is_text_pipeline(source) else None
    if source.endswith((".json", ".yaml", ".yml")) and os.path.isfile(source):
        from pid_fast.train.config import load_config, resolve_config

        tcfg = resolve_config(load_config(source))["teacher"]
        if tcfg.get("kind") == "diffusers" and is_text_pipeline(tcfg["path"]):
            return os.path.abspath(tcfg["path"])
    return None


def check_resumed_text(recorded: Optional[Mapping[str, Any]], conditions: Optional[TextConditions],
                       checkpoint: str) -> None:
    """A resumed run's prompts and text encoder must be the run's (checkpoint['student']['text'],
    ``recorded``): the config names the same files, but their contents may have changed since."""
    if recorded is None or conditions is None:
        return
    for key, what in (("prompts_sha256", "the prompt list (teacher.prompts) or the negative prompt"),
                      ("encoder_sha256", "the text encoder's or tokenizer's files")):
        if recorded.get(key) != conditions.info[key]:
            raise ValueError(f"cannot resume {checkpoint}: {what} changed since the run started (sha256 "
                             f"{str(recorded.get(key))[:16]}... then, {conditions.info[key][:16]}... now), so the "
                             f"resumed run would train on other conditions; restore them or start a new run")

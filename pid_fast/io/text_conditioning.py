"""Text-to-image teachers: the prompts of a run, the frozen text encoder of a diffusers pipeline
folder, and the prompt embeddings cached on disk (nothing is ever downloaded).

A text-conditioned pipeline folder is what StableDiffusionPipeline.save_pretrained writes:
model_index.json, unet/ (a UNet2DConditionModel), scheduler/, text_encoder/ and tokenizer/
(transformers classes named by model_index.json, CLIPTextModel / CLIPTokenizer by default) and vae/
(an AutoencoderKL). ``text_pipeline_parts`` finds them and names a missing one.

Prompts (``read_prompts``): a text file with one prompt per line (blank lines skipped), or a
.jsonl / .parquet file with a 'prompt' column (also 'text' or 'caption').

Encoding (``encode_prompts``) is diffusers' StableDiffusionPipeline.encode_prompt without
classifier-free guidance: the tokenizer pads to its model_max_length and truncates (one warning
for the prompts that were cut, as diffusers warns), and the embedding is the text encoder's last
hidden state [P, L, D] (with the attention mask only when the encoder's config asks for it).

The cache (``cached_embeddings``): CACHE_DIR/text-embeddings-<encoder>-<prompts>.safetensors with
the embeddings of every prompt and of the unconditional (negative) prompt, keyed by the sha256 of
the text encoder's and tokenizer's files and of the prompt list, so a run never runs the text
encoder once the file exists, and a changed encoder or prompt list never reads stale embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Optional, Sequence

import torch

from pid_fast.io.atomic import atomic_write
from pid_fast.io.errors import CheckpointFormatError

__all__ = ["TEXT_COMPONENTS", "PROMPT_COLUMNS", "is_text_pipeline", "text_pipeline_parts", "read_prompts",
           "load_text_encoder", "encode_prompts", "encoder_fingerprint", "prompts_fingerprint", "cached_embeddings",
           "TextEncoder"]

# The folders of a text-conditioned pipeline besides unet/ and scheduler/ (found by find_diffusers_parts)
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "vae")
PROMPT_COLUMNS = ("prompt", "text", "caption")
# default classes when model_index.json does not name them
_DEFAULT_CLASSES = {"text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
                    "vae": ("diffusers", "AutoencoderKL")}
_ENCODE_BATCH = 64


def _unet_class(path: str) -> Optional[str]:
    for config in (os.path.join(path, "unet", "config.json"), os.path.join(path, "config.json")):
        if os.path.isfile(config):
            try:
                with open(config) as f:
                    return json.load(f).get("_class_name")
            except (OSError, json.JSONDecodeError):
                return None
    return None


def is_text_pipeline(path: str | os.PathLike) -> bool:
    """Whether a diffusers folder's UNet is a UNet2DConditionModel (cross-attention on text)."""
    return os.path.isdir(os.fspath(path)) and _unet_class(os.fspath(path)) == "UNet2DConditionModel"


def _model_index(path: str) -> dict:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    try:
        with open(index) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"teacher.path: cannot read {index!r} as JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def text_pipeline_parts(path: str | os.PathLike, *, name: str = "teacher.path") -> dict:
    """{component: (folder, (library, class name))} for text_encoder, tokenizer and vae of a
    text-conditioned pipeline folder; a CheckpointFormatError naming each missing component."""
    path = os.fspath(path)
    index = _model_index(path)
    parts, missing = {}, []
    for component in TEXT_COMPONENTS:
        folder = os.path.join(path, component)
        if not os.path.isdir(folder) or not os.listdir(folder):
            missing.append(component)
            continue
        entry = index.get(component)
        library, cls = (entry if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]
                        else _DEFAULT_CLASSES[component])
        parts[component] = (folder, (str(library), str(cls)))
    if missing:
        raise CheckpointFormatError(
            f"{name}: {path!r} holds a text-conditioned UNet (UNet2DConditionModel) but lacks "
            f"{', '.join(m + '/' for m in missing)}: a text-to-image pipeline folder needs unet/, scheduler/, "
            f"{'/, '.join(TEXT_COMPONENTS)}/ (StableDiffusionPipeline.save_pretrained writes them); with "
            f"conditions of your own, use PIDLoss in your loop with encoder_hidden_states (examples/diffusers_loop.py)")
    return parts


# --------------------------------------------------------------------------------------------
# Prompts


def read_prompts(path: str | os.PathLike, *, name: str = "teacher.prompts") -> list[str]:
    """The prompts of a file: .txt (or any other suffix): one per line, blank lines skipped;
    .jsonl: one JSON object per line with a PROMPT_COLUMNS key; .parquet: a PROMPT_COLUMNS column."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no such file: {path!r} (a text file with one prompt per line, or a "
                                f".jsonl / .parquet file with a 'prompt' column)")
    if path.endswith(".jsonl"):
        prompts = _jsonl_prompts(path, name)
    elif path.endswith(".parquet"):
        prompts = _parquet_prompts(path, name)
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f]
        prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"{name}: {path!r} holds no prompts (it is empty or blank)")
    return prompts


def _column(keys, path: str, name: str, where: str) -> str:
    for column in PROMPT_COLUMNS:
        if column in keys:
            return column
    raise ValueError(f"{name}: {path!r} {where} has no prompt column (one of {list(PROMPT_COLUMNS)}); "
                     f"found {sorted(keys)}")


def _jsonl_prompts(path: str, name: str) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name}: {path!r} line {number} is not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{name}: {path!r} line {number} must be a JSON object with a 'prompt' key")
            value = row[_column(row.keys(), path, name, f"line {number}")]
            if not isinstance(value, str):
                raise ValueError(f"{name}: {path!r} line {number}: the prompt must be a string, got {value!r}")
            prompts.append(value)
    return prompts


def _parquet_prompts(path: str, name: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{name}: reading {path!r} needs pyarrow (not installed): pip install pyarrow, or give "
                          f"the prompts as a .txt or .jsonl file") from None
    table = pq.read_table(path)
    column = _column(table.column_names, path, name, "")
    return [str(v) for v in table.column(column).to_pylist() if v is not None]


def prompts_fingerprint(prompts: Sequence[str], negative_prompt: str) -> str:
    """sha256 of the prompt list and the negative prompt (the cache key's second half)."""
    return hashlib.sha256(json.dumps({"prompts": list(prompts), "negative": negative_prompt}).encode()).hexdigest()


def encoder_fingerprint(parts: dict) -> str:
    """sha256 of every file of the text encoder's and the tokenizer's folders (names and bytes):
    the cache key's first half."""
    digest = hashlib.sha256()
    for component in ("text_encoder", "tokenizer"):
        folder = parts[component][0]
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for file in sorted(files):
                full = os.path.join(root, file)
                digest.update(os.path.relpath(full, folder).encode() + b"\0")
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The text encoder


class TextEncoder:
    """A frozen tokenizer + text encoder: ``encoder(prompts)`` -> embeddings [P, L, D] float32."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        self._warned = False

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], batch_size: int = _ENCODE_BATCH) -> torch.Tensor:
        return encode_prompts(self, prompts, batch_size)


def _component_class(library: str, cls: str, component: str, folder: str):
    if library != "transformers":
        raise CheckpointFormatError(f"teacher.path: {component} in {folder!r} is a {library}.{cls}; a "
                                    f"transformers text encoder and tokenizer are supported")
    try:
        import transformers
    except ImportError:
        raise ImportError("a text-conditioned teacher needs transformers (not installed): "
                          "pip install 'pid_fast[text]'") from None
    found = getattr(transformers, cls, None)
    if found is None:
        raise CheckpointFormatError(f"teacher.path: {component} names transformers.{cls}, which this transformers "
                                    f"{transformers.__version__} does not have")
    return found


def load_text_encoder(path: str | os.PathLike, device: torch.device | str = "cpu", *,
                      name: str = "teacher.path") -> TextEncoder:
    """The frozen tokenizer and text encoder of a text-conditioned pipeline folder (local files only)."""
    parts = text_pipeline_parts(path, name=name)
    loaded = {}
    for component in ("tokenizer", "text_encoder"):
        folder, (library, cls) = parts[component]
        try:
            loaded[component] = _component_class(library, cls, component, folder).from_pretrained(
                folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointFormatError(f"{name}: cannot load the {component} in {folder!r}: {exc}") from None
    return TextEncoder(loaded["tokenizer"], loaded["text_encoder"].to(device))


@torch.no_grad()
def encode_prompts(encoder: TextEncoder, prompts: Sequence[str], batch_size: int = _ENCODE_BATCH) -> torch.Tensor:
    """Embeddings [P, L, D] float32 on the CPU (module docstring); prompts longer than the tokenizer's
    limit are truncated with one warning naming how many and what was cut from the first."""
    tokenizer, model = encoder.tokenizer, encoder.text_encoder
    max_length = int(tokenizer.model_max_length)
    use_mask = bool(getattr(model.config, "use_attention_mask", False))
    _warn_truncated(encoder, tokenizer, list(prompts), max_length)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        tokens = tokenizer(chunk, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device) if use_mask else None
        hidden = model(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]
        out.append(hidden.float().cpu())
    return torch.cat(out)


def _warn_truncated(encoder: TextEncoder, tokenizer: Any, prompts: list[str], max_length: int) -> None:
    if encoder._warned:
        return
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
    cut = [i for i, n in enumerate(lengths) if n > max_length]
    if not cut:
        return
    encoder._warned = True
    ids = tokenizer(prompts[cut[0]], truncation=False, verbose=False).input_ids
    removed = tokenizer.decode(ids[max_length - 1:-1])
    warnings.warn(f"prompts: {len(cut)} prompt(s) longer than the tokenizer's limit of {max_length} tokens were "
                  f"truncated, as diffusers does (e.g. {prompts[cut[0]][:60]!r} lost {removed!r}); this warning "
                  f"is given once", stacklevel=2)


# --------------------------------------------------------------------------------------------
# The cache


def cached_embeddings(path: str | os.PathLike, prompts: Sequence[str], negative_prompt: str,
                      cache_dir: Optional[str | os.PathLike], *, device: torch.device | str = "cpu",
                      write: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(embeddings [P, L, D], the negative prompt's [1, L, D], info) of ``prompts`` under the text
    encoder of the pipeline folder ``path``, float32 on the CPU: read from the cache file in
    ``cache_dir`` when it exists, else encoded (on ``device``) and, with ``write``, saved there
    (``cache_dir`` None: always encoded, nothing read or written).
    info: {'file', 'encoder_sha256', 'prompts_sha256', 'encoded': whether the encoder ran}."""
    from safetensors.torch import load_file, save

    parts = text_pipeline_parts(path)
    encoder_key, prompts_key = encoder_fingerprint(parts), prompts_fingerprint(prompts, negative_prompt)
    file = None if cache_dir is None else os.path.join(
        os.fspath(cache_dir), f"text-embeddings-{encoder_key[:16]}-{prompts_key[:16]}.safetensors")
    info = {"file": file, "encoder_sha256": encoder_key, "prompts_sha256": prompts_key, "encoded": False}
    if file is not None and os.path.isfile(file):
        try:
            stored = load_file(file)
            return stored["prompts"], stored["negative"], info
        except Exception as exc:  # a damaged cache file: say so, then encode again
            warnings.warn(f"prompt embedding cache {file!r} is unreadable ({exc}); encoding the prompts again",
                          stacklevel=2)
    encoder = load_text_encoder(path, device)
    embeddings = encoder(list(prompts))
    negative = encoder([negative_prompt])
    info["encoded"] = True
    del encoder
    if write and file is not None:
        os.makedirs(os.fspath(cache_dir), exist_ok=True)
        atomic_write(file, save({"prompts": embeddings.contiguous(), "negative": negative.contiguous()},
                                metadata={"encoder_sha256": encoder_key, "prompts_sha256": prompts_key,
                                          "num_prompts": str(len(prompts))}))
    return embeddings, negative, info

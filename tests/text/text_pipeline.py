"""A tiny random text-to-image pipeline saved as StableDiffusionPipeline.save_pretrained does:
model_index.json, unet/ (UNet2DConditionModel on 4 x 8 x 8 latents), vae/ (AutoencoderKL, 16 x 16
RGB images), text_encoder/ (CLIPTextModel), tokenizer/ (a CLIP BPE tokenizer over the 256 byte
symbols, written from a hand-made vocab.json + merges.txt: nothing is downloaded), scheduler/."""

import json
import os

import torch

HIDDEN = 16          # the text encoder's width = the UNet's cross_attention_dim
MAX_LENGTH = 12      # the tokenizer's model_max_length


def _byte_symbols():
    # GPT-2 / CLIP's byte -> unicode table (transformers' bytes_to_unicode)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def save_tokenizer(folder, max_length=MAX_LENGTH):
    import transformers

    os.makedirs(folder, exist_ok=True)
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nt h\nth e</w>\n")
    tokenizer = transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                           model_max_length=max_length)
    return tokenizer, len(vocab)


def save_text_pipeline(folder, *, prediction_type="epsilon", scheduler="EulerDiscreteScheduler", seed=0):
    """The tiny pipeline in ``folder`` (returned as a str)."""
    import diffusers
    import transformers

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    tokenizer, vocab_size = save_tokenizer(os.path.join(folder, "tokenizer"))
    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        norm_num_groups=4, sample_size=16)
    sched = getattr(diffusers, scheduler)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          steps_offset=1, prediction_type=prediction_type)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


PROMPTS = ["a red cat", "the blue sea", "a tree", "the sun"]  # within the tokenizer's 12 tokens


def save_prompts(path, prompts=PROMPTS):
    with open(path, "w") as f:
        f.write("\n".join(prompts) + "\n")
    return str(path)


def save_clip(folder, image_size=16):
    """A tiny random CLIPModel (text and vision towers, projection 8) + the tiny tokenizer."""
    import transformers

    folder = str(folder)
    _, vocab_size = save_tokenizer(folder)
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=MAX_LENGTH, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=8)
    transformers.CLIPModel(config).save_pretrained(folder)
    return folder

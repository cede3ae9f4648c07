"""A tiny, randomly initialised Stable-Diffusion-style model folder, written offline for tests.

The components follow the tiny configurations of diffusers' own Stable Diffusion tests (UNet and VAE with
block_out_channels (32, 64), a 2-layer CLIP text encoder of width 32) and the CLIP tokenizer is built from a
vocab.json and merges.txt written here, so nothing is ever downloaded. The folder is saved with
``StableDiffusionPipeline.save_pretrained``, so it has the layout and model_index.json of a real SD folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

LATENT_SIZE = 8
IMAGE_SIZE = 2 * LATENT_SIZE  # the VAE has two blocks, so it downsamples by 2
MODEL_MAX_LENGTH = 77
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
WORDS = (
    "a", "an", "the", "photo", "painting", "picture", "of", "in", "on", "with", "and", "style",
    "cat", "dog", "car", "house", "tree", "red", "blue", "green", "big", "small",
)  # fmt: skip


def _clip_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary in CLIP's format: specials, every letter/digit alone and word-final
    (``x</w>``), and left-to-right merges that make each of ``words`` a single token."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = list(SPECIAL_TOKENS) + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = f"{left} {right}"
            left = left + right
            if merge not in merges:
                merges.append(merge)
            if left not in tokens:
                tokens.append(left)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tiny_clip_tokenizer(max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP tokenizer read from a vocab.json and merges.txt written to a temporary folder."""
    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, local_files_only=True)
    if tokenizer.unk_token_id in tokenizer("a photo of a cat", add_special_tokens=False).input_ids:
        raise RuntimeError("The tiny CLIP tokenizer did not read its vocab.json and merges.txt.")
    return tokenizer


def write_tiny_sd_folder(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/,
    model_index.json) to ``path``; the weights depend only on ``seed``."""
    folder = Path(path)
    tokenizer = build_tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            sample_size=IMAGE_SIZE,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                layer_norm_eps=1e-5,
                vocab_size=1000,
                max_position_embeddings=MODEL_MAX_LENGTH,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder

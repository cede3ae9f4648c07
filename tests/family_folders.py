"""Tiny, randomly initialised SDXL, SD3, FLUX and PixArt model folders, written offline for tests.

The component sizes follow diffusers' own pipeline tests for each family (one or two tiny transformer blocks or
a two-level UNet, a two-level VAE, CLIP encoders of width 16-32, a T5 encoder of width 32). The CLIP tokenizers
are built from a written vocab.json and merges.txt (tests/sd_folder.py), the T5 tokenizer from a written
Unigram vocabulary with ``tokenizers``, so nothing is ever downloaded. Each folder is saved with its
pipeline's ``save_pretrained``, so it has the layout and model_index.json of a real folder of that family;
a ``sampler_defaults.json`` keeps the T5 sequence short (16 tokens) and the latents small (8×8).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    DPMSolverMultistepScheduler,
)
from sd_folder import WORDS, build_tiny_clip_tokenizer
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

FAMILIES = ("sdxl", "sd3", "flux", "pixart")
LATENT_SIZE = 8
IMAGE_SIZE = 2 * LATENT_SIZE  # two-level VAEs: 2x
MAX_SEQUENCE_LENGTH = 16
T5_WIDTH = 32


def build_tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram, SentencePiece-style) tokenizer whose pieces are ▁word for the test vocabulary plus single
    letters, read back from a folder it was saved to."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS] + [("\u2581", -2.0)]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(tmp)
        tokenizer = T5Tokenizer.from_pretrained(tmp, local_files_only=True)
    ids = tokenizer("a photo of a cat").input_ids
    if tokenizer.unk_token_id in ids or ids[-1] != tokenizer.eos_token_id:
        raise RuntimeError("The tiny T5 tokenizer did not read its vocabulary.")
    return tokenizer


def _clip(width: int, projection: bool, tokenizer) -> torch.nn.Module:
    config = CLIPTextConfig(
        hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, layer_norm_eps=1e-5,
        vocab_size=1000, max_position_embeddings=tokenizer.model_max_length, projection_dim=width,
        hidden_act="gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    ))


def _vae(latent_channels: int, **kwargs) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, sample_size=IMAGE_SIZE,
        **kwargs,
    )


def write_tiny_family_folder(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random folder of ``family`` (sdxl, sd3, flux, pixart) to ``path``; the weights depend only
    on ``seed``."""
    folder = Path(path)
    clip_tokenizer = build_tiny_clip_tokenizer()
    t5_tokenizer = build_tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sdxl":
            unet = UNet2DConditionModel(
                block_out_channels=(32, 64), layers_per_block=1, sample_size=LATENT_SIZE, in_channels=4,
                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
                cross_attention_dim=64, norm_num_groups=1,
            )
            pipe = StableDiffusionXLPipeline(
                vae=_vae(4), text_encoder=_clip(32, False, clip_tokenizer),
                text_encoder_2=_clip(32, True, clip_tokenizer), tokenizer=clip_tokenizer,
                tokenizer_2=clip_tokenizer, unet=unet,
                scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading"),
            )
        elif family == "sd3":
            transformer = SD3Transformer2DModel(
                sample_size=LATENT_SIZE, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5_WIDTH,
                pooled_projection_dim=32, out_channels=4,
            )
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=_vae(4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                         use_post_quant_conv=False),
                text_encoder=_clip(16, True, clip_tokenizer), tokenizer=clip_tokenizer,
                text_encoder_2=_clip(16, True, clip_tokenizer), tokenizer_2=clip_tokenizer,
                text_encoder_3=_t5(t5_tokenizer), tokenizer_3=t5_tokenizer,
            )
        elif family == "flux":
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=32,
                guidance_embeds=True, axes_dims_rope=[4, 4, 8],
            )
            pipe = FluxPipeline(
                transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096),
                vae=_vae(1, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                         use_post_quant_conv=False),
                text_encoder=_clip(32, False, clip_tokenizer), tokenizer=clip_tokenizer,
                text_encoder_2=_t5(t5_tokenizer), tokenizer_2=t5_tokenizer,
            )
        elif family == "pixart":
            transformer = PixArtTransformer2DModel(
                sample_size=LATENT_SIZE, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                caption_channels=T5_WIDTH, in_channels=4, cross_attention_dim=24, out_channels=8,
                attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            )
            pipe = PixArtSigmaPipeline(
                tokenizer=t5_tokenizer, text_encoder=_t5(t5_tokenizer), vae=_vae(4), transformer=transformer,
                scheduler=DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                                      prediction_type="epsilon"),
            )
        else:
            raise ValueError(f"unknown family {family}")
    pipe.save_pretrained(folder)
    defaults = {"num_inference_steps": 3, "sample_size": LATENT_SIZE}
    if family != "sdxl":
        defaults["max_sequence_length"] = MAX_SEQUENCE_LENGTH
    (folder / "sampler_defaults.json").write_text(json.dumps(defaults, indent=2))
    return folder

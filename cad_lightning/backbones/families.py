"""The model families beyond Stable Diffusion 1.x/2.x: SDXL and the diffusion transformers SD3, FLUX and PixArt.

Each family is a :class:`~cad_lightning.backbones.backbone.DiffusionBackbone` that reads the folder layout of
its diffusers pipeline, encodes prompts the way that pipeline does, and calls its denoiser with the inputs that
pipeline gives it. What a component is, the objectives and the edits do not change: a component is a weight of
the denoiser, the erase objective compares the denoiser's predictions for the concept and the base prompt at
the same noisy state (ε for SDXL and PixArt, the flow-matching velocity for SD3 and FLUX), and an edit zeroes
weights.

=========  =================================  ==========================================================
family     pipeline (model_index.json)        conditioning packed into the trailing rows
=========  =================================  ==========================================================
SDXL       StableDiffusionXLPipeline          pooled text of text_encoder_2, size/crop ids (6 numbers)
SD3        StableDiffusion3Pipeline           pooled CLIP-L + CLIP-G text
FLUX       FluxPipeline                       pooled CLIP-L text (no classifier-free guidance; guidance
                                              is an input of guidance-distilled models)
PixArt     PixArtAlphaPipeline,               T5's attention mask
           PixArtSigmaPipeline
=========  =================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from cad_lightning.backbones.backbone import DiffusionBackbone


def pack_conditioning(tokens: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
    """(B, L, D) token embeddings and (B, E_i) vectors as one (B, L + ceil(ΣE_i / D), D) tensor: the vectors,
    concatenated and zero-padded, fill the trailing rows."""
    if not extras:
        return tokens
    batch, _, width = tokens.shape
    flat = torch.cat([e.reshape(batch, -1).to(tokens) for e in extras], dim=1)
    rows = -(-flat.shape[1] // width)
    flat = F.pad(flat, (0, rows * width - flat.shape[1]))
    return torch.cat([tokens, flat.view(batch, rows, width)], dim=1)


def unpack_conditioning(packed: torch.Tensor, length: int, sizes: Sequence[int]) -> list[torch.Tensor]:
    """The inverse of :func:`pack_conditioning`: the (B, length, D) tokens, then one (B, E_i) tensor per size."""
    tokens, flat = packed[:, :length], packed[:, length:].flatten(1)
    return [tokens, *torch.split(flat[:, : sum(sizes)], list(sizes), dim=1)]


def _timesteps(t: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.reshape(-1).expand(batch) if t.numel() == 1 else t


def _token_ids(tokenizer, prompts: Sequence[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                      return_tensors="pt")
    return batch.input_ids.to(device), batch.attention_mask.to(device)


class SDXLBackbone(DiffusionBackbone):
    """Stable Diffusion XL: two CLIP text encoders (penultimate hidden states, concatenated), the second one's
    pooled projection and the size/crop ids as ``added_cond_kwargs``; an empty prompt encodes to zeros when the
    pipeline says so (``force_zeros_for_empty_prompt``), as the pipeline's default negative prompt does."""

    family = "SDXL"

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None, *, text_encoder_2, tokenizer_2,
                 force_zeros_for_empty_prompt: bool = True, **kwargs) -> None:
        super().__init__(unet, text_encoder, tokenizer, scheduler, vae, **kwargs)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.text_length = tokenizer.model_max_length
        self.extra_sizes = (text_encoder_2.config.projection_dim, 6)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids, _ = _token_ids(tokenizer, prompts, tokenizer.model_max_length, self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the projected pooled text of text_encoder_2, the last one
        tokens = torch.cat(hidden, dim=-1)
        if self.force_zeros_for_empty_prompt:
            keep = torch.tensor([p != "" for p in prompts], device=tokens.device, dtype=tokens.dtype)
            tokens, pooled = tokens * keep[:, None, None], pooled * keep[:, None]
        size = float(self.image_size)  # original size, crop top-left (0, 0), target size
        time_ids = torch.tensor([size, size, 0.0, 0.0, size, size], device=tokens.device).expand(len(prompts), 6)
        return pack_conditioning(tokens, pooled, time_ids).to(self.dtype)

    def predict_noise(self, x_t, t, text):
        tokens, pooled, time_ids = unpack_conditioning(text, self.text_length, self.extra_sizes)
        return self.denoiser(x_t, t, encoder_hidden_states=tokens,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


class FlowMatchingBackbone(DiffusionBackbone):
    """A rectified-flow transformer sampled with the flow-matching Euler scheduler; it predicts the velocity
    noise - x_0, so :meth:`add_noise` is the linear path (1 - σ) x_0 + σ noise with σ = t / 1000."""

    prediction = "flow"
    part = "transformer"

    def __init__(self, *args, max_sequence_length: int = 256, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_sequence_length = max_sequence_length

    def _sigmas(self, num_inference_steps: int) -> np.ndarray | None:
        return None

    def _image_tokens(self) -> int:
        patch = getattr(self.denoiser.config, "patch_size", 1) or 1
        _, h, w = self.latent_shape
        return (h // patch) * (w // patch)

    def new_scheduler(self, num_inference_steps: int) -> FlowMatchEulerDiscreteScheduler:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", False):  # the shift grows with the image's token count, as in FLUX
            slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
            kwargs["mu"] = config.base_shift + slope * (self._image_tokens() - config.base_image_seq_len)
        sigmas = self._sigmas(num_inference_steps)
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, **kwargs)
        else:
            scheduler.set_timesteps(num_inference_steps, device=self.device, **kwargs)
        return scheduler

    def _t5(self, tokenizer, encoder, prompts: Sequence[str]) -> torch.Tensor:
        ids, _ = _token_ids(tokenizer, prompts, self.max_sequence_length, self.device)
        return encoder(ids)[0]


class SD3Backbone(FlowMatchingBackbone):
    """Stable Diffusion 3: CLIP-L and CLIP-G penultimate hidden states (concatenated, zero-padded to T5's
    width) followed by T5's (zeros when the folder has no T5), and the two pooled projections."""

    family = "SD3"

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, vae=None, *, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, **kwargs) -> None:
        super().__init__(transformer, text_encoder, tokenizer, scheduler, vae, **kwargs)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.text_length = tokenizer.model_max_length + self.max_sequence_length
        self.extra_sizes = (transformer.config.pooled_projection_dim,)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids, _ = _token_ids(tokenizer, prompts, tokenizer.model_max_length, self.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        width = self.denoiser.config.joint_attention_dim
        if self.text_encoder_3 is not None:
            t5 = self._t5(self.tokenizer_3, self.text_encoder_3, prompts)
            width = t5.shape[-1]
        else:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, width)
        clip = F.pad(clip, (0, width - clip.shape[-1]))
        return pack_conditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)).to(self.dtype)

    def predict_noise(self, x_t, t, text):
        tokens, pooled = unpack_conditioning(text, self.text_length, self.extra_sizes)
        return self.denoiser(hidden_states=x_t, timestep=_timesteps(t, x_t.shape[0], x_t.device),
                             encoder_hidden_states=tokens, pooled_projections=pooled).sample


class FluxBackbone(FlowMatchingBackbone):
    """FLUX.1: T5 token embeddings and CLIP-L's pooled text; latents are packed into 2×2 patches for the
    transformer and unpacked after it. Guidance-distilled models ([dev]) take the guidance as an input
    (``embedded_guidance``, 3.5 by default) and sample without a classifier-free guidance branch."""

    family = "FLUX"

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, vae=None, *, text_encoder_2, tokenizer_2,
                 embedded_guidance: float = 3.5, **kwargs) -> None:
        kwargs.setdefault("max_sequence_length", 512)
        super().__init__(transformer, text_encoder, tokenizer, scheduler, vae, **kwargs)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.embedded_guidance = embedded_guidance
        self.text_length = self.max_sequence_length
        self.extra_sizes = (transformer.config.pooled_projection_dim,)

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.sample_size or 128  # the pipeline's default: 1024 px with an 8x VAE
        return (self.latent_channels, size, size)

    def _image_tokens(self) -> int:
        _, h, w = self.latent_shape
        return (h // 2) * (w // 2)

    def _sigmas(self, num_inference_steps: int) -> np.ndarray:
        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        ids, _ = _token_ids(self.tokenizer, prompts, self.tokenizer.model_max_length, self.device)
        pooled = self.text_encoder(ids).pooler_output
        t5 = self._t5(self.tokenizer_2, self.text_encoder_2, prompts)
        return pack_conditioning(t5, pooled).to(self.dtype)

    def predict_noise(self, x_t, t, text):
        tokens, pooled = unpack_conditioning(text, self.text_length, self.extra_sizes)
        b, c, h, w = x_t.shape
        packed = x_t.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        rows = torch.arange(h // 2, device=x_t.device).repeat_interleave(w // 2)
        cols = torch.arange(w // 2, device=x_t.device).repeat(h // 2)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(x_t.dtype)
        txt_ids = x_t.new_zeros(tokens.shape[1], 3)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.embedded_guidance, device=x_t.device, dtype=torch.float32)
        out = self.denoiser(hidden_states=packed, timestep=_timesteps(t, b, x_t.device).to(x_t.dtype) / 1000,
                            guidance=guidance, pooled_projections=pooled, encoder_hidden_states=tokens,
                            txt_ids=txt_ids, img_ids=img_ids).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def sampler_settings(self, num_inference_steps=None, guidance_scale=None, eta=None) -> dict:
        settings = super().sampler_settings(num_inference_steps, guidance_scale, eta)
        if self.denoiser.config.guidance_embeds:
            settings["embedded_guidance"] = self.embedded_guidance
        return settings


class PixArtBackbone(DiffusionBackbone):
    """PixArt-α/Σ: T5 token embeddings with their attention mask; the transformer predicts ε and, with learned
    variance, a second half of channels that sampling does not use. Sampled with DDIM from the folder's
    scheduler configuration; the 1024-px α models also take the resolution and aspect ratio."""

    family = "PixArt"
    part = "transformer"

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, vae=None, *,
                 max_sequence_length: int = 120, **kwargs) -> None:
        super().__init__(transformer, text_encoder, tokenizer, scheduler, vae, **kwargs)
        self.max_sequence_length = max_sequence_length
        self.text_length = max_sequence_length
        self.extra_sizes = (max_sequence_length,)

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        ids, mask = _token_ids(self.tokenizer, prompts, self.max_sequence_length, self.device)
        tokens = self.text_encoder(ids, attention_mask=mask)[0]
        return pack_conditioning(tokens, mask.float()).to(self.dtype)

    def predict_noise(self, x_t, t, text):
        tokens, mask = unpack_conditioning(text, self.text_length, self.extra_sizes)
        b = x_t.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(self.denoiser, "use_additional_conditions", False):
            size = float(self.image_size)
            added = {"resolution": x_t.new_tensor([size, size]).expand(b, 2), "aspect_ratio": x_t.new_ones(b, 1)}
        out = self.denoiser(x_t, encoder_hidden_states=tokens, encoder_attention_mask=mask,
                            timestep=_timesteps(t, b, x_t.device), added_cond_kwargs=added).sample
        return out[:, : x_t.shape[1]] if out.shape[1] == 2 * x_t.shape[1] else out


BACKBONES = {"sdxl": SDXLBackbone, "sd3": SD3Backbone, "flux": FluxBackbone, "pixart": PixArtBackbone}

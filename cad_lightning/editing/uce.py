"""UCE, the closed-form edit of the cross-attention keys and values (Gandikota et al., "Unified Concept Editing
in Diffusion Models", WACV 2024): a peer of CAD-Erase, for comparison.

Follows the official code, rohitgandikota/unified-concept-editing ``trainscripts/uce_sd_erase.py``, function
``UCE``: each prompt is represented by the text encoder's output at its last word (the token before the end
token); every cross-attention key/value weight W is replaced by

    W' = (λ W + s_e Σ_i (W c_guide_i) c_iᵀ + s_p Σ_j (W c_j) c_jᵀ) (λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ)⁻¹

so the erased prompts' keys and values become those of their guide prompts (the empty prompt by default, as
the official code's for objects), the preserved prompts' stay, and λ keeps the rest near W. Differences: the
model is any :class:`~cad_lightning.backbones.backbone.DiffusionBackbone` whose cross-attention K/V weights read
the text encoder's output (``reads_text_only``: SD 1.x/2.x, SDXL; PixArt's read it through the transformer's
caption projection, which is applied to ``c`` first; SD3 and FLUX have no such layers, their prompt tokens are
mixed with the image's in joint attention, and are refused), the solve runs in float64 on the CPU, and the result is returned
as new weights instead of being written to a file.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cad_lightning.editing.text_space import reads_text_only
from cad_lightning.errors import UserInputError


@torch.no_grad()
def last_word_embeddings(backbone, prompts: Sequence[str]) -> torch.Tensor:
    """(N, D) float64: what the cross-attention keys and values read at each prompt's last word (the text
    encoder's output, through the caption projection of a denoiser that has one), UCE's ``c`` of a prompt."""
    tokenizer = backbone.tokenizer
    length = getattr(backbone, "text_length", None) or tokenizer.model_max_length
    mask = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").attention_mask
    last = (mask.sum(dim=1) - 2).clamp(min=0)
    embeddings = backbone.encode(prompts)[:, :length]  # a family's packed extras follow the tokens
    projection = getattr(backbone.denoiser, "caption_projection", None)  # PixArt
    if projection is not None:
        embeddings = projection(embeddings)
    return embeddings.double().cpu()[torch.arange(len(prompts)), last.to(torch.long)]


@torch.no_grad()
def uce_weights(backbone, erase: Sequence[str], guide: Sequence[str] | str = "", preserve: Sequence[str] = (),
                erase_scale: float = 1.0, preserve_scale: float = 1.0, lamb: float = 0.5) -> dict[str, torch.Tensor]:
    """UCE's new cross-attention key/value weights, ``{parameter name: weight}`` (the model's dtype and device),
    for ``erase`` prompts sent towards ``guide`` prompts (one for all, or one each) while ``preserve`` prompts
    keep their keys and values. The model itself is not changed (see :func:`apply_weights`)."""
    erase = list(erase)
    guide = [guide] * len(erase) if isinstance(guide, str) else list(guide)
    if not erase:
        raise UserInputError("UCE needs at least one prompt to erase.")
    if len(guide) != len(erase):
        raise UserInputError(f"UCE: {len(erase)} prompts to erase but {len(guide)} guide prompts; give one guide "
                             "prompt, or one for each.")
    if not lamb > 0:
        raise UserInputError(f"UCE lamb must be positive, got {lamb}.")
    preserve = list(preserve)
    c_erase = last_word_embeddings(backbone, erase)
    c_guide = last_word_embeddings(backbone, guide)
    c_keep = last_word_embeddings(backbone, preserve) if preserve else c_erase[:0]
    params = {n: p for n, p in backbone.denoiser.named_parameters() if reads_text_only(n)}
    if not params:
        raise UserInputError(f"UCE edits the cross-attention keys and values that read the prompt's embeddings, and "
                             f"this {type(backbone.denoiser).__name__} has none (SD3 and FLUX mix the prompt's tokens "
                             "with the image's in joint attention).")
    out = {}
    for name, weight in params.items():
        w = weight.detach().double().cpu()  # (out, D)
        mat1 = lamb * w + erase_scale * (c_guide @ w.T).T @ c_erase + preserve_scale * (c_keep @ w.T).T @ c_keep
        mat2 = (lamb * torch.eye(w.shape[1], dtype=torch.float64) + erase_scale * c_erase.T @ c_erase
                + preserve_scale * c_keep.T @ c_keep)
        out[name] = torch.linalg.solve(mat2, mat1.T).T.to(weight.dtype).to(weight.device)  # mat1 @ mat2⁻¹
    return out


@torch.no_grad()
def apply_weights(denoiser: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the denoiser's parameters of the same names."""
    params = dict(denoiser.named_parameters())
    for name, weight in weights.items():
        params[name].copy_(weight)

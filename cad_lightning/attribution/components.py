"""ComponentSpace: which denoiser parameters are components, selected by name patterns.

The default is the paper's: the 2-D feed-forward weights of the transformer blocks. Named presets cover
the other usual sets; any other string is a regular expression matched (``re.search``) against the
parameter names of the denoiser (a UNet, or the transformer of SD3, FLUX or PixArt).

=====================  ==================================  ==============================================
preset                 UNets (SD 1.x/2.x, SDXL, embedded)  diffusion transformers (SD3, FLUX, PixArt)
=====================  ==================================  ==============================================
``ff``                 ``ff.net.0.proj``, ``ff.net.2``     the same, plus the prompt stream's
                                                           ``ff_context`` (SD3, FLUX) and FLUX's
                                                           single-stream ``proj_mlp``
``cross_attn_kv``      ``attn2.to_k``, ``attn2.to_v``      PixArt: the same; SD3, FLUX: the joint
                                                           attention's prompt projections ``add_k_proj``,
                                                           ``add_v_proj``
``attention``          every projection of ``attn1``,      every projection of every attention (``to_q/k/v``,
                       ``attn2``                           ``to_out.0``, ``add_q/k/v_proj``, ``to_add_out``)
``transformer_linear`` every weight in a transformer block (FLUX's single-stream blocks too)
``conv``               ResNet convolutions                 (none: refused)
=====================  ==================================  ==============================================
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from cad_lightning.errors import UserInputError

PRESETS: dict[str, str] = {
    # feed-forward weights of transformer blocks (GEGLU/GELU projection in, projection out), the prompt stream's
    # feed-forward of the joint-attention transformers, and FLUX's single-stream MLP input
    "ff": r"transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)\.weight$|single_transformer_blocks\.\d+\.proj_mlp\.weight$",
    # key/value projections of the text: cross-attention, or the prompt tokens' projections in joint attention
    "cross_attn_kv": r"transformer_blocks\.\d+\.(attn2\.to_[kv]|attn\.add_[kv]_proj)\.weight$",
    # every attention projection
    "attention": r"transformer_blocks\.\d+\.attn\d?\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)\.weight$",
    # every linear weight inside transformer blocks
    "transformer_linear": r"transformer_blocks\.\d+\..*\.weight$",
    # convolution kernels of the ResNet blocks
    "conv": r"resnets\.\d+\.conv[12]\.weight$",
}
MIN_NDIM = {"ff": 2, "cross_attn_kv": 2, "attention": 2, "transformer_linear": 2, "conv": 4}


class ComponentSpace:
    """The selected parameters of a denoiser, by name.

    Args:
        patterns: preset names (``ff``, ``cross_attn_kv``, ``attention``, ``transformer_linear``, ``conv``) or regular
            expressions over parameter names; a parameter is selected when any pattern matches.
    """

    def __init__(self, patterns: Sequence[str] = ("ff",)) -> None:
        if isinstance(patterns, str):
            patterns = [patterns]
        if not patterns:
            raise UserInputError("model.components is empty; give at least one preset or parameter-name pattern.")
        self.patterns = list(patterns)
        self._compiled = []
        for p in self.patterns:
            try:
                self._compiled.append((re.compile(PRESETS.get(p, p)), MIN_NDIM.get(p, 1)))
            except re.error as error:
                raise UserInputError(f"model.components pattern '{p}' is not a valid regular expression: {error}.") from error

    def names(self, module: torch.nn.Module) -> list[str]:
        """Selected parameter names in the module's order; a UserInputError when nothing matches."""
        selected = [
            name
            for name, param in module.named_parameters()
            if any(rx.search(name) and param.ndim >= ndim for rx, ndim in self._compiled)
        ]
        if not selected:
            raise UserInputError(
                f"model.components {self.patterns} selects no parameter of the {type(module).__name__}; use a preset "
                f"({', '.join(PRESETS)}) or a regular expression over names such as "
                f"'{next(iter(dict(module.named_parameters())), '')}'."
            )
        return selected

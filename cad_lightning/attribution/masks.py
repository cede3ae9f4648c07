"""Ablation masks over components, and one batched forward pass for a batch of different masks.

A :class:`MaskLayout` cuts the selected parameters into components at one granularity and gives every
component a flat index (both ways: index → (parameter, slice), and per-parameter slices of a mask row):

- ``neuron``: one row of a weight (an output feature of an ``nn.Linear``, an output channel of an
  ``nn.Conv2d``);
- ``head``: the rows of one attention head in ``to_q``/``to_k``/``to_v`` and its input columns in
  ``to_out.0`` (attention projections only);
- ``layer``: a whole weight;
- ``weight``: a single weight (of an ``nn.Linear`` or ``nn.Conv2d``; used to check first-order scores, far
  too many components for a regression).

A mask is a bool row over the components (True = keep, False = ablate). Mask ``i`` of a run is drawn from
(seed, i) alone with a CPU generator, so every process regenerates the same row and nothing large is shipped
between processes. :func:`sample_masks` keeps each component independently with probability ``keep_prob``
(a fixed expected density; the number ablated varies from mask to mask, which keeps the intercept of the
linear model identifiable: with exactly k ablated in every mask, Σ mask_i would be constant and a common
shift of all coefficients could not be told from the intercept).

:func:`batched_masks` applies a *different* mask to every sample of a batch inside one forward pass, with
hooks on the selected modules (never one model copy per mask): a row mask multiplies the module's output
features and puts the bias back (``m·(xWᵀ + b) + (1 − m)·b``, what zeroing the rows gives), a head mask of
``to_out.0`` multiplies its input features, and a weight mask recomputes the layer with per-sample masked
weights by batched matmul (a convolution: by one grouped convolution, a group per mask). When the model
is called on a batch that repeats the masked samples (the classifier-free guided sampler concatenates
[unconditional, conditional]), the masks are tiled to match.
:func:`zeroed_weights` is the reference: one mask, weights really set to zero.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cad_lightning.errors import UserInputError

GRANULARITIES = ("neuron", "head", "layer", "weight")
HEAD_ROWS = ("to_q", "to_k", "to_v")
HEAD_COLUMNS = ("to_out.0",)


@dataclass(frozen=True)
class Block:
    """The components of one parameter: ``size`` of them from flat index ``offset``.

    ``axis``: ``out`` (groups of ``group`` output features), ``in`` (groups of ``group`` input features),
    ``all`` (the whole weight) or ``weight`` (single weights, row-major).
    """

    name: str
    module: str
    axis: str
    size: int
    group: int
    offset: int
    shape: tuple[int, ...]


class MaskLayout:
    """Components of the selected parameters at one granularity, with a flat index.

    Args:
        unet: the model holding the parameters.
        names: the selected parameter names (``ComponentSpace.names``).
        granularity: ``neuron``, ``head``, ``layer`` or ``weight``.
    """

    def __init__(self, unet: nn.Module, names: Sequence[str], granularity: str = "neuron") -> None:
        if granularity not in GRANULARITIES:
            raise UserInputError(f"model.granularity must be one of {', '.join(GRANULARITIES)}, got '{granularity}'.")
        self.granularity = granularity
        self.names = list(names)
        modules = dict(unet.named_modules())
        params = dict(unet.named_parameters())
        blocks, offset = [], 0
        for name in self.names:
            module_name = name.rsplit(".", 1)[0]
            module = modules.get(module_name)
            if not name.endswith(".weight") or not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise UserInputError(
                    f"model.components selects '{name}', which is not the weight of a linear or convolution layer; "
                    "ablation masks apply to such weights only."
                )
            shape = tuple(params[name].shape)
            axis, group = self._cut(name, module_name, module, modules, shape)
            size = shape[0] // group if axis == "out" else shape[1] // group if axis == "in" else 1
            if axis == "weight":
                size = int(np.prod(shape))
            blocks.append(Block(name, module_name, axis, size, group, offset, shape))
            offset += size
        self.blocks = blocks
        self.n_components = offset

    def _cut(self, name, module_name, module, modules, shape) -> tuple[str, int]:
        if self.granularity == "neuron":
            return "out", 1
        if self.granularity == "layer":
            return "all", 1
        if self.granularity == "weight":
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise UserInputError(f"model.granularity 'weight' needs zero-padded convolutions; '{name}' pads with "
                                     f"'{module.padding_mode}'.")
            return "weight", 1
        parent_name, _, leaf = module_name.rpartition(".")
        if module_name.endswith(HEAD_COLUMNS):
            parent_name, leaf = module_name[: -len(".to_out.0")], "to_out.0"
        heads = getattr(modules.get(parent_name), "heads", None)
        if leaf not in HEAD_ROWS + HEAD_COLUMNS or not heads:
            raise UserInputError(
                f"model.granularity 'head' applies to attention projections ({', '.join(HEAD_ROWS + HEAD_COLUMNS)}); "
                f"'{name}' is not one: select components such as cross_attn_kv, or use granularity neuron or layer."
            )
        axis = "in" if leaf in HEAD_COLUMNS else "out"
        features = shape[1] if axis == "in" else shape[0]
        return axis, features // heads

    # --- indexing -----------------------------------------------------------------------------
    def locate(self, index: int) -> tuple[str, tuple]:
        """(parameter name, index into the weight) of flat component ``index``."""
        if not 0 <= index < self.n_components:
            raise IndexError(f"component {index} is outside 0..{self.n_components - 1}")
        block = next(b for b in self.blocks if b.offset <= index < b.offset + b.size)
        k = index - block.offset
        if block.axis == "out":
            return block.name, (slice(k * block.group, (k + 1) * block.group),)
        if block.axis == "in":
            return block.name, (slice(None), slice(k * block.group, (k + 1) * block.group))
        if block.axis == "weight":
            return block.name, tuple(int(i) for i in np.unravel_index(k, block.shape))
        return block.name, (slice(None),)

    def expand(self, block: Block, values: torch.Tensor) -> torch.Tensor:
        """Per-component values (B, block.size) → per-weight values (B, *block.shape)."""
        b = values.shape[0]
        if block.axis == "weight":
            return values.reshape(b, *block.shape)
        if block.axis == "all":
            return values.reshape(b, *[1] * len(block.shape)).expand(b, *block.shape)
        per_feature = values.repeat_interleave(block.group, dim=1)
        if block.axis == "out":
            return per_feature.reshape(b, block.shape[0], *[1] * (len(block.shape) - 1)).expand(b, *block.shape)
        return per_feature.reshape(b, 1, block.shape[1], *[1] * (len(block.shape) - 2)).expand(b, *block.shape)

    def weight_masks(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """One mask row (n_components,) → ``{parameter name: bool tensor of its shape}`` (the editing format)."""
        mask = torch.as_tensor(mask).bool().reshape(1, -1)
        return {b.name: self.expand(b, mask[:, b.offset : b.offset + b.size])[0].clone() for b in self.blocks}

    def to_parameter_scores(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-component scores (n_components,) → per-weight fp32 tensors keyed by parameter name; a component's
        score is spread evenly over its weights, so the sum over a component's weights is its score."""
        coefficients = torch.as_tensor(coefficients, dtype=torch.float64).reshape(1, -1)
        out = {}
        for b in self.blocks:
            weights_per_component = int(np.prod(b.shape)) // b.size
            values = coefficients[:, b.offset : b.offset + b.size] / weights_per_component
            out[b.name] = self.expand(b, values)[0].float().contiguous()
        return out

    def component_sums(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-weight scores → the sum over each component's weights, (n_components,) float64."""
        out = torch.zeros(self.n_components, dtype=torch.float64)
        for b in self.blocks:
            s = scores[b.name].double()
            if b.axis == "weight":
                part = s.reshape(-1)
            elif b.axis == "all":
                part = s.sum().reshape(1)
            elif b.axis == "out":
                part = s.reshape(b.size, -1).sum(1)
            else:
                part = s.transpose(0, 1).reshape(b.size, -1).sum(1)
            out[b.offset : b.offset + b.size] = part
        return out

    def describe(self) -> dict:
        return {"granularity": self.granularity, "n_components": self.n_components,
                "parameters": [{"name": b.name, "axis": b.axis, "components": b.size, "offset": b.offset,
                                "features_per_component": b.group} for b in self.blocks]}


def mask_generator(seed: int, mask_id: int) -> torch.Generator:
    """A CPU generator seeded from (seed, mask id) alone, the same on every process and platform."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(mask_id)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_masks(n_components: int, ids: Sequence[int], keep_prob: float, seed: int) -> torch.Tensor:
    """Bool masks (len(ids), n_components), True = keep: mask ``i`` keeps each component with probability
    ``keep_prob``, drawn from (seed, i) alone."""
    if not 0 < keep_prob < 1:
        raise UserInputError(f"keep_prob must be in (0, 1), got {keep_prob}.")
    out = torch.empty(len(ids), n_components, dtype=torch.bool)
    for row, mask_id in enumerate(ids):
        out[row] = torch.rand(n_components, generator=mask_generator(seed, mask_id)) < keep_prob
    return out


def _tile(m: torch.Tensor, batch: int, repeats: int = 1) -> torch.Tensor:
    """Per-sample factors of a batch of ``batch`` samples: each row of ``m`` serves ``repeats`` consecutive
    samples, and a batch that repeats the masked samples (guidance) repeats the rows."""
    units = m.shape[0] * repeats
    if batch % units:
        raise RuntimeError(f"a batch of {batch} samples does not repeat the {units} masked samples")
    m = m.repeat_interleave(repeats, dim=0) if repeats > 1 else m
    return m.repeat(batch // units, *[1] * (m.ndim - 1)) if batch != units else m


def _out_hook(factor: torch.Tensor, repeats: int):
    """y → m·y + (1 − m)·b on the output features (dim −1 of a linear, dim 1 of a convolution): what zeroing
    the rows gives. The factors are shaped once per batch size and reused at every call."""
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def hook(module, args, y):
        key = (y.shape[0], y.ndim, y.dtype)
        if key not in cache:
            m = _tile(factor, y.shape[0], repeats).to(y.dtype)
            bias = module.bias
            if isinstance(module, nn.Conv2d):
                m = m.reshape(*m.shape, *[1] * (y.ndim - 2))
                bias = bias.reshape(-1, *[1] * (y.ndim - 2)) if bias is not None else None
            else:
                m = m.reshape(m.shape[0], *[1] * (y.ndim - 2), m.shape[-1])
            cache[key] = (m, None if bias is None else (bias.detach() * (1 - m)))
        m, shift = cache[key]
        return y * m if shift is None else torch.addcmul(shift, y, m)

    return hook


def _in_hook(factor: torch.Tensor, repeats: int):
    """x → m·x on the input features of a linear layer."""
    cache: dict[tuple, torch.Tensor] = {}

    def hook(module, args):
        x = args[0]
        key = (x.shape[0], x.ndim, x.dtype)
        if key not in cache:
            m = _tile(factor, x.shape[0], repeats).to(x.dtype)
            cache[key] = m.reshape(m.shape[0], *[1] * (x.ndim - 2), m.shape[-1])
        return (x * cache[key], *args[1:])

    return hook


def _weight_hook(factor: torch.Tensor, repeats: int):
    """Recompute a linear layer with per-mask weights by batched matmul: y = x (W ⊙ m)ᵀ + b, the samples of
    one mask (``repeats`` consecutive ones) sharing one masked weight."""

    def hook(module, args, y):
        x = args[0]
        masks = _tile(factor, x.shape[0] // repeats).to(x.dtype)  # (units, out, in)
        weights = module.weight.unsqueeze(0) * masks
        flat = x.reshape(masks.shape[0], -1, x.shape[-1])
        out = torch.bmm(flat, weights.transpose(1, 2))
        if module.bias is not None:
            out = out + module.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return hook


def _conv_weight_hook(factor: torch.Tensor, repeats: int):
    """Recompute a convolution with per-mask weights: the samples of each mask become one group of a grouped
    convolution (input channels of all masks side by side), so every mask's samples meet only its weights."""

    def hook(module, args, y):
        x = args[0]
        masks = _tile(factor, x.shape[0] // repeats).to(x.dtype)  # (units, out, in / groups, kh, kw)
        units = masks.shape[0]
        weights = (module.weight.unsqueeze(0) * masks).reshape(-1, *module.weight.shape[1:])
        stacked = x.reshape(units, repeats, *x.shape[1:]).transpose(0, 1).reshape(repeats, -1, *x.shape[2:])
        out = F.conv2d(stacked, weights, None, module.stride, module.padding, module.dilation, units * module.groups)
        out = out.reshape(repeats, units, -1, *out.shape[2:]).transpose(0, 1).reshape(x.shape[0], -1, *out.shape[2:])
        if module.bias is not None:
            out = out + module.bias.reshape(1, -1, 1, 1)
        return out

    return hook


@contextmanager
def batched_masks(unet: nn.Module, layout: MaskLayout, masks: torch.Tensor, repeats: int = 1) -> Iterator[None]:
    """Within the block, every forward pass of ``unet`` runs its samples under per-sample masks: mask row ``k``
    of ``masks`` (bool or float (M, n_components), 1 = keep) for samples ``k·repeats … (k+1)·repeats − 1``
    (and for their copies when the batch repeats the M·repeats samples, as guidance does)."""
    masks = torch.as_tensor(masks)
    if masks.ndim != 2 or masks.shape[1] != layout.n_components:
        raise ValueError(f"masks must have shape (M, {layout.n_components}), got {tuple(masks.shape)}")
    modules = dict(unet.named_modules())
    device = next(unet.parameters()).device
    values = masks.to(device, torch.float32)
    handles = []
    try:
        for b in layout.blocks:
            part = values[:, b.offset : b.offset + b.size]
            module = modules[b.module]
            if b.axis == "weight":
                hook = _conv_weight_hook if isinstance(module, nn.Conv2d) else _weight_hook
                handles.append(module.register_forward_hook(hook(part.reshape(-1, *b.shape), repeats)))
            elif b.axis == "in":
                handles.append(module.register_forward_pre_hook(_in_hook(part.repeat_interleave(b.group, dim=1), repeats)))
            elif b.axis == "all":
                handles.append(module.register_forward_hook(_out_hook(part.expand(-1, b.shape[0]), repeats)))
            else:
                handles.append(module.register_forward_hook(_out_hook(part.repeat_interleave(b.group, dim=1), repeats)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def zeroed_weights(unet: nn.Module, layout: MaskLayout, mask: torch.Tensor) -> Iterator[None]:
    """Within the block, the ablated weights of one mask row (n_components,) are really zero."""
    params = dict(unet.named_parameters())
    saved = {}
    try:
        with torch.no_grad():
            for name, keep in layout.weight_masks(mask).items():
                saved[name] = params[name].detach().clone()
                params[name].mul_(keep.to(params[name].device, params[name].dtype))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)

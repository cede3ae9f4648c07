"""Continuous edits: a change of the weights (UCE's closed form, ESD's fine-tuning), beside CAD's ablation masks.

A :class:`WeightDelta` maps parameter names to the change of their weights (float tensors of the parameters'
shapes): the edited weight is the unedited one plus the change. Everything that puts, counts, controls and saves
an edit takes either kind (cad_lightning/editing/artifacts.py, select.py), so the exam reads both the same way.

The random control of a continuous edit (:func:`random_delta_like`) changes the same matrices by the same amount:
in each parameter a Gaussian direction scaled to the edit's Frobenius norm there, on the weights the edit changes.
It answers the question the ablation control answers for masks: is the edit's damage outside the concept any
smaller than that of a change of the same size that knows nothing of the concept?

Files: safetensors with the metadata key ``cad_lightning_format`` = ``weight-delta/1``, one fp32 tensor per
parameter (the change), never pickle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from cad_lightning.errors import UserInputError
from cad_lightning.utils import atomic_path

DELTA_FORMAT = "weight-delta/1"


class WeightDelta(dict):
    """``{parameter name: change of its weights}`` (float tensors): a continuous edit (see the module docstring)."""

    @classmethod
    def between(cls, original: Mapping[str, torch.Tensor], edited: Mapping[str, torch.Tensor]) -> "WeightDelta":
        """The change from ``original`` to ``edited`` weights (same names), in fp32 on the CPU."""
        return cls({n: (edited[n].detach().float().cpu() - original[n].detach().float().cpu()) for n in edited})

    def changed(self) -> int:
        """How many weights the edit changes (entries with a non-zero change)."""
        return sum(int((d != 0).sum()) for d in self.values())

    def norm(self) -> float:
        """The change's Frobenius norm over every parameter."""
        return float(sum(float(d.double().pow(2).sum()) for d in self.values()) ** 0.5)


def check_delta(delta: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
    """Every name a parameter of the model and every change of its shape; a clear error before anything changes."""
    for name, change in delta.items():
        if name not in params:
            raise UserInputError(f"weight change {name!r} is not a parameter of the model ({len(params)} parameters, "
                                 f"e.g. {next(iter(params), '<none>')!r}); the edit must come from the same architecture.")
        if not isinstance(change, torch.Tensor) or not change.is_floating_point():
            raise UserInputError(f"weight change {name!r} must be a float tensor, got "
                                 f"{getattr(change, 'dtype', type(change).__name__)}.")
        if tuple(change.shape) != tuple(params[name].shape):
            raise UserInputError(f"weight change {name!r} has shape {tuple(change.shape)} but the parameter has shape "
                                 f"{tuple(params[name].shape)}.")


def add_delta(module: torch.nn.Module, delta: Mapping[str, torch.Tensor], sign: float = 1.0) -> None:
    """Add ``sign`` × the change to the module's weights in place (checked first: a bad edit changes nothing)."""
    params = dict(module.named_parameters())
    check_delta(delta, params)
    with torch.no_grad():
        for name, change in delta.items():
            params[name].add_(change.to(params[name].device, params[name].dtype), alpha=sign)


def random_delta_like(delta: Mapping[str, torch.Tensor], generator: torch.Generator) -> WeightDelta:
    """The random control of a continuous edit: in every parameter, a Gaussian change on the weights the edit
    changes, scaled to the edit's Frobenius norm in that parameter, drawn from ``generator``."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (for a reproducible control), got {type(generator).__name__}.")
    if not delta:
        raise UserInputError("the weight change is empty, so its random control changes nothing.")
    out = WeightDelta()
    for name, change in delta.items():
        change = change.detach().float().cpu()
        support = change != 0
        direction = torch.randn(change.shape, generator=generator) * support
        scale = change.norm() / direction.norm().clamp_min(1e-30)
        out[name] = direction * scale
    return out


def save_delta(path: str | os.PathLike, delta: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a weight change to a safetensors file (``weight-delta/1``), atomically; returns the path."""
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UserInputError(f"metadata must map str to str (safetensors metadata), got {key!r}: {value!r}.")
    metadata["cad_lightning_format"] = DELTA_FORMAT
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({n: d.detach().float().cpu().contiguous() for n, d in delta.items()}, str(tmp), metadata=metadata)
    return path


def read_delta(f, path) -> WeightDelta:
    """The change stored in an open safetensors file of format ``weight-delta/1``."""
    delta = WeightDelta()
    for name in f.keys():
        t = f.get_tensor(name)
        if not t.is_floating_point():
            raise UserInputError(f"{str(path)!r} is not a weight-change file: {name!r} has dtype {t.dtype}.")
        delta[name] = t
    return delta

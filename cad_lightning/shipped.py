"""The models that ship with the package, found by name (``tiny-shapes``) from any working directory."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "tiny-shapes"


def shipped_models() -> Path:
    """Where the shipped models are: package data of an installed wheel (``cad_lightning/checkpoints``), or the
    repository's ``checkpoints/`` for a checkout (an editable install)."""
    installed = Path(__file__).resolve().parent / "checkpoints"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "checkpoints"


SHIPPED_MODELS = shipped_models()


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model folder: the path itself when it exists, else the shipped model of that name (``tiny-shapes``),
    from any working directory."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    shipped = SHIPPED_MODELS / candidate
    if shipped.exists():
        return shipped
    if candidate.parts[:1] == ("checkpoints",):  # a shipped model named by its place in the repository
        shipped = SHIPPED_MODELS / Path(*candidate.parts[1:])
        if shipped.exists():
            return shipped
    return candidate

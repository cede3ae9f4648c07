"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny random Stable-Diffusion-style folder (see tests/sd_folder.py), written once per test session."""
    from sd_folder import write_tiny_sd_folder

    return write_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd") / "tiny-sd", seed=0)


SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-shapes"


@pytest.fixture(scope="session")
def tiny_backbone():
    """The shipped embedded model, loaded once per test session."""
    from cad_lightning import load_backbone

    return load_backbone(SHIPPED_MODEL)


@pytest.fixture(scope="session")
def detector():
    """The shipped concept classifier."""
    from cad_lightning import load_concept_classifier

    return load_concept_classifier(SHIPPED_MODEL)


def run_cli(args: list[str]) -> int:
    """Run the ``cad`` console script in-process; returns its exit code (0 when it returns normally)."""
    from cad_lightning.cli import main

    try:
        main(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def ff_scoring_backbone():
    """A fresh copy of the shipped model with its FF weights (the default components) set to take gradients:
    (backbone, their names, every UNet parameter by name)."""
    from cad_lightning import load_backbone
    from cad_lightning.attribution.components import ComponentSpace

    backbone = load_backbone(SHIPPED_MODEL)
    names = ComponentSpace(["ff"]).names(backbone.denoiser)
    params = dict(backbone.denoiser.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    return backbone, names, params

"""UCE, the closed-form K/V edit ported as a peer (cad_lightning/editing/uce.py)."""

import pytest
import torch
from conftest import SHIPPED_MODEL

from cad_lightning import load_backbone, load_concept_classifier
from cad_lightning.editing.text_space import reads_text_only
from cad_lightning.editing.uce import apply_weights, last_word_embeddings, uce_weights
from cad_lightning.errors import UserInputError

COLOURS = ["red", "green", "blue", "yellow"]
OTHERS = ["square", "triangle", "cross", "star"]
ERASE = [f"a {c} circle" for c in COLOURS] + ["a circle"]
PRESERVE = [f"a {c} {s}" for c in COLOURS for s in OTHERS] + [f"a {s}" for s in OTHERS]


def test_the_edit_solves_uces_least_squares():
    """W' minimises λ‖W'−W‖² + Σ_erase ‖W'c − W c_guide‖² + Σ_preserve ‖W'c − W c‖²: its gradient is zero."""
    backbone = load_backbone(SHIPPED_MODEL)
    params = dict(backbone.denoiser.named_parameters())
    unedited = {n: p.detach().clone() for n, p in params.items()}
    new = uce_weights(backbone, ERASE, "", PRESERVE, erase_scale=1.0, preserve_scale=1.0, lamb=0.5)
    assert set(new) == {n for n in params if reads_text_only(n)} and new
    c_e, c_g = last_word_embeddings(backbone, ERASE), last_word_embeddings(backbone, [""] * len(ERASE))
    c_p = last_word_embeddings(backbone, PRESERVE)
    for name, weight in new.items():
        w, w2 = params[name].detach().double(), weight.double()
        gradient = 0.5 * (w2 - w) + (c_e @ w2.T - c_g @ w.T).T @ c_e + (c_p @ w2.T - c_p @ w.T).T @ c_p
        assert gradient.abs().max() < 1e-6 * (w.abs().max() * (1 + c_e.norm() ** 2 + c_p.norm() ** 2))
        # the erased words' keys and values move towards the guide's, the preserved ones' barely move
        before, after = (c_e @ w.T - c_g @ w.T).norm(), (c_e @ w2.T - c_g @ w.T).norm()
        assert after < 0.5 * before
        assert (c_p @ w2.T - c_p @ w.T).norm() < 0.2 * before
    assert all(torch.equal(params[n], unedited[n]) for n in params)  # the model itself is not changed


def test_uce_erases_the_concept_and_keeps_the_others():
    backbone, detector = load_backbone(SHIPPED_MODEL), load_concept_classifier(SHIPPED_MODEL)
    targets = [f"a {c} circle" for c in COLOURS] * 4
    kept = [f"a {c} square" for c in COLOURS] * 4

    def accuracy(prompts, word):
        return sum(s == word for s in detector(backbone.generate(prompts, seed=200))["shape"]) / len(prompts)

    assert accuracy(targets, "circle") >= 0.9 and accuracy(kept, "square") >= 0.9
    apply_weights(backbone.denoiser, uce_weights(backbone, ERASE, "", PRESERVE))
    assert accuracy(targets, "circle") <= 0.25
    assert accuracy(kept, "square") >= 0.9


def test_bad_uce_inputs_are_refused():
    backbone = load_backbone(SHIPPED_MODEL)
    with pytest.raises(UserInputError, match="at least one"):
        uce_weights(backbone, [])
    with pytest.raises(UserInputError, match="guide prompts"):
        uce_weights(backbone, ["a circle", "a red circle"], ["", "a shape", "a square"])
    with pytest.raises(UserInputError, match="lamb"):
        uce_weights(backbone, ["a circle"], lamb=0)

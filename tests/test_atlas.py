"""Where concepts live and how they overlap: the localisation shares, the top components, the overlap
matrices, and the atlas of the embedded model (concepts against a run of themselves with other seeds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SHIPPED_MODEL, run_cli

from cad_lightning import load_backbone
from cad_lightning.atlas import load_atlas_scores
from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.localisation import (
    component_block,
    component_kind,
    localisation,
    overlap,
    top_components,
    unet_levels,
)
from cad_lightning.data.attribution_datamodule import AttributionDataModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def unet():
    return load_backbone(SHIPPED_MODEL).unet


def random_scores(unet, components, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    return {n: torch.randn(params[n].shape, generator=generator) for n in ComponentSpace(components).names(unet)}


@pytest.mark.parametrize("components", [["cross_attn_kv"], ["transformer_linear", "conv"]])
def test_localisation_shares_add_up_by_block_and_by_kind(unet, components):
    scores = random_scores(unet, components)
    levels, size = unet_levels(unet)
    loc = localisation(scores, 0.01, levels, size)
    total = sum(t.numel() for t in scores.values())
    assert loc["k"] == round(0.01 * total)
    for key in ("by_block", "by_kind"):
        for field in ("weights", "positive", "negative"):
            assert math.isclose(sum(g[field] for g in loc[key].values()), 1.0, rel_tol=1e-9), (key, field)
    # the weights share is the groups' count of weights
    for label, group in loc["by_kind"].items():
        count = sum(t.numel() for n, t in scores.items() if component_kind(n) == label)
        assert math.isclose(group["weights"], count / total)
    # the positive mass is that of exactly the k largest scores (no ties in random scores)
    flat = torch.cat([t.flatten() for t in scores.values()])
    top = torch.topk(flat, loc["k"]).values
    mass = sum(float(t[t >= top[-1]].sum()) for t in scores.values())
    assert math.isclose(mass, float(top.sum()), rel_tol=1e-5)


def test_block_labels_follow_diffusers_resolutions():
    # a Stable Diffusion 1.x UNet: 64×64 latents, 4 levels; up blocks count from the lowest resolution
    assert component_block("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight", 4, 64) == "down 0 (64×64)"
    assert component_block("down_blocks.3.resnets.1.conv2.weight", 4, 64) == "down 3 (8×8)"
    assert component_block("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", 4, 64) == "mid (8×8)"
    assert component_block("up_blocks.0.resnets.0.conv1.weight", 4, 64) == "up 0 (8×8)"
    assert component_block("up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q.weight", 4, 64) == "up 3 (64×64)"
    assert component_block("conv_in.weight", 4, 64) == "other"
    assert component_kind("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight") == "cross-attention values"
    assert component_kind("down_blocks.1.resnets.0.conv_shortcut.weight") == "conv"
    assert component_kind("mid_block.attentions.0.proj_in.weight") == "other"


def test_top_components_are_the_largest_scores_with_their_place(unet):
    scores = random_scores(unet, ["transformer_linear", "conv"], seed=1)
    rows = top_components(scores, 20)
    flat = torch.cat([t.flatten() for t in scores.values()])
    assert [r["score"] for r in rows] == torch.topk(flat, 20).values.tolist()
    assert all(scores[r["parameter"]][tuple(r["index"])].item() == r["score"] for r in rows)


def test_a_concept_overlaps_itself_fully_and_unrelated_scores_barely(unet):
    a, b = random_scores(unet, ["cross_attn_kv"], 0), random_scores(unet, ["cross_attn_kv"], 1)
    result = overlap({"a": a, "b": b}, top_fraction=0.05)
    assert result["jaccard"][0][0] == 1.0 and result["jaccard"][1][1] == 1.0
    assert result["spearman"][0][0] == pytest.approx(1.0) and result["spearman"][1][1] == pytest.approx(1.0)
    assert result["jaccard"][0][1] < 0.1 and abs(result["spearman"][0][1]) < 0.05  # independent draws
    assert result["jaccard"][0][1] == result["jaccard"][1][0]


def test_concepts_file_gives_the_concepts_in_order(tmp_path):
    csv = tmp_path / "concepts.csv"
    csv.write_text("concept,note\ngolf ball,object\nchurch,\n\ngolf ball,again\n")
    data = AttributionDataModule(concepts_file=str(csv), prompt_templates=["a photo of a {concept}"], retain_samples=1)
    assert data.concepts == ["golf ball", "church"]
    bad = tmp_path / "bad.csv"
    bad.write_text("name\ngolf ball\n")
    with pytest.raises(Exception, match="no 'concept' column"):
        AttributionDataModule(concepts_file=str(bad), prompt_templates=["a photo of a {concept}"])


@pytest.mark.slow
def test_atlas_concepts_are_closest_to_their_own_run_with_other_seeds(tmp_path):
    """The atlas config on four concepts (two shapes, a colour, a texture; 6 runs each, 8 steps), twice with
    different seeds: each concept's top-1% set overlaps its own other run more than any other concept's."""
    small = ["--config", str(CONFIGS / "atlas.yaml"), "--data.retain_concepts", "[square, red, striped]",
             "--data.samples", "6", "--data.retain_samples", "6", "--model.num_inference_steps", "8",
             "--trainer.enable_progress_bar", "false"]
    assert run_cli(["fit", *small, "--trainer.default_root_dir", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "lightning_logs" / "version_0"
    assert run_cli(["fit", *small, "--data.seed", "1000", "--trainer.default_root_dir", str(tmp_path / "b"),
                    "--trainer.callbacks.init_args.compare_with", str(first)]) == 0
    second = tmp_path / "b" / "lightning_logs" / "version_0"
    report = json.loads((second / "report.json").read_text())
    assert report["concepts"] == ["circle", "square", "red", "striped"]
    for name in ("overlap.png", "localisation.png", "overlap_vs_other.png", "scores.safetensors"):
        assert (second / "atlas" / name).is_file()
    within = report["overlap"]
    assert all(within["jaccard"][i][i] == 1.0 for i in range(4))
    reproducible = report["reproducible"]
    assert all(r["own_is_highest"] for r in reproducible.values()), reproducible
    # the scores written are the ones compared
    other = load_atlas_scores(first)
    assert set(other) == set(report["concepts"])
    assert "concepts overlap more with their own other run" in (second / "report.md").read_text()


def test_overlap_does_not_depend_on_the_order_of_the_parameters(unet):
    """An atlas read back from safetensors lists its parameters sorted by name, a run's scores in the UNet's order."""
    a = random_scores(unet, ["transformer_linear", "conv"], 0)
    shuffled = dict(sorted(a.items(), reverse=True))
    result = overlap({"a": a}, {"a": shuffled})
    assert result["jaccard"][0][0] == 1.0 and result["spearman"][0][0] == pytest.approx(1.0)

"""Ablation masks: components at each granularity, deterministic masks, one batched pass = one mask at a time."""

import pytest
import torch

from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.masks import MaskLayout, batched_masks, sample_masks, zeroed_weights
from cad_lightning.errors import UserInputError


def test_masks_depend_only_on_seed_and_id():
    a = sample_masks(500, [0, 1, 2, 3], keep_prob=0.95, seed=7)
    b = sample_masks(500, [3, 1], keep_prob=0.95, seed=7)  # other order, other batch
    assert torch.equal(a[3], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a, sample_masks(500, [0, 1, 2, 3], keep_prob=0.95, seed=7))
    assert not torch.equal(a, sample_masks(500, [0, 1, 2, 3], keep_prob=0.95, seed=8))
    assert len({tuple(row.tolist()) for row in a}) == 4
    ablated = (~sample_masks(2000, range(50), keep_prob=0.95, seed=0)).float().mean()
    assert abs(float(ablated) - 0.05) < 0.005


def test_bad_keep_prob_is_refused():
    with pytest.raises(UserInputError, match="keep_prob"):
        sample_masks(10, [0], keep_prob=1.0, seed=0)


@pytest.mark.parametrize("granularity, preset, expected", [
    ("neuron", "ff", 4 * (512 + 64)), ("layer", "ff", 8), ("head", "cross_attn_kv", 8 * 8), ("weight", "ff", 4 * (512 * 64 + 64 * 256)),
])
def test_layout_counts_and_index(tiny_backbone, granularity, preset, expected):
    unet = tiny_backbone.denoiser
    layout = MaskLayout(unet, ComponentSpace([preset]).names(unet), granularity)
    assert layout.n_components == expected
    last = layout.blocks[-1]
    name, index = layout.locate(layout.n_components - 1)
    assert name == last.name
    scores = layout.to_parameter_scores(torch.arange(layout.n_components, dtype=torch.float64))
    assert torch.allclose(layout.component_sums(scores), torch.arange(layout.n_components, dtype=torch.float64))


def test_head_granularity_outside_attention_is_refused(tiny_backbone):
    unet = tiny_backbone.denoiser
    with pytest.raises(UserInputError, match="head"):
        MaskLayout(unet, ComponentSpace(["ff"]).names(unet), "head")


@pytest.mark.parametrize("granularity, preset", [
    ("neuron", "ff"), ("head", "transformer_linear"), ("layer", "ff"), ("weight", "ff"), ("neuron", "conv"), ("weight", "conv")])
def test_batched_pass_equals_one_mask_at_a_time(tiny_backbone, granularity, preset):
    """Four different masks in one forward pass give what four passes with the weights zeroed give."""
    unet = tiny_backbone.denoiser
    names = ComponentSpace([preset if preset != "transformer_linear" else r"attn[12]\.to_(q|k|v|out\.0)\.weight$"]).names(unet)
    layout = MaskLayout(unet, names, granularity)
    masks = sample_masks(layout.n_components, range(4), keep_prob=0.7, seed=1)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([900, 500, 100, 10])
    text = tiny_backbone.encode(["a red circle", "a square", "", "a blue striped star"])
    with torch.no_grad():
        with batched_masks(unet, layout, masks):
            batched = tiny_backbone.predict_noise(x, t, text)
            # a batch repeating the masked samples (classifier-free guidance) tiles the masks
            doubled = tiny_backbone.predict_noise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, text]))
        unmasked = tiny_backbone.predict_noise(x, t, text)
        looped = []
        for b in range(4):
            with zeroed_weights(unet, layout, masks[b]):
                looped.append(tiny_backbone.predict_noise(x[b : b + 1], t[b : b + 1], text[b : b + 1]))
        looped = torch.cat(looped)
        assert torch.equal(tiny_backbone.predict_noise(x, t, text), unmasked)  # weights restored
    assert torch.allclose(batched, looped, atol=1e-5, rtol=1e-4)
    assert torch.allclose(doubled, torch.cat([looped, looped]), atol=1e-5, rtol=1e-4)
    assert (batched - unmasked).abs().max() > 1e-3  # the masks do change the outputs


def test_masks_shared_by_consecutive_samples(tiny_backbone):
    """``repeats``: each mask serves consecutive samples, e.g. all states of the same runs."""
    unet = tiny_backbone.denoiser
    for granularity, preset in (("neuron", "ff"), ("weight", "ff"), ("weight", "conv")):
        layout = MaskLayout(unet, ComponentSpace([preset]).names(unet), granularity)
        masks = sample_masks(layout.n_components, range(2), keep_prob=0.8, seed=2)
        x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([900, 500, 100, 900, 500, 100])
        text = tiny_backbone.encode(["a red circle"] * 6)
        with torch.no_grad():
            with batched_masks(unet, layout, masks, repeats=3):
                shared = tiny_backbone.predict_noise(x, t, text)
            with batched_masks(unet, layout, masks.repeat_interleave(3, dim=0)):
                per_sample = tiny_backbone.predict_noise(x, t, text)
        assert torch.allclose(shared, per_sample, atol=1e-5, rtol=1e-4)

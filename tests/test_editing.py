"""Component selection hits exact counts with the right signs, and masks round-trip through files and UNets."""

from __future__ import annotations

import math

import pytest
import torch

from cad_lightning import UserInputError
from cad_lightning.editing import (
    apply_edit,
    apply_masks,
    combine_masks,
    count_ablated,
    load_masks,
    random_like,
    read_mask_metadata,
    retain_adjusted_scores,
    save_edited_unet,
    save_masks,
    select_components,
    target_count,
)


def make_scores(seed: int = 0, positive_only: bool = False) -> dict[str, torch.Tensor]:
    """Scores of mixed shapes: short rows (10), a long-row matrix, a 1-D bias and a conv-like 4-D weight."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"short.weight": (40, 10), "long.weight": (6, 64), "bias": (33,), "conv.weight": (4, 3, 3, 3)}
    scores = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    return {n: s.abs() for n, s in scores.items()} if positive_only else scores


def ablated(masks):
    return {n: ~m for n, m in masks.items()}


def rows_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


# ------------------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("scope", ["row", "matrix", "global"])
@pytest.mark.parametrize("ratio", [0.03, 0.1, 0.37])
def test_exact_total_count_every_scope(scope, ratio):
    scores = make_scores(positive_only=True)
    total = sum(t.numel() for t in scores.values())
    masks = select_components(scores, ratio, scope=scope)
    assert set(masks) == set(scores)
    assert all(m.dtype == torch.bool and m.shape == scores[n].shape for n, m in masks.items())
    assert count_ablated(masks) == round(ratio * total) == target_count(scores, ratio)


def test_short_rows_still_ablate_exact_total():
    # Rows of length 10 with ratio 0.03: the official per-row rounding ablates nothing; we ablate exactly K.
    g = torch.Generator().manual_seed(1)
    scores = {"w": torch.rand(100, 10, generator=g) + 0.01}
    masks = select_components(scores, 0.03, scope="row")
    assert count_ablated(masks) == 30
    per_row = (~masks["w"]).sum(dim=1)
    assert per_row.max() == 1 and int((per_row == 1).sum()) == 30
    # The extras go to the rows whose best candidate scores highest.
    best = scores["w"].max(dim=1).values
    assert set(per_row.nonzero().flatten().tolist()) == set(best.topk(30).indices.tolist())
    # ... and inside each chosen row it is the row's best weight.
    for r in per_row.nonzero().flatten().tolist():
        assert (~masks["w"][r]).nonzero().item() == int(scores["w"][r].argmax())


def test_row_scope_floors_and_extras():
    scores = make_scores(positive_only=True)
    ratio = 0.15
    masks = select_components(scores, ratio, scope="row")
    for name, mask in masks.items():
        per_row = rows_of(~mask).sum(dim=1)
        floor = math.floor(ratio * rows_of(mask).shape[1])
        assert ((per_row == floor) | (per_row == floor + 1)).all(), name
        # Each row's ablated weights are that row's top scores.
        s = rows_of(scores[name])
        for r in range(s.shape[0]):
            k = int(per_row[r])
            if k:
                assert set(rows_of(~mask)[r].nonzero().flatten().tolist()) == set(s[r].topk(k).indices.tolist())


def test_matrix_scope_largest_remainders():
    scores = make_scores(positive_only=True)
    ratio = 0.07
    masks = select_components(scores, ratio, scope="matrix")
    exact = {n: ratio * t.numel() for n, t in scores.items()}
    got = {n: int((~m).sum()) for n, m in masks.items()}
    assert all(got[n] in (math.floor(x), math.floor(x) + 1) for n, x in exact.items())
    k = round(ratio * sum(t.numel() for t in scores.values()))
    extras = k - sum(math.floor(x) for x in exact.values())
    by_remainder = sorted(exact, key=lambda n: -(exact[n] - math.floor(exact[n])))
    assert {n for n in scores if got[n] == math.floor(exact[n]) + 1} == set(by_remainder[:extras])


# ------------------------------------------------------------------------------------------------ which ones
def test_global_erase_matches_brute_force_sort():
    scores = make_scores(seed=3)
    flat = torch.cat([t.reshape(-1) for t in scores.values()])
    k = round(0.1 * flat.numel())
    assert int((flat > 0).sum()) > k
    masks = select_components(scores, 0.1, scope="global")
    chosen = torch.cat([(~m).reshape(-1) for m in masks.values()])
    expected = sorted(range(flat.numel()), key=lambda i: -float(flat[i]))[:k]
    assert set(chosen.nonzero().flatten().tolist()) == set(expected)


def test_amplify_picks_most_negative():
    scores = make_scores(seed=4)
    flat = torch.cat([t.reshape(-1) for t in scores.values()])
    masks = select_components(scores, 0.05, mode="amplify", scope="global")
    chosen = torch.cat([(~m).reshape(-1) for m in masks.values()])
    k = round(0.05 * flat.numel())
    assert set(chosen.nonzero().flatten().tolist()) == set(flat.argsort()[:k].tolist())
    assert (flat[chosen] < 0).all()
    erase = torch.cat([(~m).reshape(-1) for m in select_components(scores, 0.05, scope="global").values()])
    assert not (erase & chosen).any()


def test_ties_broken_by_flat_index():
    scores = {"a": torch.ones(3, 4), "b": torch.ones(5)}
    masks = select_components(scores, 0.25, scope="global")  # K = round(4.25) = 4
    assert (~masks["a"]).reshape(-1).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert masks["b"].all()
    assert torch.equal(masks["a"], select_components(scores, 0.25, scope="global")["a"])


@pytest.mark.parametrize("scope", ["row", "matrix", "global"])
@pytest.mark.parametrize("mode", ["erase", "amplify"])
def test_sign_restriction_reports_shortfall(scope, mode):
    # Only 3 weights have the edit's sign: a 50% ratio ablates exactly those, never a wrong-signed one.
    sign = 1.0 if mode == "erase" else -1.0
    score = -sign * (torch.rand(4, 10) + 0.1)
    score[0, 2], score[1, 5], score[3, 9] = sign * 1.0, sign * 2.0, sign * 3.0
    score[2, 0] = 0.0  # zero is not eligible either
    masks = select_components({"w": score}, 0.5, mode=mode, scope=scope)
    assert count_ablated(masks) == 3
    assert set(map(tuple, (~masks["w"]).nonzero().tolist())) == {(0, 2), (1, 5), (3, 9)}


@pytest.mark.parametrize("scope", ["row", "matrix", "global"])
def test_exclude_respected(scope):
    scores = make_scores(positive_only=True)
    free = select_components(scores, 0.1, scope=scope)
    exclude = {n: ~m for n, m in free.items()}  # protect exactly what would have been chosen
    exclude["not_a_score_key"] = torch.ones(2, dtype=torch.bool)  # ignored
    masks = select_components(scores, 0.1, scope=scope, exclude=exclude)
    assert count_ablated(masks) == count_ablated(free)
    for n in scores:
        assert not ((~masks[n]) & exclude[n]).any()


# ------------------------------------------------------------------------------------------------ retain set
def test_retain_adjusted_scores_protect_shared_component():
    g = torch.Generator().manual_seed(5)
    target = {"w": torch.rand(8, 16, generator=g) * 0.5}
    retained = {"w": torch.randn(8, 16, generator=g) * 10.0}  # different scale: normalisation matters
    # Component (2, 3) is top for the target AND for the retained concept; (5, 7) is top for the target only.
    target["w"][2, 3], target["w"][5, 7] = 5.0, 4.0
    retained["w"][2, 3] = 200.0
    retained["w"][5, 7] = -200.0  # negative for retained: not protected when erasing
    plain = select_components(target, 1 / 128, scope="global")
    assert set(map(tuple, (~plain["w"]).nonzero().tolist())) == {(2, 3)}
    adjusted = retain_adjusted_scores(target, [retained], weight=1.0)
    masks = select_components(adjusted, 1 / 128, scope="global")
    assert set(map(tuple, (~masks["w"]).nonzero().tolist())) == {(5, 7)}
    # The formula: t / std(t) - weight * max(0, r / std(r)).
    t_hat = target["w"] / target["w"].std(correction=0)
    r_hat = retained["w"] / retained["w"].std(correction=0)
    assert torch.allclose(adjusted["w"], t_hat - r_hat.clamp(min=0), atol=1e-5)
    # Amplify pushes away the negative part of retained scores, toward positive.
    amp = retain_adjusted_scores({"w": -target["w"]}, [{"w": -retained["w"]}], weight=2.0, mode="amplify")
    assert torch.allclose(amp["w"], -t_hat + 2.0 * r_hat.clamp(min=0), atol=1e-5)
    masks = select_components(amp, 1 / 128, mode="amplify", scope="global")
    assert set(map(tuple, (~masks["w"]).nonzero().tolist())) == {(5, 7)}


def test_retain_max_over_concepts():
    target = {"w": torch.tensor([1.0, -1.0, 1.0, -1.0])}
    r1 = {"w": torch.tensor([2.0, 0.0, 0.0, 0.0])}
    r2 = {"w": torch.tensor([0.0, 0.0, 4.0, 0.0])}
    adjusted = retain_adjusted_scores(target, [r1, r2], weight=0.5)
    std = lambda t: float(t.std(correction=0))  # noqa: E731
    expected = target["w"] / std(target["w"]) - 0.5 * torch.maximum(r1["w"] / std(r1["w"]), r2["w"] / std(r2["w"]))
    assert torch.allclose(adjusted["w"], expected)


# ------------------------------------------------------------------------------------------------ random control
def test_random_like_keeps_per_row_counts():
    scores = make_scores(positive_only=True)
    masks = select_components(scores, 0.2, scope="row")
    control = random_like(masks, torch.Generator().manual_seed(0))
    assert set(control) == set(masks)
    for n in masks:
        assert control[n].shape == masks[n].shape and control[n].dtype == torch.bool
        assert torch.equal(rows_of(~control[n]).sum(dim=1), rows_of(~masks[n]).sum(dim=1))
    assert count_ablated(control) == count_ablated(masks)
    assert any(not torch.equal(control[n], masks[n]) for n in masks)
    again = random_like(masks, torch.Generator().manual_seed(0))
    assert all(torch.equal(again[n], control[n]) for n in masks)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1, float("nan"), "0.1", True, None])
def test_bad_ratio(ratio):
    with pytest.raises(UserInputError, match="ratio") as info:
        select_components(make_scores(), ratio)
    assert repr(ratio) in str(info.value)


def test_bad_mode_scope_and_scores():
    scores = make_scores()
    with pytest.raises(UserInputError, match=r"mode.*'erase', 'amplify'.*'delete'"):
        select_components(scores, 0.1, mode="delete")
    with pytest.raises(UserInputError, match=r"scope.*'row', 'matrix', 'global'.*'layer'"):
        select_components(scores, 0.1, scope="layer")
    bad = dict(scores)
    bad["long.weight"] = bad["long.weight"].clone()
    bad["long.weight"][0, :2] = float("nan")
    bad["long.weight"][1, 0] = float("inf")
    with pytest.raises(UserInputError, match=r"'long.weight'.* 3 non-finite"):
        select_components(bad, 0.1)
    with pytest.raises(UserInputError, match="selects nothing"):
        select_components({}, 0.1)
    with pytest.raises(UserInputError, match=r"exclude\['bias'\]"):
        select_components(scores, 0.1, exclude={"bias": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(UserInputError, match="mode"):
        retain_adjusted_scores(scores, [], mode="wipe")
    with pytest.raises(UserInputError, match=r"retained\[0\].*'bias'"):
        retain_adjusted_scores(scores, [{k: v for k, v in scores.items() if k != "bias"}])
    with pytest.raises(UserInputError, match="weight"):
        retain_adjusted_scores(scores, [scores], weight=-1)


# ------------------------------------------------------------------------------------------------ files
def test_save_load_round_trip(tmp_path):
    masks = select_components(make_scores(positive_only=True), 0.1)
    path = save_masks(tmp_path / "edits" / "erase-0.1.safetensors", masks, {"concept": "circle", "ratio": "0.1"})
    loaded = load_masks(path)
    assert set(loaded) == set(masks)
    assert all(loaded[n].dtype == torch.bool and torch.equal(loaded[n], masks[n]) for n in masks)
    meta = read_mask_metadata(path)
    assert meta["concept"] == "circle" and meta["ratio"] == "0.1"
    assert [p.name for p in path.parent.iterdir()] == ["erase-0.1.safetensors"]  # no temp files left


def test_load_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_masks(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserInputError, match="not a safetensors file"):
        load_masks(junk)
    from safetensors.torch import save_file

    scores_file = tmp_path / "scores.safetensors"
    save_file({"w": torch.randn(3, 3)}, str(scores_file))
    with pytest.raises(UserInputError, match=r"not a mask file.*'w'.*float32"):
        load_masks(scores_file)


def test_mask_files_grow_with_the_ablated_weights_not_with_the_model(tmp_path):
    """Sparse files: 1% of a 4M-weight parameter ablated takes about 4 bytes per ablated weight, not a byte per
    weight; a parameter with nothing ablated and one with everything ablated both round-trip."""
    generator = torch.Generator().manual_seed(0)
    big = torch.ones(2048, 2048, dtype=torch.bool)
    big.view(-1)[torch.randperm(big.numel(), generator=generator)[: big.numel() // 100]] = False
    masks = {"big": big, "untouched": torch.ones(7, 3, dtype=torch.bool), "gone": torch.zeros(5, dtype=torch.bool)}
    path = save_masks(tmp_path / "edit.safetensors", masks)
    ablated = big.numel() // 100 + 5
    assert path.stat().st_size < 4 * ablated + 1024  # the dense format: > 4,194,304 bytes
    loaded = load_masks(path)
    assert set(loaded) == set(masks) and all(torch.equal(loaded[n], masks[n]) for n in masks)
    assert read_mask_metadata(path)["cad_lightning_format"] == "ablation-masks/2"


def test_dense_mask_files_of_earlier_runs_still_apply(tmp_path):
    from safetensors.torch import save_file

    masks = select_components(make_scores(positive_only=True), 0.1)
    dense = tmp_path / "dense.safetensors"
    save_file({n: m.to(torch.uint8) for n, m in masks.items()}, str(dense),
              metadata={"cad_lightning_format": "ablation-masks/1"})
    sparse = save_masks(tmp_path / "sparse.safetensors", masks)
    a, b = load_masks(dense), load_masks(sparse)
    assert set(a) == set(b) == set(masks) and all(torch.equal(a[n], masks[n]) and torch.equal(b[n], masks[n]) for n in masks)


def test_a_sparse_file_with_indices_out_of_range_is_refused(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.tensor([0, 12], dtype=torch.int32)}, str(bad),
              metadata={"cad_lightning_format": "ablation-masks/2", "shapes": '{"w": [3, 4]}'})
    with pytest.raises(UserInputError, match=r"outside its shape \(3, 4\)"):
        load_masks(bad)


def test_combine_masks():
    a = {"x": torch.tensor([True, False, True]), "y": torch.tensor([False])}
    b = {"x": torch.tensor([True, True, False]), "z": torch.tensor([True, False])}
    c = combine_masks(a, b)
    assert set(c) == {"x", "y", "z"}
    assert c["x"].tolist() == [True, False, False] and c["y"].tolist() == [False] and c["z"].tolist() == [True, False]
    with pytest.raises(UserInputError, match="'x'.*shape"):
        combine_masks(a, {"x": torch.ones(4, dtype=torch.bool)})


# ------------------------------------------------------------------------------------------------ UNet
@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()


def ff_scores(unet, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random scores for the UNet's feed-forward weights (the paper's default components)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in unet.named_parameters() if ".ff." in n and n.endswith("weight")}


def state(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def test_apply_masks_zeroes_exactly_masked(tiny_unet):
    import copy

    unet = copy.deepcopy(tiny_unet)
    before = state(unet)
    scores = ff_scores(unet)
    assert scores
    masks = select_components(scores, 0.1)
    zeroed = apply_masks(unet, masks)
    assert zeroed == count_ablated(masks) == target_count(scores, 0.1)
    after = state(unet)
    for n, p in after.items():
        if n in masks:
            assert (p[~masks[n]] == 0).all()
            assert torch.equal(p[masks[n]], before[n][masks[n]])
        else:
            assert torch.equal(p, before[n])


def test_apply_masks_bad_key_or_shape(tiny_unet):
    import copy

    unet = copy.deepcopy(tiny_unet)
    before = state(unet)
    name, param = next((n, p) for n, p in unet.named_parameters() if p.dim() == 2)
    with pytest.raises(UserInputError, match="'no.such.weight'.*not a parameter"):
        apply_masks(unet, {name: torch.zeros(param.shape, dtype=torch.bool), "no.such.weight": torch.ones(2, dtype=torch.bool)})
    wrong = (param.shape[0] + 1, param.shape[1])
    with pytest.raises(UserInputError, match=rf"{name}.*{tuple(wrong)}.*{tuple(param.shape)}".replace("(", r"\(").replace(")", r"\)")):
        apply_masks(unet, {name: torch.zeros(wrong, dtype=torch.bool)})
    assert all(torch.equal(p, before[n]) for n, p in state(unet).items())  # nothing applied on error


def test_save_edited_unet_round_trip(tiny_unet, tmp_path):
    from diffusers import UNet2DConditionModel

    before = state(tiny_unet)
    masks = select_components(ff_scores(tiny_unet, 1), 0.2, scope="matrix")
    folder = save_edited_unet(tiny_unet, masks, tmp_path / "edits" / "erase-0.2" / "unet")
    assert all(torch.equal(p, before[n]) for n, p in state(tiny_unet).items())  # source untouched
    loaded = UNet2DConditionModel.from_pretrained(folder)
    for n, p in loaded.named_parameters():
        if n in masks:
            assert torch.equal(p == 0, ~masks[n] | (before[n] == 0))
            assert torch.equal(p[masks[n]], before[n][masks[n]])
        else:
            assert torch.equal(p, before[n])
    save_edited_unet(tiny_unet, {}, folder)  # replacing an existing folder works
    assert all(torch.equal(p, before[n]) for n, p in UNet2DConditionModel.from_pretrained(folder).named_parameters())
    assert sorted(p.name for p in folder.parent.iterdir()) == ["unet"]  # no temp siblings left


def test_apply_edit_equals_apply_masks(tiny_unet, tmp_path):
    import copy

    import cad_lightning

    masks = select_components(ff_scores(tiny_unet, 2), 0.05, mode="amplify")
    path = save_masks(tmp_path / "amplify-0.05.safetensors", masks)
    a, b = copy.deepcopy(tiny_unet), copy.deepcopy(tiny_unet)
    assert cad_lightning.apply_edit(a, path) == apply_masks(b, masks) == count_ablated(masks)
    assert apply_edit is cad_lightning.apply_edit
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))

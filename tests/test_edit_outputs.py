"""EditOutputs: the random controls, refusals and files every writer's edits share."""

from __future__ import annotations

import pytest
import torch

from cad_lightning.edit_outputs import EditOutputs, checked_ratios
from cad_lightning.errors import UserInputError


def _edit(ratio: float, rows: int = 6, cols: int = 50) -> dict[str, torch.Tensor]:
    """Masks ablating the first ``ratio`` of each row's weights of two matrices."""
    k = round(ratio * cols)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    keep[:, :k] = False
    return {"a": keep.clone(), "b": keep[:3].clone()}


def test_random_control_has_the_edits_counts_per_row_and_a_seed_per_ratio():
    outputs = EditOutputs("Writer", [0.1, 0.3], random_draws=2)
    edits = {"selective": {0.1: _edit(0.1), 0.3: _edit(0.3)}}
    outputs.add_random(edits)
    assert set(edits) == {"selective", "random"} and set(edits["random"]) == {0.1, 0.3}
    for ratio, control in edits["random"].items():
        edit = edits["selective"][ratio]
        for name in edit:
            assert torch.equal((~control[name]).sum(1), (~edit[name]).sum(1))  # same count in every row
            assert not torch.equal(control[name], edit[name])  # at other positions
    # a ratio's control does not depend on the other ratios asked for; other draws differ from draw 0
    alone = EditOutputs("Writer", [0.3])
    single = {"selective": {0.3: _edit(0.3)}}
    alone.add_random(single)
    assert all(torch.equal(single["random"][0.3][n], edits["random"][0.3][n]) for n in ("a", "b"))
    assert not torch.equal(outputs.random_draw(1)[0.3]["a"], edits["random"][0.3]["a"])


def test_random_control_only_at_the_largest_ratio_and_from_fallback_scores():
    outputs = EditOutputs("Writer", [0.1, 0.3], random_at="largest")
    edits = {"cad": {0.1: _edit(0.1), 0.3: _edit(0.3)}}
    outputs.add_random(edits)
    assert list(edits["random"]) == [0.3]
    # a run of the control alone: reference edits selected from the scores given
    scores = {"a": torch.randn(6, 50), "b": torch.randn(3, 50)}
    alone = EditOutputs("Writer", [0.2], scope="row")
    only = {}
    alone.add_random(only, fallback=scores)
    assert all(int((~m).sum(1).max()) == 10 for m in only["random"][0.2].values())


@pytest.mark.parametrize("kwargs, field", [
    ({"ratios": [0.1, 1.5]}, "ratios"), ({"ratios": []}, "ratios"), ({"ratios": "0.1"}, "ratios"),
    ({"ratios": [True]}, "ratios"), ({"random_at": "some"}, "random_at"), ({"random_draws": 0}, "random_draws"),
    ({"evaluate_at": "never"}, "evaluate_at"), ({"search_margin": 1.0}, "search_margin"),
    ({"search_images": 0}, "search_images"), ({"localise_top": 0}, "localise_top"),
])
def test_bad_settings_are_refused_naming_the_owner_and_the_field(kwargs, field):
    kwargs = {"ratios": [0.1], **kwargs}
    with pytest.raises(UserInputError, match=f"Writer {field}"):
        EditOutputs("Writer", **kwargs)


def test_ratios_are_sorted_without_repeats():
    assert checked_ratios([0.3, 0.1, 0.3], "W") == [0.1, 0.3]


def test_random_controls_follow_the_runs_seed(monkeypatch):
    from cad_lightning.edit_outputs import run_seed

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert run_seed() == 0
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # what seed_everything(5) leaves for the run
    assert run_seed() == 5
    controls = []
    for seed in (0, 5, 0):
        outputs = EditOutputs("Writer", [0.3])
        outputs.seed = seed
        edits = {"cad": {0.3: _edit(0.3)}}
        outputs.add_random(edits)
        controls.append(edits["random"][0.3]["a"])
    assert torch.equal(controls[0], controls[2]) and not torch.equal(controls[0], controls[1])

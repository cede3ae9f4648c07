"""Several concepts in one edit: the items and evaluation sets of several targets, the joint and union
selections, the goal read per target, and a whole ``cad fit`` run with ``--data.concepts``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from cad_lightning.data.attribution_datamodule import AttributionDataModule
from cad_lightning.editing import count_ablated, joint_scores, select_components, union_selection
from cad_lightning.errors import UserInputError
from cad_lightning.evaluation.concepts import evaluation_items
from cad_lightning.evaluation.edits import selective

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_items_of_several_targets():
    data = AttributionDataModule(concepts=["circle", "red"], samples=3, preserve_samples=4, base_word="auto")
    assert data.targets == ["circle", "red"] and data.concept == "circle"
    assert "circle" not in data.retain_concepts and "red" not in data.retain_concepts
    attribute = [i for i in data.items() if i["role"] == "attribute"]
    assert [i["concept"] for i in attribute] == ["circle"] * 3 + ["red"] * 3
    assert all(i["concept"] in i["prompt"].split() for i in attribute)
    assert all(i["concept"] not in i["base_prompt"].split() for i in attribute)
    # nothing to preserve names a target
    assert not any({"circle", "red"} & set(p.split()) for p in data.prompts_to_preserve())
    # one target: the same items as data.concept
    one = AttributionDataModule(concepts=["circle"], samples=3, preserve_samples=4, base_word="auto").items()
    assert one == AttributionDataModule(concept="circle", samples=3, preserve_samples=4, base_word="auto").items()


@pytest.mark.parametrize("concepts, expected", [
    ([], "a list of one or more"), (["circle", "circle"], "lists 'circle' twice"), (["circle", "dragon"], "dragon"),
])
def test_bad_concept_lists(concepts, expected):
    with pytest.raises(UserInputError, match=expected):
        AttributionDataModule(concepts=concepts)


def test_a_concepts_file_with_roles(tmp_path):
    path = tmp_path / "concepts.csv"
    path.write_text("concept,role\ncircle,target\nsquare,target\nred,retain\n")
    data = AttributionDataModule(concepts_file=str(path))
    assert data.targets == ["circle", "square"] and data.retain_concepts == ["red"]
    path.write_text("concept,role\ncircle,target\nred,keep\n")
    with pytest.raises(UserInputError, match="the role of 'red' is 'keep'"):
        AttributionDataModule(concepts_file=str(path))


def test_evaluation_items_of_several_targets():
    items = evaluation_items(["circle", "red"], ["square", "blue"], 6, 12)
    targets = [i for i in items if i.group == "target"]
    assert [i.target for i in targets] == ["circle"] * 6 + ["red"] * 6
    for item in targets:  # a target prompt counts for its own target only
        other = {"circle", "red"} - {item.target}
        assert item.target in item.named.values() and not other & set(item.named.values())
    assert not any({"circle", "red"} & set(i.prompt.split()) for i in items if i.group == "retain")
    assert len({i.seed for i in items}) == len(items)


def test_the_goal_holds_every_target_to_its_own_floor():
    row = {"target": 0.3, "targets": {"circle": 0.1, "red": 0.3}, "retained_min_relative": 1.0,
           "other_words_relative": 1.0, "retained_ssim": 0.9}
    control = {"retained_ssim": 0.8}
    assert selective(row, control, {"circle": 0.05, "red": 0.25})
    assert not selective(row, control, {"circle": 0.0, "red": 0.25})  # circle 0.1 > 0.0 + 0.05


def test_joint_selection_serves_a_concept_with_small_scores_where_the_even_union_does_not():
    """Concept A needs its 3 weights ablated, concept B its 1; B's scores are 100 times larger. A budget of 4
    weights: the even union gives each concept 2 (A keeps one of its weights), the joint scores take all 4.
    Summing the raw scores instead would rank B's small noise above A's weights."""
    n = 400
    a, b = torch.zeros(1, n), torch.zeros(1, n)
    a[0, :3] = torch.tensor([1.0, 0.9, 0.8])
    b[0, 3] = 100.0
    b[0, 4:20] = torch.linspace(5.0, 2.0, 16)  # B's weaker weights: still larger than A's best
    a_scores, b_scores = {"w": a}, {"w": b}
    ratio = 4 / n

    def ablated(masks):
        return set((~masks["w"][0]).nonzero().flatten().tolist())

    needed_a, needed_b = {0, 1, 2}, {3}
    union = ablated(union_selection([a_scores, b_scores], ratio, scope="global"))
    joint = ablated(select_components(joint_scores([a_scores, b_scores]), ratio, scope="global"))
    raw = ablated(select_components({"w": a + b}, ratio, scope="global"))
    assert not needed_a <= union and needed_b <= union
    assert needed_a <= joint and needed_b <= joint
    assert not needed_a & raw
    assert count_ablated(union_selection([a_scores, b_scores], ratio, scope="global")) == 4


def test_joint_scores_of_one_concept_rank_as_its_own():
    scores = {"w": torch.randn(8, 16, generator=torch.Generator().manual_seed(0))}
    masks = select_components(joint_scores([scores]), 0.1)
    assert torch.equal(masks["w"], select_components(scores, 0.1)["w"])


@pytest.mark.slow
def test_two_concepts_in_one_run(tmp_path):
    """``cad fit`` with two targets: each scored, one edit per ratio, evaluated and reported per target."""
    code = run_cli(["fit", "--config", str(CONFIGS / "attribute.yaml"), "--data.concepts", "[circle, red]",
                    "--model.num_inference_steps", "4", "--data.samples", "2", "--data.preserve_samples", "4",
                    "--data.batch_size", "4", "--trainer.default_root_dir", str(tmp_path),
                    "--model.editing.ratios", "[0.2]", "--model.exam.evaluate_at", "all",
                    "--model.exam.random_draws", "1",
                    "--model.exam.eval_target_images", "8",
                    "--model.exam.eval_retain_images", "8",
                    "--model.exam.floor_images", "8"])
    assert code == 0
    run = next((tmp_path / "lightning_logs").glob("version_*"))
    report = json.loads((run / "report.json").read_text())
    assert report["concepts"] == ["circle", "red"] and report["multi_concept"] == "joint"
    selective_row = next(r for r in report["results"] if r["selection"] == "selective")
    assert set(selective_row["targets"]) == {"circle", "red"}
    assert selective_row["target"] == max(selective_row["targets"].values())
    assert {"circle", "red"} <= set(report["floor"]) and {"circle", "red"} <= set(report["before"])
    per_concept = load_file(run / "attribution" / "concept_scores.safetensors")
    joint = load_file(run / "attribution" / "scores.safetensors")
    names = list(joint)
    expected = joint_scores([{n: per_concept[f"{c}::{n}"] for n in names} for c in ("circle", "red")])
    for n in names:
        torch.testing.assert_close(joint[n], expected[n])
    markdown = (run / "report.md").read_text()
    assert "of 'circle' and 'red'" in markdown and "unedited accuracy on 'red'" in markdown


def test_several_objects_of_a_stable_diffusion_folder(tiny_sd_folder, tmp_path, monkeypatch):
    """configs/sd/erase_objects.yaml (its concepts CSV with roles) on a tiny random SD folder: every target
    scored, one edit per ratio for all of them."""
    monkeypatch.chdir(CONFIGS.parent)  # the config names its CSV relative to the repository
    code = run_cli(["fit", "--config", str(CONFIGS / "sd" / "erase_objects.yaml"), "--model.model_path",
                    str(tiny_sd_folder), "--model.dtype", "fp32", "--model.num_inference_steps", "2",
                    "--data.samples", "1", "--data.batch_size", "3", "--trainer.accelerator", "cpu",
                    "--trainer.default_root_dir", str(tmp_path), "--model.editing.ratios", "[0.05]"])
    assert code == 0
    run = next((tmp_path / "lightning_logs").glob("version_*"))
    report = json.loads((run / "report.json").read_text())
    assert report["concepts"] == ["golf ball", "parachute", "church"] and report["edits"][0]["ablated"] > 0
    meta = json.loads((run / "attribution" / "meta.json").read_text())
    assert meta["items"] == 3 and meta["concepts"] == report["concepts"]


def test_concepts_and_a_concepts_file_are_not_both_given(tmp_path):
    path = tmp_path / "concepts.csv"
    path.write_text("concept,role\ncircle,target\n")
    with pytest.raises(UserInputError, match="both given"):
        AttributionDataModule(concepts=["square"], concepts_file=str(path))

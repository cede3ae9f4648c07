"""Recovery attacks: textual inversion and the prompt search on the shipped model, and their place in the exam
(``model.exam.attacks`` of the default job, ``model.attacks`` of ``cad test``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHIPPED_MODEL, run_cli
from safetensors.torch import load_file

from cad_lightning.attacks.exam import AttackExam, strongest
from cad_lightning.attacks.inversion import TOKEN, InversionSettings, added_token, learn_token
from cad_lightning.attacks.prompt_search import PromptSearchSettings, candidate_prompts, search_prompt
from cad_lightning.data.world import VOCABULARY, without_concept
from cad_lightning.errors import UserInputError
from cad_lightning.evaluation.concepts import evaluation_items

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAST = {"steps": 150, "batch_size": 8, "images": 16}


def rate(backbone, detector, prompts: list[str], seed: int, concept: str = "triangle") -> float:
    images = backbone.generate(prompts, seed=seed, num_inference_steps=10)
    return sum(w == concept for w in detector(images)["shape"]) / len(prompts)


@pytest.fixture(scope="module")
def word_cut():
    """The shipped model with the route of the word 'triangle' cut in the text encoder (its input embedding made
    that of 'shape'), the denoiser untouched: the model can still draw triangles, but not from the word."""
    from cad_lightning import load_backbone

    backbone = load_backbone(SHIPPED_MODEL)
    table = backbone.text_encoder.get_input_embeddings().weight
    ids = {w: backbone.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("triangle", "shape")}
    with torch.no_grad():
        table[ids["triangle"]] = table[ids["shape"]]
    return backbone


def test_inversion_brings_back_a_concept_whose_word_alone_was_cut(tiny_backbone, detector, word_cut):
    items = evaluation_items("triangle", [], FAST["images"], 0, seed=7_000)
    prompts = [i.prompt for i in items]
    images = tiny_backbone.generate(prompts, seed=[i.seed for i in items], num_inference_steps=10)
    read = [without_concept(p, "triangle", TOKEN) for p in prompts]
    assert rate(word_cut, detector, prompts, 9_000) <= 0.4  # the word no longer draws it
    vector, losses = learn_token(word_cut, images, read, "shape", InversionSettings(**FAST), seed=0, progress=False)
    assert losses[-1] < losses[0]
    with added_token(word_cut, vector):
        assert rate(word_cut, detector, read, 9_000) >= 0.75  # a learned word does
    # the token is gone again and nothing of the model changed: the same vector learned twice
    assert TOKEN not in word_cut.tokenizer.get_vocab()
    again, _ = learn_token(word_cut, images, read, "shape", InversionSettings(**FAST), seed=0, progress=False)
    assert torch.allclose(vector, again)


def test_the_prompt_search_never_uses_the_concept_word_and_finds_no_prompt_drawing_it_on_the_unedited_model(
        tiny_backbone, detector):
    prompts = candidate_prompts(VOCABULARY, ["circle"], 200, 4, seed=0)
    assert len(prompts) == 200 and not any("circle" in p.split() for p in prompts)
    items = evaluation_items("circle", [], 8, 0, seed=7_000)
    images = tiny_backbone.generate([i.prompt for i in items], seed=[i.seed for i in items], num_inference_steps=10)
    found = search_prompt(tiny_backbone, images, VOCABULARY, ["circle"],
                          lambda p: rate(tiny_backbone, detector, [p] * 8, 11_000, "circle"),
                          PromptSearchSettings(budget=24, keep=3, images=8, timesteps=8), seed=0, progress=False)
    assert "circle" not in found["prompt"].split() and found["candidates"] == 24 and len(found["kept"]) == 3
    # without its word, no prompt draws circles as the concept's own prompts do (1.0 on the unedited model)
    assert found["search_rate"] <= 0.75
    assert rate(tiny_backbone, detector, [i.prompt for i in items], 11_000, "circle") >= 0.9


def test_the_strongest_attack_and_its_recovery():
    record = {"inversion": {"target": 0.5, "alone": 0.7, "without_word": 0.1},
              "prompt_search": {"target": 0.6, "baseline": 0.6}}
    out = strongest(record)
    assert out == {"after_attack": 0.7, "beyond_floor": pytest.approx(0.6), "recovered": pytest.approx(0.6),
                   "strongest": "inversion alone"}


def test_a_searched_prompt_that_draws_the_concept_on_the_unedited_model_too_recovers_nothing():
    """'triangle red blue green' draws stripes on the unedited model (1.00) and on the edit of 'striped' (0.97): the
    strongest attack is the inversion, read against the floor; a search that draws beyond its baseline wins."""
    record = {"inversion": {"target": 0.53, "alone": 0.72, "without_word": 0.5},
              "prompt_search": {"target": 0.97, "baseline": 1.0}}
    out = strongest(record, floor=0.56)
    assert out["strongest"] == "inversion alone" and out["after_attack"] == 0.72
    assert out["beyond_floor"] == pytest.approx(0.16)
    record["prompt_search"] = {"target": 0.97, "baseline": 0.3}
    out = strongest(record, floor=0.56)
    assert out["strongest"] == "prompt_search" and out["beyond_floor"] == pytest.approx(0.41)
    assert out["recovered"] == pytest.approx(0.67)


@pytest.mark.parametrize("kwargs, field", [
    ({"attacks": ["jailbreak"]}, "attacks"),
    ({"attacks": ["inversion"], "attack_images": 0}, "attack_images"),
    ({"attacks": ["inversion"], "inversion": {"steps": 0}}, "inversion.steps"),
    ({"attacks": ["prompt_search"], "prompt_search": {"budget": 2, "keep": 3}}, "prompt_search.keep"),
])
def test_bad_attack_settings_are_refused_in_one_sentence(kwargs, field):
    with pytest.raises(UserInputError, match=field.replace(".", r"\.")):
        AttackExam("model.exam", **kwargs)


def test_attacks_are_refused_for_several_concepts_and_on_the_command_line_for_an_unknown_attack(tiny_backbone, capsys):
    with pytest.raises(UserInputError, match="one erased concept"):
        AttackExam("model.exam", ["inversion"]).check(tiny_backbone, ["square", "triangle"])
    code = run_cli(["fit", "--config", str(CONFIGS / "attribute.yaml"), "--model.exam.attacks", "[jailbreak]"])
    assert code == 2 and "attacks" in capsys.readouterr().err


def test_cad_test_attacks_the_edit_its_random_control_and_the_unedited_model(tmp_path):
    """An edit that ablates every cross-attention value weight of the shipped model: the attacks run against it,
    a random ablation of the same count and the unedited model, each read on the report seeds, the learned
    embeddings written."""
    from cad_lightning import load_backbone
    from cad_lightning.attribution.components import ComponentSpace
    from cad_lightning.editing import save_edit

    unet = load_backbone(SHIPPED_MODEL).denoiser
    params = dict(unet.named_parameters())
    masks = {n: torch.zeros_like(params[n], dtype=torch.bool) for n in ComponentSpace(["cross_attn_kv"]).names(unet)
             if n.endswith("to_v.weight")}
    edit = tmp_path / "edit.safetensors"
    save_edit(edit, masks)
    code = run_cli(["test", "--config", str(CONFIGS / "evaluate.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", "--data.concept", "square", "--data.target_images", "4",
                    "--data.retain_images", "4", "--model.edit", str(edit),
                    "--model.attacks", "[inversion, prompt_search]", "--model.attack_images", "6",
                    "--model.inversion.steps", "4", "--model.inversion.batch_size", "4", "--model.inversion.images", "4",
                    "--model.prompt_search.budget", "4", "--model.prompt_search.keep", "1",
                    "--model.prompt_search.images", "4", "--model.prompt_search.timesteps", "4"])
    assert code == 0
    run = next(tmp_path.rglob("evaluation.json")).parent
    out = json.loads((run / "evaluation.json").read_text())["attacks"]
    assert list(out["models"]) == ["unedited", "edit", "random"] and out["read_on"] == "report seeds"
    for name, record in out["models"].items():
        assert 0 <= record["inversion"]["target"] <= 1 and 0 <= record["prompt_search"]["target"] <= 1
        assert "square" not in record["prompt_search"]["prompt"].split()
        readings = [record["inversion"]["target"], record["inversion"]["alone"], record["prompt_search"]["target"]]
        assert record["after_attack"] in readings and record["holds"] == (record["beyond_floor"] <= 0.15 + 1e-9)
        floor = out["floor"]
        assert record["beyond_floor"] == pytest.approx(max(
            record["inversion"]["target"] - floor, record["inversion"]["alone"] - floor,
            record["prompt_search"]["target"] - max(floor, record["prompt_search"]["baseline"])))
        embedding = load_file(run / record["inversion"]["embedding"])
        assert list(embedding) == [TOKEN] and embedding[TOKEN].shape[0] == 1
    # every value weight ablated: the edit draws no square from its prompts, the unedited model does
    assert out["models"]["unedited"]["plain"] > out["models"]["edit"]["plain"]
    # the prompt search's baseline is the unedited model's reading of the same prompt
    unedited = out["models"]["unedited"]["prompt_search"]
    assert unedited["target"] == unedited["baseline"]
    assert "Recovery attacks" in (run / "report.md").read_text() and (run / "samples" / "attacks.png").is_file()


def test_the_default_job_attacks_its_reported_edit(tmp_path):
    """The default job with attacks: the exam attacks the edit the search stopped at, its random control and the
    unedited model, and report.md shows them."""
    code = run_cli(["fit", "--config", str(CONFIGS / "attribute.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", "--data.concept", "circle", "--data.samples", "2",
                    "--data.preserve_samples", "2", "--model.num_inference_steps", "2",
                    "--model.editing.ratios", "[0.2]", "--model.editing.rescore_every", "null",
                    "--model.exam.random_draws", "1", "--model.exam.eval_target_images", "4",
                    "--model.exam.eval_retain_images", "4", "--model.exam.floor_images", "4",
                    "--model.exam.attacks", "[inversion]", "--model.exam.attack_images", "4",
                    "--model.exam.inversion.steps", "3", "--model.exam.inversion.images", "4",
                    "--model.exam.inversion.batch_size", "2"])
    assert code == 0
    run = next(tmp_path.rglob("report.json")).parent
    report = json.loads((run / "report.json").read_text())
    attacks = report["attacks"]
    assert list(attacks["models"]) == ["unedited", "selective 0.2", "random 0.2"]
    assert attacks["floor"] == report["floor"]["circle"]
    for record in attacks["models"].values():
        assert record["holds"] == (record["after_attack"] <= attacks["floor"] + 0.15 + 1e-9)
        assert record["beyond_floor"] == pytest.approx(record["after_attack"] - attacks["floor"])
        assert "prompt_search" not in record and (run / record["inversion"]["embedding"]).is_file()
    assert "Does it come back?" in (run / "report.md").read_text()

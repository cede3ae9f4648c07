"""The robust mode of the selective erase (cad_lightning/editing/robust.py): adversarial rounds that add the
weights drawing the concept under a learned token, on the shipped model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHIPPED_MODEL, run_cli

from cad_lightning.attacks.inversion import TOKEN, InversionSettings, added_token, learn_token
from cad_lightning.data.world import without_concept
from cad_lightning.editing import random_like
from cad_lightning.editing.artifacts import restore_weights
from cad_lightning.editing.robust import Hardener, RobustSettings, beyond_names
from cad_lightning.errors import UserInputError
from cad_lightning.evaluation.concepts import _named, evaluation_items

FAST = {"steps": 150, "batch_size": 8, "images": 16}


def test_bad_robust_settings_are_refused_in_one_sentence():
    for bad in ({"fractions": []}, {"fractions": [0.0]}, {"fractions": [1.5]}, {"rounds": 0}, {"images": 0},
                {"retain": 1.5}, {"collateral_offset": -1}, {"inversion": {"steps": 0}}):
        with pytest.raises(UserInputError) as error:
            RobustSettings(**bad).check()
        assert "robust" in str(error.value) and "\n" not in str(error.value)
    assert RobustSettings(fractions=[0.02, 0.01, 0.01]).check() is None


@pytest.mark.parametrize("args, says", [
    (["--model.exam.evaluate_at", "all"], "evaluate_at goal"),
    (["--model.objective", "amplify", "--model.exam.evaluate_at", "all"], "amplify"),
    (["--data.concepts", "[square, triangle]"], "one erased concept"),
])
def test_the_robust_mode_is_refused_where_it_cannot_run(tmp_path, capsys, args, says):
    code = run_cli(["fit", "--config", "configs/attribute.yaml", "--data.concept", "circle",
                    "--model.editing.robust.enabled", "true", "--trainer.default_root_dir", str(tmp_path), *args])
    assert code != 0
    assert says in capsys.readouterr().err


def rate(backbone, detector, prompts: list[str], seed: int, concept: str) -> float:
    images = backbone.generate(prompts, seed=seed)
    return sum(w == concept for w in detector(images)["shape"]) / len(prompts)


def fresh_token(backbone, concept: str, seed: int, unedited: dict, edit) -> torch.Tensor:
    """A token learned on ``edit`` from images the unedited model draws on seeds the rounds never used."""
    items = evaluation_items(concept, [], FAST["images"], 0, seed=seed)
    restore_weights(backbone.denoiser, unedited)
    images = backbone.generate([i.prompt for i in items], seed=[i.seed for i in items])
    restore_weights(backbone.denoiser, unedited, edit)
    with torch.inference_mode(False), torch.enable_grad():
        vector, _ = learn_token(backbone, images, [without_concept(i.prompt, concept, TOKEN) for i in items], "shape",
                                InversionSettings(**FAST), seed=seed, progress=False)
    return vector


@pytest.fixture()
def cut_circle(tiny_backbone):
    """Cuts the word 'circle' in the text encoder of the shipped model (its input embedding made that of 'shape',
    the denoiser untouched: its prompts no longer draw circles, but the denoiser still can); put back after."""
    table = tiny_backbone.text_encoder.get_input_embeddings().weight
    ids = {w: tiny_backbone.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("circle", "shape")}
    saved = table[ids["circle"]].detach().clone()

    def cut():
        with torch.no_grad():
            table[ids["circle"]] = table[ids["shape"]]

    yield cut
    with torch.no_grad():
        table[ids["circle"]] = saved


def test_the_scores_take_what_a_learned_word_draws_and_keep_the_other_shapes(tiny_backbone, detector, cut_circle):
    """On a model whose word 'circle' no longer reaches the denoiser, a token learned from circles draws them again.
    Ablating the 3% of the weights outside the K/V projections that the robust rounds score highest under that
    token keeps the other shapes' prompts, and a token learned afresh on the result draws far fewer circles than
    one learned on random ablation of the same count in the same rows (whose K/V weights, all kept here, are the
    attacker's way in; the default edit takes part of them too, and needs less)."""
    backbone, concept = tiny_backbone, "circle"
    params = dict(backbone.denoiser.named_parameters())
    kv = [n for n in params if "attn2.to_k" in n or "attn2.to_v" in n]
    names = beyond_names(backbone.denoiser, kv)
    unedited = {n: params[n].detach().clone() for n in names}
    apply = lambda masks: restore_weights(backbone.denoiser, unedited, masks)
    items = evaluation_items(concept, [], FAST["images"], 0, seed=3_000_000)
    images = backbone.generate([i.prompt for i in items], seed=[i.seed for i in items])  # circles, before the cut
    others = evaluation_items(concept, [], 0, 32, seed=3_100_000)
    other_images = backbone.generate([i.prompt for i in others], seed=[i.seed for i in others])
    retained = [(i, _named(i.prompt)["shape"]) for i in evaluation_items(concept, [], 0, 32, seed=3_200_000)
                if "shape" in _named(i.prompt)]
    cut_circle()
    captions = [without_concept(i.prompt, concept, TOKEN) for i in items]
    with torch.inference_mode(False), torch.enable_grad():
        vector, _ = learn_token(backbone, images, captions, "shape", InversionSettings(**FAST), seed=0, progress=False)
    prompts = [without_concept(i.prompt, concept, TOKEN) for i in evaluation_items(concept, [], 32, 0)]

    def token_rate() -> float:
        with added_token(backbone, vector):
            return rate(backbone, detector, prompts, 5_000_000, concept)

    def shapes_kept() -> float:
        out = backbone.generate([i.prompt for i, _ in retained], seed=[i.seed for i, _ in retained])
        return sum(r == w for r, (_, w) in zip(detector(out)["shape"], retained)) / len(retained)

    hardener = Hardener(RobustSettings(timesteps=4), backbone, detector, concept, apply, unedited, 2_000_000, 0.22,
                        progress=False)
    try:
        before = token_rate()
        assert before >= 0.6  # the learned word brings circles back on the cut model
        scores = hardener._scores(names, {}, vector, images, captions, other_images, others, 0)
        k = round(0.03 * sum(params[n].numel() for n in names))
        edit = hardener._with_top({}, names, scores, k)
        assert sum(int((~m).sum()) for m in edit.values()) == k and set(edit) <= set(names)
        readings = {}
        for name, masks in (("scored", edit), ("random", random_like(edit, torch.Generator().manual_seed(0)))):
            apply(masks)  # the attacker learns a token afresh on each
            with torch.inference_mode(False), torch.enable_grad():
                vector, _ = learn_token(backbone, images, captions, "shape", InversionSettings(**FAST), seed=1,
                                        progress=False)
            readings[name] = (token_rate(), shapes_kept())
        assert readings["scored"][0] <= 0.45 and readings["scored"][0] <= readings["random"][0] - 0.3
        assert readings["scored"][1] >= 0.85
    finally:
        apply(None)


def test_the_default_job_hardens_its_edit_and_reports_the_rounds(tmp_path):
    """The default job with the robust mode: the written edit is the hardened one (the K/V weights the search chose
    and the rounds' weights outside them), its random control ablates the same count in every row, and the report
    shows the rounds."""
    from cad_lightning.editing import load_masks

    code = run_cli(["fit", "--config", "configs/attribute.yaml", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.enable_progress_bar", "false", "--data.concept", "circle", "--data.samples", "2",
                    "--data.preserve_samples", "2", "--model.num_inference_steps", "4",
                    "--model.editing.ratios", "[0.01]", "--model.editing.rescore_every", "null",
                    "--model.exam.random_draws", "1", "--model.exam.eval_target_images", "4",
                    "--model.exam.eval_retain_images", "4", "--model.exam.floor_images", "4",
                    "--model.editing.robust.enabled", "true", "--model.editing.robust.fractions", "[0.01, 0.02]",
                    "--model.editing.robust.rounds", "1", "--model.editing.robust.images", "8",
                    "--model.editing.robust.retain_images", "4", "--model.editing.robust.read_images", "4",
                    "--model.editing.robust.timesteps", "1", "--model.editing.robust.inversion.steps", "150",
                    "--model.editing.robust.inversion.batch_size", "4", "--model.editing.robust.retain", "0"])
    assert code == 0
    run = next(tmp_path.rglob("report.json")).parent
    report = json.loads((run / "report.json").read_text())
    record = report["exam"]["robust"]["selective"]
    # 1% of the K/V weights leaves the word's way in: a learned token draws circles, and the rounds grow the edit
    # (retain 0: every fraction may, until the token is read as gone)
    assert record["rounds"][0]["probes"]
    edit = load_masks(run / "edits" / "selective-erase-0.01.safetensors")
    control = load_masks(run / "edits" / "random-erase-0.01.safetensors")
    kv = {n for n in edit if "attn2.to_k" in n or "attn2.to_v" in n}
    beyond = sum(int((~m).sum()) for n, m in edit.items() if n not in kv)
    assert beyond == record["ablated_beyond"] == round(record["rounds"][0]["fraction"] * record["weights"]) > 0
    assert set(control) == set(edit)
    for n in edit:
        rows = lambda m: (~m).reshape(m.shape[0], -1).sum(1)
        assert torch.equal(rows(edit[n]), rows(control[n]))
    selective = next(r for r in report["results"] if r["selection"] == "selective")
    assert selective["ablated"] == sum(int((~m).sum()) for m in edit.values())
    assert "Robust mode, selective 0.01" in (run / "report.md").read_text()

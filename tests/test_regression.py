"""The regression estimator: the fit recovers a planted linear model, a killed run resumes to the same α,
a changed config is refused, and fidelity of first-order scores on random ablations."""

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import ff_scoring_backbone, run_cli
from diffusers import UNet2DConditionModel
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from sklearn.linear_model import Ridge

from cad_lightning.attribution.fidelity import first_order_fidelity
from cad_lightning.attribution.linear_fit import fit_linear
from cad_lightning.attribution.masks import sample_masks
from cad_lightning.attribution.scoring import accumulate_first_order
from cad_lightning.attribution.objectives import EraseObjective
from cad_lightning.attribution.regression import RegressionCADModule
from cad_lightning.data.mask_datamodule import MaskDataModule
from cad_lightning.editing.artifacts import load_masks
from cad_lightning.editing.select import count_ablated
from cad_lightning.regression_callbacks import RegressionWriter

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("dense_limit, method", [(10**9, "ridge"), (0, "ridge"), (10**9, "lasso")])
def test_fit_recovers_a_planted_linear_model(dense_limit, method):
    n_components, n_masks = 80, 600
    rows = lambda ids: sample_masks(n_components, ids, keep_prob=0.9, seed=3)  # noqa: E731
    rng = np.random.default_rng(0)
    coef = rng.normal(size=n_components) * (rng.random(n_components) < 0.3)  # sparse effects
    ids = list(range(n_masks))
    y = rows(ids).numpy().astype(np.float64) @ coef + 2.0 + rng.normal(size=n_masks) * 0.05
    fit = fit_linear(rows, ids, y, method=method, dense_limit=dense_limit)
    assert np.abs(fit.coef - coef).max() < 0.1
    assert fit.intercept == pytest.approx(2.0, abs=0.5)
    assert fit.train_r2 > 0.99
    if dense_limit == 0:  # streaming normal equations: the same estimate as scikit-learn's Ridge
        reference = Ridge(alpha=fit.strength).fit(rows(ids).numpy().astype(np.float64), y)
        assert np.allclose(reference.coef_, fit.coef, atol=1e-8) and reference.intercept_ == pytest.approx(fit.intercept)


def _run(root, *callbacks, steps=3, keep_prob=0.9, writer=None):
    module = RegressionCADModule(objective="erase", num_inference_steps=steps, granularity="layer", score="objective")
    data = MaskDataModule(concept="circle", samples=1, masks=12, heldout_masks=4, keep_prob=keep_prob, batch_size=2)
    writer = writer or RegressionWriter(strengths=[0.1, 1.0])
    trainer = pl.Trainer(default_root_dir=root, **writer.trainer_arguments, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer, *callbacks])
    trainer.fit(module, datamodule=data)
    return module, Path(root)


class Killed(RuntimeError):
    pass


class KillAtBatch(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            raise Killed("killed")


def test_killed_run_resumes_with_only_the_missing_masks(tmp_path):
    with pytest.raises(Killed):
        _run(tmp_path / "run", KillAtBatch(3))
    assert len(list((tmp_path / "run" / "mask_scores").glob("chunk-*.json"))) == 3  # 6 of 16 masks finished
    resumed, run = _run(tmp_path / "run")
    assert resumed.computed == 16 - 6
    fresh, fresh_run = _run(tmp_path / "fresh")
    assert fresh.computed == 16
    a = load_file(run / "attribution" / "scores.safetensors")
    b = load_file(fresh_run / "attribution" / "scores.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-12) for k in a)
    assert any(float(a[k].abs().sum()) > 0 for k in a)
    meta = json.loads((run / "attribution" / "meta.json").read_text())
    assert meta["estimator"] == "regression" and meta["masks"]["computed_this_run"] == 10
    fidelity = json.loads((run / "attribution" / "fidelity.json").read_text())
    assert fidelity["masks"] == 4 and -1 <= fidelity["spearman"] <= 1 and (run / "attribution" / "fidelity.png").is_file()


def test_regression_edits_ablate_the_top_components_and_are_evaluated(tmp_path):
    writer = RegressionWriter(strengths=[0.1, 1.0], ratios=[0.3], eval_target_images=4, eval_retain_images=3,
                              floor_images=4, eval_batch_size=16)
    module, run = _run(tmp_path, writer=writer)
    report = json.loads((run / "report.json").read_text())
    assert report["estimator"] == "regression" and [r["selection"] for r in report["results"]] == ["regression", "random"]
    assert 0 <= report["results"][0]["target"] <= 1 and (run / "tradeoff.png").is_file() and (run / "report.md").is_file()
    scores = load_file(run / "attribution" / "scores.safetensors")
    edit = load_masks(run / "edits" / "regression-erase-0.3.safetensors")
    total = sum(m.numel() for m in edit.values())
    positive = sum(int((scores[n] > 0).sum()) for n in edit)  # erase takes only positive components
    assert count_ablated(edit) == min(round(0.3 * total), positive) > 0
    # whole layers, taken by coefficient per weight: every fully ablated layer outranks every untouched one
    ablated = {n: float((~m).float().mean()) for n, m in edit.items()}
    per_weight = {n: float(scores[n].flatten()[0]) for n in edit}
    assert sum(0 < f < 1 for f in ablated.values()) <= 1
    taken = [per_weight[n] for n, f in ablated.items() if f == 1]
    kept = [per_weight[n] for n, f in ablated.items() if f == 0]
    assert taken and kept and min(taken) >= max(kept)
    random_edit = load_masks(run / "edits" / "random-erase-0.3.safetensors")
    assert count_ablated(random_edit) == count_ablated(edit)
    # the control ablates random whole components too (not the same ones shuffled within rows)
    assert sum(0 < float((~m).float().mean()) < 1 for m in random_edit.values()) <= 1
    unet = UNet2DConditionModel.from_pretrained(run / "edits" / "regression-erase-0.3" / "unet")
    name = next(n for n, f in ablated.items() if f == 1)
    assert float(unet.get_parameter(name).abs().sum()) == 0


def test_restart_with_another_config_is_refused(tmp_path, capsys):
    args = ["fit", "--config", str(CONFIGS / "attribute_regression.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--model.score", "objective", "--model.num_inference_steps", "2", "--model.granularity", "layer",
            "--data.samples", "1", "--data.masks", "4", "--data.heldout_masks", "0", "--data.batch_size", "4",
            "--trainer.callbacks.init_args.ratios", "null"]
    assert run_cli(args) == 0
    code = run_cli(args + ["--data.keep_prob", "0.9", "--model.num_inference_steps", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cad: error:" in err and "keep_prob" in err and "num_inference_steps" in err and "concept" not in err


def test_first_order_scores_predict_random_ablations():
    """First-order α on the FF weights predicts the change of J (base branch frozen) under random masks of 0.1%
    of the weights, the fraction CAD's edits ablate (benchmarks/fidelity.py measures larger fractions)."""
    backbone, names, params = ff_scoring_backbone()
    objective = EraseObjective(num_inference_steps=5)
    prompts, seeds = ["a circle", "a red circle", "a striped circle"], [0, 1, 2]
    buffers = [torch.zeros_like(params[n]) for n in names]
    _, states = accumulate_first_order(backbone, objective, names, prompts, seeds, buffers)
    backbone.requires_grad_(False)
    scores = {n: b / states for n, b in zip(names, buffers)}
    predicted, measured = first_order_fidelity(backbone, objective, prompts, seeds, scores, density=0.001, masks=32)
    spearman = float(np.corrcoef(np.argsort(np.argsort(predicted)), np.argsort(np.argsort(measured)))[0, 1])
    assert spearman > 0.7, (spearman, predicted[:5], measured[:5])


def test_first_order_fidelity_callback_writes_its_artifacts(tmp_path):
    code = run_cli(["fit", "--config", str(CONFIGS / "attribute.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    "--model.num_inference_steps", "3", "--data.samples", "2", "--data.batch_size", "2",
                    "--model.exam.evaluate", "false", "--model.editing.save_unet", "false",
                    "--trainer.callbacks+=cad_lightning.regression_callbacks.FirstOrderFidelity",
                    "--trainer.callbacks.masks", "6"])
    assert code == 0
    run = sorted((tmp_path / "lightning_logs").glob("version_*"))[-1]
    fidelity = json.loads((run / "attribution" / "fidelity.json").read_text())
    assert fidelity["estimator"] == "first_order" and fidelity["masks"] == 6 and fidelity["density"] == 0.02
    assert -1 <= fidelity["spearman"] <= 1 and (run / "attribution" / "fidelity.png").is_file()


def _presence_setup(masks):
    from cad_lightning import load_backbone
    from cad_lightning.attribution.components import ComponentSpace
    from cad_lightning.attribution.mask_scores import presence_inputs
    from cad_lightning.attribution.masks import MaskLayout
    from conftest import SHIPPED_MODEL

    backbone = load_backbone(SHIPPED_MODEL)
    backbone.requires_grad_(False)
    layout = MaskLayout(backbone.denoiser, ComponentSpace(["cross_attn_kv"]).names(backbone.denoiser), "neuron")
    objective = EraseObjective(num_inference_steps=3)
    prompts, bases = ["a red circle", "a blue striped circle"], ["a red shape", "a blue striped shape"]
    inputs = presence_inputs(backbone, objective, objective.inputs(backbone, prompts, [0, 1], bases))
    return backbone, layout, inputs, sample_masks(layout.n_components, range(masks), 0.7, 5)


def test_presence_is_one_unmasked_and_the_batched_passes_match_the_zeroed_weights():
    from cad_lightning.attribution.mask_scores import presence_scores
    from cad_lightning.attribution.masks import zeroed_weights

    backbone, layout, inputs, masks = _presence_setup(3)
    masks = torch.cat([torch.ones(1, layout.n_components, dtype=torch.bool), masks,
                       torch.zeros(1, layout.n_components, dtype=torch.bool)])
    batched = presence_scores(backbone, inputs, layout, masks, chunk_size=2 * inputs.x_t.shape[0])
    assert batched[0] == pytest.approx(1.0, abs=1e-5)
    direction = inputs.direction.double().flatten(1)
    for row, value in zip(masks, batched):
        with torch.no_grad(), zeroed_weights(backbone.denoiser, layout, row):
            eps = backbone.predict_noise(inputs.x_t, inputs.t, inputs.text).double().flatten(1)
        by_hand = float(((eps - inputs.base_noise.double().flatten(1)) * direction).sum() / direction.pow(2).sum())
        assert float(value) == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    # no K/V weight left: the prompt no longer reaches the UNet, so little of the concept's direction is left
    assert abs(float(batched[-1])) < 0.5 < float(batched[1:-1].min())


def test_presence_needs_the_erase_objective_and_is_the_erase_default():
    from cad_lightning.errors import UserInputError

    assert RegressionCADModule(granularity="layer").hparams.score == "presence"
    assert RegressionCADModule(objective="amplify", granularity="layer").hparams.score == "objective"
    with pytest.raises(UserInputError, match="presence.*erase"):
        RegressionCADModule(objective="amplify", granularity="layer", score="presence")
    data = MaskDataModule(concept="circle", base_word="auto", samples=3)
    assert all(i["base_prompt"] == i["prompt"].replace("circle", "shape") for i in data.items())
    assert {i["base_prompt"] for i in data.items()} <= set(data.all_prompts())  # checked against the vocabulary


@pytest.mark.parametrize("min_spearman, trusted", [(1.0, False), (-1.0, True)])
def test_a_fit_below_the_trusted_correlation_is_flagged(tmp_path, min_spearman, trusted, recwarn):
    _run(tmp_path, writer=RegressionWriter(strengths=[0.1, 1.0], min_spearman=min_spearman))
    fidelity = json.loads((tmp_path / "attribution" / "fidelity.json").read_text())
    assert fidelity["trusted"] is trusted and fidelity["min_spearman"] == min_spearman
    flagged = [w for w in recwarn if "predicts its 4 held-out masks poorly" in str(w.message)]
    assert len(flagged) == (0 if trusted else 1)
    if not trusted:
        assert f"Spearman {fidelity['spearman']:.3f}" in str(flagged[0].message)


def test_concept_shares_follow_the_concept_tokens_and_add_up_to_the_row():
    from cad_lightning.editing.text_space import concept_shares, spread_over_text, uniform_sensitivity

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    difference = torch.zeros(3, 5, dtype=torch.float64)
    difference[:, 2] = torch.tensor([1.0, -2.0, 0.5])  # the concept changes one input dimension only
    shares = concept_shares(weight, difference)
    assert torch.allclose(shares[:, 2], torch.ones(6, dtype=torch.float64)) and shares[:, [0, 1, 3, 4]].abs().max() < 1e-12
    difference = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    shares = concept_shares(weight, difference)
    assert torch.allclose(shares.sum(1), torch.ones(6, dtype=torch.float64)) and (shares < 0).any()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    coefficients = torch.randn(6, generator=generator, dtype=torch.float64)
    spread = spread_over_text({name: coefficients}, {name: weight}, difference)[name]
    assert torch.allclose(spread.double().sum(1), coefficients, atol=1e-5)
    second_moment = difference.T @ difference
    s = uniform_sensitivity({name: weight}, second_moment)[name].double()
    assert torch.allclose(s.sum(1) / (weight**2 * second_moment.diagonal()).sum(1), torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="not a cross-attention key or value"):
        spread_over_text({"mid_block.ff.weight": coefficients}, {"mid_block.ff.weight": weight}, difference)


def test_concept_difference_aligns_the_tokens_of_a_dropped_word():
    from conftest import SHIPPED_MODEL

    from cad_lightning import load_backbone
    from cad_lightning.editing.text_space import concept_difference

    backbone = load_backbone(SHIPPED_MODEL)
    # a replaced word ('circle' → 'shape'): token by token, as the prompts' embeddings line up
    same_length = concept_difference(backbone, ["a red striped circle"], ["a red striped shape"])
    by_position = (backbone.encode(["a red striped circle"]) - backbone.encode(["a red striped shape"]))[0].double()
    assert torch.allclose(same_length, by_position)
    # a dropped word ('a red star' against 'a star'): its own embedding, then the words after it against theirs
    concept, base = backbone.encode(["a red star"])[0].double(), backbone.encode(["a star"])[0].double()
    dropped = concept_difference(backbone, ["a red star"], ["a star"])
    assert dropped.shape == concept.shape  # the base's last padding, pushed off by 'red', is left out
    assert torch.allclose(dropped[2], concept[2])  # 'red': nothing in the base prompt reads there
    assert torch.allclose(dropped[3:], concept[3:] - base[2:-1])  # 'star' and what follows, against theirs
    assert float(dropped[:2].abs().max()) == 0.0  # the encoder is causal: the words before it are the same
    misaligned = (concept - base)[3:]
    assert float(misaligned.norm(dim=1).max()) > 2 * float(dropped[3:].norm(dim=1).max())


@pytest.mark.slow
def test_ablation_damage_is_each_row_ablated_alone_and_weighs_the_rows():
    from cad_lightning.attribution.mask_scores import ablation_damage
    from cad_lightning.attribution.masks import zeroed_weights
    from cad_lightning.editing.text_space import measured_sensitivity, token_second_moment

    backbone, layout, inputs, _ = _presence_setup(1)
    damage = ablation_damage(backbone, inputs.x_t, inputs.t, inputs.text, layout, chunk_size=3 * inputs.x_t.shape[0])
    assert damage.shape == (layout.n_components,) and bool((damage >= 0).all()) and float(damage.max()) > 0
    with torch.no_grad():
        reference = backbone.predict_noise(inputs.x_t, inputs.t, inputs.text).double()
    for i in (0, 77, layout.n_components - 1):
        keep = torch.ones(layout.n_components, dtype=torch.bool)
        keep[i] = False
        with torch.no_grad(), zeroed_weights(backbone.denoiser, layout, keep):
            moved = float((backbone.predict_noise(inputs.x_t, inputs.t, inputs.text).double() - reference).pow(2).sum())
        assert float(damage[i]) == pytest.approx(moved, rel=1e-3)
    # the sensitivity charges a whole row's removal what its ablation measured
    block = layout.blocks[0]
    weight = dict(backbone.denoiser.named_parameters())[block.name].detach().double()
    moment = token_second_moment(backbone, ["a blue square", "a green star", ""])
    rows = damage[block.offset : block.offset + block.size]
    s = measured_sensitivity({block.name: weight}, moment, {block.name: rows})[block.name].double()
    h = s.sum(1) / (weight**2 * moment.diagonal()).sum(1)
    assert torch.allclose(h * ((weight @ moment) * weight).sum(1), rows, rtol=1e-4)
    with pytest.raises(ValueError, match="damages for the"):
        measured_sensitivity({block.name: weight}, moment, {block.name: rows[:-1]})


@pytest.mark.slow
def test_selective_regression_edits_of_key_value_neurons(tmp_path):
    module = RegressionCADModule(objective="erase", num_inference_steps=3, components=["cross_attn_kv"],
                                 granularity="neuron")
    data = MaskDataModule(concept="circle", base_word="auto", samples=1, masks=24, heldout_masks=4, batch_size=8)
    writer = RegressionWriter(strengths=[0.1, 1.0], ratios=[0.3, 0.4], eval_target_images=4, eval_retain_images=3,
                              floor_images=4, eval_batch_size=16, min_spearman=-1, damage_prompts=1, evaluate_at="goal")
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer])
    trainer.fit(module, datamodule=data)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spread"] == "text" and report["selection"] == "selective" and report["scope"] == "matrix"
    assert report["row_weights"] == "ablation"
    assert module.hparams.score == "presence"
    # per-weight scores: each row's coefficient over its weights, unevenly
    scores = load_file(tmp_path / "attribution" / "scores.safetensors")
    coefficients = load_file(tmp_path / "attribution" / "component_scores.safetensors")["coefficients"].double()
    rows = torch.cat([scores[b.name].double().sum(1) for b in module.layout.blocks])
    assert torch.allclose(rows, coefficients, rtol=1e-4, atol=1e-6 * float(coefficients.abs().max()))
    assert any(float(scores[n].std(1).max()) > 0 for n in scores)
    edit = load_masks(tmp_path / "edits" / "regression-erase-0.3.safetensors")
    total = sum(m.numel() for m in edit.values())
    assert count_ablated(edit) == round(0.3 * total)
    partly = sum(int(((~m).any(1) & m.any(1)).sum()) for m in edit.values())
    assert partly > 0  # single weights, not whole rows
    control = load_masks(tmp_path / "edits" / "random-erase-0.3.safetensors")
    assert all(torch.equal((~control[n]).sum(1), (~edit[n]).sum(1)) for n in edit)  # same count in every row
    # evaluate_at goal: on the search seeds smallest first, each beside its control, until one meets the goal (the
    # rest not written); the edit it stopped at, beside its control, on the report seeds
    exam = report["exam"]
    evaluated = sorted({r["ratio"] for r in exam["search_results"]})
    met = [r["ratio"] for r in exam["search_results"] if r["selection"] == "regression" and r["selective"]]
    assert evaluated == ([0.3] if met and met[0] == 0.3 else [0.3, 0.4]) and exam["chosen"] == evaluated[-1]
    assert [(r["selection"], r["ratio"]) for r in report["results"]] == [("regression", exam["chosen"]),
                                                                        ("random", exam["chosen"])]
    written = {e["masks"] for e in report["edits"]}
    assert written == {f"edits/{s}-erase-{r:g}.safetensors" for s in ("regression", "random") for r in evaluated}
    edited = report["results"][0]  # read against the mean of the control's 3 draws, as first-order edits are
    assert len(edited["random_retained_ssim_draws"]) == 3
    assert edited["random_retained_ssim"] == pytest.approx(sum(edited["random_retained_ssim_draws"]) / 3)


def test_the_text_spread_and_the_selective_selection_need_key_value_neurons(tmp_path):
    from cad_lightning.errors import UserInputError

    with pytest.raises(UserInputError, match="needs per-weight scores"):
        RegressionWriter(spread="even", selection="selective")
    with pytest.raises(UserInputError, match="spread must be one of"):
        RegressionWriter(spread="rows")
    with pytest.raises(UserInputError, match="row_weights must be one of ablation, uniform"):
        RegressionWriter(row_weights="gradient")
    with pytest.raises(UserInputError, match="evaluate_at must be one of all, goal"):
        RegressionWriter(ratios=[0.1], evaluate_at="floor")
    module = RegressionCADModule(num_inference_steps=2, granularity="neuron")  # FF rows
    data = MaskDataModule(concept="circle", samples=1, masks=4, heldout_masks=0, batch_size=4)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RegressionWriter(spread="text")], default_root_dir=tmp_path)
    with pytest.raises(UserInputError, match="spread 'text' needs neuron components of the cross-attention"):
        trainer.fit(module, datamodule=data)


def _staged_run(root):
    module = RegressionCADModule(objective="erase", num_inference_steps=3, components=["cross_attn_kv"],
                                 granularity="neuron")
    data = MaskDataModule(concept="circle", base_word="auto", samples=1, masks=24, heldout_masks=4, batch_size=8)
    writer = RegressionWriter(strengths=[0.1, 1.0], ratios=[0.2, 0.3], rescore_every=0.2, evaluate=False,
                              save_unet=False, min_spearman=-1, damage_prompts=1)
    trainer = pl.Trainer(default_root_dir=root, **writer.trainer_arguments, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer])
    trainer.fit(module, datamodule=data)
    return module, data, writer


@pytest.mark.slow
def test_staged_regression_edits_score_the_edited_model_again_and_resume(tmp_path):
    from cad_lightning.attribution.store import MaskScoreStore
    from cad_lightning.editing import restore_weights

    module, data, writer = _staged_run(tmp_path)
    params = dict(module.backbone.denoiser.named_parameters())  # the staged edit is taken off the model at the end
    assert all(torch.equal(params[n], w) for n, w in module.original_weights.items())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rescored_at"] == [0.2] and [s["stage"] for s in report["stages"]] == [0, 1]
    assert [s["at"] for s in report["stages"]] == [0.0, 0.2] and module.computed == 2 * 28
    first, second = (Path(s["store"]) for s in report["stages"])
    assert first == tmp_path / "mask_scores" and second.parent == first and second.name.startswith("stage-1-")
    small = load_masks(tmp_path / "edits" / "regression-erase-0.2.safetensors")
    large = load_masks(tmp_path / "edits" / "regression-erase-0.3.safetensors")
    total = sum(m.numel() for m in large.values())
    assert count_ablated(small) == round(0.2 * total) and count_ablated(large) == round(0.3 * total)
    assert all(torch.equal(large[n] & small[n], large[n]) for n in small)  # nested: the edit grew from the stage
    # the second stage's scores are those of the model with the staged edit on it, on the unedited model's states
    before, after = MaskScoreStore(first, {}).load(), MaskScoreStore(second, {}).load()
    assert set(before) == set(after) and any(abs(before[i] - after[i]) > 1e-6 for i in before)
    restore_weights(module.backbone.denoiser, module.original_weights)
    module._inputs = None
    runs = data.items()
    module.prepare_inputs([r["prompt"] for r in runs], [int(r["seed"]) for r in runs], [r["base_prompt"] for r in runs])
    restore_weights(module.backbone.denoiser, module.original_weights, small)
    again = module.score_masks(module.masks([0, 5]), [r["prompt"] for r in runs], [int(r["seed"]) for r in runs],
                               [r["base_prompt"] for r in runs])
    assert again.tolist() == pytest.approx([after[0], after[5]], rel=1e-5, abs=1e-7)
    # the written attribution is the first fit's, of the unedited model
    meta = json.loads((tmp_path / "attribution" / "meta.json").read_text())
    assert meta["rescore_every"] == 0.2 and meta["fit"]["train_r2"] == pytest.approx(report["stages"][0]["train_r2"])
    # a restart finds both stages' scores and makes the same edits
    resumed, _, _ = _staged_run(tmp_path)
    assert resumed.computed == 0
    again_large = load_masks(tmp_path / "edits" / "regression-erase-0.3.safetensors")
    assert all(torch.equal(again_large[n], large[n]) for n in large)


def test_staged_regression_edits_are_refused_where_they_cannot_grow(tmp_path):
    from cad_lightning.errors import UserInputError

    with pytest.raises(UserInputError, match="rescore_every must be in"):
        RegressionWriter(ratios=[0.2], rescore_every=1.5)
    assert RegressionWriter(rescore_every=0.2)._stops() == []  # no ratios: no edits, one fit
    with pytest.raises(UserInputError, match="use selection selective"):
        RegressionWriter(ratios=[0.2], rescore_every=0.1, selection="top")
    module = RegressionCADModule(num_inference_steps=2, granularity="layer", score="objective")  # FF layers
    data = MaskDataModule(concept="circle", samples=1, masks=4, heldout_masks=0, batch_size=4)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[RegressionWriter(ratios=[0.2], rescore_every=0.1)])
    with pytest.raises(UserInputError, match="set it to null for other components"):
        trainer.fit(module, datamodule=data)


def test_a_store_outlives_a_moved_model_folder_but_not_other_weights(tmp_path, capsys):
    import shutil

    from cad_lightning.generation import resolve_model_path

    source = resolve_model_path("tiny-shapes")
    args = ["fit", "--config", str(CONFIGS / "attribute_regression.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--model.score", "objective", "--model.num_inference_steps", "2", "--model.granularity", "layer",
            "--data.samples", "1", "--data.masks", "4", "--data.heldout_masks", "0", "--data.batch_size", "4",
            "--trainer.callbacks.init_args.ratios", "null"]
    shutil.copytree(source, tmp_path / "a")
    assert run_cli(args + ["--model.model_path", str(tmp_path / "a")]) == 0
    (tmp_path / "a").rename(tmp_path / "b")  # the checkout moved: the same weights, so the scores are found
    assert run_cli(args + ["--model.model_path", str(tmp_path / "b")]) == 0
    meta = json.loads(sorted((tmp_path / "run" / "lightning_logs").glob("version_*/attribution/meta.json"))[-1].read_text())
    assert meta["masks"]["computed_this_run"] == 0
    weights = tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    from safetensors.torch import save_file

    save_file(tensors, str(weights))  # other weights at the same path: refused
    capsys.readouterr()
    assert run_cli(args + ["--model.model_path", str(tmp_path / "b")]) == 2
    assert "model_sha256" in capsys.readouterr().err


def test_a_staged_regression_writer_declares_its_epochs_and_refuses_others(tmp_path):
    """The writer's stages are epochs it declares (``cad fit`` sets them); a Trainer built with others is refused
    before any mask is scored, instead of the writer changing the trainer's loop."""
    from cad_lightning.errors import UserInputError

    writer = RegressionWriter(ratios=[0.2, 0.3], rescore_every=0.2, evaluate=False, save_unet=False)
    assert writer.trainer_arguments == {"max_epochs": 2}
    assert RegressionWriter(ratios=[0.2, 0.3]).trainer_arguments == {"max_epochs": 1}
    module = RegressionCADModule(objective="erase", num_inference_steps=2, components=["cross_attn_kv"],
                                 granularity="neuron")
    data = MaskDataModule(concept="circle", base_word="auto", samples=1, masks=4, heldout_masks=0, batch_size=4)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[writer])
    with pytest.raises(UserInputError, match="max_epochs=2"):
        trainer.fit(module, datamodule=data)
    assert not (tmp_path / "mask_scores").exists() or not any((tmp_path / "mask_scores").rglob("*.json"))

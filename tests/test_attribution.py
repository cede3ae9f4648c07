"""The main job: first-order CAD attribution, editing artifacts, evaluation and its bad inputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import SHIPPED_MODEL, ff_scoring_backbone, run_cli
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from cad_lightning import apply_edit, load_backbone
from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.localisation import localisation
from cad_lightning.attribution.scoring import accumulate_first_order
from cad_lightning.attribution.scoring import first_order_scores
from cad_lightning.attribution.objectives import EraseObjective
from cad_lightning.editing import load_masks, select_components

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAST = ["--model.num_inference_steps", "4", "--data.samples", "2", "--data.batch_size", "2"]
EIGHT_IMAGES = ["--model.exam.eval_target_images", "8", "--model.exam.eval_retain_images",
                "8", "--model.exam.floor_images", "8"]  # an evaluation on 8 images per group


def attribute(tmp_path, *extra: str) -> tuple[int, Path]:
    code = run_cli(["fit", "--config", str(CONFIGS / "attribute.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    *FAST, *extra])
    runs = sorted((tmp_path / "lightning_logs").glob("version_*"))
    return code, (runs[-1] if runs else tmp_path)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One small attribution run with evaluation, shared by the artifact tests."""
    tmp = tmp_path_factory.mktemp("attribute")
    code, run = attribute(tmp, "--data.concept", "square", "--model.editing.ratios", "[0.01, 0.03]",
                          "--model.editing.selections", "[selective, cad, random]",
                          "--model.exam.evaluate_at", "all",
                          "--model.exam.eval_target_images", "8",
                          "--model.exam.eval_retain_images", "8",
                          "--model.exam.floor_images", "8")
    assert code == 0
    return run


def test_artifacts(small_run):
    for name in ("config.yaml", "attribution/scores.safetensors", "attribution/sensitivity.safetensors",
                 "attribution/row_moments.safetensors",
                 "attribution/meta.json", "report.json", "report.md", "tradeoff.png", "samples/selective-erase.png",
                 "samples/cad-erase.png", "samples/random-erase.png"):
        assert (small_run / name).is_file(), name
    unet = load_backbone(SHIPPED_MODEL).unet
    params = dict(unet.named_parameters())
    scores = load_file(small_run / "attribution/scores.safetensors")
    assert set(scores) == set(ComponentSpace(["cross_attn_kv"]).names(unet))  # the default config's components
    sensitivity = load_file(small_run / "attribution/sensitivity.safetensors")
    assert set(sensitivity) == set(scores) and all((t >= 0).all() and t.sum() > 0 for t in sensitivity.values())
    row_moments = load_file(small_run / "attribution/row_moments.safetensors")  # every scored weight is K or V
    assert set(row_moments) == set(scores)
    for name, moment in row_moments.items():
        rows = params[name].shape[0]
        assert moment.shape == (rows, rows) and torch.allclose(moment, moment.T, atol=1e-6 * float(moment.abs().max()))
        assert (moment.diagonal() >= 0).all() and moment.diagonal().sum() > 0
    for name, tensor in scores.items():
        assert tensor.shape == params[name].shape and tensor.dtype == torch.float32
    meta = json.loads((small_run / "attribution/meta.json").read_text())
    assert meta["concept"] == "square" and meta["estimator"] == "first_order" and meta["items"] == 2
    report = json.loads((small_run / "report.json").read_text())
    assert report["collateral_space"] == "text" and report["row_coupling"] is True
    assert "rows coupled by their output gradients' correlation" in (small_run / "report.md").read_text()
    total = sum(t.numel() for t in scores.values())
    for edit in report["edits"]:
        assert 0 < edit["ablated"] <= round(edit["ratio"] * total)  # fewer only when positive scores run out
        assert (small_run / edit["masks"]).is_file()
    assert {r["selection"] for r in report["results"]} == {"selective", "cad", "random"}
    # the random control at every ratio, with the counts of the first selection
    counts = {(r["selection"], r["ratio"]): r["ablated"] for r in report["results"]}
    assert counts[("random", 0.01)] == counts[("selective", 0.01)] and counts[("random", 0.03)] == counts[("selective", 0.03)]
    assert 0 <= report["before"]["square"] <= 1 and "circle" in report["before"]
    for r in report["results"]:
        assert 0 <= r["retained_ssim"] <= 1 and r["retained_kid"] == r["retained_kid"]
        assert 0 <= r["other_words"] <= 1 and abs(sum(r["drawn_instead"].values()) - 1) < 1e-9
        assert (r["selective"] is None) == (r["selection"] == "random")
    # the config's 3 random draws per ratio: draw 0 is the written control, edits are read against their mean
    for r in report["results"]:
        if r["selection"] == "random":
            assert len(r["retained_ssim_draws"]) == 3 and r["retained_ssim_draws"][0] == r["retained_ssim"]
            assert len(set(r["retained_ssim_draws"])) > 1  # different draws, different images
        else:
            draws = r["random_retained_ssim_draws"]
            assert abs(r["random_retained_ssim"] - sum(draws) / 3) < 1e-12
    assert sum(e["selection"] == "random" for e in report["edits"]) == 2
    assert report["collateral_space"] == "text"  # cross-attention keys and values: measured exactly on the prompts
    markdown = (small_run / "report.md").read_text()
    assert "SSIM" in markdown and "other words" in markdown and "samples/selective-erase.png" in markdown
    # where the concept lives: the report's localisation is that of the written scores
    assert (small_run / "localisation.png").is_file() and "## Where the concept lives" in markdown
    assert report["localisation"] == json.loads(json.dumps(localisation(scores, 0.01, 2, 16)))
    top = report["top_components"]
    assert len(top) == 20 and top[0]["score"] == max(float(t.max()) for t in scores.values())
    assert all(scores[r["parameter"]][tuple(r["index"])].item() == r["score"] for r in top)


def test_selective_collateral_on_sampled_states(small_run, tmp_path):
    """``collateral_space: states`` (what ``auto`` picks for components other than cross-attention K/V) measures
    collateral on preserved runs' states instead of in text space: same scores and count, another edit."""
    code, run = attribute(tmp_path, "--data.concept", "square", "--model.editing.ratios", "[0.01, 0.03]",
                          "--model.editing.selections", "[selective]",
                          "--model.editing.collateral_space", "states",
                          "--model.editing.rescore_every", "null",
                          "--model.exam.evaluate", "false", "--model.editing.save_unet", "false")
    assert code == 0
    report = json.loads((run / "report.json").read_text())
    assert report["collateral_space"] == "states"
    assert load_file(run / "attribution/scores.safetensors").keys() == load_file(small_run / "attribution/scores.safetensors").keys()
    states = load_masks(run / "edits/selective-erase-0.03.safetensors")
    text = load_masks(small_run / "edits/selective-erase-0.03.safetensors")
    assert sum(int((~m).sum()) for m in states.values()) == sum(int((~m).sum()) for m in text.values())
    assert any(not torch.equal(states[n], text[n]) for n in text)


def test_edited_unet_opens_in_plain_diffusers(small_run):
    masks = load_masks(small_run / "edits/cad-erase-0.03.safetensors")
    edited = UNet2DConditionModel.from_pretrained(small_run / "edits/cad-erase-0.03/unet")
    original = load_backbone(SHIPPED_MODEL).unet
    edited_params, original_params = dict(edited.named_parameters()), dict(original.named_parameters())
    for name, keep in masks.items():
        assert (edited_params[name][~keep] == 0).all()
        assert torch.equal(edited_params[name][keep], original_params[name][keep])
    apply_edit(original.requires_grad_(False), small_run / "edits/cad-erase-0.03.safetensors")
    for name in masks:
        assert torch.equal(dict(original.named_parameters())[name], edited_params[name])


def test_scores_are_the_first_order_effect():
    """α = w·∂J/∂w: shrinking a set S of weights by a factor (1 − ε) changes J by −ε Σ_S α (to first order).
    Checked for the top positive, the most negative and a random set of components."""
    backbone, names, params = ff_scoring_backbone()
    objective = EraseObjective(num_inference_steps=6)
    prompts, seeds = ["a circle", "a red circle", "a striped circle", "a circle"], [0, 1, 2, 3]
    scores, _ = first_order_scores(backbone, objective, names, prompts, seeds)  # α of the mean J over states
    inputs = objective.inputs(backbone, prompts, seeds)  # J as the scores see it: the base branch held fixed

    def j_scaled(masks, eps):
        saved = {n: params[n].detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                params[n].mul_(torch.where(masks[n], 1.0, 1.0 - eps))
            value = float(objective.value(backbone, inputs).double().mean())
            for n in names:
                params[n].copy_(saved[n])
        return value

    keep_all = {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
    base = j_scaled(keep_all, 0.0)
    generator = torch.Generator().manual_seed(0)
    sets = {
        "top": select_components(scores, 0.01, mode="erase", scope="global"),
        "bottom": select_components(scores, 0.01, mode="amplify", scope="global"),
        "random": {n: torch.rand(params[n].shape, generator=generator) > 0.01 for n in names},
    }
    eps = 0.002
    predicted = {k: -eps * float(sum(scores[n][~m].sum() for n, m in masks.items())) for k, masks in sets.items()}
    actual = {k: j_scaled(masks, eps) - base for k, masks in sets.items()}
    assert predicted["top"] < 0 < predicted["bottom"]
    for k in ("top", "bottom"):
        assert actual[k] == pytest.approx(predicted[k], rel=0.1), (k, actual, predicted)
    assert abs(actual["random"]) < 0.25 * abs(actual["top"])


@pytest.mark.slow
def test_same_config_twice_gives_identical_scores(tmp_path):
    args = ["--model.exam.evaluate", "false", "--model.editing.save_unet", "false"]
    code_a, run_a = attribute(tmp_path / "a", *args)
    code_b, run_b = attribute(tmp_path / "b", *args)
    assert code_a == code_b == 0
    a, b = load_file(run_a / "attribution/scores.safetensors"), load_file(run_b / "attribution/scores.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a)
    # every edit bitwise the same in both runs, the staged one too (past the config's rescore_every, grown on
    # scores of the edited model)
    report_a = json.loads((run_a / "report.json").read_text())
    ratios = sorted(e["ratio"] for e in report_a["edits"] if e["selection"] == "selective")
    assert ratios == report_a["ratios"] and report_a["rescored_at"] == [0.2] and max(ratios) > 0.2
    for e in report_a["edits"]:
        masks_a, masks_b = load_masks(run_a / e["masks"]), load_masks(run_b / e["masks"])
        assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)


def test_evaluate_an_edit(small_run, tmp_path):
    edit = small_run / "edits/cad-erase-0.03.safetensors"
    code = run_cli(["test", "--config", str(CONFIGS / "evaluate.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    "--data.concept", "square", "--data.target_images", "8", "--data.retain_images", "8",
                    "--model.edit", str(edit)])
    assert code == 0
    out = json.loads(next(tmp_path.rglob("evaluation.json")).read_text())
    assert out["edit"] == str(edit) and 0 <= out["accuracy"]["square"] <= 1 and "circle" in out["accuracy"]
    # the collateral against the unedited model on the same seeds, as at the end of the fit
    assert out["ablated"] > 0 and 0 <= out["edited"]["retained_ssim"] <= 1 and "other_words_relative" in out["edited"]
    report = json.loads((small_run / "report.json").read_text())
    fit_row = next(r for r in report["results"] if r["selection"] == "cad" and r["ratio"] == 0.03)
    assert out["edited"]["target"] == pytest.approx(fit_row["target"])


@pytest.mark.parametrize(
    "args, field",
    [
        (["--data.concept", "dog"], "data.concept"),
        (["--model.editing.ratios", "[0.5, 1.5]"], "ratios"),
        (["--model.editing.ratios", "[0]"], "ratios"),
        (["--model.editing.ratios", "null"], "ratios"),
        (["--model.components", "[no_such_layer]"], "model.components"),
        (["--model.exam.evaluate_at", "nowhere"], "evaluate_at"),
        (["--model.exam.evaluate_at", "floor", "--model.objective", "amplify"], "evaluate_at"),
        (["--model.exam.evaluate_at", "goal", "--model.objective", "amplify"], "evaluate_at"),
        (["--model.exam.search_images", "0"], "search_images"),
        (["--model.editing.collateral_space", "nowhere"], "collateral_space"),
        (["--model.editing.collateral_space", "text", "--model.components", "[ff]"], "collateral_space"),
        (["--data.base_word", "auto", "--data.base_prompt", "a shape"], "data.base_word"),
        (["--data.base_word", "auto", "--data.prompt_templates", '["a photo of a {concept}"]', "--data.concept", "dog"],
         "data.base_word"),
    ],
)
def test_bad_input(tmp_path, capsys, args, field):
    code, _ = attribute(tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2
    assert "cad: error:" in err and field in err


@pytest.mark.parametrize("damage, part, reason", [
    (lambda d: (d / "unet/diffusion_pytorch_model.safetensors").write_bytes(
        (d / "unet/diffusion_pytorch_model.safetensors").read_bytes()[:5000]), "unet/", "deserializing header"),
    (lambda d: (d / "unet/diffusion_pytorch_model.safetensors").unlink(), "unet/", "no file named"),
    (lambda d: [f.unlink() for f in (d / "tokenizer").iterdir()], "tokenizer/", "holds no files"),
    (lambda d: (d / "classifier/config.json").write_text("{not json"), "classifier/", "Expecting property name"),
], ids=["truncated weights", "missing weights", "empty tokenizer", "broken classifier config"])
def test_a_model_folder_that_does_not_load_is_refused_in_one_sentence(tmp_path, capsys, damage, part, reason):
    broken = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, broken)
    damage(broken)
    code, _ = attribute(tmp_path, "--model.model_path", str(broken))
    err = capsys.readouterr().err
    assert code == 2
    message = next(line for line in err.splitlines() if "cad: error:" in line)
    assert f"'{broken}': {part} does not load" in message and reason in message
    assert "Traceback" not in err


def test_non_finite_scores_are_refused(tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL, broken)
    unet = UNet2DConditionModel.from_pretrained(broken / "unet")
    name = ComponentSpace(["ff"]).names(unet)[0]
    with torch.no_grad():
        dict(unet.named_parameters())[name][0, 0] = float("nan")
    unet.save_pretrained(broken / "unet")
    code, _ = attribute(tmp_path, "--model.model_path", str(broken))
    err = capsys.readouterr().err
    assert code == 2 and "non-finite" in err


def test_stable_diffusion_folder_end_to_end(tiny_sd_folder, tmp_path):
    """A free-text concept on a (tiny, random) Stable Diffusion folder: scores, an edit, and the edited UNet
    running inside a plain StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    code = run_cli(["fit", "--config", str(CONFIGS / "sd" / "erase_object.yaml"), "--model.model_path", str(tiny_sd_folder),
                    "--model.dtype", "fp32", "--model.num_inference_steps", "3", "--data.concept", "cat",
                    "--data.samples", "2", "--data.batch_size", "2", "--trainer.default_root_dir", str(tmp_path),
                    "--model.editing.ratios", "[0.05]", "--model.editing.save_unet", "true"])
    assert code == 0
    run = sorted((tmp_path / "lightning_logs").glob("version_*"))[-1]
    report = json.loads((run / "report.json").read_text())
    assert report["concept"] == "cat" and report["edits"][0]["ablated"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, local_files_only=True)
    pipe.unet = UNet2DConditionModel.from_pretrained(run / report["edits"][0]["unet"])
    image = pipe("a photo of a cat", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape[0] == 1 and torch.isfinite(image).all()

    # cad predict with the edit: same seeds, other images than the unedited model
    grids = {}
    for name, extra in (("unedited", []), ("edited", ["--model.edit", str(run / report["edits"][0]["masks"])])):
        code = run_cli(["predict", "--config", str(CONFIGS / "generate.yaml"), "--model.model_path", str(tiny_sd_folder),
                        "--model.num_inference_steps", "2", "--data.prompts", "[a photo of a cat]",
                        "--data.images_per_prompt", "2", "--trainer.default_root_dir", str(tmp_path / name), *extra])
        assert code == 0
        grids[name] = np.asarray(Image.open(tmp_path / name / "samples.png"))
    assert grids["edited"].shape == grids["unedited"].shape
    assert not np.array_equal(grids["edited"], grids["unedited"])


def test_gradient_checkpointing_gives_the_same_scores():
    """Recomputing activations in the backward pass changes memory, not the scores."""
    backbone, names, params = ff_scoring_backbone()
    objective = EraseObjective(num_inference_steps=4)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            backbone.denoiser.enable_gradient_checkpointing()
        buffers = [torch.zeros_like(params[n]) for n in names]
        accumulate_first_order(backbone, objective, names, ["a circle", "a red circle"], [0, 1], buffers)
        results.append(torch.cat([b.flatten() for b in buffers]))
    assert backbone.denoiser.is_gradient_checkpointing
    assert results[0].abs().max() > 0
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-9)


def test_fp32_on_cuda_switches_tf32_off():
    from cad_lightning.attribution.base import restore_fp32, use_ieee_fp32

    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        assert not use_ieee_fp32(torch.device("cpu"))
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        previous = use_ieee_fp32(torch.device("cuda", 0))
        assert previous is not None and previous[1] == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        restore_fp32(previous)  # what a run's teardown does
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_items_carry_their_base_prompts():
    from cad_lightning.data.attribution_datamodule import AttributionDataModule

    items = AttributionDataModule(concept="red", base_word="auto", samples=6, retain_samples=1).items()
    for item in items:
        assert item["concept"] in item["prompt"].split() and item["concept"] not in item["base_prompt"].split()
    assert {i["base_prompt"] for i in items if i["concept"] == "circle"} <= {"a shape", "a red shape", "a blue shape",
        "a green shape", "a yellow shape", "a solid shape", "a striped shape"} | {
        f"a {c} {t} shape" for c in ("red", "green", "blue", "yellow") for t in ("solid", "striped")}
    plain = AttributionDataModule(concept="red", samples=2).items()
    assert {i["base_prompt"] for i in plain} == {""}
    free = AttributionDataModule(concept="golf ball", base_word="object", prompt_templates=["a photo of a {concept}"],
                                 samples=1).items()
    assert free[0]["base_prompt"] == "a photo of a object"


def test_erase_objective_uses_each_items_base_prompt():
    """With each item's base prompt equal to its prompt the gap, and so J and every score, is zero; with the
    concept word taken out it is not, and differs from the gap to the empty prompt."""
    backbone, names, params = ff_scoring_backbone()
    objective = EraseObjective(num_inference_steps=5)  # 3 states are all at t >= 666, where prompts differ little
    prompts, seeds = ["a red circle", "a striped circle"], [0, 1]
    results = {}
    for label, bases in (("same", prompts), ("without", ["a red shape", "a striped shape"]), ("empty", None)):
        buffers = [torch.zeros_like(params[n]) for n in names]
        total_j, _ = accumulate_first_order(backbone, objective, names, prompts, seeds, buffers, base_prompts=bases)
        results[label] = (total_j, torch.cat([b.flatten() for b in buffers]))
    assert results["same"][0] == 0 and results["same"][1].abs().max() == 0
    assert results["without"][0] > 0 and results["without"][1].abs().max() > 0
    assert results["without"][0] < results["empty"][0]
    assert not torch.allclose(results["without"][1], results["empty"][1])


@pytest.mark.slow
def test_goal_evaluates_smallest_first_and_stops_at_the_first_edit_that_meets_the_goal(tmp_path):
    ratios = [0.01, 0.02, 0.1, 0.3, 0.5]
    code, run = attribute(tmp_path, "--data.concept", "circle",
                          "--model.editing.ratios", str(ratios),
                          "--model.exam.evaluate_at", "goal",
                          "--model.exam.random_draws", "2", *EIGHT_IMAGES)
    assert code == 0
    report = json.loads((run / "report.json").read_text())
    exam = report["exam"]
    searched = exam["search_results"]  # the decision, on the search seeds
    evaluated = sorted({r["ratio"] for r in searched})
    assert evaluated == ratios[: len(evaluated)]  # smallest first, none skipped
    met = {r["ratio"] for r in searched if r["selection"] == "selective" and r["selective"]}
    # the scenario this checks: an edit meets the goal, and not the largest, so the larger ratios are left out
    assert met and evaluated[-1] < ratios[-1]
    assert met == {evaluated[-1]} == {exam["chosen"]} and exam["goal_met_on_search"]  # it stopped at the first
    floor = exam["search_floor"]["circle"]
    for r in searched:  # every searched edit read against its random control's 2 draws (their retained images) ...
        assert r["selection"] == "selective"
        if r.get("screened"):  # ... unless its target images alone missed the goal
            assert (r["target"] > floor + 0.05 or r["other_words_relative"] < 0.9) and not r["selective"]
            assert r.get("retained_ssim") is None and r["random_retained_ssim"] is None
        else:
            assert len(r["random_retained_ssim_draws"]) == 2 and r["retained_ssim"] is not None
    # the report: only the chosen edit, beside its control, on the report seeds
    assert {(r["selection"], r["ratio"]) for r in report["results"]} == {("selective", exam["chosen"]),
                                                                         ("random", exam["chosen"])}
    control = next(c for c in report["results"] if c["selection"] == "random")
    edit = next(c for c in report["results"] if c["selection"] == "selective")
    assert control["ablated"] == edit["ablated"] and len(control["retained_ssim_draws"]) == 2
    assert edit["random_retained_ssim"] == pytest.approx(sum(control["retained_ssim_draws"]) / 2)
    search_seeds, report_seeds = exam["search_seeds"], exam["report_seeds"]
    assert search_seeds[1] <= report_seeds[0] or report_seeds[1] <= search_seeds[0]  # disjoint
    # only the searched edits are written (and their controls)
    assert {(e["selection"], e["ratio"]) for e in report["edits"]} == {
        (s, r) for r in evaluated for s in ("selective", "random")}
    assert len(list((run / "edits").glob("*.safetensors"))) == len(report["edits"])
    markdown = (run / "report.md").read_text()
    skipped = ", ".join(f"{r:g}" for r in ratios[len(evaluated):])
    assert f"{evaluated[-1]:g} meets it, and only it is evaluated on the report seeds above; {skipped} neither " \
           "evaluated nor written" in markdown


@pytest.mark.slow
def test_floor_search_evaluates_the_smallest_edit_that_reaches_the_floor(tmp_path):
    ratios = [0.01, 0.02, 0.05, 0.1, 0.3]
    code, run = attribute(tmp_path, "--data.concept", "circle",
                          "--model.editing.ratios", str(ratios),
                          "--model.exam.evaluate_at", "floor",
                          "--model.exam.random_draws", "1",
                          "--model.exam.search_images", "8", *EIGHT_IMAGES)
    assert code == 0
    report = json.loads((run / "report.json").read_text())
    search = report["search"]["selective"]
    # decided on the search seeds' floor, reported against the report seeds' floor
    assert search["goal"] == pytest.approx(report["exam"]["search_floor"]["circle"]) and search["images"] == 8
    probes = {p["ratio"]: p for p in search["probes"]}
    assert 1 <= len(probes) <= 3 and set(probes) <= set(ratios)  # bisection: about log2(6) probes, not 5
    for p in probes.values():
        assert p["reached"] == (p["target"] <= search["goal"]) and abs(sum(p["drawn_instead"].values()) - 1) < 1e-9
    found = search["found"]
    # the scenario this checks: some edit reaches the floor, and not the smallest
    assert found is not None and found > ratios[0]
    assert probes[found]["reached"] and not probes[ratios[ratios.index(found) - 1]]["reached"]
    # only the edit found is written and evaluated, beside its random control of equal count
    assert {(r["selection"], r["ratio"]) for r in report["results"]} == {("selective", found), ("random", found)}
    assert {(e["selection"], e["ratio"]) for e in report["edits"]} == {("selective", found), ("random", found)}
    counts = {r["selection"]: r["ablated"] for r in report["results"]}
    assert counts["selective"] == counts["random"] == probes[found]["ablated"]
    markdown = (run / "report.md").read_text()
    assert "the smallest edit that reaches the floor" in markdown
    # past the config's rescore_every (0.2), the edit grew on scores of the edited model: one more epoch
    assert report["rescored_at"] == [0.2] and "grown on scores of the edited model from 0.2 on" in markdown
    meta = json.loads((run / "attribution/meta.json").read_text())
    assert meta["sensitivity"]["rescore_every"] == 0.2

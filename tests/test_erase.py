"""Continuous edits in the exam (cad_lightning/editing/delta.py), the peers' job (cad_lightning/editing/peers.py)
and the one call that erases (cad_lightning/erase.py)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHIPPED_MODEL

from cad_lightning import erase
from cad_lightning.editing import (WeightDelta, combine_masks, count_ablated, load_edit, load_masks, put_edit,
                                   random_like, restore_weights, save_edit)
from cad_lightning.errors import UserInputError

ROOT = Path(__file__).resolve().parent.parent
SMALL_EXAM = {"eval_target_images": 8, "eval_retain_images": 8, "floor_images": 8}


def _linear_delta():
    layer = torch.nn.Linear(6, 4, bias=False)
    change = torch.zeros(4, 6)
    change[1, 2], change[3, 0] = 0.5, -2.0
    return layer, WeightDelta({"weight": change})


def test_a_weight_change_is_put_on_saved_read_and_controlled(tmp_path):
    layer, delta = _linear_delta()
    original = {"weight": layer.weight.detach().clone()}
    assert count_ablated(delta) == 2 and delta.norm() == pytest.approx((0.25 + 4.0) ** 0.5)
    assert put_edit(layer, delta) == 2
    assert torch.allclose(layer.weight, original["weight"] + delta["weight"])
    restore_weights(layer, original)
    assert torch.equal(layer.weight, original["weight"])
    path = save_edit(tmp_path / "delta.safetensors", delta, {"method": "test"})
    read = load_edit(path)
    assert isinstance(read, WeightDelta) and torch.equal(read["weight"], delta["weight"])
    restore_weights(layer, original, read)
    assert torch.allclose(layer.weight, original["weight"] + delta["weight"])
    # the control: the same norm on the same weights, another direction, reproducible from its generator
    control = random_like(delta, torch.Generator().manual_seed(1))
    again = random_like(delta, torch.Generator().manual_seed(1))
    assert isinstance(control, WeightDelta) and torch.equal(control["weight"], again["weight"])
    assert control.norm() == pytest.approx(delta.norm(), rel=1e-5)
    assert set(control["weight"].nonzero().flatten().tolist()) <= set(delta["weight"].nonzero().flatten().tolist())
    assert not torch.allclose(control["weight"], delta["weight"])


def test_a_weight_change_is_refused_where_masks_are_needed(tmp_path):
    layer, delta = _linear_delta()
    path = save_edit(tmp_path / "delta.safetensors", delta)
    with pytest.raises(UserInputError, match="weight change"):
        load_masks(path)
    with pytest.raises(UserInputError, match="does not combine"):
        combine_masks({"weight": torch.ones(4, 6, dtype=torch.bool)}, delta)
    before = layer.weight.detach().clone()
    with pytest.raises(UserInputError, match="shape"):
        put_edit(layer, WeightDelta({"weight": torch.ones(6, 4)}))
    with pytest.raises(UserInputError, match="not a parameter"):
        put_edit(layer, WeightDelta({"bias": torch.ones(4)}))
    assert torch.equal(layer.weight, before)


def test_erase_with_uce_writes_a_model_diffusers_opens_and_reads_it_against_a_control_of_its_size(tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    summary = erase(str(SHIPPED_MODEL), "circle", method="uce", out=str(tmp_path), exam=SMALL_EXAM, progress=False)
    run = Path(summary["run_dir"])
    report = json.loads((run / "report.json").read_text())
    assert summary["method"] == "uce" and summary["concepts"] == ["circle"]
    edit, control = summary["edit"], summary["random"]
    assert edit["selection"] == "uce" and control["selection"] == "random" and control["ratio"] == edit["ratio"]
    # UCE changes the cross-attention key/value weights (all 32,768 but the few whose change rounds to nothing in
    # float32, which depends on the machine's solve); on the report seeds circle is no longer drawn as often
    assert 0.999 * 32768 <= edit["ablated"] <= 32768 and edit["target"] < report["before"]["circle"]
    assert edit["target"] <= control["target"]
    assert (run / "samples" / "uce-erase.png").is_file() and "UCE erase" in (run / "report.md").read_text()
    # the control is a change of the same Frobenius norm in the same matrices
    files = {e["selection"]: load_edit(run / e["masks"]) for e in report["edits"]}
    assert isinstance(files["uce"], WeightDelta) and set(files["random"]) == set(files["uce"])
    for name, change in files["uce"].items():
        assert float(files["random"][name].norm()) == pytest.approx(float(change.norm()), rel=1e-4)
    assert report["edit_norm"] == pytest.approx(files["uce"].norm(), rel=1e-5)
    # the edited model folder: every part of the model, the denoiser edited, opened by plain diffusers
    folder = Path(summary["model_folder"])
    assert {p.name for p in SHIPPED_MODEL.iterdir()} == {p.name for p in folder.iterdir()}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    unedited = load_file(SHIPPED_MODEL / "unet" / "diffusion_pytorch_model.safetensors")
    params = dict(unet.named_parameters())
    for name, change in files["uce"].items():
        assert torch.allclose(params[name].detach(), unedited[name] + change, atol=1e-6)
    untouched = next(n for n in params if "attn1.to_q" in n)
    assert torch.equal(params[untouched].detach(), unedited[untouched])


def test_erase_runs_on_a_stable_diffusion_folder(tiny_sd_folder, tmp_path):
    """A Stable Diffusion 1.x layout (random weights): the edit is made and written; the shapes-world exam does
    not read free-text concepts, and says so."""
    from diffusers import UNet2DConditionModel

    summary = erase(str(tiny_sd_folder), "a cat", method="uce", out=str(tmp_path), progress=False,
                    data={"prompt_templates": ["a photo of {concept}"], "base_word": "", "preserve_samples": 2,
                          "samples": 2})
    report = json.loads((Path(summary["run_dir"]) / "report.json").read_text())
    assert "skipped" in report["evaluation"] and summary["edit"] is None
    unet = UNet2DConditionModel.from_pretrained(Path(summary["model_folder"]) / "unet")
    assert sum(p.numel() for p in unet.parameters()) > 0


def test_erase_refuses_an_unknown_method_and_no_concept(tmp_path):
    with pytest.raises(UserInputError, match="method must be one of"):
        erase(str(SHIPPED_MODEL), "circle", method="mace", out=str(tmp_path))
    with pytest.raises(UserInputError, match="concepts is empty"):
        erase(str(SHIPPED_MODEL), [], method="uce", out=str(tmp_path))


@pytest.mark.parametrize("config", ["attribute.yaml", "cad_paper.yaml", "peers/uce.yaml", "peers/esd_x.yaml",
                                    "peers/conceptprune.yaml"])
def test_the_configs_run_what_erase_runs(config):
    """configs/*.yaml and erase() hold the same settings: the command line and the call examine alike."""
    from cad_lightning.erase import CAD, CAD_PAPER, DATA, EXAM

    loaded = yaml.safe_load((ROOT / "configs" / config).read_text())
    init = loaded["model"]["init_args"]
    assert {k: init["exam"][k] for k in EXAM if k in init["exam"]} == {k: v for k, v in EXAM.items() if k in init["exam"]}
    assert set(init["exam"]) >= {"evaluate_at", "random_at", "random_draws", "eval_target_images", "floor_images"}
    data = loaded["data"]["init_args"]
    own = {"preserve_samples": 0} if config == "cad_paper.yaml" else {}
    assert {k: data[k] for k in DATA} == {**DATA, **own}
    if config in ("attribute.yaml", "cad_paper.yaml"):
        expected = CAD if config == "attribute.yaml" else CAD_PAPER
        assert init["components"] == expected["components"]
        assert {k: init["editing"][k] for k in expected["editing"]} == expected["editing"]
    else:
        assert init["method"] == config.split("/")[1].removesuffix(".yaml")


@pytest.mark.parametrize("method, settings, kind", [("esd_x", {"esd": {"steps": 3}}, WeightDelta),
                                                     ("conceptprune", {}, dict)])
def test_every_peer_runs_as_a_job_and_is_examined(method, settings, kind, tmp_path):
    summary = erase(str(SHIPPED_MODEL), "circle", method=method, out=str(tmp_path), progress=False,
                    exam={**SMALL_EXAM, "random_draws": 1}, settings=settings)
    report = json.loads((Path(summary["run_dir"]) / "report.json").read_text())
    edit = load_edit(Path(summary["run_dir"]) / report["edits"][0]["masks"])
    assert type(edit) is kind and summary["edit"]["selection"] == method and summary["random"] is not None
    assert report["method"] == method and report["edit_time_s"] > 0
    assert summary["edit"]["ablated"] == count_ablated(edit) > 0
    # the report names what the edit does to its weights: a weight change changes them, a pruning ablates them
    text = (Path(summary["run_dir"]) / "report.md").read_text()
    word = "changed" if kind is WeightDelta else "ablated"
    assert f"| {word} weights |" in text and f"| {'ablated' if word == 'changed' else 'changed'} weights |" not in text


def test_cad_erase_on_the_command_line_is_the_call(tmp_path, capsys):
    """``cad erase`` parses erase()'s own arguments (jsonargparse, from its signature), runs it and prints the
    summary as JSON; a bad argument is refused in one line."""
    from conftest import run_cli
    from diffusers import UNet2DConditionModel

    exam = "{" + ", ".join(f"{k}: {v}" for k, v in {**SMALL_EXAM, "random_draws": 1}.items()) + "}"
    code = run_cli(["erase", "--model", str(SHIPPED_MODEL), "--concepts", "[circle, square]", "--method", "uce",
                    "--out", str(tmp_path), "--progress", "false", "--exam", exam])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])
    assert summary["method"] == "uce" and summary["concepts"] == ["circle", "square"]
    report = json.loads((Path(summary["run_dir"]) / "report.json").read_text())
    assert report["concepts"] == ["circle", "square"] and summary["edit"]["selection"] == "uce"
    UNet2DConditionModel.from_pretrained(Path(summary["model_folder"]) / "unet")
    assert run_cli(["erase", "--method", "uce", "--concepts", "purple", "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("cad: error:") and "purple" in error[0]

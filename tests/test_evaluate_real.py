"""The evaluation of real models on a prompt-set CSV (configs/sd/evaluate.yaml), with tiny local stand-ins for
every weight: a random SD folder, a ResNet classifier, a CLIP model, reference PNGs and a user detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from cad_lightning.errors import UserInputError
from cad_lightning.evaluation.prompt_sets import read_prompt_set

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sd" / "evaluate.yaml"
STEPS = 4
ROWS = [  # prompt, seed, label, group
    ("a photo of a cat", 11, "golf ball", "target"),
    ("a photo of a dog", 12, "golf ball", "target"),
    ("a red car", 13, "tench", "retain"),
    ("a big house", 14, "1", "retain"),
    ("a green tree", 15, "parachute", "retain"),
    ("a small dog, in the style of a painting", 16, "", "other"),
]


def write_csv(path: Path, rows=ROWS, header="prompt,seed,label,group") -> Path:
    lines = [header] + [f'"{p}",{s},{label},{g}' for p, s, label, g in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def generate(folder, rows=ROWS) -> torch.Tensor:
    from cad_lightning import load_backbone

    backbone = load_backbone(folder)
    return backbone.generate([r[0] for r in rows], seed=[r[1] for r in rows], num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def weights(tiny_sd_folder, tmp_path_factory):
    from eval_models import write_reference_images, write_tiny_classifier, write_tiny_clip

    root = tmp_path_factory.mktemp("eval_weights")
    images = generate(tiny_sd_folder)
    return {
        "images": images,
        "classifier": write_tiny_classifier(root / "classifier", spread_over=images),
        "clip": write_tiny_clip(root / "clip"),
        "reference": write_reference_images(root / "reference", n=6),
        "csv": write_csv(root / "prompts.csv"),
        "threshold": float(images.mean(dim=(1, 2, 3)).median()),
    }


def evaluate(args: list[str], root: Path, folder, prompts_file) -> int:
    return run_cli(["test", "--config", str(CONFIG), "--model.model_path", str(folder), "--model.dtype", "fp32",
                    "--model.num_inference_steps", str(STEPS), "--data.prompts_file", str(prompts_file),
                    "--data.batch_size", "4", "--trainer.accelerator", "cpu",
                    "--trainer.default_root_dir", str(root), *args])


def run_dir(root: Path) -> Path:
    (report,) = root.rglob("report.json")
    return report.parent


# --------------------------------------------------------------------------------------------- the CSV format
def test_prompt_set_reads_quoted_prompts_and_optional_columns(tmp_path):
    rows = read_prompt_set(write_csv(tmp_path / "p.csv"))
    assert [r.prompt for r in rows][-1] == "a small dog, in the style of a painting"
    assert [r.seed for r in rows] == [11, 12, 13, 14, 15, 16]
    assert rows[0].label == "golf ball" and rows[-1].label is None and rows[2].group == "retain"
    only = tmp_path / "only.csv"
    only.write_text("seed,prompt\n3,a cat\n\n4,a dog\n")
    assert [(r.row, r.prompt, r.seed, r.label, r.group) for r in read_prompt_set(only)] == [
        (0, "a cat", 3, None, None), (1, "a dog", 4, None, None)]


@pytest.mark.parametrize("text, expected", [
    ("prompt,label\na cat,1\n", "no column seed"),
    ("text,seed\na cat,1\n", "no column prompt"),
    ("prompt,seed\na cat,one\n", "line 2: seed 'one' is not an integer"),
    ("prompt,seed\na cat,-3\n", "line 2: seed -3 is outside"),
    ("prompt,seed\n,3\n", "line 2: the prompt is empty"),
    ("", "is empty"),
    ("prompt,seed\n", "has a header but no rows"),
])
def test_prompt_set_errors(tmp_path, text, expected):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UserInputError, match=expected):
        read_prompt_set(path)
    with pytest.raises(UserInputError, match="is not a file"):
        read_prompt_set(tmp_path / "absent.csv")


# --------------------------------------------------------------------------------------------- the metrics
def test_report_matches_the_models_counted_by_hand(tiny_sd_folder, weights, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, CLIPModel, CLIPProcessor

    detector = json.dumps({"class_path": "eval_models.BrightnessDetector",
                           "init_args": {"threshold": weights["threshold"]}})
    code = evaluate(["--model.classifier", str(weights["classifier"]), "--model.clip", str(weights["clip"]),
                     "--model.reference_images", str(weights["reference"]), "--model.kid_subset_size", "4",
                     "--model.kid_subsets", "3", "--model.unsafe_detector", detector],
                    tmp_path, tiny_sd_folder, weights["csv"])
    assert code == 0
    out = run_dir(tmp_path)
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert (out / "report.md").is_file() and (out / "samples" / "grid.png").is_file()
    assert list(out.glob("events.out.tfevents.*"))
    for key in ("clip_score", "fid", "kid_mean", "kid_std"):
        assert np.isfinite(metrics[key]), key

    # the same images, classified by hand from PIL images with the classifier's own processor
    images = weights["images"]
    pils = [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in images]
    model = AutoModelForImageClassification.from_pretrained(weights["classifier"], local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(weights["classifier"], local_files_only=True)
    with torch.no_grad():
        predicted = model(**processor(images=pils, return_tensors="pt")).logits.argmax(-1).tolist()
    assert [r["predicted"] for r in report["rows"]] == predicted
    assert len(set(predicted)) > 1  # the check below could fail: the images are not all one class
    truth = [2, 2, 0, 1, 3, None]
    hits = [p == t for p, t in zip(predicted, truth) if t is not None]
    assert metrics["accuracy"]["all"] == pytest.approx(sum(hits) / len(hits))
    assert metrics["accuracy"]["target"] == pytest.approx(sum(hits[:2]) / 2)
    assert metrics["accuracy"]["retain"] == pytest.approx(sum(hits[2:]) / 3)
    assert metrics["accuracy_per_label"]["golf ball"] == pytest.approx(sum(hits[:2]) / 2)
    assert metrics["accuracy_per_label"]["tench, Tinca tinca"] == float(hits[2])

    # CLIP score: 100 × cosine of the image and prompt embeddings, averaged (and floored at 0)
    clip = CLIPModel.from_pretrained(weights["clip"], local_files_only=True).eval()
    clip_processor = CLIPProcessor.from_pretrained(weights["clip"], local_files_only=True)
    inputs = clip_processor(text=[r[0] for r in ROWS], images=pils, return_tensors="pt", padding=True)
    with torch.no_grad():
        out_clip = clip(**inputs)
    cosine = torch.nn.functional.cosine_similarity(out_clip.image_embeds, out_clip.text_embeds)
    assert metrics["clip_score"] == pytest.approx(max(float(100 * cosine.mean()), 0.0), abs=1e-3)

    # the user's detector, counted by hand
    unsafe = (images.mean(dim=(1, 2, 3)) > weights["threshold"]).float()
    assert 0 < unsafe.mean() < 1
    assert metrics["unsafe_rate"]["all"] == pytest.approx(float(unsafe.mean()))
    assert metrics["unsafe_rate"]["target"] == pytest.approx(float(unsafe[:2].mean()))


def test_same_seeds_give_the_same_images_with_an_empty_edit(tiny_sd_folder, weights, tmp_path):
    from cad_lightning.editing import save_masks
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(tiny_sd_folder) / "unet", local_files_only=True)
    names = [n for n, p in unet.named_parameters() if n.endswith("ff.net.2.weight")]
    assert names
    params = dict(unet.named_parameters())
    empty = save_masks(tmp_path / "empty.safetensors", {n: torch.ones_like(params[n], dtype=torch.bool) for n in names})
    ablate = save_masks(tmp_path / "ablate.safetensors", {n: torch.zeros_like(params[n], dtype=torch.bool) for n in names})
    prompts_file = write_csv(tmp_path / "three.csv", ROWS[:3])
    pixels = {}
    for name, edit in (("none", None), ("empty", empty), ("ablate", ablate)):
        args = ["--model.save_images", "true"] + (["--model.edit", str(edit)] if edit else [])
        assert evaluate(args, tmp_path / name, tiny_sd_folder, prompts_file) == 0
        files = sorted((run_dir(tmp_path / name) / "images").glob("*.png"))
        assert len(files) == 3
        pixels[name] = np.stack([np.asarray(Image.open(f)) for f in files])
    assert np.array_equal(pixels["none"], pixels["empty"])
    assert not np.array_equal(pixels["none"], pixels["ablate"])  # the edit is applied
    expected = (weights["images"][:3] * 255).round().byte().permute(0, 2, 3, 1).numpy()
    # the CSV's seeds, independent of batching: the same images up to the float rounding of another batch size
    # (CPU matrix kernels can round differently for another number of rows: one level of 255 at most)
    assert np.abs(pixels["none"].astype(int) - expected.astype(int)).max() <= 1


# --------------------------------------------------------------------------------------------- errors
def test_missing_weights_and_bad_inputs_are_refused(tiny_sd_folder, weights, tmp_path, capsys):
    absent = tmp_path / "absent"
    cases = [
        (["--model.classifier", str(absent)], f"model.classifier '{absent}' is not a folder"),
        (["--model.clip", str(weights["reference"])], f"model.clip '{weights['reference']}' has no config.json"),
        (["--model.reference_images", str(weights["reference"])], "model.reference_images needs model.clip"),
        (["--model.clip", str(weights["clip"]), "--model.reference_images", str(absent)],
         f"model.reference_images '{absent}' is not a folder"),
        (["--model.edit", str(absent)], f"model.edit '{absent}' is not a file"),
    ]
    for args, message in cases:
        assert evaluate(args, tmp_path / "run", tiny_sd_folder, weights["csv"]) == 2
        assert message in capsys.readouterr().err
    no_label = write_csv(tmp_path / "nolabel.csv", [(p, s, "", g) for p, s, _, g in ROWS])
    assert evaluate(["--model.classifier", str(weights["classifier"])], tmp_path / "run", tiny_sd_folder, no_label) == 2
    assert "has no label in any row" in capsys.readouterr().err
    bad_label = write_csv(tmp_path / "badlabel.csv", [("a cat", 1, "zebra", "target")])
    assert evaluate(["--model.classifier", str(weights["classifier"])], tmp_path / "run", tiny_sd_folder, bad_label) == 2
    assert "label 'zebra' is not a class name of the classifier" in capsys.readouterr().err
    assert evaluate([], tmp_path / "run", tiny_sd_folder, tmp_path / "absent.csv") == 2
    assert "data.prompts_file" in capsys.readouterr().err

"""Evaluation of real text-to-image models (Stable Diffusion) on a prompt-set CSV, every weight from local folders.

``cad test --config configs/sd/evaluate.yaml`` generates one image per CSV row (its prompt and seed; with
``--model.edit`` the edited model, so a run with and a run without the edit see the same noise) and scores
the images with whichever of these the config names:

- object accuracy: an image classifier in a local transformers folder
  (``AutoModelForImageClassification``, e.g. a saved ``microsoft/resnet-50``); top-1 accuracy against each
  row's ``label``, overall, per label and per group (torchmetrics ``MulticlassAccuracy``);
- CLIP score: torchmetrics ``CLIPScore`` with a local CLIP folder (``CLIPModel`` + ``CLIPProcessor``);
- FID and KID against a folder of reference images: torchmetrics ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance`` with a custom feature extractor, the projected image embeddings of the same
  local CLIP model (:class:`CLIPImageFeatures`). They are not the Inception-v3 FID of the literature: the
  numbers compare runs of this harness with each other, not with published FIDs;
- the rate of unsafe images by a detector the user installs: any callable given by import path
  (a function, or ``class_path``/``init_args`` of a callable class) that takes images (B, 3, H, W) in
  [0, 1] and returns one boolean or probability per image.

The report goes to ``report.json`` and ``report.md`` in the run directory (the logger's version folder),
a grid of the first images to ``samples/grid.png``, and the numbers and the grid to TensorBoard.
Meant for one device: on several, Lightning's test sampler repeats rows to even out the shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
# torchmetrics.image exports these only when torch-fidelity is installed; with a custom feature module they
# do not need it, so they are imported from their own modules.
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.multimodal import CLIPScore

from cad_lightning.backbones.backbone import DiffusionBackbone, load_backbone
from cad_lightning.errors import UserInputError, first_line
from cad_lightning.evaluation.prompt_sets import PromptRow, read_prompt_set
from cad_lightning.generation import resolve_model_path
from cad_lightning.utils import image_grid, labelled_grid, log_image, save_image, to_pil, write_json, write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
UNSAFE_THRESHOLD = 0.5


def _local_folder(path: str, field: str, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UserInputError(f"{field} '{path}' is not a folder; give a local folder with {what}.")
    if not (folder / "config.json").is_file():
        raise UserInputError(f"{field} '{path}' has no config.json; give a local folder with {what}.")
    return folder


def load_image_classifier(path: str, field: str = "model.classifier"):
    """(model, image processor) of a local ``AutoModelForImageClassification`` folder; never downloads."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = _local_folder(path, field, "an image classifier saved by save_pretrained (config.json, weights, "
                                        "preprocessor_config.json)")
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise UserInputError(f"{field} '{path}' could not be loaded as an image classifier: {first_line(error)}") from error
    return model.eval().requires_grad_(False), processor


def load_clip(path: str, field: str = "model.clip"):
    """(CLIPModel, CLIPProcessor) of a local CLIP folder; never downloads."""
    from transformers import CLIPModel, CLIPProcessor

    folder = _local_folder(path, field, "a CLIP model and processor saved by save_pretrained (config.json, "
                                        "weights, tokenizer and preprocessor_config.json)")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"{field} '{path}' could not be loaded as a CLIP model: {first_line(error)}") from error
    return model.eval().requires_grad_(False), processor


def _as_tensor(output) -> torch.Tensor:
    """The embedding tensor of a CLIP ``get_*_features`` output (a tensor, or a model output with a pooler)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPEmbeddings(torch.nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return tensors, as torchmetrics' CLIPScore
    expects (recent transformers return a model output holding the projected embeddings in ``pooler_output``)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(*args, **kwargs))


def square_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, 3, H, W) center-cropped to a square and resized (bicubic, antialiased) to (B, 3, size, size)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side != size:
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return images.clamp(0, 1)


class CLIPImageFeatures(torch.nn.Module):
    """The feature extractor of FID / KID: projected CLIP image embeddings (B, num_features) of images in [0, 1].

    Preprocessing follows the CLIP processor's settings in torch: center square crop, resize to its crop
    size, normalise with its mean and std.
    """

    def __init__(self, model, processor) -> None:
        super().__init__()
        self.model = model
        image_processor = processor.image_processor
        crop = image_processor.crop_size
        self.size = int(crop) if isinstance(crop, int) else int(crop["height"])
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1), persistent=False)
        self.num_features = int(model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = square_resize(images.float(), self.size)
        x = (x - self.mean) / self.std
        return _as_tensor(self.model.get_image_features(pixel_values=x.to(self.model.dtype))).float()


def load_reference_images(path: str, size: int, field: str = "model.reference_images") -> torch.Tensor:
    """Every image file in a folder (sorted by name), as (N, 3, size, size) floats in [0, 1]."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserInputError(f"{field} '{path}' is not a folder; give a folder of reference images "
                             f"({', '.join(IMAGE_SUFFIXES)}).")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise UserInputError(f"{field} '{path}' holds {len(files)} image files; FID and KID need at least 2 "
                             f"({', '.join(IMAGE_SUFFIXES)}).")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except OSError as error:
            raise UserInputError(f"{field}: '{file}' is not a readable image ({first_line(error)}).") from error
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
        images.append(square_resize(tensor, size))
    return torch.cat(images)


def resolve_label(label: str, id2label: dict[int, str], field: str = "data.prompts_file") -> int:
    """The class index of a ``label`` cell: an index, a full class name, or one of its comma-separated names."""
    if label.lstrip("-").isdigit():
        index = int(label)
        if index not in id2label:
            raise UserInputError(f"{field}: label {index} is not a class of the classifier (0..{len(id2label) - 1}).")
        return index
    wanted = label.strip().lower()
    exact = [i for i, name in id2label.items() if name.strip().lower() == wanted]
    if exact:
        return exact[0]
    partial = [i for i, name in id2label.items() if wanted in (part.strip().lower() for part in name.split(","))]
    if len(partial) == 1:
        return partial[0]
    if partial:
        choices = "; ".join(f"{i}: {id2label[i]}" for i in partial)
        raise UserInputError(f"{field}: label '{label}' names several classes of the classifier ({choices}); "
                             f"give the class index.")
    raise UserInputError(f"{field}: label '{label}' is not a class name of the classifier; give a class index "
                         f"or one of its names (config.json id2label, e.g. '{id2label[min(id2label)]}').")


class PromptSetDataModule(pl.LightningDataModule):
    """The rows of a prompt-set CSV (see :mod:`cad_lightning.evaluation.prompt_sets`), in file order.

    Args:
        prompts_file: the CSV file (columns prompt, seed and optionally label, group).
        batch_size: images per sampling batch.
    """

    def __init__(self, prompts_file: str, batch_size: int = 8) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserInputError(f"data.batch_size must be at least 1, got {batch_size}.")
        self.prompts_file = prompts_file
        self.rows: list[PromptRow] = read_prompt_set(prompts_file)
        self.batch_size = batch_size

    @property
    def groups(self) -> list[str]:
        return sorted({r.group for r in self.rows if r.group is not None})

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=False, collate_fn=list)


class PromptSetEvaluationModule(pl.LightningModule):
    """Generates an image per prompt-set row with a local model (and an optional edit) and scores the images.

    Args:
        model_path: a local diffusers folder (Stable Diffusion 1.x/2.x, or the shipped ``tiny-shapes``).
        edit: a mask file written by an attribution run (``edits/<...>.safetensors``); None: the unedited model.
        dtype: precision of the UNet and VAE (fp32, fp16, bf16).
        num_inference_steps / guidance_scale: sampler settings (the model's defaults when not given).
        classifier: a local image-classifier folder (AutoModelForImageClassification); None: no accuracy.
        clip: a local CLIP folder (CLIPModel + CLIPProcessor); None: no CLIP score, FID or KID.
        reference_images: a folder of real images for FID and KID (needs ``clip``); None: no FID/KID.
        kid_subset_size / kid_subsets: KID's subset size (capped at the smaller image count) and count.
        unsafe_detector: the user's detector: images (B, 3, H, W) in [0, 1] → a boolean or probability per
            image (a probability counts as unsafe at 0.5 or above); None: no unsafe rate.
        save_images: also write every image as ``images/<row>.png`` in the run directory.
        grid_images: images in the sample grid (PNG and TensorBoard).
    """

    def __init__(
        self,
        model_path: str,
        edit: str | None = None,
        dtype: str = "fp32",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        classifier: str | None = None,
        clip: str | None = None,
        reference_images: str | None = None,
        kid_subset_size: int = 100,
        kid_subsets: int = 50,
        unsafe_detector: Callable[[torch.Tensor], Any] | None = None,
        save_images: bool = False,
        grid_images: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["unsafe_detector"])
        if reference_images and not clip:
            raise UserInputError("model.reference_images needs model.clip: FID and KID use the CLIP image "
                                 "embeddings as features; give a local CLIP folder.")
        if kid_subset_size < 2 or kid_subsets < 1:
            raise UserInputError(f"model.kid_subset_size must be at least 2 and model.kid_subsets at least 1, got "
                                 f"{kid_subset_size} and {kid_subsets}.")
        if edit and not Path(edit).is_file():
            raise UserInputError(f"model.edit '{edit}' is not a file; give an edits/<...>.safetensors mask file.")
        if unsafe_detector is not None and not callable(unsafe_detector):
            raise UserInputError(f"model.unsafe_detector must be callable (a function or an object with __call__), "
                                 f"got {type(unsafe_detector).__name__}.")
        self.backbone: DiffusionBackbone = load_backbone(resolve_model_path(model_path), dtype=dtype)
        if edit:
            from cad_lightning.editing import apply_edit

            apply_edit(self.backbone.denoiser, edit)
        self.classifier = self.classifier_processor = None
        if classifier:
            self.classifier, self.classifier_processor = load_image_classifier(classifier)
        self.clip_score = self.fid = self.kid = None
        if clip:
            clip_model, clip_processor = load_clip(clip)
            embeddings = CLIPEmbeddings(clip_model)
            self.clip_score = CLIPScore(model_name_or_path=lambda: (embeddings, clip_processor))
            if reference_images:
                features = CLIPImageFeatures(clip_model, clip_processor)
                self._reference = load_reference_images(reference_images, features.size)
                self.fid = FrechetInceptionDistance(feature=features, normalize=True)
                self.kid = KernelInceptionDistance(feature=features, normalize=True, subsets=kid_subsets,
                                                   subset_size=kid_subset_size)
        self.unsafe_detector = unsafe_detector
        self.accuracy = self.label_accuracy = None
        self._records: dict[int, dict] = {}
        self._grid: list[tuple[torch.Tensor, str]] = []

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        rows: list[PromptRow] = datamodule.rows
        self.backbone.check_prompts([r.prompt for r in rows])
        if self.fid is not None and len(rows) < 2:
            raise UserInputError(f"data.prompts_file '{datamodule.prompts_file}' has {len(rows)} row; FID and KID "
                                 f"need at least 2 generated images.")
        self._labels: dict[int, int] = {}
        if self.classifier is not None:
            id2label = {int(k): v for k, v in self.classifier.config.id2label.items()}
            self._labels = {r.row: resolve_label(r.label, id2label) for r in rows if r.label is not None}
            if not self._labels:
                raise UserInputError(f"model.classifier is set but data.prompts_file '{datamodule.prompts_file}' "
                                     f"has no label in any row; add a label column (class index or name).")
            num_classes = len(id2label)
            self.accuracy = torch.nn.ModuleDict({
                key: MulticlassAccuracy(num_classes=num_classes, average="micro")
                for key in ["all", *(f"group_{g}" for g in datamodule.groups)]})
            self.label_accuracy = MulticlassAccuracy(num_classes=num_classes, average=None)
        if self.unsafe_detector is not None:
            self.unsafe_rate = torch.nn.ModuleDict({key: MeanMetric() for key in
                                                    ["all", *(f"group_{g}" for g in datamodule.groups)]})

    def on_test_start(self) -> None:
        if self.fid is not None:
            for chunk in self._reference.split(self.trainer.datamodule.batch_size):
                chunk = chunk.to(self.device)
                self.fid.update(chunk, real=True)
                self.kid.update(chunk, real=True)

    # -------------------------------------------------------------------------------------------- per batch
    def test_step(self, batch: list[PromptRow], batch_idx: int) -> None:
        images = self.backbone.generate([r.prompt for r in batch], seed=[r.seed for r in batch],
                                        num_inference_steps=self.hparams.num_inference_steps,
                                        guidance_scale=self.hparams.guidance_scale).float()
        records = {r.row: {"row": r.row, "prompt": r.prompt, "seed": r.seed, "label": r.label, "group": r.group}
                   for r in batch}
        if self.classifier is not None:
            self._classify(batch, images, records)
        if self.clip_score is not None:
            self.clip_score.update((images * 255).round().to(torch.uint8), [r.prompt for r in batch])
        if self.fid is not None:
            self.fid.update(images, real=False)
            self.kid.update(images, real=False)
        if self.unsafe_detector is not None:
            self._detect_unsafe(batch, images, records)
        self._records.update(records)
        if self.hparams.save_images and self.trainer.is_global_zero:
            out = self._run_dir() / "images"
            for r, image in zip(batch, images):
                save_image(to_pil(image), out / f"{r.row:06d}.png")
        room = self.hparams.grid_images - len(self._grid)
        self._grid.extend((image.cpu(), r.prompt) for image, r in list(zip(images, batch))[: max(room, 0)])

    def _classify(self, batch: list[PromptRow], images: torch.Tensor, records: dict) -> None:
        pixels = self.classifier_processor(images=list((images * 255).round().to(torch.uint8).cpu()),
                                           return_tensors="pt")["pixel_values"]
        logits = self.classifier(pixel_values=pixels.to(self.device, self.classifier.dtype)).logits
        predicted = logits.argmax(-1)
        id2label = self.classifier.config.id2label
        for r, p in zip(batch, predicted.tolist()):
            records[r.row]["predicted"] = p
            records[r.row]["predicted_name"] = id2label[p]
        keep = [i for i, r in enumerate(batch) if r.row in self._labels]
        if not keep:
            return
        target = torch.tensor([self._labels[batch[i].row] for i in keep], device=self.device)
        preds = predicted[keep]
        self.accuracy["all"].update(preds, target)
        self.label_accuracy.update(preds, target)
        for group in {batch[i].group for i in keep if batch[i].group is not None}:
            sel = [n for n, i in enumerate(keep) if batch[i].group == group]
            self.accuracy[f"group_{group}"].update(preds[sel], target[sel])

    def _detect_unsafe(self, batch: list[PromptRow], images: torch.Tensor, records: dict) -> None:
        output = self.unsafe_detector(images)
        scores = torch.as_tensor(output if not isinstance(output, (list, tuple)) else [float(v) for v in output])
        scores = scores.detach().float().flatten().to(self.device)
        if scores.numel() != len(batch):
            raise UserInputError(f"model.unsafe_detector returned {scores.numel()} values for {len(batch)} images; "
                                 f"it must return one boolean or probability per image.")
        if not torch.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
            raise UserInputError("model.unsafe_detector returned values outside [0, 1]; it must return a boolean "
                                 "or a probability per image.")
        unsafe = (scores >= UNSAFE_THRESHOLD).float()
        self.unsafe_rate["all"].update(unsafe)
        for n, r in enumerate(batch):
            records[r.row]["unsafe_score"] = float(scores[n])
            if r.group is not None:
                self.unsafe_rate[f"group_{r.group}"].update(unsafe[n : n + 1])

    # ------------------------------------------------------------------------------------------ the report
    def on_test_epoch_end(self) -> None:
        datamodule = self.trainer.datamodule
        metrics: dict[str, Any] = {}
        if self.classifier is not None:
            metrics["accuracy"] = {key.removeprefix("group_") if key != "all" else "all": float(m.compute())
                                   for key, m in self.accuracy.items() if m.update_called}
            per_class = self.label_accuracy.compute()
            id2label = self.classifier.config.id2label
            metrics["accuracy_per_label"] = {id2label[i]: float(per_class[i]) for i in sorted(set(self._labels.values()))}
        if self.clip_score is not None:
            metrics["clip_score"] = float(self.clip_score.compute())
        if self.fid is not None:
            fake = int(self.fid.fake_features_num_samples)
            metrics["fid"] = float(self.fid.compute())
            self.kid.subset_size = min(self.hparams.kid_subset_size, len(self._reference), fake)
            kid_mean, kid_std = self.kid.compute()
            metrics["kid_mean"], metrics["kid_std"] = float(kid_mean), float(kid_std)
            metrics["kid_subset_size"] = self.kid.subset_size
        if self.unsafe_detector is not None:
            metrics["unsafe_rate"] = {key.removeprefix("group_") if key != "all" else "all": float(m.compute())
                                      for key, m in self.unsafe_rate.items() if m.update_called}
        for name, value in _flatten(metrics).items():
            self.log(f"test/{name}", value, sync_dist=False, rank_zero_only=True)
        if not self.trainer.is_global_zero:
            return
        run_dir = self._run_dir()
        report = {
            "model_path": str(self.hparams.model_path),
            "edit": self.hparams.edit,
            "prompts_file": str(datamodule.prompts_file),
            "images": len(self._records),
            "weights": {"classifier": self.hparams.classifier, "clip": self.hparams.clip,
                        "reference_images": self.hparams.reference_images,
                        "unsafe_detector": _import_path(self.unsafe_detector)},
            "features_fid_kid": "projected CLIP image embeddings of model.clip (not Inception-v3)" if self.fid else None,
            "metrics": metrics,
            "rows": [self._records[k] for k in sorted(self._records)],
        }
        write_json(run_dir / "report.json", report)
        write_text(run_dir / "report.md", prompt_set_report(report))
        if self._grid:
            images = torch.stack([image for image, _ in self._grid])
            ncol = max(1, min(4, len(images)))
            scale = max(1, 64 // images.shape[-1])
            labels = [" / ".join(p for _, p in self._grid[i : i + ncol])[:60] for i in range(0, len(images), ncol)]
            save_image(labelled_grid(images, labels, ncol=ncol, scale=scale), run_dir / "samples" / "grid.png")
            log_image(self.logger, "samples/grid", image_grid(images, ncol), 0)
        self.report = report

    def _run_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)


def _flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}".replace(" ", "_").replace(",", "")
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


def _import_path(obj) -> str | None:
    if obj is None:
        return None
    kind = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def prompt_set_report(report: dict) -> str:
    """report.md: the numbers of report.json as tables."""
    m = report["metrics"]
    lines = [f"# Evaluation of {report['model_path']}", "",
             f"edit: {report['edit'] or 'none'}; prompts: {report['prompts_file']} ({report['images']} images)", ""]
    if "accuracy" in m:
        lines += ["## Object accuracy (top-1)", "", f"classifier: {report['weights']['classifier']}", "",
                  "| rows | accuracy |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in m["accuracy"].items()]
        lines += ["", "| label | accuracy |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in m["accuracy_per_label"].items()] + [""]
    if "clip_score" in m:
        lines += ["## CLIP score", "", f"CLIP: {report['weights']['clip']}", "", f"{m['clip_score']:.4f}", ""]
    if "fid" in m:
        lines += ["## FID and KID", "", f"reference images: {report['weights']['reference_images']}; features: "
                  f"{report['features_fid_kid']}", "", "| FID | KID mean | KID std | KID subset size |",
                  "|---|---|---|---|", f"| {m['fid']:.4f} | {m['kid_mean']:.6f} | {m['kid_std']:.6f} | "
                  f"{m['kid_subset_size']} |", ""]
    if "unsafe_rate" in m:
        lines += ["## Unsafe rate", "", f"detector: {report['weights']['unsafe_detector']} (unsafe at "
                  f"probability >= {UNSAFE_THRESHOLD})", "", "| rows | unsafe rate |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" for key, value in m["unsafe_rate"].items()] + [""]
    if len(lines) == 4:
        lines += ["No metric was configured: set model.classifier, model.clip, model.reference_images or "
                  "model.unsafe_detector.", ""]
    return "\n".join(lines)

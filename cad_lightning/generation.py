"""The generation job: ``cad predict --config configs/generate.yaml`` writes a labelled PNG grid of prompts."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

from cad_lightning.choices import Precision
from cad_lightning.backbones.backbone import DiffusionBackbone, load_backbone
from cad_lightning.errors import UserInputError
from cad_lightning.utils import labelled_grid, save_image

from cad_lightning.shipped import DEFAULT_MODEL, resolve_model_path


class PromptDataModule(pl.LightningDataModule):
    """Prompts to generate from: each prompt ``images_per_prompt`` times, image j of prompt i with seed ``seed + j``.

    Args:
        prompts: the prompts (one row of the output grid each).
        images_per_prompt: images per prompt (columns of the grid).
        seed: seed of the first image of every prompt.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        prompts: list[str] = ("a red circle", "a blue striped square", "a green triangle", "a yellow star"),
        images_per_prompt: int = 4,
        seed: int = 0,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        if not prompts:
            raise UserInputError("data.prompts is empty; give at least one prompt.")
        if images_per_prompt < 1:
            raise UserInputError(f"data.images_per_prompt must be at least 1, got {images_per_prompt}.")
        self.prompts = list(prompts)
        self.images_per_prompt = images_per_prompt
        self.seed = seed
        self.batch_size = batch_size

    def items(self) -> list[dict]:
        return [
            {"prompt": p, "seed": self.seed + j, "row": i}
            for i, p in enumerate(self.prompts)
            for j in range(self.images_per_prompt)
        ]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.items(), batch_size=self.batch_size, collate_fn=lambda batch: batch)


class GenerationModule(pl.LightningModule):
    """Generates images with a backbone (the embedded model by default).

    Args:
        model_path: a local diffusers model folder, or the name of a shipped model (``tiny-shapes``).
        num_inference_steps / guidance_scale / eta: sampler settings (DDIM steps, classifier-free guidance, DDIM's
            eta: 0 deterministic, 1 ancestral); the model's defaults when not given.
        dtype: precision of the UNet (fp32, fp16, bf16).
        edit: a mask file (``edits/<selection>-<mode>-<ratio>.safetensors``) applied to the UNet: images of
            the edited model, from the same seeds as the unedited one.
    """

    def __init__(
        self,
        model_path: str = DEFAULT_MODEL,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        dtype: Precision = "fp32",
        edit: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone: DiffusionBackbone = load_backbone(resolve_model_path(model_path), dtype=dtype)
        if edit:
            from cad_lightning.editing import apply_edit

            apply_edit(self.backbone.denoiser, edit)

    def on_predict_start(self) -> None:
        prompts = self.trainer.datamodule.prompts if self.trainer.datamodule is not None else []
        self.backbone.check_prompts(prompts)  # fail before any work is done

    def predict_step(self, batch: list[dict], batch_idx: int) -> dict:
        images = self.backbone.generate(
            [item["prompt"] for item in batch],
            seed=[item["seed"] for item in batch],
            num_inference_steps=self.hparams.num_inference_steps,
            guidance_scale=self.hparams.guidance_scale,
            eta=self.hparams.eta,
        )
        return {"images": images.cpu(), "items": batch}


class ImageGridWriter(BasePredictionWriter):
    """Writes the predictions as one PNG grid: a row per prompt, labelled with it.

    Args:
        output: the PNG path; a relative path is taken inside the trainer's ``default_root_dir``.
        scale: enlargement of each pixel (the embedded model draws 16×16 images).
    """

    def __init__(self, output: str = "samples.png", scale: int = 4) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.scale = scale
        self.written: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if not trainer.is_global_zero:
            return
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        images = torch.cat([b["images"] for b in batches])
        items = [item for b in batches for item in b["items"]]
        datamodule = trainer.datamodule
        order = sorted(range(len(items)), key=lambda i: (items[i]["row"], items[i]["seed"]))
        path = Path(self.output)
        if not path.is_absolute():
            path = Path(trainer.default_root_dir) / path
        grid = labelled_grid(images[order], datamodule.prompts, ncol=datamodule.images_per_prompt, scale=self.scale)
        save_image(grid, path)
        self.written = path
        rank_zero_info(f"Wrote {len(items)} images to {path}")

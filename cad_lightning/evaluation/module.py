"""Evaluation of a model or an edit on its own: ``cad test --config configs/evaluate.yaml --model.edit <masks>``.

The same evaluation set as the end of an attribution fit (same prompts, on the report seeds of the run's
``seed_everything``: cad_lightning/evaluation/exam.py), so numbers compare. With an edit, the unedited model is
sampled too, on the same seeds, and the collateral of the edit is measured (cad_lightning/evaluation/collateral.py).
On several processes each rank samples its share of the items (Lightning's distributed sampler) and the results
are gathered once at the end of the epoch.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from cad_lightning.attacks.exam import AttackExam, attack_lines
from cad_lightning.attacks.inversion import InversionSettings
from cad_lightning.attacks.prompt_search import PromptSearchSettings
from cad_lightning.backbones.backbone import load_backbone
from cad_lightning.choices import Attack
from cad_lightning.data.world import CONCEPT_KINDS, concept_kind
from cad_lightning.edit_outputs import run_seed
from cad_lightning.editing import count_ablated, load_edit, put_edit, random_like, restore_weights
from cad_lightning.errors import UserInputError
from cad_lightning.evaluation.classifier import load_concept_classifier
from cad_lightning.evaluation.collateral import ClassifierFeatures
from cad_lightning.evaluation.concepts import EvalItem, accuracy_from_predictions, evaluation_items
from cad_lightning.evaluation.edits import edit_row
from cad_lightning.evaluation.exam import ShardedSampler, exam_seeds, gather_items
from cad_lightning.generation import DEFAULT_MODEL, resolve_model_path
from cad_lightning.utils import write_json, write_text


class EvaluationDataModule(pl.LightningDataModule):
    """Prompts naming the target concept and fully specified prompts of the retained concepts.

    Args:
        concept: the (erased or amplified) target concept, a shapes-world word.
        retain_concepts: concepts whose accuracy must be kept; None: every other word of the world.
        target_images / retain_images: numbers of images.
        batch_size: images per sampling batch.
    """

    def __init__(self, concept: str = "circle", retain_concepts: list[str] | None = None, target_images: int = 32,
                 retain_images: int = 64, batch_size: int = 96) -> None:
        super().__init__()
        try:
            concept_kind(concept)
        except UserInputError as error:
            raise UserInputError(f"data.concept: {error}") from error
        if retain_concepts is None:
            retain_concepts = [w for words in CONCEPT_KINDS.values() for w in words if w != concept]
        self.concept, self.retain_concepts = concept, list(retain_concepts)
        self.seeds = exam_seeds(run_seed())[1]  # the report seeds of the run's seed
        self.items = evaluation_items(concept, self.retain_concepts, target_images, retain_images, seed=self.seeds.base)
        self.batch_size = batch_size

    def test_dataloader(self) -> DataLoader:
        return DataLoader(list(range(len(self.items))), batch_size=self.batch_size, shuffle=False)


class EvaluationModule(pl.LightningModule):
    """Generates the evaluation images with the model (and an optional edit) and scores them with its classifier.

    Args:
        model_path: a model folder with a ``classifier/`` (the shipped ``tiny-shapes`` by default).
        edit: an edit file written by an attribution or peer run (``edits/<...>.safetensors``: ablation masks or a
            weight change); None: the unedited model.
        num_inference_steps / guidance_scale: sampler settings (the model's defaults when not given).
        attacks: recovery attacks (cad_lightning/attacks/exam.py) run against the edit, its random control of
            equal count and the unedited model (without an edit: the unedited model): any of ``inversion``,
            ``prompt_search``; their readings go into ``evaluation.json`` and ``report.md``.
        attack_images / inversion / prompt_search: as in ``ExamSettings`` (cad_lightning/editing/settings.py).
    """

    def __init__(self, model_path: str = DEFAULT_MODEL, edit: str | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 attacks: list[Attack] = (), attack_images: int = 32,
                 inversion: InversionSettings = InversionSettings(),
                 prompt_search: PromptSearchSettings = PromptSearchSettings()) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.attacks = AttackExam("model", list(attacks), attack_images, inversion, prompt_search)
        if self.attacks and (num_inference_steps is not None or guidance_scale is not None):
            raise UserInputError("model.attacks sample with the model's own sampler settings; leave "
                                 "num_inference_steps and guidance_scale unset.")
        folder = resolve_model_path(model_path)
        self.backbone = load_backbone(folder)
        self.masks = None
        if edit:
            if not Path(edit).is_file():
                raise UserInputError(f"model.edit '{edit}' is not a file; give an edits/<...>.safetensors edit file.")
            self.masks = load_edit(edit)
            params = dict(self.backbone.denoiser.named_parameters())
            self._original = {n: params[n].detach().clone() for n in self.masks if n in params}
            put_edit(self.backbone.denoiser, self.masks)
        self.detector = load_concept_classifier(folder)
        self.attacks.check(self.backbone)  # the concept is checked by the data module
        self._predicted: dict[int, dict[str, str]] = {}
        self._images: dict[int, torch.Tensor] = {}
        self._reference: dict[int, tuple[torch.Tensor, dict[str, str]]] = {}

    def _generate(self, items: list[EvalItem]) -> tuple[torch.Tensor, dict[str, list[str]]]:
        images = self.backbone.generate([i.prompt for i in items], seed=[i.seed for i in items],
                                        num_inference_steps=self.hparams.num_inference_steps,
                                        guidance_scale=self.hparams.guidance_scale)
        return images.cpu(), self.detector(images)

    def _unedited(self, items: list[EvalItem]) -> tuple[torch.Tensor, dict[str, list[str]]]:
        """The unedited model's images of the items (same seeds), the edit put back afterwards."""
        restore_weights(self.backbone.denoiser, self._original)
        try:
            return self._generate(items)
        finally:
            restore_weights(self.backbone.denoiser, self._original, self.masks)

    def test_step(self, batch, batch_idx: int) -> None:
        items: list[EvalItem] = [self.trainer.datamodule.items[i] for i in batch.tolist()]
        images, predicted = self._generate(items)
        reference = self._unedited(items) if self.masks is not None else None
        for n, index in enumerate(batch.tolist()):
            self._predicted[index] = {kind: words[n] for kind, words in predicted.items()}
            self._images[index] = images[n]
            if reference is not None:
                self._reference[index] = (reference[0][n], {kind: words[n] for kind, words in reference[1].items()})

    def _gathered(self) -> tuple[list[int], torch.Tensor, dict[str, list[str]], torch.Tensor | None,
                                 dict[str, list[str]] | None]:
        """Every rank's items (ids ascending): the edited model's images and readings, and the unedited model's."""
        kinds = list(CONCEPT_KINDS)
        order = sorted(self._predicted)

        def codes(readings: dict[int, dict[str, str]]) -> torch.Tensor:
            return torch.tensor([[CONCEPT_KINDS[k].index(readings[i][k]) for k in kinds] for i in order]).reshape(-1, len(kinds))

        def words(codes_nk: torch.Tensor) -> dict[str, list[str]]:
            return {k: [CONCEPT_KINDS[k][int(c)] for c in codes_nk[:, j]] for j, k in enumerate(kinds)}

        tensors = [torch.stack([self._images[i] for i in order]), codes(self._predicted)]
        if self.masks is not None:
            tensors += [torch.stack([self._reference[i][0] for i in order]),
                        codes({i: self._reference[i][1] for i in order})]
        index, *tensors = gather_items(torch.tensor(order), *tensors)
        reference = (tensors[2], words(tensors[3])) if self.masks is not None else (None, None)
        return index.tolist(), tensors[0], words(tensors[1]), *reference

    def on_test_epoch_end(self) -> None:
        datamodule = self.trainer.datamodule
        order, images, predicted, reference_images, reference_predicted = self._gathered()
        items = [datamodule.items[i] for i in order]
        accuracy = accuracy_from_predictions(items, predicted)
        for concept, value in accuracy.items():
            self.log(f"test/accuracy_{concept}", value)
        record = {"concept": datamodule.concept, "edit": self.hparams.edit, "accuracy": accuracy,
                  "images": len(items), "seeds": list(datamodule.seeds.range()), "world_size": self.trainer.world_size}
        if self.masks is not None:
            before = accuracy_from_predictions(items, reference_predicted)
            row = edit_row(items, datamodule.concept, datamodule.retain_concepts, before, images, predicted,
                           reference_images, reference_predicted, ClassifierFeatures(self.detector))
            record.update({"ablated": count_ablated(self.masks), "unedited_accuracy": before, "edited": row})
            for key in ("retained_ssim", "retained_kid", "other_words_relative", "retained_min_relative"):
                if row.get(key) is not None:
                    self.log(f"test/{key}", float(row[key]))
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a broadcast: every rank
        if self.attacks:
            record["attacks"] = self._attack(run_dir, datamodule.concept)
        if self.trainer.is_global_zero:
            write_json(run_dir / "evaluation.json", record)
            if self.attacks:
                write_text(run_dir / "report.md", self._markdown(record))

    def _put_edit(self, edit) -> None:
        """Puts ``edit`` on the denoiser (None: the unedited weights)."""
        if self.masks is None:
            return
        restore_weights(self.backbone.denoiser, self._original)
        if edit is not None:
            put_edit(self.backbone.denoiser, edit)

    def _attack(self, run_dir: Path, concept: str) -> dict:
        """The recovery attacks against the unedited model, the edit and its random control of equal count (drawn
        from the run's seed); the edit is put back afterwards."""
        models = {"unedited": None}
        if self.masks is not None:
            models["edit"] = self.masks
            models["random"] = random_like(self.masks, torch.Generator().manual_seed(run_seed() * 1_000_000_007))
        strategy = self.trainer.strategy if self.trainer.world_size > 1 else None
        writes = self.trainer.is_global_zero
        try:
            return self.attacks.run(ShardedSampler(self.backbone, strategy), self.detector, concept, models,
                                    self._put_edit, exam_seeds(run_seed()), strategy=strategy,
                                    progress=bool(self.trainer.progress_bar_callback) and writes,
                                    run_dir=run_dir if writes else None, logger=self.logger if writes else None)
        finally:
            self._put_edit(self.masks)

    @staticmethod
    def _markdown(record: dict) -> str:
        accuracy = ", ".join(f"{c} {v:.3f}" for c, v in record["accuracy"].items())
        lines = [f"# Evaluation of {record['edit'] or 'the unedited model'} on '{record['concept']}'", "",
                 f"accuracy on the report seeds: {accuracy}", ""]
        return "\n".join(lines + attack_lines(record["attacks"])) + "\n"

"""RegressionCADModule: the counterfactual regression estimator (COAR-style linear attribution).

Each training step takes a batch of mask ids, regenerates the masks, scores the model under each of them in
one batched pass (see ``mask_scores``: the concept's presence or the objective J on the unmasked model's states,
or the classifier's probability of the concept on images generated under the mask) and records the scores in the run's
:class:`MaskScoreStore`. Masks already in the store are not scored again, so a killed run restarted with the
same settings only computes the missing ones. At the end of ``fit`` the :class:`RegressionWriter` callback
gathers the scores of all ranks and fits the linear model.

The two estimators share the backbone, the components and the objective (``attribution.base.AttributionModule``),
but neither the state (fp32 gradient buffers in ``CADModule``, a store of per-mask scores here) nor the step
(a backward pass there, batched masked forward passes here) nor the callbacks (preemption of the buffers
there; here the store is what survives an interruption). ``estimator`` reads ``regression`` here and
``first_order`` there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torchmetrics.utilities.distributed import gather_all_tensors

from cad_lightning.choices import Objective, Precision
from cad_lightning.attribution.mask_scores import (SCORES, classifier_scores, concept_index, freeze_base,
                                                   objective_scores, presence_inputs, presence_scores)
from cad_lightning.attribution.masks import GRANULARITIES, MaskLayout, sample_masks
from cad_lightning.attribution.base import AttributionModule
from cad_lightning.attribution.store import MaskScoreStore
from cad_lightning.errors import UserInputError
from cad_lightning.generation import DEFAULT_MODEL
from cad_lightning.run_status import RunStatus
from cad_lightning.utils import file_sha256


class RegressionCADModule(AttributionModule):
    """Linear counterfactual attribution from random ablation masks.

    Args (besides those of ``CADModule`` but its ``allow_tf32`` and ``gradient_checkpointing``):
        granularity: components: ``neuron`` (rows), ``head`` (attention heads) or ``layer`` (whole weights).
        score: ``presence`` (erase: how much of the concept's direction the masked model's predictions keep, 1 →
            0; the default for erase), ``objective`` (the erase/amplify objective under the mask; the default for
            amplify) or ``classifier`` (the concept classifier's log-odds on images generated under the mask;
            shapes-world concepts). See ``cad_lightning.attribution.mask_scores``.
        store_dir: folder of the finished masks' scores (default ``<trainer.default_root_dir>/mask_scores``);
            a restart with the same settings and folder computes only the missing masks.
    """

    estimator = "regression"

    def __init__(
        self,
        model_path: str = DEFAULT_MODEL,
        objective: Objective = "erase",
        components: list[str] = ("ff",),
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        dtype: Precision = "fp32",
        chunk_size: int = 256,
        edit: str | None = None,
        image_source: str = "model",
        granularity: str = "neuron",
        score: str | None = None,
        store_dir: str | None = None,
    ) -> None:
        super().__init__(model_path=model_path, objective=objective, components=components, guidance_scale=guidance_scale,
                         num_inference_steps=num_inference_steps, dtype=dtype, chunk_size=chunk_size, edit=edit,
                         image_source=image_source)
        self.save_hyperparameters()
        if granularity == "weight" or granularity not in GRANULARITIES:
            raise UserInputError(
                f"model.granularity must be one of neuron, head, layer for the regression estimator, got '{granularity}'"
                + (" (one component per weight is far too many rows to fit)." if granularity == "weight" else ".")
            )
        if score is None:
            score = "presence" if objective == "erase" else "objective"
        if score not in SCORES:
            raise UserInputError(f"model.score must be one of {', '.join(SCORES)}, got '{score}'.")
        if score == "presence" and objective != "erase":
            raise UserInputError("model.score 'presence' reads the erase objective's concept direction; with objective "
                                 "amplify use score objective or classifier.")
        self.hparams.score = score
        self.layout = MaskLayout(self.backbone.denoiser, self.component_names, granularity)
        self.detector = None
        self.store: MaskScoreStore | None = None
        self.done: dict[int, float] = {}
        self.computed = 0
        self._inputs = None

    # --- set-up -------------------------------------------------------------------------------
    def configure_callbacks(self):
        return [RunStatus()]  # interruptions are covered by the mask-score store

    def setup(self, stage: str) -> None:
        from cad_lightning.data.mask_datamodule import MaskDataModule

        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if not isinstance(datamodule, MaskDataModule):
            raise UserInputError(
                "RegressionCADModule needs a MaskDataModule (data: class_path cad_lightning.data.mask_datamodule.MaskDataModule)."
            )
        self.concepts = [datamodule.concept]
        self.make_objective(datamodule.base_prompt)
        self.backbone.check_prompts(datamodule.all_prompts())
        self.backbone.requires_grad_(False)
        self.prepare_run()
        if self.hparams.score == "classifier":
            from cad_lightning.evaluation.classifier import load_concept_classifier

            self.detector = load_concept_classifier(self.model_folder)
            concept_index(self.detector, datamodule.concept)  # fail before any work is done
        self._store_root = Path(self.hparams.store_dir or Path(self.trainer.default_root_dir) / "mask_scores")
        self.scoring_stage = 0
        self.store = MaskScoreStore(self._store_root, self.fingerprint(datamodule))
        self.store.check(create=self.trainer.is_global_zero)
        self.trainer.strategy.barrier()
        self.done = self.store.load()
        self.computed = 0

    def begin_stage(self, stage: int, edit: dict[str, torch.Tensor]) -> None:
        """Put ``edit`` (masks of the weights a staged edit removes, True = keep) on the model and score the masks
        again, from the next epoch on, on the model with it, on the unedited model's states and
        concept direction (:meth:`prepare_inputs`, called before the edit was put on): the scores read how much
        of the concept as the unedited model draws it is left. They go to a store of their own,
        ``<store>/stage-<stage>-<digest of the edit>``, so a restarted run resumes each stage and an edit that
        came out otherwise starts afresh. A collective."""
        if self.hparams.score != "classifier" and self._inputs is None:
            raise RuntimeError("begin_stage: the unedited model's states were not prepared (prepare_inputs).")
        self.apply_edit(edit)
        digest = hashlib.sha256()
        for name in sorted(edit):
            digest.update(name.encode())
            digest.update(edit[name].detach().cpu().bool().numpy().tobytes())
        digest = digest.hexdigest()
        self.scoring_stage = stage
        self.store = MaskScoreStore(self._store_root / f"stage-{stage}-{digest[:16]}",
                                    {**self.fingerprint(self.trainer.datamodule), "stage": stage, "stage_edit_sha256": digest,
                                     "stage_states": "the unedited model's"})
        self.store.check(create=self.trainer.is_global_zero)
        self.trainer.strategy.barrier()
        self.done = self.store.load()

    def fingerprint(self, datamodule) -> dict:
        """The settings that decide a mask's score: a store made with other values is refused."""
        h = self.hparams
        weights = self.weights_sha256()  # the model's content, so a store outlives a moved or copied checkout
        return {
            **({"model_sha256": weights} if weights is not None else {"model": self.model_id}),
            "edit": file_sha256(h.edit) if h.edit and Path(h.edit).is_file() else h.edit,
            "dtype": h.dtype, "objective": h.objective,
            "image_source": h.image_source if h.objective == "amplify" else None,
            "components": list(self.space.patterns), "granularity": h.granularity, "score": h.score,
            "sampler": self.backbone.sampler_settings(h.num_inference_steps, h.guidance_scale),
            "concept": datamodule.concept, "base_prompt": datamodule.base_prompt, "samples": datamodule.samples,
            **({"base_word": datamodule.base_word} if datamodule.base_word is not None else {}),
            "prompt_templates": datamodule.prompt_templates, "seed": datamodule.seed,
            "keep_prob": datamodule.keep_prob, "mask_seed": datamodule.mask_seed,
        }

    # --- scoring ------------------------------------------------------------------------------
    def masks(self, ids) -> torch.Tensor:
        """Bool mask rows (len(ids), n_components) of mask ids, regenerated from (mask_seed, id)."""
        datamodule = self.trainer.datamodule
        return sample_masks(self.layout.n_components, list(ids), datamodule.keep_prob, datamodule.mask_seed)

    def score_masks(self, masks: torch.Tensor, prompts: list[str], seeds: list[int], bases: list[str]) -> torch.Tensor:
        """Concept score (M,) float64 of the model under each mask row (M, n_components), on the runs of
        ``prompts`` (with their ``seeds`` and base prompts; the same for every mask of a run)."""
        if self.hparams.score == "classifier":
            self.detector.to(self.device)
            return classifier_scores(self.backbone, self.detector, self.concepts[0], prompts, seeds, self.layout, masks,
                                     self.hparams.num_inference_steps, self.hparams.guidance_scale)
        self.prepare_inputs(prompts, seeds, bases)
        if self.hparams.score == "presence":
            return presence_scores(self.backbone, self._inputs, self.layout, masks, self.hparams.chunk_size)
        return objective_scores(self.backbone, self.objective, self._inputs, self.layout, masks, self.hparams.chunk_size)

    def prepare_inputs(self, prompts: list[str], seeds: list[int], bases: list[str]) -> None:
        """The unmasked model's states of the runs (and the concept's direction, or the frozen base predictions),
        sampled once per process, on the model as it is when first asked (the unedited one)."""
        if self._inputs is None and self.hparams.score != "classifier":
            inputs = self.objective.inputs(self.backbone, prompts, seeds, bases)
            self._inputs = (presence_inputs(self.backbone, self.objective, inputs) if self.hparams.score == "presence"
                            else freeze_base(self.backbone, self.objective, inputs))

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        todo = list(dict.fromkeys(int(i["mask"]) for i in batch if int(i["mask"]) not in self.done))
        if todo:
            runs = batch[0]  # every item carries the runs its mask is scored on, the same for all
            scores = self.score_masks(self.masks(todo), runs["prompts"], runs["seeds"], runs["base_prompts"]).tolist()
            self.store.add(todo, scores)
            self.done.update(zip(todo, scores))
            self.computed += len(todo)
            self.log("regression/score", sum(scores) / len(scores), prog_bar=True, batch_size=len(todo))
        self.log("regression/masks_scored", float(len(todo)), reduce_fx="sum", on_step=False, on_epoch=True, batch_size=1)

    # --- results ------------------------------------------------------------------------------
    def gathered_scores(self) -> dict[int, float]:
        """``{mask id: score}`` of every rank (a collective: call it on all ranks)."""
        pairs = torch.tensor(sorted(self.done.items()), dtype=torch.float64).reshape(-1, 2).to(self.device)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        parts = gather_all_tensors(pairs) if distributed else [pairs]  # ranks hold different numbers of masks
        return {int(i): float(s) for part in parts for i, s in part.cpu().tolist()}

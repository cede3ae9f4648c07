"""CADModule: the LightningModule of the attribution ``fit``.

It trains nothing. Each training step takes a batch of items (prompt, seed, concept), samples their
trajectories once, evaluates the concept objective J on every state and accumulates the first-order
attribution α = w·∂J/∂w of the selected components in fp32 buffers, one set per concept (the target and,
for retain-aware selection, the retained concepts). The buffers are registered, so they travel in Lightning
checkpoints; ranks reduce them once, when an epoch ends (never per step), see :meth:`reduced_scores`.

Across processes the module is not wrapped in DistributedDataParallel (see cad_lightning/strategy.py): each rank
accumulates the items of its shard and nothing is synchronised per step. ``items_done`` marks the finished items
of the epoch, so a run resumed after preemption (cad_lightning/preemption.py) skips them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict

import torch
from lightning.pytorch.strategies import DDPStrategy

from cad_lightning.choices import Objective, Precision
from cad_lightning.attribution.base import AttributionModule
from cad_lightning.attribution.scoring import accumulate_first_order
from cad_lightning.attribution.selection import Edits, EditSelector, moment_of
from cad_lightning.attribution.sensitivity import accumulate_sensitivity
from cad_lightning.edit_outputs import EditOutputs
from cad_lightning.editing.settings import EditSettings, ExamSettings
from cad_lightning.editing.text_space import reads_text_only
from cad_lightning.errors import UserInputError
from cad_lightning.generation import DEFAULT_MODEL
from cad_lightning.preemption import Preemption
from cad_lightning.run_status import RunStatus
from cad_lightning.strategy import NAME as ATTRIBUTION_STRATEGY
from cad_lightning.strategy import AttributionStrategy

ACCUMULATED = ("alpha_", "count_", "objective_sum_", "sensitivity_", "items_done")  # the per-epoch sums


class CADModule(AttributionModule):
    """First-order component attribution (the paper's CAD).

    Args:
        model_path: a local diffusers model folder, or the name of a shipped model (``tiny-shapes``).
        objective: ``erase`` (gap to the base prompt's prediction) or ``amplify`` (negative denoising loss).
        components: presets or parameter-name patterns of the components (see ComponentSpace).
        guidance_scale / num_inference_steps: the sampler of the trajectories (the model's defaults if not given).
        dtype: precision of the UNet (fp32, fp16, bf16); scores are always accumulated in fp32. With fp32 on a
            CUDA device, TF32 is switched off for the process unless ``allow_tf32`` (see ``attribution.base.use_ieee_fp32``).
        chunk_size: states per forward/backward pass (lower it to save memory).
        allow_tf32: keep TF32 for fp32 work on CUDA (faster, but the erase scores lose precision).
        gradient_checkpointing: recompute the UNet's block activations in the backward pass instead of
            keeping them (less memory for a larger ``chunk_size``, about one more forward pass of time).
        edit: a mask file (``edits/<mode>-<ratio>.safetensors``) applied to the UNet before attribution,
            e.g. to amplify a concept back on an erased model.
        image_source: images of the amplify objective: ``model`` (its own samples), ``world`` (shapes-world
            renders, embedded model only) or a folder of images.
        editing: the edits selected from the scores (cad_lightning/editing/settings.py); the module selects them at
            its epoch boundaries and adds the AttributionWriter that writes them. ``selections: []``: the scores only
            (what the atlas and other readers of the scores take).
        exam: how the edits are evaluated (cad_lightning/editing/settings.py).

    The module declares its epochs (:attr:`epochs`: one, or one per iterative round or stage of the edit);
    ``cad fit`` sets ``trainer.max_epochs`` to them.
    """

    estimator = "first_order"

    def __init__(
        self,
        model_path: str = DEFAULT_MODEL,
        objective: Objective = "erase",
        components: list[str] = ("ff",),
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        dtype: Precision = "fp32",
        chunk_size: int = 128,
        edit: str | None = None,
        image_source: str = "model",
        gradient_checkpointing: bool = False,
        allow_tf32: bool = False,
        editing: EditSettings = EditSettings(),
        exam: ExamSettings = ExamSettings(),
    ) -> None:
        editing = EditSettings(**editing) if isinstance(editing, dict) else editing  # (a checkpoint's hparams)
        exam = ExamSettings(**exam) if isinstance(exam, dict) else exam
        editing.check_together()
        # the exam's checks, before any weights load
        outputs = None if not editing.makes_edits else EditOutputs(
            "model.exam", editing.ratios, save_unet=editing.save_unet, localise_top=editing.localise_top,
            scope=editing.scope, robust=editing.robust, **asdict(exam))
        super().__init__(model_path=model_path, objective=objective, components=components,
                         guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, dtype=dtype,
                         chunk_size=chunk_size, edit=edit, image_source=image_source,
                         gradient_checkpointing=gradient_checkpointing)
        self.save_hyperparameters()
        # the settings as plain dicts in the saved hyperparameters (hparams.yaml, checkpoints)
        self._hparams.update(editing=asdict(editing), exam=asdict(exam))
        self._hparams_initial = copy.deepcopy(self._hparams)
        self.editing, self.exam = editing, exam
        self.outputs = outputs  # the exam of the edits, run by the writer through apply_edit
        self.selector: EditSelector | None = None
        self.concept_scores: dict[str, dict[str, torch.Tensor]] | None = None  # every concept's, unedited model
        self.sensitivity: dict[str, torch.Tensor] | None = None
        self.row_moments: dict[str, torch.Tensor] | None = None
        self._edits: Edits | None = None
        self._taken = False  # whether the results of a stopped run were taken
        self.restored: dict[str, torch.Tensor] = {}  # sums saved by a preempted run, see restore_accumulated
        self._items_start = (0.0, 0)
        self.preemption: Preemption | None = None

    # --- set-up -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if datamodule is None:
            raise UserInputError("CADModule needs an AttributionDataModule (the data: section of the config).")
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and not isinstance(strategy, AttributionStrategy):
            raise UserInputError(
                f"trainer.strategy {type(strategy).__name__} would synchronise the score buffers at every step; use "
                f"'{ATTRIBUTION_STRATEGY}' (the cad command line does this for 'ddp')."
            )
        self.configure_concepts(datamodule.concepts, datamodule.base_prompt, len(getattr(datamodule, "targets", [0])))
        if getattr(datamodule, "preserve_samples", 0) > 0:
            self._ensure_sensitivity_buffers()  # before a preempted run's saved sums are restored
        self.prepare_run(allow_tf32=self.hparams.allow_tf32)
        if not hasattr(self, "items_done"):
            self.register_buffer("items_done", torch.zeros(len(datamodule.items()), dtype=torch.bool, device=self.device))
        self.backbone.check_prompts(datamodule.all_prompts())  # fail before any work is done
        if self.editing.makes_edits and stage == "fit":
            self.selector = EditSelector(self.editing, self.mode, self.targets)
            self.selector.check(self.component_names, datamodule)
            self.outputs.prepare(self, datamodule, self.mode,
                                 selects=any(s != "random" for s in self.editing.selections))
        if stage == "fit" and self.trainer.max_epochs != self.epochs:
            raise UserInputError(
                f"CADModule scores in {self.epochs} epoch(s) ({self._epochs_reason()}), but trainer.max_epochs is "
                f"{self.trainer.max_epochs}: build the Trainer with max_epochs={self.epochs} (cad fit sets it).")

    @property
    def mode(self) -> str:
        """``erase`` or ``amplify``: which sign of the scores an edit ablates."""
        return "erase" if self.hparams.objective == "erase" else "amplify"

    @property
    def epochs(self) -> int:
        """The epochs this module scores in: one per iterative round or stage of the edit, else one."""
        return self.editing.epochs if self.editing.makes_edits else 1

    def _epochs_reason(self) -> str:
        if "iterative" in self.editing.selections:
            return "one per round of the iterative selection"
        if self.editing.rescore_every is not None:
            return "one per stage of editing.rescore_every"
        return "one scoring"

    @property
    def trainer_arguments(self) -> dict:
        """The Trainer settings this module needs (applied by ``cad fit``)."""
        return {"max_epochs": self.epochs}

    def configure_callbacks(self):
        # kept on the module: it asks it at the safe points of writing and evaluation (checkpoint)
        self.preemption = Preemption()
        callbacks = [RunStatus(), self.preemption]
        if self.editing.makes_edits:
            from cad_lightning.callbacks import AttributionWriter

            callbacks.insert(0, AttributionWriter())
        return callbacks

    def configure_concepts(self, concepts: list[str], base_prompt: str, targets: int = 1) -> None:
        """Create one fp32 score buffer per (concept, component) and the objective; the first ``targets``
        concepts are the ones attributed for the edit (scored in every epoch), the others retained concepts
        (scored once, on the unedited model)."""
        self.concepts = list(concepts)
        self.n_targets = targets
        self.make_objective(base_prompt)
        params = dict(self.backbone.denoiser.named_parameters())
        for c in range(len(self.concepts)):
            for p, name in enumerate(self.component_names):
                key = self._buffer_name(c, p)
                if not hasattr(self, key):
                    self.register_buffer(key, torch.zeros(params[name].shape, dtype=torch.float32, device=self.device))
            if not hasattr(self, f"count_{c}"):
                self.register_buffer(f"count_{c}", torch.zeros((), dtype=torch.float64, device=self.device))
                self.register_buffer(f"objective_sum_{c}", torch.zeros((), dtype=torch.float64, device=self.device))
        self.backbone.requires_grad_(False)
        for name in self.component_names:
            params[name].requires_grad_(True)

    @staticmethod
    def _buffer_name(concept: int, param: int) -> str:
        return f"alpha_{concept}_{param}"

    # --- the epochs' boundaries: reduce, select, edit ------------------------------------------
    def on_train_start(self) -> None:
        if self.selector is not None:
            self.keep_original_weights()
            self.selector.attach(self.original_weights, self.apply_edit)
        if self.preemption is not None:  # a signal in a later epoch saves what the earlier epochs made
            self.preemption.provide_results(self.edit_results)

    def on_train_epoch_start(self) -> None:
        self._items_start = (time.perf_counter(), int(self.items_done.sum()))
        if self.current_epoch == 0:
            self.take_saved()

    def on_train_epoch_end(self) -> None:
        """Reduce the epoch's sums across ranks (every rank), keep the unedited model's scores (first epoch) and,
        for the rounds that edit the model, grow the edit and put it on the model for the next epoch."""
        if self.preemption is not None and self.current_epoch < self.preemption.epochs_done:
            return  # an epoch whose results a stopped run saved
        scores = self.reduced_scores()
        for concept, per_param in scores.items():
            for name, tensor in per_param.items():
                if not torch.isfinite(tensor).all():
                    raise UserInputError(
                        f"The scores of '{concept}' for {name} hold {int((~torch.isfinite(tensor)).sum())} non-finite "
                        "values (NaN or inf): the model's outputs overflowed or its weights are not finite; "
                        "use model.dtype fp32 and check the weights.")
        epoch = self.current_epoch
        if epoch == 0:
            self.concept_scores = scores
            self.sensitivity, self.row_moments = self.reduced_sensitivity()
        if epoch == 0 or self.epochs > 1:
            value = self.mean_objective(0)
            if self.trainer.is_global_zero and self.trainer.logger is not None:
                self.trainer.logger.log_metrics({"attribution/mean_J": value}, step=epoch)
        if self.selector is not None:
            self.selector.epoch_end(epoch, scores, self.sensitivity, self.row_moments,
                                    moment_of(self.backbone, self.trainer.datamodule))
        self.reset_scores()

    def edit_results(self) -> dict:
        """What the artifacts are made from (saved when a run is stopped, see cad_lightning/preemption.py)."""
        results = {"concept_scores": self.concept_scores, "sensitivity": self.sensitivity,
                   "row_moments": self.row_moments}
        if self.selector is not None:
            results.update(selection=self.selector.results(), floor=self.outputs.floor_cache)
        return results

    def take_saved(self) -> None:
        """Take the results a stopped run saved after whole epochs (once), and put its edit back on the model."""
        if self._taken or self.preemption is None or self.preemption.results is None:
            return
        self._taken = True
        results = self.preemption.results
        self.concept_scores, self.sensitivity = results["concept_scores"], results["sensitivity"]
        self.row_moments = results["row_moments"]
        if self.selector is not None:
            self.selector.take_results(results["selection"])
            self.outputs.floor_cache = results["floor"]
            self.apply_edit(self.selector.on_model())

    def edit_scores(self) -> dict[str, torch.Tensor]:
        """The scores the edits are selected on: the target's of the unedited model, or several targets' joint."""
        if self.selector is not None:
            return self.selector.edit_scores()
        return self.concept_scores[self.targets[0]]

    def stop_point(self, phase: str) -> None:
        """Where a run stopped by a signal after its last batch saves its results and stops (see Preemption);
        every rank passes the same stop points."""
        if self.preemption is not None:
            self.preemption.checkpoint(self.trainer, phase, self.edit_results, every_rank=True)

    def exam_apply(self, masks: dict[str, torch.Tensor] | None) -> None:
        """Put an edit on the model for the exam: a safe point to stop at first."""
        self.stop_point("evaluation")
        self.apply_edit(masks)

    def selected_edits(self) -> Edits:
        """Every selection's edits, ``{selection: {ratio: masks}}``: selected on rank 0 once the epochs are done
        and broadcast (a collective: every rank calls it)."""
        if self._edits is None:
            edits = None
            if self.trainer.is_global_zero:
                datamodule = self.trainer.datamodule
                preserve = [i for i in datamodule.items() if i.get("role") == "preserve"]
                edits = self.selector.edits(self.backbone, preserve, moment_of(self.backbone, datamodule), self.hparams,
                                            progress=bool(self.trainer.progress_bar_callback))
            if self.trainer.world_size > 1:
                edits = self.trainer.strategy.broadcast(edits, src=0)
            self._edits = edits
        return self._edits

    # --- accumulation -------------------------------------------------------------------------

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        if self.preemption is not None and self.current_epoch < self.preemption.epochs_done:
            return  # an epoch whose results a stopped run saved
        batch = [item for item in batch if not self.items_done[item["item_id"]]]  # finished before a preemption
        for c, concept in enumerate(self.concepts):
            if c >= self.n_targets and self.current_epoch > 0:
                continue  # retained concepts are scored once, on the unedited model (first epoch)
            items = [item for item in batch if item.get("role", "attribute") == "attribute" and item["concept"] == concept]
            if items:
                bases = [i.get("base_prompt", self.objective.base_prompt) for i in items]
                self.accumulate(c, [i["prompt"] for i in items], [int(i["seed"]) for i in items], bases)
        preserve = [item for item in batch if item.get("role") == "preserve"]
        if preserve and self.current_epoch == 0:  # on the unedited model, like the retained concepts' scores
            self.accumulate_sensitivity([i["prompt"] for i in preserve], [int(i["seed"]) for i in preserve])
        for item in batch:
            self.items_done[item["item_id"]] = True
        self._log_progress()

    def _log_progress(self) -> None:
        """Items done, items/s and the running mean of J, as seen on rank 0 (its shard of the items)."""
        start, done_at_start = self._items_start
        done = int(self.items_done.sum())
        elapsed = max(time.perf_counter() - start, 1e-9)
        count = float(self.count_0) + float(self.restored.get("count_0", 0.0))
        running_j = (float(self.objective_sum_0) + float(self.restored.get("objective_sum_0", 0.0))) / max(count, 1.0)
        log = dict(on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)
        self.log("items", float(done), prog_bar=True, logger=False, **log)
        self.log("progress/items_done", float(done), **log)
        self.log("progress/items_per_s", (done - done_at_start) / elapsed, **log)
        if count:
            self.log("progress/running_J", running_j, **log)

    def accumulate(self, concept_index: int, prompts: list[str], seeds: list[int],
                   base_prompts: list[str] | None = None) -> None:
        """Add Σ over the items' states of w·∂J/∂w to the concept's buffers."""
        buffers = [getattr(self, self._buffer_name(concept_index, p)) for p in range(len(self.component_names))]
        total_j, n = accumulate_first_order(
            self.backbone, self.objective, self.component_names, prompts, seeds, buffers, self.hparams.chunk_size,
            base_prompts,
        )
        getattr(self, f"count_{concept_index}").add_(n)
        getattr(self, f"objective_sum_{concept_index}").add_(total_j)
        if concept_index == 0:
            self.log("attribution/J", total_j / n, prog_bar=True, batch_size=n)

    def accumulate_sensitivity(self, prompts: list[str], seeds: list[int]) -> None:
        """Add the output sensitivity (see cad_lightning/attribution/sensitivity.py) of the runs of prompts to preserve."""
        self._ensure_sensitivity_buffers()
        buffers = [getattr(self, f"sensitivity_{p}") for p in range(len(self.component_names))]
        rows = {p: getattr(self, f"sensitivity_rows_{p}") for p in self._text_only_indices()}
        n = accumulate_sensitivity(self.backbone, self.component_names, prompts, seeds, buffers,
                                   self.hparams.guidance_scale, self.hparams.num_inference_steps, rows)
        self.sensitivity_count.add_(n)

    def _ensure_sensitivity_buffers(self) -> None:
        if hasattr(self, "sensitivity_count"):
            return
        params = dict(self.backbone.denoiser.named_parameters())
        for p, name in enumerate(self.component_names):
            self.register_buffer(f"sensitivity_{p}", torch.zeros(params[name].shape, dtype=torch.float32, device=self.device))
        for p in self._text_only_indices():
            rows = params[self.component_names[p]].shape[0]
            self.register_buffer(f"sensitivity_rows_{p}", torch.zeros(rows, rows, dtype=torch.float32, device=self.device))
        self.register_buffer("sensitivity_count", torch.zeros((), dtype=torch.float64, device=self.device))

    def _text_only_indices(self) -> list[int]:
        """Components that read only the prompt (cross-attention keys and values): their row moments are kept."""
        return [p for p, name in enumerate(self.component_names) if reads_text_only(name)]

    # --- results ------------------------------------------------------------------------------
    def reset_scores(self) -> None:
        for name, buffer in self.named_buffers():
            if name.startswith(ACCUMULATED):
                buffer.zero_()
        self.restored = {}

    def accumulated_state(self) -> dict[str, torch.Tensor]:
        """This rank's sums of the current epoch and the items they cover (what a preempted run saves)."""
        return {name: buffer for name, buffer in self.named_buffers()
                if name.startswith(ACCUMULATED)}

    def restore_accumulated(self, state: dict[str, torch.Tensor], in_place: bool = False) -> None:
        """Take the saved state of a preempted run: its items are skipped. ``in_place``: the sums are this rank's
        own saved buffers (same world size), copied into the buffers, so that the batches still to come are added
        in the order of an uninterrupted run and the scores come out bit for bit equal; otherwise (sums of other
        ranks, another world size) they are kept apart and added once when reducing."""
        own = self.accumulated_state()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise UserInputError("The saved progress does not match this run's concepts and components; restart "
                                 "with the same config, or remove the preemption folder to start afresh.")
        self.items_done.copy_(state["items_done"])
        sums = {k: v.to(self.device) for k, v in state.items() if k != "items_done"}
        if in_place:
            for name, tensor in sums.items():
                getattr(self, name).copy_(tensor)
            self.restored = {}
        else:
            self.restored = sums

    def _reduced_sum(self, name: str) -> torch.Tensor:
        """The sum of a buffer over all ranks, plus what a preempted run saved of it."""
        total = self.trainer.strategy.reduce(getattr(self, name).clone(), reduce_op="sum")
        return total + self.restored[name] if name in self.restored else total

    def reduced_scores(self) -> dict[str, dict[str, torch.Tensor]]:
        """Mean α per concept over all states of all ranks: ``{concept: {parameter name: (shape) fp32}}``
        (concepts without items this epoch are left out).

        The only cross-rank communication of an epoch: one sum-reduction of the buffers.
        """
        out = {}
        for c, concept in enumerate(self.concepts):
            count = self._reduced_sum(f"count_{c}")
            if float(count) == 0:
                if c < self.n_targets:
                    raise RuntimeError(f"No item of concept '{concept}' was attributed; the data module gave none.")
                continue  # a retained concept not scored this epoch
            scores = {}
            for p, name in enumerate(self.component_names):
                total = self._reduced_sum(self._buffer_name(c, p))
                scores[name] = (total / count).float().cpu()
            out[concept] = scores
        return out

    def reduced_sensitivity(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
        """Mean output sensitivity per weight over all preserved states of all ranks, ``{parameter name: (shape)
        fp32}``, and the mean row moments (rows × rows, see cad_lightning/attribution/sensitivity.py) of the
        components that read only the prompt; each None when there is none (``data.preserve_samples`` 0, or no
        cross-attention key or value weight scored)."""
        if not hasattr(self, "sensitivity_count"):
            return None, None
        count = self._reduced_sum("sensitivity_count")
        if float(count) == 0:
            return None, None
        sensitivity = {name: (self._reduced_sum(f"sensitivity_{p}") / count).float().cpu()
                       for p, name in enumerate(self.component_names)}
        rows = {self.component_names[p]: (self._reduced_sum(f"sensitivity_rows_{p}") / count).float().cpu()
                for p in self._text_only_indices()}
        return sensitivity, rows or None

    def mean_objective(self, concept_index: int = 0) -> float:
        count = self._reduced_sum(f"count_{concept_index}")
        total = self._reduced_sum(f"objective_sum_{concept_index}")
        return float(total / count)

"""AttributionWriter: turns the accumulated scores into attribution and editing artifacts at the end of ``fit``.

Run directory (``trainer.log_dir``, under ``trainer.default_root_dir``; every file is listed in the README):
``config.yaml`` (written by LightningCLI), ``attribution/scores.safetensors`` and ``meta.json``,
``edits/<selection>-<mode>-<ratio>.safetensors`` (ablation masks) with ``edits/<...>/unet/`` (the edited UNet),
``report.json``, ``report.md``, ``samples/*.png``, ``tradeoff.png`` and TensorBoard events. Every file is
written atomically.

Selections (``selections``):
- ``cad``: the paper's, one scoring of the unedited model, top components at each ratio;
- ``selective``: CAD's scores per unit of collateral, grown in rounds of ``selective_step``: each round takes the
  weights with the highest α / (the collateral they add to the edit so far + ``collateral_offset`` · its mean).
  The collateral is measured where ``collateral_space`` says: ``text`` (cross-attention keys and values only,
  cad_lightning/editing/text_space.py): exactly, as the change of the keys and values of every token of every
  prompt to preserve, weighted by the output sensitivity per row and by how the rows' output gradients
  correlate (the row moments of the preserved runs); ``states`` (any component,
  cad_lightning/editing/coherent.py): the output sensitivity s of each weight plus the change it adds to the
  edit's damage measured on the states of ``collateral_runs`` preserved runs. Both need the output sensitivity
  on prompts to preserve (cad_lightning/attribution/sensitivity.py; ``data.preserve_samples > 0``). Weights
  whose removal moves every output, which CAD's gap objective cannot see, lose their rank;
- ``retain``: retain-aware, scores adjusted to protect components that matter for retained concepts
  (needs ``data.retain_samples > 0``);
- ``iterative``: ablate ``iterative_step`` of the components, re-sample trajectories and re-score on the
  edited model, repeat up to the largest ratio (one training epoch per round);
- ``random``: the control, the same number of ablated weights per row as the first other selection, at random
  positions.

This callback's job is the first-order scores and the selection of edits from them (with the rounds that edit
the model between epochs). What every estimator does with selected edits (random controls, evaluation, files,
report) is :class:`cad_lightning.edit_outputs.EditOutputs`, which it owns.
"""

from __future__ import annotations

import math
import platform
import time
from importlib import metadata
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cad_lightning.choices import (
    CollateralSpace,
    EvaluateAt,
    MultiConcept,
    RandomAt,
    Scope,
    Selection,
    check_choice,
    choices,
)
from cad_lightning.edit_outputs import EditOutputs
from cad_lightning.editing import (
    combine_masks,
    count_ablated,
    joint_scores,
    restore_weights,
    retain_adjusted_scores,
    select_components,
    union_selection,
)
from cad_lightning.editing.coherent import GuidedChange, coherent_selection, rescore_stops, round_schedule
from cad_lightning.editing.text_space import TEXT_SPACE_STEP, preserved_moment, reads_text_only, text_space_selection
from cad_lightning.errors import UserInputError
from cad_lightning.utils import atomic_path, write_json

SELECTIONS = choices(Selection)
STATES_STEP = 0.02  # rounds with sampled states cost a forward and backward pass each


class AttributionWriter(Callback):
    """Writes scores, edits, evaluation and report at the end of an attribution ``fit``.

    Args:
        ratios: fractions of the components to ablate, each in (0, 1).
        scope: where the top components are taken: ``row`` (the paper's), ``matrix`` or ``global``.
        selections: any of ``cad``, ``retain``, ``iterative``, ``random`` (see the module docstring).
        retain_weight: strength of the protection of retained concepts in the ``retain`` selection.
        collateral_offset: the ``selective`` selection ranks by α / (added collateral + collateral_offset · its
            mean): small values rank by concept gap per unit of collateral, large ones approach CAD's ranking.
        collateral_space: where the ``selective`` selection measures collateral: ``text`` (exactly, on the
            keys and values of every prompt to preserve; only for cross-attention key/value components),
            ``states`` (on sampled states of preserved runs; any component) or ``auto`` (``text`` when every
            scored component is a cross-attention key or value weight, else ``states``).
        selective_step: fraction of components added per round of the ``selective`` selection (None: 0.005 in
            text space, 0.02 with states; with states, 1 gives one round, the per-weight ranking
            α / (s + collateral_offset · mean s)).
        rescore_every: the ``selective`` edit in stages: after each ``rescore_every`` of the components it is
            put on the model, the concept's trajectories are sampled again and scored on the edited model (one
            more epoch, target items only), and the edit grows on the new scores, charged with the collateral
            of all of it (text space only). None: one scoring, of the unedited model.
        collateral_runs: preserved runs (the first of ``data.preserve_samples``) on whose states the
            ``states`` collateral is measured.
        iterative_step: fraction of components ablated per round of the ``iterative`` selection.
        random_at: where the ``random`` control is written and evaluated: ``all`` ratios (each edit is read
            against random ablation of its own count) or only the ``largest``.
        evaluate_at: which edits are written and evaluated: ``all`` ratios (on the report seeds); ``goal``: on
            the search seeds, ratio by ratio, smallest first, each edit beside its random control, until every
            selection (other than ``random``) has an edit that meets the selective-edit goal (target ≤ floor +
            0.05, retained concepts and the target prompts' other words ≥ 0.90 of unedited, retained SSIM ≥ the
            random control's; an edit whose target images miss it is read no further); the larger ratios are
            neither evaluated nor written, and with none meeting it every ratio is searched. The edit the search
            stopped at is then evaluated beside its controls on the report seeds, which the report reads. Or,
            for each selection only the
            ``floor`` edit: the smallest of ``ratios`` (the candidates; the edits are nested) whose target accuracy
            is at most the floor plus ``search_margin``. It is found by bisection, about log2(len(ratios) + 1)
            probes, each sampling the evaluation's target prompts on the search seeds, and then evaluated in
            full beside its random control on the report seeds. When no candidate reaches it, the largest is evaluated. Erase only.
            Without an evaluation (``evaluate`` false, or free-text concepts that the shapes world's classifier
            cannot read) there is nothing to search with, and every ratio's edit is written.
        search_margin: the floor search's goal is target ≤ floor + ``search_margin`` (the search seeds' floor).
        search_images: images of the target prompts per probe of the search.
        random_draws: random controls evaluated per ratio (seeds 0, 1, ...); an edit is read against their
            mean SSIM. Same-seed SSIM of one random draw varies by about ±0.01 from draw to draw on the
            embedded model, as much as the differences being judged. Only draw 0 is written as edits.
        save_unet: also write each edited UNet as a diffusers folder.
        evaluate: measure accuracy before and after every edit with the model's concept classifier.
        eval_target_images / eval_retain_images: images of prompts naming the target / retained concepts.
        floor_images: images of the base prompt used to measure the floor.
        eval_batch_size: images per sampling batch during evaluation.
        localise_top: the fraction of scored weights (by score, each sign) whose attribution mass the report's
            localisation chart breaks down by UNet block and component kind.
        multi_concept: how one edit serves several ``data.concepts``: ``joint`` (every selection ranks by the sum
            of each concept's scores over its own mass, so each concept weighs the same and a weight that serves
            several ranks by all of them) or ``union`` (the ``cad`` selection takes each concept's own top set
            with an even share of the budget; the other selections rank jointly).
    """

    def __init__(
        self,
        ratios: list[float] = (0.01, 0.02, 0.03),
        scope: Scope = "global",
        selections: list[Selection] = ("cad",),
        retain_weight: float = 1.0,
        collateral_offset: float = 0.03,
        collateral_space: CollateralSpace = "auto",
        selective_step: float | None = None,
        rescore_every: float | None = None,
        collateral_runs: int = 16,
        iterative_step: float = 0.005,
        random_at: RandomAt = "all",
        random_draws: int = 1,
        evaluate_at: EvaluateAt = "all",
        search_margin: float = 0.0,
        search_images: int = 32,
        save_unet: bool = True,
        evaluate: bool = True,
        eval_target_images: int = 32,
        eval_retain_images: int = 64,
        floor_images: int = 64,
        eval_batch_size: int = 96,
        localise_top: float = 0.01,
        multi_concept: MultiConcept = "joint",
    ) -> None:
        super().__init__()
        check_choice("AttributionWriter", "multi_concept", multi_concept, MultiConcept)
        self.multi_concept = multi_concept
        # the random controls, evaluation, edit files and report of the selected edits
        self.outputs = EditOutputs(
            "AttributionWriter", ratios, random_at=random_at, random_draws=random_draws, evaluate_at=evaluate_at,
            search_margin=search_margin, search_images=search_images, save_unet=save_unet, evaluate=evaluate,
            eval_target_images=eval_target_images, eval_retain_images=eval_retain_images, floor_images=floor_images,
            eval_batch_size=eval_batch_size, localise_top=localise_top, scope=scope)
        self.ratios = self.outputs.ratios
        check_choice("AttributionWriter", "scope", scope, Scope)
        for s in selections:
            check_choice("AttributionWriter", "selections: each", s, Selection)
        if not 0 < iterative_step < 1:
            raise UserInputError(f"AttributionWriter iterative_step must be in (0, 1), got {iterative_step}.")
        self.scope, self.selections = scope, list(dict.fromkeys(selections))
        if not collateral_offset >= 0:
            raise UserInputError(f"AttributionWriter collateral_offset must be 0 or more, got {collateral_offset}.")
        self.retain_weight, self.iterative_step = retain_weight, iterative_step
        self.collateral_offset = float(collateral_offset)
        if selective_step is not None and not (isinstance(selective_step, (int, float)) and 0 < selective_step <= 1):
            raise UserInputError(f"AttributionWriter selective_step must be in (0, 1] or null, got {selective_step!r}.")
        check_choice("AttributionWriter", "collateral_space", collateral_space, CollateralSpace)
        self.collateral_space = collateral_space
        if isinstance(collateral_runs, bool) or not isinstance(collateral_runs, int) or collateral_runs < 1:
            raise UserInputError(f"AttributionWriter collateral_runs must be a whole number >= 1, got {collateral_runs!r}.")
        self.selective_step = None if selective_step is None else float(selective_step)
        if rescore_every is not None:
            if isinstance(rescore_every, bool) or not (isinstance(rescore_every, (int, float)) and 0 < rescore_every < 1):
                raise UserInputError(f"AttributionWriter rescore_every must be in (0, 1) or null, got {rescore_every!r}.")
            if "selective" not in self.selections:
                raise UserInputError("AttributionWriter rescore_every stages the 'selective' edit: add it to selections.")
            if "iterative" in self.selections:
                raise UserInputError("AttributionWriter rescore_every and the 'iterative' selection both edit the model "
                                     "between epochs: use one of them.")
            if collateral_space == "states":
                raise UserInputError("AttributionWriter rescore_every grows the edit in text space: set it to null for "
                                     "collateral_space states.")
        self.rescore_every = None if rescore_every is None else float(rescore_every)
        self._staged: dict[float, dict[str, torch.Tensor]] = {}  # the selective edit's masks, stage by stage
        self._keep: dict[str, torch.Tensor] | None = None
        self.collateral_runs = collateral_runs
        self.sensitivity: dict[str, torch.Tensor] | None = None
        self.row_moments: dict[str, torch.Tensor] | None = None
        self.scores: dict[str, dict[str, torch.Tensor]] | None = None
        self.iterative_masks: dict[float, dict[str, torch.Tensor]] = {}
        self._cumulative: dict[str, torch.Tensor] | None = None
        self._original: dict[str, torch.Tensor] = {}
        self._start = 0.0
        self._taken = False  # whether the results of a stopped run were taken

    # --- set-up -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if "retain" in self.selections and not (datamodule.retain_samples > 0 and datamodule.retain_concepts):
            raise UserInputError(
                "The 'retain' selection needs scores of retained concepts: set data.retain_samples > 0 "
                "and give data.retain_concepts (or use the shapes world's default)."
            )
        if "selective" in self.selections and not getattr(datamodule, "preserve_samples", 0) > 0:
            raise UserInputError(
                "The 'selective' selection needs the output sensitivity on prompts to preserve: set "
                "data.preserve_samples > 0 (the default config's: 32).")
        if "iterative" in self.selections:
            rounds = self._iterative_schedule()
            trainer.fit_loop.max_epochs = len(rounds)
        if self.rescore_every is not None:
            trainer.fit_loop.max_epochs = 1 + len(self._rescore_stops())
        self.mode = "erase" if pl_module.hparams.objective == "erase" else "amplify"
        self.outputs.prepare(pl_module, datamodule, self.mode, selects=any(s != "random" for s in self.selections))
        self._start = time.perf_counter()

    def _iterative_schedule(self) -> list[float]:
        """Cumulative ratios after each round: steps of ``iterative_step`` that also land on every ratio."""
        return round_schedule(self.ratios, self.iterative_step)

    def _rescore_stops(self) -> list[float]:
        """The ratios at which the staged ``selective`` edit is put on the model and the concept scored again."""
        return rescore_stops(self.rescore_every, max(self.ratios))

    def on_train_start(self, trainer, pl_module) -> None:
        if "selective" in self.selections:
            # refuse a collateral space that cannot serve, before any work
            if self._space(pl_module.component_names) != "text" and self.rescore_every is not None:
                raise UserInputError("AttributionWriter rescore_every grows the edit in text space, where every scored "
                                     "component is a cross-attention key or value (model.components [cross_attn_kv]): "
                                     "set it to null for other components.")
        params = dict(pl_module.backbone.denoiser.named_parameters())
        self._original = {n: params[n].detach().clone() for n in pl_module.component_names}
        preemption = getattr(pl_module, "preemption", None)
        if preemption is not None:  # a signal in a later epoch saves what the earlier epochs made
            preemption.provide_results(self._results)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            self._take_saved(pl_module)

    def _take_saved(self, pl_module) -> None:
        """Take the results a stopped run saved after whole epochs (once), and put its edit back on the model."""
        preemption = getattr(pl_module, "preemption", None)
        if self._taken or preemption is None or preemption.results is None:
            return
        self._taken = True
        self._take_results(preemption.results)
        self._apply(pl_module, self._keep if self.rescore_every is not None else self._cumulative)

    def _skipped(self, trainer, pl_module) -> bool:
        """Whether this epoch's results come from a stopped run (see Preemption)."""
        preemption = getattr(pl_module, "preemption", None)
        return preemption is not None and trainer.current_epoch < preemption.epochs_done

    # --- per round ----------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self._skipped(trainer, pl_module):
            return
        scores = pl_module.reduced_scores()
        for concept, per_param in scores.items():
            for name, tensor in per_param.items():
                if not torch.isfinite(tensor).all():
                    raise UserInputError(
                        f"The scores of '{concept}' for {name} hold {int((~torch.isfinite(tensor)).sum())} non-finite "
                        "values (NaN or inf): the model's outputs overflowed or its weights are not finite; "
                        "use model.dtype fp32 and check the weights."
                    )
        epoch = trainer.current_epoch
        if epoch == 0:
            self.scores = scores
            self.sensitivity, self.row_moments = pl_module.reduced_sensitivity()
            self._log_objective(trainer, pl_module, epoch)
        if "iterative" in self.selections:
            schedule = self._iterative_schedule()
            target = schedule[epoch]
            step_masks = self._select_increment(self._edit_scores(pl_module, scores), target)
            self._cumulative = step_masks if self._cumulative is None else combine_masks(self._cumulative, step_masks)
            if any(math.isclose(target, r) for r in self.ratios):
                self.iterative_masks[target] = {k: v.clone() for k, v in self._cumulative.items()}
            self._apply(pl_module, self._cumulative)  # the next round scores the edited model
            if epoch > 0:
                self._log_objective(trainer, pl_module, epoch)
        if self.rescore_every is not None:
            self._stage(pl_module, epoch, self._edit_scores(pl_module, scores))
            if epoch > 0:
                self._log_objective(trainer, pl_module, epoch)
        pl_module.reset_scores()

    def _edit_scores(self, pl_module, scores: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """The scores an edit is selected on: the target's, or for several targets their joint scores."""
        scores = self.scores if scores is None else scores
        targets = pl_module.targets
        if len(targets) == 1:
            return scores[targets[0]]
        return joint_scores([scores[c] for c in targets], self.mode)

    def _stage(self, pl_module, epoch: int, scores: dict[str, torch.Tensor]) -> None:
        """Grow the staged ``selective`` edit from the last stop to the next on this epoch's scores, keep the masks of
        the ratios on the way, and put the edit on the model for the next epoch's scoring."""
        stops = self._rescore_stops()
        low = stops[epoch - 1] if epoch > 0 else 0.0
        high = stops[epoch] if epoch < len(stops) else max(self.ratios)
        wanted = sorted({r for r in self.ratios if low < r <= high} | {high})
        grown = self._text_space(pl_module, scores, wanted, initial=self._keep)
        self._staged.update({r: m for r, m in grown.items() if r in self.ratios})
        self._keep = grown[high]
        if epoch < len(stops):
            self._apply(pl_module, self._keep)

    def _log_objective(self, trainer, pl_module, epoch: int) -> None:
        value = pl_module.mean_objective(0)
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics({"attribution/mean_J": value}, step=epoch)

    def _total_weights(self) -> int:
        return sum(t.numel() for t in self._original.values())

    def _ablated(self) -> dict[str, torch.Tensor] | None:
        if self._cumulative is None:
            return None
        return {k: ~v for k, v in self._cumulative.items()}

    def _select_increment(self, scores: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        """Masks ablating (target − already ablated) of all weights among those not yet ablated."""
        already = 0 if self._cumulative is None else count_ablated(self._cumulative)
        missing = round(target * self._total_weights()) - already
        if missing <= 0:
            return {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
        return select_components(scores, missing / self._total_weights(), mode=self.mode, scope=self.scope, exclude=self._ablated())

    def _apply(self, pl_module, masks: dict[str, torch.Tensor] | None) -> None:
        """Set the component weights to the originals with ``masks`` applied (None: the unedited model)."""
        restore_weights(pl_module.backbone.denoiser, self._original, masks)

    # --- end of fit ---------------------------------------------------------------------------
    def _results(self) -> dict:
        """What the artifacts are made from (saved when a run is stopped while writing them)."""
        return {"scores": self.scores, "sensitivity": self.sensitivity, "row_moments": self.row_moments,
                "staged": self._staged, "keep": self._keep, "iterative": self.iterative_masks,
                "cumulative": self._cumulative, "floor": self.outputs.floor_cache}

    def _take_results(self, results: dict) -> None:
        self.scores, self.sensitivity, self.row_moments = results["scores"], results["sensitivity"], results["row_moments"]
        self._staged, self._keep = results["staged"], results["keep"]
        self.iterative_masks, self._cumulative = results["iterative"], results["cumulative"]
        self.outputs.floor_cache = results["floor"]

    def _stop_point(self, trainer, pl_module, phase: str) -> None:
        """Where a run stopped by a signal after its last batch saves its results and stops (see Preemption);
        every rank passes the same stop points."""
        preemption = getattr(pl_module, "preemption", None)
        if preemption is not None:
            preemption.checkpoint(trainer, phase, self._results, every_rank=True)

    def _checked_apply(self, trainer, pl_module, masks) -> None:
        """Put an edit on the model during evaluation, a safe point to stop at."""
        self._stop_point(trainer, pl_module, "evaluation")
        self._apply(pl_module, masks)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._take_saved(pl_module)  # a rerun of a run stopped after attribution (no epoch ran)
        self._apply(pl_module, None)
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast from rank 0: on every rank
        self._stop_point(trainer, pl_module, "writing")
        targets = pl_module.targets
        target = " + ".join(targets)
        report, edits = None, None
        if trainer.is_global_zero:  # rank 0 writes the scores and selects; every rank takes part in the exam
            scores = self._edit_scores(pl_module)
            self._write_scores(run_dir, trainer, pl_module, scores)
            report = {
                "concept": targets[0], "objective": pl_module.hparams.objective, "mode": self.mode, "scope": self.scope,
                "base_prompt": trainer.datamodule.base_prompt, "base_word": trainer.datamodule.base_word,
                "ratios": self.ratios, "evaluate_at": self.outputs.evaluate_at,
            }
            if len(targets) > 1:
                report.update(concepts=targets, multi_concept=self.multi_concept)
            report.update(self.outputs.localise(run_dir, trainer, pl_module, scores))
            if "selective" in self.selections:
                report["collateral_space"] = self._space(scores)
                # in text space, whether the rows' changes were combined through their output gradients' correlation
                report["row_coupling"] = report["collateral_space"] == "text" and self.row_moments is not None
                report["rescored_at"] = self._rescore_stops() if self.rescore_every is not None else []
            edits = self._build_edits(pl_module)
        if trainer.world_size > 1:
            edits = trainer.strategy.broadcast(edits, src=0)
        self.outputs.emit(run_dir, trainer, pl_module, edits, report,
                          apply=lambda masks: self._checked_apply(trainer, pl_module, masks),
                          random="random" in self.selections, random_fallback=next(iter(self.scores.values())),
                          start=self._start, checkpoint=lambda: self._stop_point(trainer, pl_module, "writing"),
                          strategy=trainer.strategy)
        rank_zero_info(f"Attribution of '{target}' written to {run_dir}")

    def _write_scores(self, run_dir: Path, trainer, pl_module, scores: dict[str, torch.Tensor]) -> None:
        attribution = run_dir / "attribution"
        label = " + ".join(pl_module.targets)
        with atomic_path(attribution / "scores.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={"concept": label})
        targets, retained = pl_module.targets, pl_module.concepts[pl_module.n_targets:]
        if len(targets) > 1:  # each target's own scores beside the joint ones the edits were selected on
            with atomic_path(attribution / "concept_scores.safetensors") as tmp:
                save_file({f"{c}::{k}": v.contiguous() for c in targets for k, v in self.scores[c].items()}, str(tmp))
        if retained:
            with atomic_path(attribution / "retain_scores.safetensors") as tmp:
                flat = {f"{c}::{k}": v.contiguous() for c in retained for k, v in self.scores[c].items()}
                save_file(flat, str(tmp))
        if self.sensitivity is not None:
            with atomic_path(attribution / "sensitivity.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in self.sensitivity.items()}, str(tmp),
                          metadata={"concept": label})
        if self.row_moments is not None:
            with atomic_path(attribution / "row_moments.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in self.row_moments.items()}, str(tmp),
                          metadata={"concept": label})
        datamodule = trainer.datamodule
        meta = {
            "model": pl_module.model_id,
            "model_sha256": pl_module.weights_sha256(),
            "concept": pl_module.concepts[0],
            **({"concepts": pl_module.targets, "multi_concept": self.multi_concept,
                "scores": "the joint scores the edits were selected on; each concept's own in concept_scores.safetensors"}
               if len(pl_module.targets) > 1 else {}),
            "retained_concepts_scored": pl_module.concepts[pl_module.n_targets:],
            "base_prompt": datamodule.base_prompt,
            "base_word": datamodule.base_word,
            "base_prompts": [i["base_prompt"] for i in datamodule.items()],
            "estimator": "first_order",
            "objective": pl_module.hparams.objective,
            "score": "alpha = w * dJ/dw, mean over the states of all sampling runs (fp32)",
            "components": {"patterns": pl_module.space.patterns, "parameters": pl_module.component_names,
                           "weights": self._total_weights()},
            "granularity": "weight",
            "sensitivity": None if self.sensitivity is None else {
                "file": "sensitivity.safetensors", "preserve_prompts": datamodule.preserve_prompts(),
                "meaning": "s = mean over preserved states of mean_k (w * d eps_k/dw)^2 (one Rademacher probe per run)",
                "row_moments": None if self.row_moments is None else {
                    "file": "row_moments.safetensors",
                    "meaning": "P = mean over preserved states of G_s G_s^T / elements, G_s = d(v.eps)/dW at one state "
                               "(rows x rows, cross-attention K/V weights)"},
                "collateral_offset": self.collateral_offset, "selective_step": self.selective_step,
                "rescore_every": self.rescore_every,
                "collateral_runs": self.collateral_runs},
            "items": sum(i.get("role", "attribute") == "attribute" for i in datamodule.items()),
            "preserve_items": sum(i.get("role") == "preserve" for i in datamodule.items()),
            "seeds": [i["seed"] for i in datamodule.items() if i.get("role", "attribute") == "attribute"],
            "sampler": pl_module.backbone.sampler_settings(pl_module.hparams.num_inference_steps,
                                                           pl_module.hparams.guidance_scale),
            "edit_applied_before": pl_module.hparams.edit,
            "world_size": trainer.world_size,
            "versions": {p: metadata.version(p) for p in ("torch", "lightning", "diffusers", "transformers", "cad-lightning")},
            "python": platform.python_version(),
            "wall_time_s": time.perf_counter() - self._start,
        }
        write_json(attribution / "meta.json", meta)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_histogram"):
            for name, tensor in scores.items():
                experiment.add_histogram(f"scores/{name}", tensor.flatten(), 0)

    def _build_edits(self, pl_module) -> dict[str, dict[float, dict[str, torch.Tensor]]]:
        scores = self._edit_scores(pl_module)
        targets = pl_module.targets
        edits: dict[str, dict[float, dict[str, torch.Tensor]]] = {}
        for selection in self.selections:
            if selection == "iterative":
                edits["iterative"] = self.iterative_masks
                continue
            if selection == "random":
                continue
            if selection == "selective":
                edits[selection] = self._selective_edits(pl_module, scores)
                continue
            if selection == "cad" and len(targets) > 1 and self.multi_concept == "union":
                per_concept = [self.scores[c] for c in targets]
                edits[selection] = {r: union_selection(per_concept, r, mode=self.mode, scope=self.scope)
                                    for r in self.ratios}
                continue
            source = scores
            if selection == "retain":
                retained = pl_module.concepts[pl_module.n_targets:]
                source = retain_adjusted_scores(scores, [self.scores[c] for c in retained],
                                                weight=self.retain_weight, mode=self.mode)
            edits[selection] = {r: select_components(source, r, mode=self.mode, scope=self.scope) for r in self.ratios}
        return edits

    def _space(self, names) -> str:
        """The collateral space of the ``selective`` selection for the scored parameters ``names``."""
        text_only = all(reads_text_only(n) for n in names)
        if self.collateral_space == "text" and not text_only:
            other = next(n for n in names if not reads_text_only(n))
            raise UserInputError(
                f"collateral_space 'text' measures collateral on the cross-attention keys and values only, but "
                f"'{other}' is scored too: use model.components [cross_attn_kv] or collateral_space 'states'.")
        if self.collateral_space == "auto":
            return "text" if text_only else "states"
        return self.collateral_space

    def _selective_edits(self, pl_module, scores: dict[str, torch.Tensor]) -> dict[float, dict[str, torch.Tensor]]:
        """The ``selective`` edits: grown in rounds, each charged with the collateral it adds (in text space,
        editing/text_space.py, or on sampled states, editing/coherent.py)."""
        if self.rescore_every is not None:
            return self._staged  # grown stage by stage as the epochs ended
        if self._space(scores) == "text":
            return self._text_space(pl_module, scores, self.ratios)
        params = dict(pl_module.backbone.denoiser.named_parameters())  # live: the rounds differentiate through them
        preserve = [i for i in pl_module.trainer.datamodule.items() if i.get("role") == "preserve"]
        preserve = preserve[: self.collateral_runs]
        hparams = pl_module.hparams
        collateral = GuidedChange(pl_module.backbone, [i["prompt"] for i in preserve], [int(i["seed"]) for i in preserve],
                                  guidance_scale=hparams.guidance_scale, num_inference_steps=hparams.num_inference_steps)
        return coherent_selection(
            scores, self.sensitivity, {n: params[n] for n in scores}, collateral, self.ratios,
            step=self.selective_step or STATES_STEP, offset=self.collateral_offset, mode=self.mode, scope=self.scope,
            progress=lambda rounds: tqdm(rounds, desc="selective edit rounds", leave=False,
                                         disable=not pl_module.trainer.progress_bar_callback))

    def _text_space(self, pl_module, scores, ratios, initial=None) -> dict[float, dict[str, torch.Tensor]]:
        datamodule = pl_module.trainer.datamodule
        moment = preserved_moment(pl_module.backbone, datamodule.prompts_to_preserve(), datamodule.base_prompt)
        return text_space_selection(
            scores, self.sensitivity, {n: self._original[n] for n in scores}, moment, ratios,
            step=self.selective_step or TEXT_SPACE_STEP, offset=self.collateral_offset, mode=self.mode,
            scope=self.scope, row_moments=self.row_moments, initial=initial)

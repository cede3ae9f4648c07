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

Every edit is evaluated on the same prompts, seeds and sampler noise as the unedited model: the target's and
the retained concepts' accuracies, and the collateral (cad_lightning/evaluation/collateral.py: SSIM and KID
of the retained images against the unedited ones, the target prompts' other words, what is drawn instead),
beside the random control of equal count.
"""

from __future__ import annotations

import hashlib
import itertools
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

from cad_lightning.attribution.localisation import localisation, top_components, unet_levels
from cad_lightning.editing import (
    MULTI_CONCEPT,
    SCOPES,
    combine_masks,
    count_ablated,
    joint_scores,
    load_masks,
    random_like,
    restore_weights,
    retain_adjusted_scores,
    save_edited_unet,
    save_masks,
    select_components,
    union_selection,
)
from cad_lightning.editing.coherent import GuidedChange, coherent_selection, round_schedule
from cad_lightning.editing.text_space import TEXT_SPACE_STEP, reads_text_only, text_space_selection, token_second_moment
from cad_lightning.errors import UserInputError
from cad_lightning.plots import localisation_figure, save_figure
from cad_lightning.utils import atomic_path, image_grid, labelled_grid, log_image, save_image, write_json, write_text

SELECTIONS = ("cad", "selective", "retain", "iterative", "random")
COLLATERAL_SPACES = ("auto", "text", "states")
EVALUATE_AT = ("all", "goal", "floor")
STATES_STEP = 0.02  # rounds with sampled states cost a forward and backward pass each


def ratio_tag(ratio: float) -> str:
    return f"{ratio:g}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        evaluate_at: which edits are written and evaluated: ``all`` ratios; ``goal``: ratio by ratio, smallest
            first, each edit beside its random control, until every selection (other than ``random``) has an edit
            that meets the selective-edit goal (target ≤ floor + 0.05, retained concepts and the target prompts'
            other words ≥ 0.90 of unedited, retained SSIM ≥ the random control's); the larger ratios are neither
            evaluated nor written, and with none meeting it every ratio is. Or, for each selection only the
            ``floor`` edit: the smallest of ``ratios`` (the candidates; the edits are nested) whose target accuracy
            is at most the floor plus ``search_margin``. It is found by bisection, about log2(len(ratios) + 1)
            probes, each sampling the evaluation's target prompts with other seeds, and then evaluated in full
            beside its random control. When no candidate reaches it, the largest is evaluated. Erase only.
            Without an evaluation (``evaluate`` false, or free-text concepts that the shapes world's classifier
            cannot read) there is nothing to search with, and every ratio's edit is written.
        search_margin: the search's goal is target ≤ floor + ``search_margin``. Below the selective goal's 0.05:
            the reading on the evaluation's images, which the edit was not chosen on, differs from the search's
            by about 0.07 (one standard deviation, 64 images each).
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
        scope: str = "global",
        selections: list[str] = ("cad",),
        retain_weight: float = 1.0,
        collateral_offset: float = 0.03,
        collateral_space: str = "auto",
        selective_step: float | None = None,
        rescore_every: float | None = None,
        collateral_runs: int = 16,
        iterative_step: float = 0.005,
        random_at: str = "all",
        random_draws: int = 1,
        evaluate_at: str = "all",
        search_margin: float = 0.0,
        search_images: int = 32,
        save_unet: bool = True,
        evaluate: bool = True,
        eval_target_images: int = 32,
        eval_retain_images: int = 64,
        floor_images: int = 64,
        eval_batch_size: int = 96,
        localise_top: float = 0.01,
        multi_concept: str = "joint",
    ) -> None:
        super().__init__()
        if multi_concept not in MULTI_CONCEPT:
            raise UserInputError(f"AttributionWriter multi_concept must be one of {', '.join(MULTI_CONCEPT)}, "
                                 f"got {multi_concept!r}.")
        self.multi_concept = multi_concept
        if not (isinstance(localise_top, (int, float)) and 0 < localise_top < 1):
            raise UserInputError(f"AttributionWriter localise_top must be in (0, 1), got {localise_top!r}.")
        self.localise_top = float(localise_top)
        if ratios is None or isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__"):
            raise UserInputError(f"AttributionWriter ratios must be a list of numbers in (0, 1), got {ratios!r}.")
        ratios = list(ratios)
        if not ratios:
            raise UserInputError("AttributionWriter ratios is empty; give at least one ratio in (0, 1).")
        for r in ratios:
            if not isinstance(r, (int, float)) or not 0 < r < 1:
                raise UserInputError(f"AttributionWriter ratios: {r!r} is not a number in (0, 1).")
        if scope not in SCOPES:
            raise UserInputError(f"AttributionWriter scope must be one of {', '.join(SCOPES)}, got '{scope}'.")
        for s in selections:
            if s not in SELECTIONS:
                raise UserInputError(f"AttributionWriter selections: '{s}' is not one of {', '.join(SELECTIONS)}.")
        if not 0 < iterative_step < 1:
            raise UserInputError(f"AttributionWriter iterative_step must be in (0, 1), got {iterative_step}.")
        self.ratios = sorted(set(float(r) for r in ratios))
        if random_at not in ("all", "largest"):
            raise UserInputError(f"AttributionWriter random_at must be 'all' or 'largest', got '{random_at}'.")
        self.random_at = random_at
        if isinstance(random_draws, bool) or not isinstance(random_draws, int) or random_draws < 1:
            raise UserInputError(f"AttributionWriter random_draws must be a whole number >= 1, got {random_draws!r}.")
        self.random_draws = random_draws
        if evaluate_at not in EVALUATE_AT:
            raise UserInputError(f"AttributionWriter evaluate_at must be one of {', '.join(EVALUATE_AT)}, got {evaluate_at!r}.")
        if not (isinstance(search_margin, (int, float)) and 0 <= search_margin < 1):
            raise UserInputError(f"AttributionWriter search_margin must be in [0, 1), got {search_margin!r}.")
        if isinstance(search_images, bool) or not isinstance(search_images, int) or search_images < 1:
            raise UserInputError(f"AttributionWriter search_images must be a whole number >= 1, got {search_images!r}.")
        self.evaluate_at, self.search_margin, self.search_images = evaluate_at, float(search_margin), search_images
        self.scope, self.selections = scope, list(dict.fromkeys(selections))
        if not collateral_offset >= 0:
            raise UserInputError(f"AttributionWriter collateral_offset must be 0 or more, got {collateral_offset}.")
        self.retain_weight, self.iterative_step = retain_weight, iterative_step
        self.collateral_offset = float(collateral_offset)
        if selective_step is not None and not (isinstance(selective_step, (int, float)) and 0 < selective_step <= 1):
            raise UserInputError(f"AttributionWriter selective_step must be in (0, 1] or null, got {selective_step!r}.")
        if collateral_space not in COLLATERAL_SPACES:
            raise UserInputError(f"AttributionWriter collateral_space must be one of {', '.join(COLLATERAL_SPACES)}, "
                                 f"got {collateral_space!r}.")
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
        self.save_unet, self.evaluate = save_unet, evaluate
        self.eval_target_images, self.eval_retain_images = eval_target_images, eval_retain_images
        self.floor_images, self.eval_batch_size = floor_images, eval_batch_size
        self.scores: dict[str, dict[str, torch.Tensor]] | None = None
        self.iterative_masks: dict[float, dict[str, torch.Tensor]] = {}
        self._cumulative: dict[str, torch.Tensor] | None = None
        self._original: dict[str, torch.Tensor] = {}
        self._start = 0.0
        self._detector_cache = None
        self._floor_cache: dict[str, float] | None = None
        self._taken = False  # whether the results of a stopped run were taken

    # --- set-up -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if len(getattr(datamodule, "targets", [])) > 1 and self.evaluate_at == "floor":
            raise UserInputError("AttributionWriter evaluate_at 'floor' searches one concept's floor; with several "
                                 "data.concepts use evaluate_at 'goal' or 'all'.")
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
        if self.evaluate_at != "all" and self.mode != "erase":
            raise UserInputError(f"AttributionWriter evaluate_at '{self.evaluate_at}' looks for the smallest edit that "
                                 "erases the concept; with model.objective amplify use evaluate_at all.")
        if self.evaluate_at != "all" and not any(s != "random" for s in self.selections):
            raise UserInputError(f"AttributionWriter evaluate_at '{self.evaluate_at}' looks among the edits of a "
                                 "selection other than 'random': add one to selections.")
        if self.evaluate and datamodule.prompt_templates is None:
            with torch.random.fork_rng(devices=[]):  # its construction draws initial weights: leave the RNG as it was
                self._detector(pl_module)  # a classifier that does not load is refused before any work
        self._start = time.perf_counter()

    def _iterative_schedule(self) -> list[float]:
        """Cumulative ratios after each round: steps of ``iterative_step`` that also land on every ratio."""
        return round_schedule(self.ratios, self.iterative_step)

    def _rescore_stops(self) -> list[float]:
        """The ratios at which the staged ``selective`` edit is put on the model and the concept scored again."""
        stops, k = [], 1
        while k * self.rescore_every < max(self.ratios) - 1e-9:
            stops.append(round(k * self.rescore_every, 9))
            k += 1
        return stops

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
                "cumulative": self._cumulative, "floor": self._floor_cache}

    def _take_results(self, results: dict) -> None:
        self.scores, self.sensitivity, self.row_moments = results["scores"], results["sensitivity"], results["row_moments"]
        self._staged, self._keep = results["staged"], results["keep"]
        self.iterative_masks, self._cumulative = results["iterative"], results["cumulative"]
        self._floor_cache = results["floor"]

    def _stop_point(self, trainer, pl_module, phase: str) -> None:
        """Where a run stopped by a signal after its last batch saves its results and stops (see Preemption)."""
        preemption = getattr(pl_module, "preemption", None)
        if preemption is not None:
            preemption.checkpoint(trainer, phase, self._results)

    def _checked_apply(self, trainer, pl_module, masks) -> None:
        """Put an edit on the model during evaluation, a safe point to stop at."""
        self._stop_point(trainer, pl_module, "evaluation")
        self._apply(pl_module, masks)

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._take_saved(pl_module)  # a rerun of a run stopped after attribution (no epoch ran)
        self._apply(pl_module, None)
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast from rank 0: on every rank
        if not trainer.is_global_zero:
            return
        self._stop_point(trainer, pl_module, "writing")
        targets = pl_module.targets
        target = " + ".join(targets)
        scores = self._edit_scores(pl_module)
        self._write_scores(run_dir, trainer, pl_module, scores)
        located = self._localise(run_dir, trainer, pl_module, scores)
        edits = self._build_edits(pl_module)
        self._stop_point(trainer, pl_module, "writing")
        evaluable = self.evaluate and trainer.datamodule.prompt_templates is None
        search = None
        if self.evaluate_at == "floor" and evaluable:
            edits, search = self._search_floor(trainer, pl_module, edits)
        self._add_random(edits)
        report = {
            "concept": targets[0], "objective": pl_module.hparams.objective, "mode": self.mode, "scope": self.scope,
            "base_prompt": trainer.datamodule.base_prompt, "base_word": trainer.datamodule.base_word,
            "ratios": self.ratios, "evaluate_at": self.evaluate_at,
        }
        if len(targets) > 1:
            report.update(concepts=targets, multi_concept=self.multi_concept)
        report.update(located)
        if search is not None:
            report["search"] = search
        if "selective" in self.selections:
            report["collateral_space"] = self._space(scores)
            # in text space, whether the rows' changes were combined through their output gradients' correlation
            report["row_coupling"] = report["collateral_space"] == "text" and self.row_moments is not None
            report["rescored_at"] = self._rescore_stops() if self.rescore_every is not None else []
        if self.evaluate_at == "goal" and evaluable:
            # the edits are evaluated smallest first until one meets the goal; only those evaluated are written
            report.update(self._evaluate(run_dir, trainer, pl_module, edits))
            report["edits"] = self._write_edits(run_dir, pl_module, edits)
        else:
            report["edits"] = self._write_edits(run_dir, pl_module, edits)
            if self.evaluate:
                report.update(self._evaluate(run_dir, trainer, pl_module, edits, search))
        report["wall_time_s"] = time.perf_counter() - self._start
        write_json(run_dir / "report.json", report)
        write_text(run_dir / "report.md", markdown_report(report))
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
        weights = pl_module.model_folder / pl_module.backbone.part / "diffusion_pytorch_model.safetensors"
        meta = {
            "model": pl_module.model_id,
            "model_sha256": file_sha256(weights) if weights.is_file() else None,
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

    def _localise(self, run_dir: Path, trainer, pl_module, scores: dict[str, torch.Tensor]) -> dict:
        """Where the concept's attribution sits, by block and by kind, and its top weights: for the report, as
        ``localisation.png`` and as a TensorBoard figure."""
        levels, size = unet_levels(pl_module.backbone.denoiser)
        loc = localisation(scores, self.localise_top, levels, size)
        fig = localisation_figure(loc, " + ".join(f"'{c}'" for c in pl_module.targets))
        save_figure(fig, run_dir / "localisation.png")
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            experiment.add_figure("attribution/localisation", fig, 0)
        return {"localisation": loc, "top_components": top_components(scores, 20, levels, size)}

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

    def _add_random(self, edits: dict[str, dict[float, dict[str, torch.Tensor]]]) -> None:
        """The random control (draw 0) beside the edits, at every ratio they have (``random_at`` all) or the largest."""
        if "random" not in self.selections:
            return
        reference: dict[float, dict[str, torch.Tensor]] = {}
        for per_ratio in edits.values():  # a ratio's count is the same in every selection
            for r, m in per_ratio.items():
                reference.setdefault(r, m)
        if not reference:
            reference = {r: select_components(self.scores[next(iter(self.scores))], r, mode=self.mode, scope=self.scope)
                         for r in self.ratios}
        largest = max(reference)
        self._control_reference = {r: reference[r] for r in sorted(reference) if self.random_at == "all" or r == largest}
        edits["random"] = self._random_draw(0)

    def _search_floor(self, trainer, pl_module, edits):
        """Each selection's edits reduced to the smallest that reaches the floor (``evaluate_at`` floor); the
        search's record for the report: ``{selection: {"goal", "images", "found", "probes"}}``."""
        from cad_lightning.evaluation.edits import search_floor

        concept = pl_module.concepts[0]
        goal = self._floor(trainer, pl_module).get(concept, 0.0) + self.search_margin
        record, kept = {}, {}
        for selection, per_ratio in edits.items():
            found, probes = search_floor(
                pl_module.backbone, self._detector(pl_module), concept, per_ratio,
                lambda masks: self._checked_apply(trainer, pl_module, masks), goal, self.search_images, self.eval_batch_size,
                progress=bool(trainer.progress_bar_callback))
            chosen = found if found is not None else max(per_ratio)
            kept[selection] = {chosen: per_ratio[chosen]}
            record[selection] = {"goal": goal, "images": self.search_images, "found": found, "probes": probes}
        return kept, record

    def _detector(self, pl_module):
        if self._detector_cache is None:
            from cad_lightning.evaluation.classifier import load_concept_classifier

            self._detector_cache = load_concept_classifier(pl_module.model_folder)
        return self._detector_cache.to(pl_module.device)

    def _floor(self, trainer, pl_module) -> dict[str, float]:
        """The floor of every concept: how often the target prompts without the concept are drawn as it."""
        if self._floor_cache is None:
            from cad_lightning.evaluation.concepts import empty_prompt_rates, evaluation_items

            datamodule, targets = trainer.datamodule, pl_module.targets
            detector = self._detector(pl_module)
            if datamodule.base_word is None:
                self._floor_cache = empty_prompt_rates(pl_module.backbone, detector, datamodule.base_prompt,
                                                       self.floor_images)
            else:  # each target prompt without its concept; every target's floor from its own prompts
                rates = {}
                for concept in targets:
                    items = evaluation_items(concept, [], self.eval_target_images, 0)
                    base = [datamodule.base_for(item.prompt, concept) for item in items]
                    rates[concept] = empty_prompt_rates(pl_module.backbone, detector, base, self.floor_images)
                self._floor_cache = {**rates[targets[0]], **{c: r[c] for c, r in rates.items()}}
        return self._floor_cache

    def _goal_floor(self, pl_module, floor: dict[str, float]) -> float | dict[str, float] | None:
        """What an edit's target accuracy is read against: the target's floor, or each target's."""
        targets = pl_module.targets
        return floor.get(targets[0]) if len(targets) == 1 else {c: floor.get(c, 0.0) for c in targets}

    def _random_draw(self, draw: int) -> dict[float, dict[str, torch.Tensor]]:
        """Draw ``draw`` of the random control at every ratio that has one (draw 0 is the one written as edits).
        Each (draw, ratio) has its own seed, so a ratio's control does not depend on the other ratios asked for."""
        return {r: random_like(m, torch.Generator().manual_seed(draw * 1_000_003 + round(r * 1_000_000)))
                for r, m in self._control_reference.items()}

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

    @staticmethod
    def text_space_moment(pl_module) -> torch.Tensor:
        """C of the text-space collateral: the token embeddings' second moment over the prompts to preserve, the
        base prompt and the unconditional branch of guidance ("")."""
        datamodule = pl_module.trainer.datamodule
        prompts = list(dict.fromkeys([*datamodule.prompts_to_preserve(), datamodule.base_prompt, ""]))
        return token_second_moment(pl_module.backbone, prompts)

    def _text_space(self, pl_module, scores, ratios, initial=None) -> dict[float, dict[str, torch.Tensor]]:
        return text_space_selection(
            scores, self.sensitivity, {n: self._original[n] for n in scores}, self.text_space_moment(pl_module), ratios,
            step=self.selective_step or TEXT_SPACE_STEP, offset=self.collateral_offset, mode=self.mode,
            scope=self.scope, row_moments=self.row_moments, initial=initial)

    def _write_edits(self, run_dir: Path, pl_module, edits) -> list[dict]:
        written = []
        for selection, per_ratio in edits.items():
            for ratio, masks in per_ratio.items():
                stem = f"{selection}-{self.mode}-{ratio_tag(ratio)}"
                path = run_dir / "edits" / f"{stem}.safetensors"
                entry = {"selection": selection, "ratio": ratio, "ablated": count_ablated(masks),
                         "masks": str(path.relative_to(run_dir))}
                if pl_module.hparams.edit:
                    # the file holds the whole edit from the original model: the edit attributed on, then this one
                    masks = combine_masks(load_masks(pl_module.hparams.edit), masks)
                    entry["ablated_with_previous_edit"] = count_ablated(masks)
                save_masks(path, masks, metadata={"selection": selection, "mode": self.mode, "ratio": str(ratio),
                                                  "scope": self.scope, "concept": " + ".join(pl_module.targets)})
                if self.save_unet:
                    folder = run_dir / "edits" / stem / pl_module.backbone.part
                    save_edited_unet(pl_module.backbone.denoiser, masks, folder)
                    entry["unet"] = str(folder.relative_to(run_dir))
                written.append(entry)
        return written

    def _evaluate(self, run_dir: Path, trainer, pl_module, edits, search: dict | None = None) -> dict:
        from cad_lightning.evaluation.concepts import evaluation_items
        from cad_lightning.evaluation.edits import evaluate_edits, goal_met, read_against_controls

        datamodule = trainer.datamodule
        if datamodule.prompt_templates is not None:
            return {"evaluation": "skipped: the concept classifier reads only shapes-world concepts"}
        detector = self._detector(pl_module)
        backbone = pl_module.backbone
        targets, retained = pl_module.targets, datamodule.retain_concepts
        concept = targets[0] if len(targets) == 1 else targets
        items = evaluation_items(concept, retained, self.eval_target_images, self.eval_retain_images)
        floor = self._floor(trainer, pl_module)
        goal_floor = self._goal_floor(pl_module, floor)
        draws_only = {}  # further draws of the random control: only their retained images' SSIM is read
        if "random" in edits:
            draws_only = {f"random draw {d}": self._random_draw(d) for d in range(1, self.random_draws)}
        erase = self.mode == "erase"
        until = None
        if self.evaluate_at == "goal":  # ratio by ratio, smallest first, until an edit meets the goal
            until = lambda rows: goal_met(read_against_controls(rows, goal_floor, erase))  # noqa: E731
        before, results, images = evaluate_edits(
            backbone, detector, concept, retained, items, edits, lambda masks: self._checked_apply(trainer, pl_module, masks),
            self.eval_batch_size, progress=bool(trainer.progress_bar_callback), ssim_only=draws_only, until=until)
        results = read_against_controls(results, goal_floor, erase)
        for selection in list(edits):  # what was not evaluated is not written either
            edits[selection] = {r: m for r, m in edits[selection].items() if f"{selection} {r:g}" in images}
        # the grids show six target images (the first of each target in turn) and the last six (retained) images
        n = len(items)
        by_target = [[i for i, item in enumerate(items) if item.group == "target" and item.target == c] for c in targets]
        firsts = [i for column in itertools.zip_longest(*by_target) for i in column if i is not None][:6]
        show = list(dict.fromkeys([*firsts, *(n - 1 - i for i in range(min(6, n)))]))
        for selection in edits:
            keys = ["unedited"] + [f"{selection} {ratio:g}" for ratio in sorted(edits[selection])]
            rows = torch.cat([images[k][show] for k in keys])
            save_image(labelled_grid(rows, keys, ncol=len(show)), run_dir / "samples" / f"{selection}-{self.mode}.png")
            log_image(trainer.logger, f"samples/{selection}", image_grid(rows, ncol=len(show)), 0)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_scalar"):
            for r in results:
                step = round(r["ratio"] * 10_000)  # basis points of ablated components
                for key, tag in (("target", "target_accuracy"), ("retained_mean", "retained_mean_accuracy"),
                                 ("retained_min_relative", "retained_worst_relative"),
                                 ("other_words_relative", "other_words_relative"),
                                 ("retained_ssim", "retained_ssim"), ("retained_kid", "retained_kid")):
                    if r.get(key) is not None:
                        experiment.add_scalar(f"edit/{r['selection']}/{tag}", r[key], step)
                if len(targets) > 1:
                    for c, accuracy in r["targets"].items():
                        experiment.add_scalar(f"edit/{r['selection']}/target_accuracy/{c}", accuracy, step)
        plot_tradeoff(run_dir / "tradeoff.png", targets, before, floor, results, retained, search)
        return {"floor": floor, "before": before, "results": results,
                "eval": {"target_images": self.eval_target_images, "retain_images": self.eval_retain_images,
                         "sampler": backbone.sampler_settings()}}


def plot_tradeoff(path: Path, concept: str | list[str], before: dict, floor: dict[str, float] | float | None,
                  results: list[dict], retained: list[str], search: dict | None = None) -> None:
    """Ablated fraction → target accuracy (each target's, for several), mean retained accuracy and retained SSIM,
    one line per selection (and the floor search's probes of the target, when there was one); ``floor``: the
    floor of every concept (or the target's)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3, sharex=True)
    retained_before = sum(before[c] for c in retained if c in before) / max(1, sum(c in before for c in retained))
    targets = [concept] if isinstance(concept, str) else list(concept)
    floors = floor if isinstance(floor, dict) else {targets[0]: floor}
    for selection in dict.fromkeys(r["selection"] for r in results):
        rows = sorted((r for r in results if r["selection"] == selection), key=lambda r: r["ratio"])
        x = [0.0] + [r["ratio"] for r in rows]
        for n, c in enumerate(targets):
            accuracy = [r.get("targets", {}).get(c, r["target"]) for r in rows]
            axes[0].plot(x, [before[c]] + accuracy, marker="o", linestyle=("-", "--", ":", "-.")[n % 4],
                         label=selection if len(targets) == 1 else f"{selection}: {c}")
        axes[1].plot(x, [retained_before] + [r["retained_mean"] for r in rows], marker="o", label=selection)
        axes[2].plot(x, [1.0] + [r.get("retained_ssim", float("nan")) for r in rows], marker="o", label=selection)
    for selection, search in (search or {}).items():
        probes = search["probes"]
        axes[0].plot([p["ratio"] for p in probes], [p["target"] for p in probes], linestyle="none", marker="x",
                     label=f"{selection}: search probes")
    for n, c in enumerate(targets):
        if floors.get(c) is not None:
            axes[0].axhline(floors[c], color="grey", linestyle=("--", ":", "-.", "-")[n % 4],
                            label="floor (base prompt)" if len(targets) == 1 else f"floor: {c}")
    axes[0].set_title(f"target: {', '.join(targets)}")
    axes[1].set_title("retained concepts (mean)")
    axes[2].set_title("retained images: SSIM to unedited")
    for ax in axes:
        ax.set_xlabel("ablated fraction of components")
        ax.set_ylabel("classifier accuracy" if ax is not axes[2] else "SSIM (same seeds)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def markdown_report(report: dict) -> str:
    estimator = f" ({report['estimator']} estimator)" if "estimator" in report else ""
    targets = report.get("concepts", [report["concept"]])
    several = (f", one edit for {len(targets)} concepts (selection: {report['multi_concept']})"
               if len(targets) > 1 else "")
    lines = [f"# CAD {report['mode']} of {' and '.join(repr(c) for c in targets)}{estimator}{several}", "",
             f"objective: {report['objective']}, scope: {report['scope']}, "
             + (f"selective collateral measured in {report['collateral_space']} space"
                + (" (rows coupled by their output gradients' correlation)" if report.get("row_coupling") else "")
                + (f", grown on scores of the edited model from {', '.join(f'{r:g}' for r in report['rescored_at'])} on"
                   if report.get("rescored_at") else "")
                + ", " if "collateral_space" in report else "")
             + (
                 f"base prompt: '{report['base_prompt']}'" if report.get("base_word") is None else
                 f"base prompts: each prompt without {' or '.join(repr(c) for c in targets)}"
                 + ("" if report["base_word"] in ("auto", "") else f" ('{report['base_word']}' in its place)")), ""]
    if "results" in report:
        lines += ["; ".join(f"unedited accuracy on '{c}': {report['before'][c]:.3f}, floor (base prompts drawn as "
                            f"'{c}'): {report['floor'].get(c, float('nan')):.3f}" for c in targets), "",
                  "Every edit is evaluated on the same prompts, seeds and sampler noise as the unedited model. *other "
                  "words*: the target prompts' other named words still drawn, relative to unedited; *SSIM*, *KID*: "
                  "retained images against the unedited ones (KID ×1000 on the concept classifier's features); "
                  "*selective*: target ≤ floor + 0.05 (each target its own), retained and other words ≥ 0.90 of unedited, SSIM ≥ the "
                  "random control's of equal count (*random SSIM*: the mean over the control's draws).", "",
                  "| selection | ratio | ablated weights | target accuracy | drawn instead | retained mean | "
                  "worst retained / unedited | other words | SSIM | KID | random SSIM | selective |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            worst = _fmt(r["retained_min_relative"])
            if r.get("retained_worst") and r["retained_min_relative"] is not None and r["retained_min_relative"] < 1:
                worst += f" ({r['retained_worst']})"
            instead = ", ".join(f"{w} {v:.2f}" for w, v in list(r.get("drawn_instead", {}).items())[:2])
            flag = {True: "yes", False: "no", None: ""}[r.get("selective")]
            target = (f"{r['target']:.3f}" if len(targets) == 1 else
                      ", ".join(f"{c} {r['targets'][c]:.3f}" for c in targets))
            if len(targets) > 1:
                instead = "; ".join(f"{c}: " + ", ".join(f"{w} {v:.2f}" for w, v in list(d.items())[:2])
                                    for c, d in r.get("drawn_instead_by_target", {}).items())
            lines.append(f"| {r['selection']} | {r['ratio']:g} | {r['ablated']} | {target} | {instead} | "
                         f"{r['retained_mean']:.3f} | {worst} | {_fmt(r.get('other_words_relative'), '.2f')} | "
                         f"{_fmt(r.get('retained_ssim'))} | {_fmt(r.get('retained_kid'), '.2f')} | "
                         f"{_fmt(r.get('random_retained_ssim'))} | {flag} |")
        if report.get("evaluate_at") == "goal":
            evaluated = sorted({r["ratio"] for r in report["results"]})
            skipped = [r for r in report["ratios"] if r > max(evaluated, default=0.0)]
            met = sorted({r["ratio"] for r in report["results"] if r.get("selective")})
            lines += ["", "Edits evaluated smallest first until one met the goal (evaluate_at goal): "
                      + (f"{met[0]:g} meets it" if met else "none of the ratios meets it")
                      + (f"; {', '.join(f'{r:g}' for r in skipped)} neither evaluated nor written." if skipped else ".")]
        for selection, search in report.get("search", {}).items():
            found = search["found"]
            lines += ["", f"**{selection}: the smallest edit that reaches the floor** (goal: target ≤ floor + margin = "
                      f"{search['goal']:.3f} on {search['images']} images of the target prompts with other seeds than the "
                      "evaluation's; the edits are nested, so it is found by bisection): "
                      + (f"{found:g}, evaluated above." if found is not None else
                         f"none of the ratios reaches it; the largest, {max(p['ratio'] for p in search['probes']):g}, "
                         "is evaluated above."), "",
                      "| ratio | ablated weights | target accuracy (search prompts) | drawn instead | reaches the goal |",
                      "|---|---|---|---|---|"]
            for p in search["probes"]:
                instead = ", ".join(f"{w} {v:.2f}" for w, v in list(p["drawn_instead"].items())[:2])
                lines.append(f"| {p['ratio']:g} | {p['ablated']} | {p['target']:.3f} | {instead} | "
                             f"{'yes' if p['reached'] else 'no'} |")
        lines += ["", "![trade-off](tradeoff.png)", ""]
        lines += [f"![{s}](samples/{s}-{report['mode']}.png)" for s in dict.fromkeys(r["selection"] for r in report["results"])]
        lines += [""]
    else:
        lines += [str(report.get("evaluation", "not evaluated")), ""]
    lines += localisation_lines(report)
    lines += ["## Edits", ""] + [f"- `{e['masks']}` ({e['ablated']} weights)" for e in report["edits"]]
    return "\n".join(lines) + "\n"


def localisation_lines(report: dict) -> list[str]:
    """The report's section on where the concept's attribution sits (see attribution/localisation.py)."""
    loc = report.get("localisation")
    if loc is None:
        return []
    lines = ["## Where the concept lives", "",
             f"Shares of the top {loc['top_fraction']:.2%} of scored weights by score ({loc['k']} weights: *positive*, "
             "they induce the concept; *negative*, they suppress it), of their attribution mass, against the share of "
             "weights.", "", "![localisation](localisation.png)", ""]
    for key, title in (("by_block", "UNet block (latent resolution)"), ("by_kind", "component kind")):
        lines += [f"| {title} | weights | top-k positive mass | top-k negative mass |", "|---|---|---|---|"]
        lines += [f"| {g} | {v['weights']:.3f} | {v['positive']:.3f} | {v['negative']:.3f} |" for g, v in loc[key].items()]
        lines += [""]
    top = report.get("top_components", [])
    if top:
        lines += [f"The {len(top)} weights with the largest scores:", "", "| # | parameter | index | block | kind | score |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {i + 1} | `{r['parameter']}` | {tuple(r['index'])} | {r['block']} | {r['kind']} | {r['score']:.3g} |"
                  for i, r in enumerate(top)]
        lines += [""]
    return lines

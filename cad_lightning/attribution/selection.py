"""EditSelector: the edits of a first-order job from its scores, with the rounds that edit the model between epochs.

Plain torch, owned by :class:`cad_lightning.attribution.module.CADModule`, which calls it at its epoch
boundaries: :meth:`EditSelector.epoch_end` takes the reduced scores of an epoch (the first: the unedited
model's) and, for the ``iterative`` selection or a staged ``selective`` edit, grows the edit and puts it on the
model for the next epoch's scoring; :meth:`EditSelector.edits` selects every edit once the epochs are done.

Selections (``EditSettings.selections``):
- ``cad``: the paper's, one scoring of the unedited model, top components at each ratio;
- ``selective``: CAD's scores per unit of collateral, grown in rounds of ``selective_step``: each round takes the
  weights with the highest α / (the collateral they add to the edit so far + ``collateral_offset`` · its mean).
  The collateral is measured where ``collateral_space`` says: ``text`` (cross-attention keys and values only,
  cad_lightning/editing/text_space.py): exactly, as the change of the keys and values of every token of every
  prompt to preserve, weighted by the output sensitivity per row and by how the rows' output gradients
  correlate; ``states`` (any component, cad_lightning/editing/coherent.py): the output sensitivity of each
  weight plus the change it adds to the edit's damage on the states of ``collateral_runs`` preserved runs;
- ``retain``: scores adjusted to protect components that matter for retained concepts;
- ``iterative``: ablate ``iterative_step`` of the components, re-sample and re-score on the edited model,
  repeat up to the largest ratio (one epoch per round);
- ``random``: the control (drawn by the exam, cad_lightning/edit_outputs.py), not selected here.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from cad_lightning.editing import (
    combine_masks,
    count_ablated,
    joint_scores,
    retain_adjusted_scores,
    select_components,
    union_selection,
)
from cad_lightning.editing.coherent import GuidedChange, coherent_selection
from cad_lightning.editing.settings import EditSettings
from cad_lightning.editing.text_space import TEXT_SPACE_STEP, preserved_moment, reads_text_only, text_space_selection
from cad_lightning.errors import UserInputError

STATES_STEP = 0.02  # rounds with sampled states cost a forward and backward pass each

Masks = dict[str, torch.Tensor]  # {parameter name: (shape) bool, True = keep}
Edits = dict[str, dict[float, Masks]]  # {selection: {ratio: masks}}


class EditSelector:
    """The selection state of one job (see the module docstring).

    Args:
        settings: the edits to select.
        mode: ``erase`` (top positive scores) or ``amplify`` (top negative).
        targets: the concepts the edit is for (several: their joint scores).
    """

    def __init__(self, settings: EditSettings, mode: str, targets: list[str]) -> None:
        self.settings, self.mode, self.targets = settings, mode, list(targets)
        self.scores: dict[str, dict[str, torch.Tensor]] | None = None  # every concept's, of the unedited model
        self.sensitivity: Masks | None = None
        self.row_moments: Masks | None = None
        self.staged: dict[float, Masks] = {}  # the staged selective edit's masks, stage by stage
        self.keep: Masks | None = None  # the staged edit on the model
        self.iterative_masks: dict[float, Masks] = {}
        self.cumulative: Masks | None = None  # the iterative edit on the model
        self.original: dict[str, torch.Tensor] = {}
        self.apply: Callable[[Masks | None], None] = lambda masks: None  # see attach
        self._moment: torch.Tensor | None = None

    # --- the model's weights ------------------------------------------------------------------
    def attach(self, original: dict[str, torch.Tensor], apply: Callable[[Masks | None], None]) -> None:
        """The unedited weights of the scored components and the module's way of putting an edit on the model."""
        self.original, self.apply = original, apply

    def on_model(self) -> Masks | None:
        """The edit the next epoch scores on (None: the unedited model)."""
        return self.keep if self.settings.rescore_every is not None else self.cumulative

    def total_weights(self) -> int:
        return sum(t.numel() for t in self.original.values())

    # --- checks that need the model and data --------------------------------------------------
    def space(self, names) -> str:
        """The collateral space of the ``selective`` selection for the scored parameters ``names``."""
        wanted = self.settings.collateral_space
        text_only = all(reads_text_only(n) for n in names)
        if wanted == "text" and not text_only:
            other = next(n for n in names if not reads_text_only(n))
            raise UserInputError(
                f"model.editing.collateral_space 'text' measures collateral on the cross-attention keys and values "
                f"only, but '{other}' is scored too: use model.components [cross_attn_kv] or collateral_space 'states'.")
        if wanted == "auto":
            return "text" if text_only else "states"
        return wanted

    def check(self, names: list[str], datamodule) -> None:
        """Refuse settings the components or the data cannot serve, before any work."""
        selections = self.settings.selections
        if "retain" in selections and not (datamodule.retain_samples > 0 and datamodule.retain_concepts):
            raise UserInputError(
                "The 'retain' selection needs scores of retained concepts: set data.retain_samples > 0 "
                "and give data.retain_concepts (or use the shapes world's default).")
        if "selective" in selections:
            if not getattr(datamodule, "preserve_samples", 0) > 0:
                raise UserInputError(
                    "The 'selective' selection needs the output sensitivity on prompts to preserve: set "
                    "data.preserve_samples > 0 (the default config's: 32).")
            if self.space(names) != "text" and self.settings.rescore_every is not None:
                raise UserInputError("model.editing.rescore_every grows the edit in text space, where every scored "
                                     "component is a cross-attention key or value (model.components [cross_attn_kv]): "
                                     "set it to null for other components.")

    # --- per epoch ----------------------------------------------------------------------------
    def edit_scores(self, scores: dict[str, dict[str, torch.Tensor]] | None = None) -> Masks:
        """The scores an edit is selected on: the target's, or for several targets their joint scores."""
        scores = self.scores if scores is None else scores
        if len(self.targets) == 1:
            return scores[self.targets[0]]
        return joint_scores([scores[c] for c in self.targets], self.mode)

    def epoch_end(self, epoch: int, scores: dict[str, dict[str, torch.Tensor]], sensitivity, row_moments,
                  moment: Callable[[], torch.Tensor]) -> None:
        """Take an epoch's reduced scores; for the rounds that edit the model, grow the edit and put it on the
        model for the next epoch. ``moment()``: the preserved prompts' text moment (text space)."""
        if epoch == 0:
            self.scores, self.sensitivity, self.row_moments = scores, sensitivity, row_moments
        if "iterative" in self.settings.selections:
            target = self.settings.iterative_schedule[epoch]
            step_masks = self._select_increment(self.edit_scores(scores), target)
            self.cumulative = step_masks if self.cumulative is None else combine_masks(self.cumulative, step_masks)
            if any(math.isclose(target, r) for r in self.settings.ratios):
                self.iterative_masks[target] = {k: v.clone() for k, v in self.cumulative.items()}
            self.apply(self.cumulative)
        if self.settings.rescore_every is not None:
            self._stage(epoch, self.edit_scores(scores), moment)

    def _select_increment(self, scores: Masks, target: float) -> Masks:
        """Masks ablating (target − already ablated) of all weights among those not yet ablated."""
        already = 0 if self.cumulative is None else count_ablated(self.cumulative)
        missing = round(target * self.total_weights()) - already
        if missing <= 0:
            return {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
        ablated = None if self.cumulative is None else {k: ~v for k, v in self.cumulative.items()}
        return select_components(scores, missing / self.total_weights(), mode=self.mode, scope=self.settings.scope,
                                 exclude=ablated)

    def _stage(self, epoch: int, scores: Masks, moment) -> None:
        """Grow the staged ``selective`` edit from the last stop to the next on this epoch's scores, keep the masks
        of the ratios on the way, and put the edit on the model for the next epoch's scoring."""
        stops, ratios = self.settings.rescore_stops, self.settings.ratios
        low = stops[epoch - 1] if epoch > 0 else 0.0
        high = stops[epoch] if epoch < len(stops) else max(ratios)
        wanted = sorted({r for r in ratios if low < r <= high} | {high})
        grown = self.text_space(scores, wanted, moment, initial=self.keep)
        self.staged.update({r: m for r, m in grown.items() if r in ratios})
        self.keep = grown[high]
        if epoch < len(stops):
            self.apply(self.keep)

    # --- the edits ----------------------------------------------------------------------------
    def edits(self, backbone, preserve: list[dict], moment: Callable[[], torch.Tensor], hparams,
              progress: bool = True) -> Edits:
        """Every selection's edits at every ratio (``random`` is the exam's). ``preserve``: the preserved runs
        (items with prompt and seed) of the ``states`` collateral; ``hparams``: the module's sampler settings."""
        scores = self.edit_scores()
        s = self.settings
        out: Edits = {}
        for selection in s.selections:
            if selection == "iterative":
                out["iterative"] = self.iterative_masks
            elif selection == "random":
                continue
            elif selection == "selective":
                out[selection] = self._selective(backbone, scores, preserve, moment, hparams, progress)
            elif selection == "cad" and len(self.targets) > 1 and s.multi_concept == "union":
                per_concept = [self.scores[c] for c in self.targets]
                out[selection] = {r: union_selection(per_concept, r, mode=self.mode, scope=s.scope) for r in s.ratios}
            else:
                source = scores
                if selection == "retain":
                    retained = [c for c in self.scores if c not in self.targets]
                    source = retain_adjusted_scores(scores, [self.scores[c] for c in retained],
                                                    weight=s.retain_weight, mode=self.mode)
                out[selection] = {r: select_components(source, r, mode=self.mode, scope=s.scope) for r in s.ratios}
        return out

    def _selective(self, backbone, scores: Masks, preserve, moment, hparams, progress: bool) -> dict[float, Masks]:
        """The ``selective`` edits: grown in rounds, each charged with the collateral it adds (in text space,
        editing/text_space.py, or on sampled states, editing/coherent.py)."""
        s = self.settings
        if s.rescore_every is not None:
            return self.staged  # grown stage by stage as the epochs ended
        if self.space(scores) == "text":
            return self.text_space(scores, s.ratios, moment)
        params = dict(backbone.denoiser.named_parameters())  # live: the rounds differentiate through them
        preserve = preserve[: s.collateral_runs]
        collateral = GuidedChange(backbone, [i["prompt"] for i in preserve], [int(i["seed"]) for i in preserve],
                                  guidance_scale=hparams.guidance_scale, num_inference_steps=hparams.num_inference_steps)
        return coherent_selection(
            scores, self.sensitivity, {n: params[n] for n in scores}, collateral, s.ratios,
            step=s.selective_step or STATES_STEP, offset=s.collateral_offset, mode=self.mode, scope=s.scope,
            progress=lambda rounds: tqdm(rounds, desc="selective edit rounds", leave=False, disable=not progress))

    def text_space(self, scores: Masks, ratios, moment: Callable[[], torch.Tensor],
                   initial: Masks | None = None) -> dict[float, Masks]:
        s = self.settings
        if self._moment is None:  # the prompts' embeddings: the same in every stage (no edit changes them)
            self._moment = moment()
        return text_space_selection(
            scores, self.sensitivity, {n: self.original[n] for n in scores}, self._moment, ratios,
            step=s.selective_step or TEXT_SPACE_STEP, offset=s.collateral_offset, mode=self.mode,
            scope=s.scope, row_moments=self.row_moments, initial=initial)

    # --- a stopped run ------------------------------------------------------------------------
    def results(self) -> dict:
        """What the edits are made from (saved when a run is stopped, see cad_lightning/preemption.py)."""
        return {"scores": self.scores, "sensitivity": self.sensitivity, "row_moments": self.row_moments,
                "staged": self.staged, "keep": self.keep, "iterative": self.iterative_masks,
                "cumulative": self.cumulative}

    def take_results(self, results: dict) -> None:
        self.scores, self.sensitivity, self.row_moments = results["scores"], results["sensitivity"], results["row_moments"]
        self.staged, self.keep = results["staged"], results["keep"]
        self.iterative_masks, self.cumulative = results["iterative"], results["cumulative"]


def moment_of(backbone, datamodule) -> Callable[[], torch.Tensor]:
    """The text moment of the data's prompts to preserve (computed when asked)."""
    return lambda: preserved_moment(backbone, datamodule.prompts_to_preserve(), datamodule.base_prompt)

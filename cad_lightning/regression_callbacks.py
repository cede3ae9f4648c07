"""Callbacks of the regression estimator and of the fidelity check of first-order scores.

- :class:`RegressionWriter`: at the end of ``fit``, gathers the mask scores of all ranks, fits the linear
  model (scikit-learn ridge or lasso with cross-validated strength; streaming normal equations when the mask
  matrix is too big to hold), writes α in the format of the first-order scores, the meta data and the
  fidelity on the held-out masks; with ``ratios``, also the edits of the fitted α (the text-space rounds of
  the selective edits, rows weighed by their measured ablations, or the top components), random controls,
  their evaluation and the report, as the first-order writer does.
- :class:`FirstOrderFidelity`: in a first-order job, measures how well the first-order
  scores predict the effect of random per-weight ablations.

Artifacts (run directory ``trainer.log_dir``, every file written atomically):
``attribution/scores.safetensors`` — per-weight α keyed by parameter name, fp32, each of its parameter's shape:
a component's coefficient spread over its weights (evenly, or for key/value rows by each weight's share of the
row's change on the concept's tokens: ``spread``), so Σ α over a component's weights is its coefficient
(the effect on the score of keeping it, i.e. the drop when it is ablated: positive = the component carries the
concept, the sign of the first-order scores); ``attribution/component_scores.safetensors`` — the coefficients
per component (``coefficients``, (n_components,)); ``attribution/meta.json`` — estimator, intercept, strength,
fit statistics and the component layout; ``attribution/fidelity.json`` and ``fidelity.png``.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from safetensors.torch import save_file

from cad_lightning.attribution.fidelity import correlations, first_order_fidelity, write_fidelity
from cad_lightning.attribution.linear_fit import fit_linear
from cad_lightning.attribution.mask_scores import ablation_damage
from cad_lightning.attribution.objectives import EraseObjective
from cad_lightning.choices import (
    RegressionEvaluateAt,
    RegressionMethod,
    RegressionSelection,
    RowWeights,
    Spread,
    check_choice,
)
from cad_lightning.edit_outputs import EditOutputs, run_seed
from cad_lightning.editing.coherent import rescore_stops
from cad_lightning.editing.select import count_ablated, select_components
from cad_lightning.editing.text_space import (TEXT_SPACE_STEP, concept_difference, measured_sensitivity, preserved_moment,
                                             reads_text_only, spread_over_text, text_space_selection,
                                             uniform_sensitivity)
from cad_lightning.errors import UserInputError
from cad_lightning.utils import atomic_path, write_json


class RegressionWriter(Callback):
    """Fits the linear attribution model at the end of a regression ``fit`` and writes its artifacts.

    Args:
        method: ``ridge`` (RidgeCV, leave-one-out over ``strengths``) or ``lasso`` (LassoCV, k-fold).
        strengths: regularisation strengths to cross-validate (default: 19 values from 1e-2 to 1e4).
        folds: folds of LassoCV and of the streaming ridge solver.
        dense_limit: the largest mask matrix (masks × components entries) fitted densely; beyond it ridge runs
            on streaming normal equations.
        ratios: if given, the edits of the fitted α, one per ratio (that fraction of the component weights), written
            as ``edits/regression-<mode>-<ratio>`` beside a random control with the same counts, evaluated with
            the model's concept classifier and reported in ``report.json`` / ``report.md`` / ``tradeoff.png``.
        spread: how a component's coefficient becomes per-weight scores: ``even`` (the same share for each of
            its weights) or ``text`` (rows of cross-attention keys/values only: each weight's share of the row's
            change on the concept's tokens, ``editing.text_space.spread_over_text``); ``auto``: ``text`` where
            every component is such a row, else ``even``.
        selection: ``top`` (the components with the largest coefficient per weight, global ranking, whole
            components but the last; the most negative for amplify) or ``selective`` (``text`` spread only: the
            text-space rounds of the first-order ``selective`` edits, each weight charged the exact change it
            makes to the keys and values of the prompts to preserve, each row weighed by ``row_weights``);
            ``auto``: ``selective`` with the ``text`` spread, else ``top``.
        row_weights: how the ``selective`` rounds weigh a row's change in text space against another's:
            ``ablation`` (each row ablated alone on the unmasked model's runs of ``damage_prompts`` prompts to
            preserve and of the empty prompt: how far it moves their predictions, per unit of its change in text
            space; one UNet pass per state and row, no gradient) or ``uniform`` (every row the same).
        damage_prompts: prompts to preserve that ``row_weights ablation`` samples (besides the empty prompt).
        collateral_offset: as in ``EditSettings``, for the ``selective`` selection.
        min_spearman: the held-out Spearman correlation below which the fit is reported as too poor to trust
            (a warning with the held-out numbers and ``"trusted": false`` in ``fidelity.json``).
        random_draws: random controls evaluated per ratio for ``selective`` edits (draw 0 written as the edit
            ``random``; the edits are read against the mean SSIM of the draws), as in ``ExamSettings``;
            ``top`` edits have one control of random whole components.
        evaluate_at: ``all`` (every ratio's edit) or ``goal`` (smallest first, each beside its control, until one
            meets the selective-edit goal; the larger are neither evaluated nor written), as in ``ExamSettings``.
        rescore_every: the ``selective`` edit in stages, as ``AttributionWriter``'s: after each ``rescore_every``
            of the K/V weights the edit so far is put on the model, every mask is scored again on the edited model
            (one more epoch, on the unedited model's states and concept direction: how much of the concept as
            the unedited model draws it is left; the scores in a store of their own), the linear model is fitted
            again and the edit grows on its coefficients, charged with the collateral of all of it. The
            attribution written (scores, fidelity) is the first fit's, of the unedited model; each stage's fit
            and held-out correlations are in ``meta.json`` and ``report.json`` (``stages``). None, or no
            ``ratios``: one fit.
        random_control / save_unet / evaluate / eval_target_images / eval_retain_images / floor_images /
            eval_batch_size: as in ``AttributionWriter``.
    """

    def __init__(self, method: RegressionMethod = "ridge", strengths: list[float] | None = None, folds: int = 5,
                 dense_limit: int = 50_000_000, ratios: list[float] | None = None, random_control: bool = True,
                 save_unet: bool = True, evaluate: bool = True, eval_target_images: int = 32,
                 eval_retain_images: int = 64, floor_images: int = 64, eval_batch_size: int = 96,
                 min_spearman: float = 0.6, spread: Spread = "auto", selection: RegressionSelection = "auto",
                 collateral_offset: float = 0.03, row_weights: RowWeights = "ablation", damage_prompts: int = 7,
                 random_draws: int = 3, evaluate_at: RegressionEvaluateAt = "all", rescore_every: float | None = None) -> None:
        super().__init__()
        if rescore_every is not None:
            if isinstance(rescore_every, bool) or not (isinstance(rescore_every, (int, float)) and 0 < rescore_every < 1):
                raise UserInputError(f"RegressionWriter rescore_every must be in (0, 1) or null, got {rescore_every!r}.")
            if selection == "top":
                raise UserInputError("RegressionWriter rescore_every grows the 'selective' edit in text space: use "
                                     "selection selective (or auto), or set rescore_every to null.")
        self.rescore_every = None if rescore_every is None else float(rescore_every)
        self._keep: dict[str, torch.Tensor] | None = None  # the staged edit so far (True = keep)
        self._staged: dict[float, dict[str, torch.Tensor]] = {}  # its masks at the ratios on the way
        self._stages: list[dict] = []  # each fit's record: where it was made, its held-out correlations
        self._first = None  # the first fit (of the unedited model) and its per-weight scores
        self._selection_inputs = None  # the unedited weights, the preserved moment and the rows' sensitivity
        check_choice("RegressionWriter", "row_weights", row_weights, RowWeights)
        if damage_prompts < 1:
            raise UserInputError(f"RegressionWriter damage_prompts must be at least 1, got {damage_prompts}.")
        self.row_weights, self.damage_prompts = row_weights, damage_prompts
        check_choice("RegressionWriter", "spread", spread, Spread)
        check_choice("RegressionWriter", "selection", selection, RegressionSelection)
        if selection == "selective" and spread == "even":
            raise UserInputError("RegressionWriter selection 'selective' charges each weight its own collateral and "
                                 "needs per-weight scores: use spread text (or auto).")
        self.spread, self.selection = spread, selection
        if not -1 <= min_spearman <= 1:
            raise UserInputError(f"RegressionWriter min_spearman must be in [-1, 1], got {min_spearman}.")
        self.min_spearman = min_spearman
        self.random_control = random_control
        if not collateral_offset >= 0:
            raise UserInputError(f"RegressionWriter collateral_offset must be 0 or more, got {collateral_offset}.")
        self.collateral_offset = float(collateral_offset)
        check_choice("RegressionWriter", "evaluate_at", evaluate_at, RegressionEvaluateAt)
        # the random controls, evaluation, edit files and report of the edits, as for first-order edits
        self.outputs = None if ratios is None else EditOutputs(
            "RegressionWriter", ratios, random_draws=random_draws, evaluate_at=evaluate_at, save_unet=save_unet,
            evaluate=evaluate, eval_target_images=eval_target_images, eval_retain_images=eval_retain_images,
            floor_images=floor_images, eval_batch_size=eval_batch_size)
        check_choice("RegressionWriter", "method", method, RegressionMethod)
        if strengths is not None and (not strengths or any(not s > 0 for s in strengths)):
            raise UserInputError(f"RegressionWriter strengths must be positive numbers, got {strengths}.")
        if folds < 2:
            raise UserInputError(f"RegressionWriter folds must be at least 2, got {folds}.")
        self.method, self.strengths, self.folds, self.dense_limit = method, strengths, folds, dense_limit
        self.fit = None
        self._start = 0.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "estimator", None) != "regression":
            raise UserInputError("RegressionWriter needs model.class_path cad_lightning.attribution.regression.RegressionCADModule.")
        self._start = time.perf_counter()
        text_rows = pl_module.layout.granularity == "neuron" and all(reads_text_only(n) for n in pl_module.component_names)
        if self.spread == "text" and not text_rows:
            raise UserInputError("RegressionWriter spread 'text' needs neuron components of the cross-attention keys and "
                                 "values only (model.components [cross_attn_kv], model.granularity neuron).")
        self._spread = ("text" if text_rows else "even") if self.spread == "auto" else self.spread
        self._selection = ("selective" if self._spread == "text" else "top") if self.selection == "auto" else self.selection
        if self._selection == "selective" and self._spread != "text":
            raise UserInputError("RegressionWriter selection 'selective' needs the text spread (cross-attention key/value "
                                 "neurons); use selection top.")
        if self.outputs is not None and stage == "fit":
            # the control of selective edits: random weights in the same rows, as first-order's (with its further
            # draws); of top edits: one draw of random whole components
            self.outputs.scope = "matrix" if self._selection == "selective" else "global"
            if self._selection != "selective":
                self.outputs.random_draws = 1
            mode = "erase" if pl_module.hparams.objective == "erase" else "amplify"
            self.outputs.prepare(pl_module, trainer.datamodule, mode)
        if self.rescore_every is not None and self.outputs is not None and stage == "fit":
            if self._selection != "selective":
                raise UserInputError("RegressionWriter rescore_every grows the 'selective' edit in text space, where "
                                     "every component is a cross-attention key/value row (model.components "
                                     "[cross_attn_kv], model.granularity neuron): set it to null for other components.")
        if stage == "fit" and trainer.max_epochs != self.trainer_arguments["max_epochs"]:
            epochs = self.trainer_arguments["max_epochs"]
            raise UserInputError(
                f"RegressionWriter scores the masks in {epochs} epoch(s) (one per stage of rescore_every), but "
                f"trainer.max_epochs is {trainer.max_epochs}: build the Trainer with max_epochs={epochs} (cad fit sets it).")

    @property
    def trainer_arguments(self) -> dict:
        """The Trainer settings this writer's stages need (applied by ``cad fit`` before the Trainer is built)."""
        return {"max_epochs": 1 + len(self._stops())}

    def _stops(self) -> list[float]:
        """The ratios at which the staged edit is put on the model and the masks scored again."""
        if self.rescore_every is None or self.outputs is None:  # no ratios: no edits to stage
            return []
        return rescore_stops(self.rescore_every, max(self.outputs.ratios))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.outputs is not None:  # the module keeps the original component weights, which the edits are put on
            pl_module.keep_original_weights()

    def _fit_stage(self, trainer, pl_module) -> dict | None:
        """Gather the masks' scores of every rank (a collective) and, on rank 0, fit the linear model: ``{"fit",
        "y", "heldout": (predicted, measured) or None, "record"}`` (None on the other ranks)."""
        scores = pl_module.gathered_scores()
        if not trainer.is_global_zero:
            return None
        datamodule = trainer.datamodule
        train_ids, heldout_ids = datamodule.train_ids(), datamodule.heldout_ids()
        missing = [i for i in train_ids + heldout_ids if i not in scores]
        if missing:
            raise RuntimeError(f"{len(missing)} masks have no score (first missing id {missing[0]}); the run did not finish.")
        y = [scores[i] for i in train_ids]
        fit = fit_linear(pl_module.masks, train_ids, y, self.method, self.strengths, self.folds, self.dense_limit)
        heldout = None
        record = {"stage": pl_module.scoring_stage, "at": ([0.0, *self._stops()])[pl_module.scoring_stage],
                  "store": str(pl_module.store.folder), "train_r2": fit.train_r2, "strength": fit.strength,
                  "score_mean": float(np.mean(y))}
        if heldout_ids:
            heldout = (fit.predict(pl_module.masks(heldout_ids).numpy()), [scores[i] for i in heldout_ids])
            record.update(correlations(*heldout))
        self._stages.append(record)
        return {"fit": fit, "y": y, "heldout": heldout, "record": record}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        """A staged edit: fit on this epoch's scores, grow the edit to the next stop, put it on the model (every
        rank) and start the next stage's scoring."""
        epoch, stops = trainer.current_epoch, self._stops()
        if epoch >= len(stops):
            return  # the last (or only) fit is on_train_end's
        result = self._fit_stage(trainer, pl_module)
        keep = None
        if trainer.is_global_zero:
            per_weight = self._per_weight(pl_module, trainer.datamodule, result["fit"])
            if epoch == 0:
                self._first = (result, per_weight)
            low, high = stops[epoch - 1] if epoch > 0 else 0.0, stops[epoch]
            grown = self._grow(pl_module, trainer.datamodule, per_weight, low, high)
            keep = grown[high]
            rank_zero_info(f"Staged edit of '{pl_module.concepts[0]}' at {high:g} of the K/V weights put on the model; "
                           f"its masks are scored again (fit {epoch}: held-out Spearman "
                           f"{result['record'].get('spearman', float('nan')):.3f})")
        keep = trainer.strategy.broadcast(keep, src=0)
        self._keep = keep
        # the next stage scores on the unedited model's states: sampled now, before the first edit goes on, where
        # the first stage found every score in the store (later stages: already there)
        runs = trainer.datamodule.items()
        pl_module.prepare_inputs([r["prompt"] for r in runs], [int(r["seed"]) for r in runs],
                                 [r["base_prompt"] for r in runs])
        pl_module.begin_stage(epoch + 1, keep)  # the module puts the edit on and scores the masks again

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        result = self._fit_stage(trainer, pl_module)  # a collective: every rank takes part
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast from rank 0: on every rank
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        if self._first is not None:
            # staged: the last fit's scores, spread on the edited weights; then the edit comes off the model, so the
            # floor and the evaluation read the unedited one
            last = self._per_weight(pl_module, datamodule, result["fit"])
            pl_module.apply_edit(None)
            first, per_weight = self._first
        else:
            last, first = None, result
            per_weight = self._per_weight(pl_module, datamodule, result["fit"])
        fit, y = first["fit"], first["y"]
        self.fit = fit
        layout = pl_module.layout
        attribution = run_dir / "attribution"
        concept = pl_module.concepts[0]
        with atomic_path(attribution / "scores.safetensors") as tmp:
            save_file(per_weight, str(tmp), metadata={"concept": concept})
        with atomic_path(attribution / "component_scores.safetensors") as tmp:
            save_file({"coefficients": torch.from_numpy(fit.coef).float().contiguous()}, str(tmp),
                      metadata={"concept": concept, "granularity": layout.granularity})
        record = {"estimator": "regression", "score": pl_module.hparams.score, "granularity": layout.granularity,
                  "keep_prob": datamodule.keep_prob}  # fidelity of the components' coefficients (any spread)
        if first["heldout"] is not None:
            predicted, held = first["heldout"]
            record["min_spearman"] = self.min_spearman
            record = write_fidelity(run_dir, record, predicted, held, trainer.logger,
                                    xlabel="predicted score", ylabel=f"measured score ({pl_module.hparams.score})")
            if not record["trusted"]:
                rank_zero_warn(
                    f"The linear fit of '{pl_module.concepts[0]}' predicts its {len(held)} held-out masks poorly "
                    f"(Spearman {record['spearman']:.3f}, Pearson {record['pearson']:.3f}; trusted from "
                    f"{self.min_spearman}): its coefficients and edits are not to be trusted. More masks "
                    "(data.masks), more runs per mask (data.samples) or fewer components (a coarser granularity) "
                    "give a closer fit.")
        self._write_meta(attribution, trainer, pl_module, fit, y, record if first["heldout"] is not None else None)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"regression/train_r2": fit.train_r2, "regression/fit_time_s": fit.fit_time_s}, step=0)
            for stage in self._stages[1:]:
                if "spearman" in stage:
                    trainer.logger.log_metrics({"regression/stage_spearman": stage["spearman"]}, step=stage["stage"])
        if self.outputs is not None:
            self._edit(run_dir, trainer, pl_module, per_weight, last)
        rank_zero_info(f"Regression attribution of '{concept}' written to {run_dir} (fit {fit.fit_time_s:.2f} s"
              + (f", held-out Spearman {record['spearman']:.3f})" if first["heldout"] is not None else ")"))

    def _per_weight(self, pl_module, datamodule, fit) -> dict[str, torch.Tensor]:
        """A fit's coefficients as per-weight scores (``spread``), on the model's weights as they are now."""
        if self._spread == "text":
            return self._text_spread(pl_module, datamodule, fit.coef)
        return pl_module.layout.to_parameter_scores(torch.from_numpy(fit.coef))

    def _inputs_of_selection(self, pl_module, datamodule):
        """The unedited weights, the preserved prompts' second moment and the rows' sensitivity the ``selective``
        rounds charge collateral with, measured once on the unedited model."""
        if self._selection_inputs is None:
            original = {n: pl_module.original_weights[n] for n in pl_module.component_names}
            moment = preserved_moment(pl_module.backbone, datamodule.prompts_to_preserve(), datamodule.base_prompt)
            sensitivity = (measured_sensitivity(original, moment, self._row_damage(pl_module, datamodule))
                           if self.row_weights == "ablation" else uniform_sensitivity(original, moment))
            self._selection_inputs = (original, moment, sensitivity)
        return self._selection_inputs

    def _grow(self, pl_module, datamodule, scores, low: float, high: float) -> dict[float, dict[str, torch.Tensor]]:
        """The staged edit grown from ``low`` (``self._keep``) to ``high`` on ``scores``; keeps the masks of the
        ratios on the way."""
        original, moment, sensitivity = self._inputs_of_selection(pl_module, datamodule)
        ratios = self.outputs.ratios
        wanted = sorted({r for r in ratios if low < r <= high} | {high})
        grown = text_space_selection(scores, sensitivity, original, moment, wanted, step=TEXT_SPACE_STEP,
                                     offset=self.collateral_offset, mode=self.outputs.mode, scope=self.outputs.scope,
                                     initial=self._keep)
        self._staged.update({r: m for r, m in grown.items() if r in ratios})
        return grown

    def _edit(self, run_dir: Path, trainer, pl_module, scores: dict[str, torch.Tensor],
              staged_scores: dict[str, torch.Tensor] | None = None) -> None:
        """The edits of ``scores`` (the first fit's), or with stages, the staged edit grown to the largest ratio
        on the last fit's ``staged_scores``."""
        outputs, datamodule, ratios = self.outputs, trainer.datamodule, self.outputs.ratios
        if staged_scores is not None:
            stops = self._stops()
            self._grow(pl_module, datamodule, staged_scores, stops[-1], max(ratios))
            edits = {"regression": {r: self._staged[r] for r in ratios}}
        elif self._selection == "selective":  # no gradient passes: rows weighed by their measured ablations, or equally
            original, moment, sensitivity = self._inputs_of_selection(pl_module, datamodule)
            edits = {"regression": text_space_selection(
                scores, sensitivity, original, moment, ratios, step=TEXT_SPACE_STEP, offset=self.collateral_offset,
                mode=outputs.mode, scope=outputs.scope)}
        else:
            edits = {"regression": {r: select_components(scores, r, mode=outputs.mode, scope=outputs.scope)
                                    for r in ratios}}
            if self.random_control:  # the control ablates what the edit ablates in kind: whole components
                edits["random"] = self._random_components(pl_module.layout, edits["regression"], ratios)
        report = {
            "concept": pl_module.concepts[0], "estimator": "regression", "objective": pl_module.hparams.objective,
            "mode": outputs.mode, "scope": outputs.scope, "granularity": pl_module.layout.granularity,
            "spread": self._spread, "selection": self._selection,
            **({"row_weights": self.row_weights} if self._selection == "selective" else {}),
            "base_prompt": datamodule.base_prompt, "base_word": datamodule.base_word, "ratios": ratios,
            "evaluate_at": outputs.evaluate_at, "rescored_at": self._stops(), "stages": self._stages,
        }
        report.update(outputs.localise(run_dir, trainer, pl_module, scores))  # each weight: its component's share
        outputs.emit(run_dir, trainer, pl_module, edits, report,
                     apply=pl_module.apply_edit,
                     random=self._selection == "selective" and self.random_control, start=self._start)

    def _row_damage(self, pl_module, datamodule) -> dict[str, torch.Tensor]:
        """Per K/V matrix, how far ablating each of its rows alone moves the predictions of the unmasked model's
        runs of the empty prompt and of ``damage_prompts`` prompts to preserve, evenly spaced in their list."""
        preserve = [p for p in datamodule.prompts_to_preserve() if p]
        step = max(1, len(preserve) // self.damage_prompts)
        prompts = ["", *preserve[::step][: self.damage_prompts]]
        seeds = [datamodule.seed + k for k in range(len(prompts))]
        h, backbone, layout = pl_module.hparams, pl_module.backbone, pl_module.layout
        start = time.perf_counter()
        # the states of their sampling runs, as the concept's own are sampled (the same sampler settings)
        states = EraseObjective(guidance_scale=h.guidance_scale, num_inference_steps=h.num_inference_steps).inputs(
            backbone, prompts, seeds)
        damage = ablation_damage(backbone, states.x_t, states.t, states.text, layout, h.chunk_size)
        rank_zero_info(f"Row weights of the selective edits: {layout.n_components} rows ablated one by one on "
                       f"{states.x_t.shape[0]} states of {len(prompts)} prompts to preserve in "
                       f"{time.perf_counter() - start:.0f} s")
        return {b.name: damage[b.offset : b.offset + b.size] for b in layout.blocks}

    @staticmethod
    def _text_spread(pl_module, datamodule, coefficients) -> dict[str, torch.Tensor]:
        """Per-weight scores: each K/V row's coefficient over its weights by their share of the row's change on
        the concept's tokens (the prompts every mask was scored on, against their base prompts)."""
        layout = pl_module.layout
        items = datamodule.items()
        difference = concept_difference(pl_module.backbone, [i["prompt"] for i in items],
                                        [i["base_prompt"] for i in items])
        params = dict(pl_module.backbone.denoiser.named_parameters())
        rows = {b.name: torch.from_numpy(coefficients[b.offset : b.offset + b.size]) for b in layout.blocks}
        return spread_over_text(rows, {n: params[n] for n in rows}, difference)

    @staticmethod
    def _random_components(layout, reference: dict, ratios: list[float]) -> dict:
        """Per ratio, masks ablating random components (drawn from the run's seed, uniform over components) with
        as many weights as the reference edit (whole components but the last)."""
        generator = torch.Generator().manual_seed(run_seed())
        draw = torch.rand(1, layout.n_components, generator=generator, dtype=torch.float64) + 1e-3
        scores = {b.name: layout.expand(b, draw[:, b.offset : b.offset + b.size])[0].float().contiguous()
                  for b in layout.blocks}
        total = sum(t.numel() for t in scores.values())
        out = {}
        for ratio in ratios:
            k = count_ablated(reference[ratio])
            out[ratio] = (select_components(scores, k / total, mode="erase", scope="global") if k
                          else {n: torch.ones_like(t, dtype=torch.bool) for n, t in scores.items()})
        return out

    def _write_meta(self, attribution: Path, trainer, pl_module, fit, y, fidelity) -> None:
        datamodule = trainer.datamodule
        h = pl_module.hparams
        meta = {
            "model": pl_module.model_id,
            "model_sha256": pl_module.weights_sha256(),
            "concept": pl_module.concepts[0],
            "base_prompt": datamodule.base_prompt,
            "estimator": "regression",
            "objective": h.objective,
            "score_kind": h.score,
            "score": "alpha: per-component coefficients of a linear model of the concept score on keep-masks (1 = keep), "
                     + ("each spread over its K/V row's weights by their share of the row's change on the concept's "
                        "tokens" if self._spread == "text" else "each spread evenly over its component's weights"),
            "components": {"patterns": pl_module.space.patterns, "parameters": pl_module.component_names,
                           "weights": sum(int(np.prod(b.shape)) for b in pl_module.layout.blocks)},
            "granularity": h.granularity,
            "spread": self._spread,
            "layout": pl_module.layout.describe(),
            "masks": {"train": len(y), "heldout": len(datamodule.heldout_ids()), "keep_prob": datamodule.keep_prob,
                      "mask_seed": datamodule.mask_seed, "computed_this_run": int(pl_module.computed),
                      "store": str(pl_module.store.folder)},
            "items": len(datamodule.items()),
            "seeds": [i["seed"] for i in datamodule.items()],
            "sampler": pl_module.backbone.sampler_settings(h.num_inference_steps, h.guidance_scale),
            "fit": {"method": fit.method, "solver": fit.solver, "strength": fit.strength, "intercept": fit.intercept,
                    "train_r2": fit.train_r2, "fit_time_s": fit.fit_time_s, "score_mean": float(np.mean(y)),
                    "score_std": float(np.std(y)), **fit.details},
            "fidelity": fidelity,
            "edit_applied_before": h.edit,
            "rescore_every": self.rescore_every,
            "stages": self._stages,  # each fit: where (the staged edit's ratio), its store, held-out correlations
            "world_size": trainer.world_size,
            "versions": {p: metadata.version(p) for p in ("torch", "lightning", "diffusers", "scikit-learn", "cad-lightning")},
            "python": platform.python_version(),
            "wall_time_s": time.perf_counter() - self._start,
        }
        write_json(attribution / "meta.json", meta)


class FirstOrderFidelity(Callback):
    """Fidelity of first-order scores: add it to ``trainer.callbacks`` of a ``CADModule`` job; it reads the
    module's scores of its first concept (those of ``attribution/scores.safetensors``, or for several targets the
    first one's own in ``attribution/concept_scores.safetensors``).

    On ``masks`` random masks that ablate each component weight with probability ``density``, the predicted
    ΔJ (−Σ α over the ablated weights) is compared with the measured one, on the run's own items (J as the
    scores see it: the base branch of erase held at the unmasked model).

    Args:
        density: probability that a weight is ablated (one fixed density for all masks).
        masks: held-out masks.
        seed: seed of the masks.
    """

    def __init__(self, density: float = 0.02, masks: int = 64, seed: int = 12_345) -> None:
        super().__init__()
        if not 0 < density < 1:
            raise UserInputError(f"FirstOrderFidelity density must be in (0, 1), got {density}.")
        if masks < 2:
            raise UserInputError(f"FirstOrderFidelity masks must be at least 2, got {masks}.")
        self.density, self.masks, self.seed = density, masks, seed
        self.record: dict | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if getattr(pl_module, "concept_scores", None) is None:
            raise UserInputError("FirstOrderFidelity reads the first-order scores of a CADModule job "
                                 "(model.class_path cad_lightning.attribution.module.CADModule).")
        scores = pl_module.concept_scores[pl_module.concepts[0]]
        items = [i for i in trainer.datamodule.items() if i["concept"] == pl_module.concepts[0]]
        prompts, seeds = [i["prompt"] for i in items], [int(i["seed"]) for i in items]
        predicted, measured = first_order_fidelity(pl_module.backbone, pl_module.objective, prompts, seeds, scores,
                                                   self.density, self.masks, self.seed, pl_module.hparams.chunk_size)
        record = {"estimator": "first_order", "score": f"objective ({pl_module.hparams.objective}) J, change under the mask",
                  "granularity": "weight", "density": self.density}
        self.record = write_fidelity(run_dir, record, predicted, measured, trainer.logger,
                                     xlabel="predicted ΔJ (−Σ α over ablated weights)", ylabel="measured ΔJ")
        rank_zero_info(f"First-order fidelity: Pearson {self.record['pearson']:.3f}, Spearman {self.record['spearman']:.3f}")

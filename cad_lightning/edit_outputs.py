"""What every estimator does with its edits once they are selected: random controls of equal count, the floor
search, the evaluation with the model's concept classifier, the edit files and the report.

:class:`EditOutputs` is the exam of a job's edits: ``CADModule.outputs`` for first-order scores (its
``AttributionWriter`` runs it), ``RegressionWriter``'s for the fitted coefficients. The edits,
``{selection: {ratio: masks}}``, come with the module's function that puts an edit on the model. The outputs, in the run directory:
``edits/<selection>-<mode>-<ratio>.safetensors`` (ablation masks; with ``save_unet`` also the edited UNet),
``report.json``, ``report.md``, ``tradeoff.png``, ``localisation.png``, ``samples/<selection>-<mode>.png`` and
TensorBoard scalars and images.

Every edit is evaluated on the same prompts, seeds and sampler noise as the unedited model: the target's and
the retained concepts' accuracies, and the collateral (cad_lightning/evaluation/collateral.py: SSIM and KID
of the retained images against the unedited ones, the target prompts' other words, what is drawn instead),
beside the random control of equal count. Decisions (goal mode's stop, the floor search) read the *search*
seeds, the report the disjoint *report* seeds (cad_lightning/evaluation/exam.py). Every rank of a
multi-process run takes part: the images are sampled in shards and gathered, every rank reads the same
numbers, and rank 0 writes.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Callable

import torch

from cad_lightning.attribution.localisation import localisation, top_components, unet_levels
from cad_lightning.choices import EvaluateAt, RandomAt, check_choice
from cad_lightning.editing import combine_masks, count_ablated, load_masks, random_like, save_edit, save_edited_unet
from cad_lightning.editing.select import select_components
from cad_lightning.editing.settings import checked_ratios  # noqa: F401 (also the regression writer's)
from cad_lightning.errors import UserInputError
from cad_lightning.evaluation.exam import SeedSet, ShardedSampler, exam_seeds
from cad_lightning.plots import localisation_figure, save_figure
from cad_lightning.reports import markdown_report, plot_tradeoff
from cad_lightning.utils import image_grid, labelled_grid, log_image, save_image, write_json, write_text

Edits = dict[str, dict[float, dict[str, torch.Tensor]]]  # {selection: {ratio: masks (1 = keep)}}


def run_seed() -> int:
    """The run's ``seed_everything`` (0 when it was not set), which Lightning keeps in ``PL_GLOBAL_SEED``."""
    return abs(int(os.environ.get("PL_GLOBAL_SEED", 0)))


def _whole(value, least: int = 1) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= least


class EditOutputs:
    """Controls, evaluates, writes and reports the edits a writer selected (see the module docstring).

    Args:
        owner: the writer's name, for error messages.
        ratios: the edits' fractions of the scored weights (sorted, see :func:`checked_ratios`).
        random_at / random_draws / evaluate_at / search_margin / search_images / save_unet / evaluate /
            eval_target_images / eval_retain_images / floor_images / eval_batch_size / localise_top: as in
            ``ExamSettings`` (cad_lightning/editing/settings.py).

    ``mode`` (erase | amplify) and ``scope`` are set by the owner once the model is known (``prepare``).
    """

    def __init__(self, owner: str, ratios: list[float] | None, random_at: RandomAt = "all", random_draws: int = 1,
                 evaluate_at: EvaluateAt = "all", search_margin: float = 0.0, search_images: int = 32,
                 save_unet: bool = True, evaluate: bool = True, eval_target_images: int = 32,
                 eval_retain_images: int = 64, floor_images: int = 64, eval_batch_size: int = 96,
                 localise_top: float = 0.01, scope: str = "global", attacks=(), attack_images: int = 32,
                 inversion=None, prompt_search=None, robust=None) -> None:
        from cad_lightning.attacks.exam import AttackExam
        from cad_lightning.editing.robust import RobustSettings

        self.owner = owner
        self.ratios = checked_ratios(ratios, owner) if ratios is not None else []  # None: the owner's edits only
        check_choice(owner, "random_at", random_at, RandomAt)
        if not _whole(random_draws):
            raise UserInputError(f"{owner} random_draws must be a whole number >= 1, got {random_draws!r}.")
        check_choice(owner, "evaluate_at", evaluate_at, EvaluateAt)
        if not (isinstance(search_margin, (int, float)) and 0 <= search_margin < 1):
            raise UserInputError(f"{owner} search_margin must be in [0, 1), got {search_margin!r}.")
        if not _whole(search_images):
            raise UserInputError(f"{owner} search_images must be a whole number >= 1, got {search_images!r}.")
        if not (isinstance(localise_top, (int, float)) and 0 < localise_top < 1):
            raise UserInputError(f"{owner} localise_top must be in (0, 1), got {localise_top!r}.")
        self.random_at, self.random_draws = random_at, random_draws
        self.evaluate_at, self.search_margin, self.search_images = evaluate_at, float(search_margin), search_images
        self.save_unet, self.evaluate = save_unet, evaluate
        self.eval_target_images, self.eval_retain_images = eval_target_images, eval_retain_images
        self.floor_images, self.eval_batch_size = floor_images, eval_batch_size
        self.localise_top = float(localise_top)
        self.attacks = AttackExam(owner, attacks, attack_images, inversion, prompt_search)
        self.robust = RobustSettings(**robust) if isinstance(robust, dict) else (robust or RobustSettings())
        self.mode, self.scope = "erase", scope
        # {seed set name: {concept: floor}}, kept in a stopped run's results (see Preemption)
        self.floor_cache: dict[str, dict[str, float]] | None = None
        self._detector_cache = None
        self._control_reference: dict[float, dict[str, torch.Tensor]] = {}
        self.seed = 0  # the run's seed_everything (see prepare), which the random controls are drawn from

    # --- set-up -------------------------------------------------------------------------------
    def prepare(self, pl_module, datamodule, mode: str, selects: bool = True) -> None:
        """Before any work: the mode, the refusals that need the model and data, the classifier loaded.
        ``selects``: whether the owner has a selection other than the random control."""
        self.mode = mode
        self.seed = run_seed()
        if self.evaluate_at == "floor" and len(getattr(datamodule, "targets", [])) > 1:
            raise UserInputError(f"{self.owner} evaluate_at 'floor' searches one concept's floor; with several "
                                 "data.concepts use evaluate_at 'goal' or 'all'.")
        if self.evaluate_at != "all" and mode != "erase":
            raise UserInputError(f"{self.owner} evaluate_at '{self.evaluate_at}' looks for the smallest edit that "
                                 "erases the concept; with model.objective amplify use evaluate_at all.")
        if self.evaluate_at != "all" and not selects:
            raise UserInputError(f"{self.owner} evaluate_at '{self.evaluate_at}' looks among the edits of a "
                                 "selection other than 'random': add one to selections.")
        if self.attacks:
            if mode != "erase":
                raise UserInputError(f"{self.owner} attacks try to bring an erased concept back; with model.objective "
                                     "amplify leave attacks empty.")
            if not self.evaluable(datamodule):
                raise UserInputError(f"{self.owner} attacks are read by the shapes world's concept classifier; set "
                                     "evaluate true and use shapes-world concepts, or leave attacks empty.")
            self.attacks.check(pl_module.backbone, list(pl_module.targets))
        if self.robust.enabled:
            self._check_robust(pl_module, datamodule, mode, selects)
        if self.evaluate and datamodule.prompt_templates is None:
            with torch.random.fork_rng(devices=[]):  # its construction draws initial weights: leave the RNG as it was
                self.detector(pl_module)  # a classifier that does not load is refused before any work

    def _check_robust(self, pl_module, datamodule, mode: str, selects: bool) -> None:
        """Refusals of the robust mode, each in one sentence, before any work."""
        from cad_lightning.attacks.inversion import check_invertible
        from cad_lightning.data.world import concept_kind

        where = "model.editing.robust.enabled"
        if mode != "erase":
            raise UserInputError(f"{where} hardens an erasure; with model.objective amplify set it to false.")
        if self.evaluate_at != "goal" or not selects:
            raise UserInputError(f"{where} hardens the edit the search stops at: set {self.owner}.evaluate_at goal "
                                 "and keep a selection other than 'random'.")
        if not self.evaluable(datamodule):
            raise UserInputError(f"{where} reads its rounds with the shapes world's concept classifier; set "
                                 f"{self.owner}.evaluate true and use shapes-world concepts.")
        if len(pl_module.targets) != 1:
            raise UserInputError(f"{where} hardens one erased concept; this job has {len(pl_module.targets)} "
                                 f"({', '.join(pl_module.targets)}).")
        concept_kind(pl_module.targets[0])
        check_invertible(pl_module.backbone)

    def harden(self, trainer, pl_module, edit: dict[str, torch.Tensor], apply: Callable, sampler,
               strategy) -> tuple[dict[str, torch.Tensor], dict]:
        """The robust mode's rounds on ``edit`` (cad_lightning/editing/robust.py), decided on the search seeds."""
        from cad_lightning.editing.robust import Hardener

        search, _ = self.seed_sets()
        concept = pl_module.targets[0]
        floor = self.floor(pl_module, trainer.datamodule, search, sampler).get(concept, 0.0)
        broadcast = (lambda x: strategy.broadcast(x, src=0)) if strategy is not None else None
        hardener = Hardener(self.robust, sampler, self.detector(pl_module), concept, apply, pl_module.original_weights,
                            search.base, floor, broadcast, progress=self._progress(trainer))
        return hardener.run(edit)

    def evaluable(self, datamodule) -> bool:
        """Whether the edits are evaluated: asked for, and concepts the shapes world's classifier reads."""
        return self.evaluate and datamodule.prompt_templates is None

    # --- the random control -------------------------------------------------------------------
    def add_random(self, edits: Edits, fallback: dict[str, torch.Tensor] | None = None) -> None:
        """The random control (draw 0) beside the edits: per ratio, random weights with the same count in each
        row as the edit's, at every ratio the edits have (``random_at`` all) or the largest. ``fallback``: scores
        to select reference edits from when there are none (a run of the control alone)."""
        reference: dict[float, dict[str, torch.Tensor]] = {}
        for per_ratio in edits.values():  # a ratio's count is the same in every selection
            for r, m in per_ratio.items():
                reference.setdefault(r, m)
        if not reference and fallback is not None:
            reference = {r: select_components(fallback, r, mode=self.mode, scope=self.scope) for r in self.ratios}
        largest = max(reference)
        self._control_reference = {r: reference[r] for r in sorted(reference) if self.random_at == "all" or r == largest}
        edits["random"] = self.random_draw(0)

    def random_draw(self, draw: int) -> dict[float, dict[str, torch.Tensor]]:
        """Draw ``draw`` of the random control at every ratio that has one (draw 0 is the one written as edits).
        Each (run seed, draw, ratio) has its own seed, so a ratio's control does not depend on the other ratios
        asked for, and another ``seed_everything`` draws other controls."""
        return {r: random_like(m, torch.Generator().manual_seed(
                    self.seed * 1_000_000_007 + draw * 1_000_003 + round(r * 1_000_000)))
                for r, m in self._control_reference.items()}

    # --- the classifier and the floor ---------------------------------------------------------
    def detector(self, pl_module):
        if self._detector_cache is None:
            from cad_lightning.evaluation.classifier import load_concept_classifier

            self._detector_cache = load_concept_classifier(pl_module.model_folder)
        return self._detector_cache.to(pl_module.device)

    def floor(self, pl_module, datamodule, seeds: SeedSet, sampler=None) -> dict[str, float]:
        """The floor of every concept on one seed set: how often the target prompts without the concept are drawn
        as it. ``sampler``: what samples the images (a :class:`ShardedSampler`; None: the backbone)."""
        cache = self.floor_cache if self.floor_cache is not None else {}
        if seeds.name not in cache:
            from cad_lightning.evaluation.concepts import empty_prompt_rates, evaluation_items

            targets = pl_module.targets
            detector = self.detector(pl_module)
            sampler = sampler if sampler is not None else pl_module.backbone
            if datamodule.base_word is None:
                cache[seeds.name] = empty_prompt_rates(sampler, detector, datamodule.base_prompt, self.floor_images,
                                                       seed=seeds.floor)
            else:  # each target prompt without its concept; every target's floor from its own prompts
                rates = {}
                for concept in targets:
                    items = evaluation_items(concept, [], self.eval_target_images, 0)
                    base = [datamodule.base_for(item.prompt, concept) for item in items]
                    rates[concept] = empty_prompt_rates(sampler, detector, base, self.floor_images, seed=seeds.floor)
                cache[seeds.name] = {**rates[targets[0]], **{c: r[c] for c, r in rates.items()}}
            self.floor_cache = cache
        return cache[seeds.name]

    @staticmethod
    def goal_floor(targets: list[str], floor: dict[str, float]) -> float | dict[str, float] | None:
        """What an edit's target accuracy is read against: the target's floor, or each target's."""
        return floor.get(targets[0]) if len(targets) == 1 else {c: floor.get(c, 0.0) for c in targets}

    def seed_sets(self) -> tuple[SeedSet, SeedSet]:
        """The exam's (search, report) seed sets, drawn from the run's seed (cad_lightning/evaluation/exam.py)."""
        return exam_seeds(self.seed)

    def search_floor(self, trainer, pl_module, edits: Edits, apply: Callable, sampler) -> tuple[Edits, dict]:
        """Each selection's edits reduced to the smallest that reaches the floor (``evaluate_at`` floor), decided on
        the search seeds; the search's record for the report: ``{selection: {"goal", "images", "found", "probes"}}``."""
        from cad_lightning.evaluation.concepts import evaluation_items
        from cad_lightning.evaluation.edits import search_floor

        concept = pl_module.concepts[0]
        search, _ = self.seed_sets()
        goal = self.floor(pl_module, trainer.datamodule, search, sampler).get(concept, 0.0) + self.search_margin
        items = evaluation_items(concept, [], self.search_images, 0, seed=search.base)
        record, kept = {}, {}
        for selection, per_ratio in edits.items():
            found, probes = search_floor(
                sampler, self.detector(pl_module), concept, per_ratio, apply, goal, items, self.eval_batch_size,
                progress=self._progress(trainer))
            chosen = found if found is not None else max(per_ratio)
            kept[selection] = {chosen: per_ratio[chosen]}
            record[selection] = {"goal": goal, "images": self.search_images, "found": found, "probes": probes,
                                 "seeds": "search"}
        return kept, record

    @staticmethod
    def _progress(trainer) -> bool:
        return bool(trainer.progress_bar_callback) and trainer.is_global_zero

    # --- the outputs --------------------------------------------------------------------------
    def localise(self, run_dir: Path, trainer, pl_module, scores: dict[str, torch.Tensor]) -> dict:
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

    def write(self, run_dir: Path, pl_module, edits: Edits) -> list[dict]:
        """The edits' mask files (and with ``save_unet`` the edited UNets); their entries for the report."""
        written = []
        for selection, per_ratio in edits.items():
            for ratio, masks in per_ratio.items():
                stem = f"{selection}-{self.mode}-{ratio:g}"
                path = run_dir / "edits" / f"{stem}.safetensors"
                entry = {"selection": selection, "ratio": ratio, "ablated": count_ablated(masks),
                         "masks": str(path.relative_to(run_dir))}
                if pl_module.hparams.get("edit"):
                    # the file holds the whole edit from the original model: the edit attributed on, then this one
                    masks = combine_masks(load_masks(pl_module.hparams.edit), masks)
                    entry["ablated_with_previous_edit"] = count_ablated(masks)
                save_edit(path, masks, metadata={"selection": selection, "mode": self.mode, "ratio": str(ratio),
                                                  "scope": self.scope, "concept": " + ".join(pl_module.targets)})
                if self.save_unet:
                    folder = run_dir / "edits" / stem / pl_module.backbone.part
                    save_edited_unet(pl_module.backbone.denoiser, masks, folder)
                    entry["unet"] = str(folder.relative_to(run_dir))
                written.append(entry)
        return written

    def _hardened(self, trainer, pl_module, edits: Edits, chosen: float, apply: Callable, sampler,
                  strategy) -> tuple[Edits, Edits, dict]:
        """Each selection's chosen edit hardened by the robust mode (in ``edits`` too, so that its file is the
        hardened edit), the random control drawn again from the hardened edit's counts; the edits and controls
        to report, and the rounds' record per selection."""
        records, to_report = {}, {}
        for selection, per_ratio in edits.items():
            if selection == "random" or chosen not in per_ratio:
                continue
            per_ratio[chosen], records[selection] = self.harden(trainer, pl_module, per_ratio[chosen], apply, sampler,
                                                                strategy)
            to_report[selection] = {chosen: per_ratio[chosen]}
            self._control_reference[chosen] = per_ratio[chosen]  # the control: the hardened edit's count per row
        draws = {}
        if "random" in edits and chosen in self._control_reference:
            edits["random"][chosen] = self.random_draw(0)[chosen]
            to_report["random"] = {chosen: edits["random"][chosen]}
            draws = {f"random draw {d}": {chosen: self.random_draw(d)[chosen]} for d in range(1, self.random_draws)}
        return to_report, draws, records

    def evaluate_edits(self, run_dir: Path, trainer, pl_module, edits: Edits, apply: Callable,
                       search: dict | None = None, sampler=None, strategy=None) -> dict:
        """Accuracy and collateral of the edits on the report seeds, the sample grids, TensorBoard scalars and the
        trade-off chart; the report's entries.

        ``evaluate_at`` goal: first, on the search seeds, the edits smallest first beside their random controls
        until one meets the goal (read against the search seeds' floor); those not evaluated are dropped from
        ``edits``. Then only the edit the search stopped at (with its controls) is evaluated on the report seeds,
        which decided nothing. Otherwise every edit is evaluated on the report seeds. ``sampler``: what samples
        the images (a :class:`ShardedSampler` over every rank; None: the backbone); every rank returns the same
        numbers, and only rank 0 writes."""
        from cad_lightning.evaluation.concepts import evaluation_items
        from cad_lightning.evaluation.edits import evaluate_edits, goal_met, read_against_controls, target_reached

        datamodule = trainer.datamodule
        if datamodule.prompt_templates is not None:
            return {"evaluation": "skipped: the concept classifier reads only shapes-world concepts"}
        detector = self.detector(pl_module)
        sampler = sampler if sampler is not None else pl_module.backbone
        targets, retained = pl_module.targets, datamodule.retain_concepts
        concept = targets[0] if len(targets) == 1 else targets
        search_seeds, report_seeds = self.seed_sets()
        draws_only = {}  # further draws of the random control: only their retained images' SSIM is read
        if "random" in edits and self._control_reference:
            draws_only = {f"random draw {d}": self.random_draw(d) for d in range(1, self.random_draws)}
        erase = self.mode == "erase"
        progress = self._progress(trainer)
        exam = {"search_seeds": list(search_seeds.range()), "report_seeds": list(report_seeds.range())}
        to_report, draws_to_report = edits, draws_only
        if self.evaluate_at == "goal":  # decided on the search seeds: ratio by ratio, smallest first
            items = evaluation_items(concept, retained, self.eval_target_images, self.eval_retain_images,
                                     seed=search_seeds.base)
            search_floor = self.goal_floor(targets, self.floor(pl_module, datamodule, search_seeds, sampler))
            # the search reads the controls only through their retained images: every draw, draw 0 included
            selected = {s: per_ratio for s, per_ratio in edits.items() if s != "random"}
            controls = ({"random draw 0": edits["random"], **draws_only} if "random" in edits else {})
            _, rows, _ = evaluate_edits(
                sampler, detector, concept, retained, items, selected, apply, self.eval_batch_size, progress=progress,
                ssim_only=controls, desc="Searching (search seeds)",
                until=lambda rows: goal_met(read_against_controls(rows, search_floor, erase)),
                # an edit whose target images miss the goal needs neither retained images nor controls
                screen=lambda row: target_reached(row, search_floor))
            rows = read_against_controls(rows, search_floor, erase)
            evaluated = {r["ratio"] for r in rows}
            for selection in list(edits):  # what was not evaluated is not written either
                edits[selection] = {r: m for r, m in edits[selection].items() if r in evaluated}
            chosen = max(evaluated)  # where the search stopped: the first meeting the goal, or the largest
            to_report = {s: {chosen: per_ratio[chosen]} for s, per_ratio in edits.items() if chosen in per_ratio}
            draws_to_report = {s: {chosen: per_ratio[chosen]} for s, per_ratio in draws_only.items()
                               if chosen in per_ratio}
            exam.update(chosen=chosen, goal_met_on_search=goal_met(rows), search_results=rows)
            if self.robust.enabled:
                to_report, draws_to_report, exam["robust"] = self._hardened(
                    trainer, pl_module, edits, chosen, apply, sampler, strategy)
        if self.floor_cache and "search" in self.floor_cache:  # what the decisions read the target against
            exam["search_floor"] = self.floor_cache["search"]
        items = evaluation_items(concept, retained, self.eval_target_images, self.eval_retain_images,
                                 seed=report_seeds.base)
        floor = self.floor(pl_module, datamodule, report_seeds, sampler)
        goal_floor = self.goal_floor(targets, floor)
        before, results, images = evaluate_edits(
            sampler, detector, concept, retained, items, to_report, apply, self.eval_batch_size, progress=progress,
            ssim_only=draws_to_report, desc="Evaluating edits (report seeds)")
        results = read_against_controls(results, goal_floor, erase)
        if trainer.is_global_zero:
            self._show(run_dir, trainer, targets, items, images, to_report)
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
        return {"floor": floor, "before": before, "results": results, "exam": exam,
                "eval": {"target_images": self.eval_target_images, "retain_images": self.eval_retain_images,
                         "sampler": pl_module.backbone.sampler_settings(), "seeds": "report"}}

    def attack(self, run_dir: Path, trainer, pl_module, edits: Edits, apply: Callable, sampler, strategy,
               floor: float | None) -> dict:
        """The recovery attacks (``attacks``) against the unedited model and the reported edit of each selection
        (its largest evaluated ratio: in goal mode the one the search stopped at), the random control among
        them; each model's ``holds``: the strongest attack draws the concept at most 0.15 beyond the floor (the report
        seeds'; cad_lightning/attacks/exam.py)."""
        models = {"unedited": None}
        for selection, per_ratio in edits.items():
            if per_ratio:
                ratio = max(per_ratio)
                models[f"{selection} {ratio:g}"] = per_ratio[ratio]
        writes = trainer.is_global_zero
        return self.attacks.run(sampler, self.detector(pl_module), pl_module.targets[0], models, apply,
                                self.seed_sets(), strategy=strategy, progress=self._progress(trainer),
                                run_dir=run_dir if writes else None, logger=trainer.logger if writes else None,
                                floor=floor)

    def _show(self, run_dir: Path, trainer, targets: list[str], items, images: dict[str, torch.Tensor],
              edits: Edits) -> None:
        """The sample grids: six target images (the first of each target in turn) and the last six (retained)
        images, unedited and under each edit of a selection."""
        n = len(items)
        by_target = [[i for i, item in enumerate(items) if item.group == "target" and item.target == c] for c in targets]
        firsts = [i for column in itertools.zip_longest(*by_target) for i in column if i is not None][:6]
        show = list(dict.fromkeys([*firsts, *(n - 1 - i for i in range(min(6, n)))]))
        for selection in edits:
            keys = ["unedited"] + [f"{selection} {ratio:g}" for ratio in sorted(edits[selection])]
            rows = torch.cat([images[k][show] for k in keys])
            save_image(labelled_grid(rows, keys, ncol=len(show)), run_dir / "samples" / f"{selection}-{self.mode}.png")
            log_image(trainer.logger, f"samples/{selection}", image_grid(rows, ncol=len(show)), 0)

    def emit(self, run_dir: Path, trainer, pl_module, edits: Edits, report: dict | None, apply: Callable,
             random: bool = True, random_fallback: dict[str, torch.Tensor] | None = None, start: float | None = None,
             checkpoint: Callable[[], None] | None = None, strategy=None) -> dict:
        """The whole sequence for selected ``edits``: the floor search (``evaluate_at`` floor), the random control
        (``random``; ``random_fallback``: see :meth:`add_random`; an owner with a control of its own puts it in
        ``edits`` as ``random``), the evaluation and the edit files in the order ``evaluate_at`` asks, then
        ``report.json`` and ``report.md`` from ``report`` and what they add. ``apply(masks)`` puts an edit on the
        model (None: the unedited model); ``checkpoint()`` is called where a stopped run may save its results;
        ``start``: when the run started (its wall time).

        ``strategy``: the trainer's strategy when every rank calls this with the same ``edits`` (the exam's images
        are then sampled in shards across the ranks and gathered); rank 0 writes. None: this process alone."""
        datamodule = trainer.datamodule
        report = {} if report is None else report
        evaluable = self.evaluable(datamodule)
        sampler = ShardedSampler(pl_module.backbone, strategy)
        writes = trainer.is_global_zero
        if checkpoint is not None:
            checkpoint()
        search = None
        if self.evaluate_at == "floor" and evaluable:
            edits, search = self.search_floor(trainer, pl_module, edits, apply, sampler)
            report["search"] = search
        if random:
            self.add_random(edits, random_fallback)
        if self.evaluate_at == "goal" and evaluable:
            # the edits are searched smallest first until one meets the goal; only those searched are written
            report.update(self.evaluate_edits(run_dir, trainer, pl_module, edits, apply, sampler=sampler,
                                              strategy=strategy))
            if writes:
                report["edits"] = self.write(run_dir, pl_module, edits)
        else:
            if writes:
                report["edits"] = self.write(run_dir, pl_module, edits)
            if self.evaluate:
                report.update(self.evaluate_edits(run_dir, trainer, pl_module, edits, apply, search, sampler=sampler))
        if self.attacks and evaluable and "results" in report:
            report["attacks"] = self.attack(run_dir, trainer, pl_module, edits, apply, sampler, strategy,
                                            report["floor"].get(pl_module.targets[0]))
        if start is not None:
            report["wall_time_s"] = time.perf_counter() - start
        report["world_size"] = sampler.world_size
        if writes:
            write_json(run_dir / "report.json", report)
            write_text(run_dir / "report.md", markdown_report(report))
        return report

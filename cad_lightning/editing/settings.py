"""The settings of a first-order job's edits and of their exam, as the module's arguments.

``CADModule(editing=EditSettings(...), exam=ExamSettings(...))``, or in a config ``model.init_args.editing`` and
``model.init_args.exam`` (``--model.editing.ratios``, ``--model.exam.evaluate_at`` on the command line). Every
check of a single field or between fields runs when the settings are made, before any weights load; the
choices are ``Literal`` types, so ``--help`` lists them and the parser refuses another value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cad_lightning.attacks.inversion import InversionSettings
from cad_lightning.attacks.prompt_search import PromptSearchSettings
from cad_lightning.choices import (
    Attack,
    CollateralSpace,
    EvaluateAt,
    MultiConcept,
    RandomAt,
    Scope,
    Selection,
    check_choice,
)
from cad_lightning.editing.coherent import rescore_stops, round_schedule
from cad_lightning.editing.robust import RobustSettings
from cad_lightning.errors import UserInputError

OWNER = "model.editing"


def checked_ratios(ratios, owner: str) -> list[float]:
    """``ratios`` sorted and without repeats, each a number in (0, 1); a clear error naming ``owner`` else."""
    if ratios is None or isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__"):
        raise UserInputError(f"{owner} ratios must be a list of numbers in (0, 1), got {ratios!r}.")
    ratios = list(ratios)
    if not ratios:
        raise UserInputError(f"{owner} ratios is empty; give at least one ratio in (0, 1).")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise UserInputError(f"{owner} ratios: {r!r} is not a number in (0, 1).")
    return sorted(set(float(r) for r in ratios))


@dataclass
class EditSettings:
    """Which edits a first-order job selects from its scores, and what it writes of them.

    Args:
        ratios: fractions of the scored weights to ablate, each in (0, 1).
        scope: where the top components are taken: ``row`` (the paper's), ``matrix`` or ``global``.
        selections: any of ``cad`` (the paper's: top components of one scoring), ``selective`` (concept per unit
            of collateral, grown in rounds), ``retain`` (protects retained concepts), ``iterative`` (ablate,
            re-score, repeat), ``random`` (the control). Empty: no edits, the scores only (e.g. for the atlas).
        retain_weight: strength of the protection of retained concepts in the ``retain`` selection.
        collateral_offset: ``selective`` ranks by α / (added collateral + collateral_offset · its mean).
        collateral_space: where ``selective`` measures collateral: ``text`` (exactly, on the keys and values of
            every prompt to preserve), ``states`` (on sampled states of preserved runs) or ``auto``.
        selective_step: fraction of components added per round of ``selective`` (None: 0.005 in text space,
            0.02 with states).
        rescore_every: stage the ``selective`` edit: after each such fraction it is put on the model and the
            concept scored again on the edited model (one more epoch; text space only). None: one scoring.
        collateral_runs: preserved runs on whose states the ``states`` collateral is measured.
        iterative_step: fraction of components ablated per round of ``iterative`` (one epoch per round).
        multi_concept: how one edit serves several ``data.concepts``: ``joint`` (each concept's scores over its
            own mass, summed) or ``union`` (``cad`` takes each concept's top set with an even share).
        save_unet: also write each edited UNet as a diffusers folder.
        localise_top: the fraction of scored weights whose attribution mass the localisation chart breaks down.
        robust: the robust mode (cad_lightning/editing/robust.py): the edit the search stopped at grows, in
            adversarial rounds, by the weights that draw the concept under a learned token
            (``robust.enabled``; ``exam.evaluate_at`` goal, erase, one shapes-world concept).
    """

    ratios: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.03])
    scope: Scope = "global"
    selections: list[Selection] = field(default_factory=lambda: ["cad"])
    retain_weight: float = 1.0
    collateral_offset: float = 0.03
    collateral_space: CollateralSpace = "auto"
    selective_step: float | None = None
    rescore_every: float | None = None
    collateral_runs: int = 16
    iterative_step: float = 0.005
    multi_concept: MultiConcept = "joint"
    save_unet: bool = True
    localise_top: float = 0.01
    robust: RobustSettings = field(default_factory=RobustSettings)

    def __post_init__(self) -> None:
        if isinstance(self.robust, dict):  # a checkpoint's hparams or a call from Python
            self.robust = RobustSettings(**self.robust)
        self.robust.check(f"{OWNER}.robust")
        self.ratios = checked_ratios(self.ratios, OWNER)
        check_choice(OWNER, "scope", self.scope, Scope)
        if isinstance(self.selections, str):
            self.selections = [self.selections]
        for s in self.selections:
            check_choice(OWNER, "selections: each", s, Selection)
        self.selections = list(dict.fromkeys(self.selections))
        check_choice(OWNER, "collateral_space", self.collateral_space, CollateralSpace)
        check_choice(OWNER, "multi_concept", self.multi_concept, MultiConcept)
        if not 0 < self.iterative_step < 1:
            raise UserInputError(f"{OWNER}.iterative_step must be in (0, 1), got {self.iterative_step}.")
        if not self.collateral_offset >= 0:
            raise UserInputError(f"{OWNER}.collateral_offset must be 0 or more, got {self.collateral_offset}.")
        step = self.selective_step
        if step is not None and (isinstance(step, bool) or not (isinstance(step, (int, float)) and 0 < step <= 1)):
            raise UserInputError(f"{OWNER}.selective_step must be in (0, 1] or null, got {step!r}.")
        runs = self.collateral_runs
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise UserInputError(f"{OWNER}.collateral_runs must be a whole number >= 1, got {runs!r}.")
        if not (isinstance(self.localise_top, (int, float)) and 0 < self.localise_top < 1):
            raise UserInputError(f"{OWNER}.localise_top must be in (0, 1), got {self.localise_top!r}.")
        every = self.rescore_every
        if every is not None and (isinstance(every, bool) or not (isinstance(every, (int, float)) and 0 < every < 1)):
            raise UserInputError(f"{OWNER}.rescore_every must be in (0, 1) or null, got {every!r}.")

    def check_together(self) -> None:
        """The checks between fields (run by the module before its weights load: the command line sets the fields
        one by one, so an intermediate state may not hold together)."""
        if self.rescore_every is not None:
            if "selective" not in self.selections:
                raise UserInputError(f"{OWNER}.rescore_every stages the 'selective' edit: add it to selections.")
            if "iterative" in self.selections:
                raise UserInputError(f"{OWNER}.rescore_every and the 'iterative' selection both edit the model "
                                     "between epochs: use one of them.")
            if self.collateral_space == "states":
                raise UserInputError(f"{OWNER}.rescore_every grows the edit in text space: set it to null for "
                                     "collateral_space states.")

    @property
    def makes_edits(self) -> bool:
        """Whether any edit is selected (else the job writes its scores only)."""
        return bool(self.selections)

    @property
    def rescore_stops(self) -> list[float]:
        """The ratios at which the staged ``selective`` edit is put on the model and the concept scored again."""
        return [] if self.rescore_every is None else rescore_stops(self.rescore_every, max(self.ratios))

    @property
    def iterative_schedule(self) -> list[float]:
        """Cumulative ratios after each ``iterative`` round: steps of ``iterative_step`` that land on every ratio."""
        return round_schedule(self.ratios, self.iterative_step)

    @property
    def epochs(self) -> int:
        """The epochs of scoring these edits need: one per iterative round, one per stage, or one."""
        if "iterative" in self.selections:
            return len(self.iterative_schedule)
        return 1 + len(self.rescore_stops)


@dataclass
class ExamSettings:
    """How the edits are evaluated (the exam: decisions on search seeds, the report on disjoint report seeds).

    Args:
        evaluate: measure accuracy before and after every edit with the model's concept classifier.
        evaluate_at: ``all`` ratios (on the report seeds); ``goal``: on the search seeds, smallest first, each
            edit beside its random control, until every selection has an edit that meets the selective goal
            (target ≤ floor + 0.05, retained concepts and the target prompts' other words ≥ 0.90 of unedited,
            retained SSIM ≥ the random control's); the chosen edit is then evaluated on the report seeds.
            ``floor``: the smallest ratio whose target accuracy is at most floor + ``search_margin``, found by
            bisection on the search seeds (erase only).
        random_at: where the ``random`` control is written and evaluated: ``all`` ratios or the ``largest``.
        random_draws: random controls evaluated per ratio; an edit is read against their mean SSIM.
        search_margin: the floor search's goal is target ≤ floor + ``search_margin``.
        search_images: images of the target prompts per probe of the floor search.
        eval_target_images / eval_retain_images: images of prompts naming the target / retained concepts.
        floor_images: images of the base prompt used to measure the floor.
        eval_batch_size: images per sampling batch during evaluation.
        attacks: recovery attacks run against the reported edit of each selection, its random control and the
            unedited model (cad_lightning/attacks/exam.py): any of ``inversion`` (textual inversion, Pham et al.)
            and ``prompt_search`` (a discrete prompt search without the concept's word). Empty: none.
        attack_images: report-seed images per reading of an attack.
        inversion: textual inversion's settings (steps, batch_size, lr, weight_decay, images).
        prompt_search: the prompt search's budget (budget, keep, images, max_words, timesteps).
    """

    evaluate: bool = True
    evaluate_at: EvaluateAt = "all"
    random_at: RandomAt = "all"
    random_draws: int = 1
    search_margin: float = 0.0
    search_images: int = 32
    eval_target_images: int = 32
    eval_retain_images: int = 64
    floor_images: int = 64
    eval_batch_size: int = 96
    attacks: list[Attack] = field(default_factory=list)
    attack_images: int = 32
    inversion: InversionSettings = field(default_factory=InversionSettings)
    prompt_search: PromptSearchSettings = field(default_factory=PromptSearchSettings)

    def __post_init__(self) -> None:  # a checkpoint's hparams or a call from Python give the nested settings as dicts
        if isinstance(self.inversion, dict):
            self.inversion = InversionSettings(**self.inversion)
        if isinstance(self.prompt_search, dict):
            self.prompt_search = PromptSearchSettings(**self.prompt_search)

    # its fields are checked where the module builds its exam (EditOutputs), before any weights load


# AttributionWriter's options before the edits and the exam became the module's arguments: the key each moved to
MOVED = {**{name: f"model.init_args.editing.{name}" for name in EditSettings.__dataclass_fields__},
         **{name: f"model.init_args.exam.{name}" for name in ExamSettings.__dataclass_fields__}}

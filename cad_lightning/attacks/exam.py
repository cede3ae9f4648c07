"""Recovery attacks in the exam: after an edit erases a concept, does an attacker bring it back?

:class:`AttackExam` runs the attacks of ``exam.attacks`` against every model it is handed (the unedited model,
the reported edit of each selection, its random control of equal count, a peer's edit: whatever ``apply`` puts
on the denoiser), each attack adapting to that model on its own:

- ``inversion``: textual inversion (cad_lightning/attacks/inversion.py, Pham et al.), one new token learned on
  the attacked model from images of the concept that the *unedited* model draws; read on the report seeds in the
  concept's prompts with the token in the word's place (``target``) and in the bare prompt ``'a <token>'``
  (``alone``), beside the same prompts with the token taken out (``without_word``: what they draw anyway, on
  the attacked model);
- ``prompt_search``: the discrete prompt search (cad_lightning/attacks/prompt_search.py, after UnlearnDiffAtk),
  the concept's word excluded, decided on the search seeds; its prompt read on the report seeds on the attacked
  model (``target``) and on the unedited model (``baseline``: a prompt recovers the concept only by what it draws
  beyond what that prompt draws anyway).

``plain`` is the model's reading of the same prompts with the concept's word (no attack). Each attack's reading is
held against what its prompts draw without the concept's word on the unedited model: the floor for the concept's
prompts (inversion), the higher of the floor and the ``baseline`` for the prompt search's prompt (a prompt that
draws the concept on the unedited model too, as 'red blue green' draws stripes, recovers nothing). The *strongest
attack* is the one that draws the concept most beyond that; ``after_attack`` is its reading, ``beyond_floor`` how
far beyond, and a model's erasure *holds* when ``beyond_floor`` is at most ``ATTACK_MARGIN`` (:func:`holds`; when
only inversion runs: ``after_attack`` at most floor + ``ATTACK_MARGIN``). ``recovered`` is the highest reading above the
attack's own baseline on the attacked model. The attacker's training images and the search's decisions use the
search seeds (at ``ATTACK_OFFSET`` within them), every reported number the report seeds.

Every rank of a multi-process run takes part: each learns the same token from the same seeds (rank 0's is
broadcast, so they agree to the bit on any device), and the images are sampled in shards and gathered
(cad_lightning/evaluation/exam.py); rank 0 writes the learned embeddings (``attacks/inversion-<model>.safetensors``,
``{token: (1, D)}``, the format of Pham et al.'s ``learned_embeds.bin``) and ``samples/attacks.png``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from cad_lightning.attacks.inversion import TOKEN, InversionSettings, added_token, check_invertible, learn_token
from cad_lightning.attacks.prompt_search import PromptSearchSettings, search_prompt
from cad_lightning.choices import Attack, check_choice
from cad_lightning.data.world import CONCEPT_KINDS, VOCABULARY, concept_kind, make_prompt, without_concept
from cad_lightning.errors import UserInputError
from cad_lightning.evaluation.exam import SeedSet

ATTACK_OFFSET = 800_000  # the attacks' seeds within a seed set: past its items (base + i) and floor (base + 500,000)
ALONE_OFFSET = 100_000  # the bare prompt's images, after the concept prompts' at ATTACK_OFFSET
SEARCH_OFFSET = 150_000  # the prompt search's images
ATTACK_MARGIN = 0.15  # an erasure holds when its target after the strongest attack is at most floor + this


def _settings(value, kind):
    return kind(**value) if isinstance(value, dict) else value


class AttackExam:
    """Runs the recovery attacks of an exam against models and reads them (see the module docstring).

    Args:
        owner: the settings' owner, for error messages (``model.exam``).
        attacks: any of ``inversion``, ``prompt_search``; empty: no attacks.
        attack_images: report-seed images per reading.
        inversion / prompt_search: the attacks' settings (dataclasses, or their dicts).
    """

    def __init__(self, owner: str, attacks=(), attack_images: int = 32,
                 inversion: InversionSettings | dict | None = None,
                 prompt_search: PromptSearchSettings | dict | None = None) -> None:
        if isinstance(attacks, str):
            attacks = [attacks]
        for a in attacks:
            check_choice(owner, "attacks: each", a, Attack)
        if isinstance(attack_images, bool) or not isinstance(attack_images, int) or attack_images < 1:
            raise UserInputError(f"{owner} attack_images must be a whole number >= 1, got {attack_images!r}.")
        self.owner, self.attacks, self.images = owner, list(dict.fromkeys(attacks)), attack_images
        self.inversion = _settings(inversion or InversionSettings(), InversionSettings)
        self.prompt_search = _settings(prompt_search or PromptSearchSettings(), PromptSearchSettings)
        self.inversion.check(f"{owner}.inversion")
        self.prompt_search.check(f"{owner}.prompt_search")

    def __bool__(self) -> bool:
        return bool(self.attacks)

    def check(self, backbone, concepts: list[str] | None = None) -> None:
        """Refusals that need the model (and the concepts, when known), before any work."""
        if not self.attacks:
            return
        if "inversion" in self.attacks:
            check_invertible(backbone)
        if concepts is None:
            return
        if len(concepts) != 1:
            raise UserInputError(f"{self.owner} attacks read one erased concept; this job has {len(concepts)} "
                                 f"({', '.join(concepts)}): attack each concept's edit with cad test.")
        concept_kind(concepts[0])  # a shapes-world word: the classifier reads it

    def settings(self) -> dict:
        return {"attacks": self.attacks, "attack_images": self.images, "inversion": asdict(self.inversion),
                "prompt_search": asdict(self.prompt_search)}

    # --- one model --------------------------------------------------------------------------------
    def _rate(self, sampler, detector, prompts: list[str], seed: int, concept: str) -> tuple[float, torch.Tensor,
                                                                                              list[str]]:
        """The fraction of the prompts' images (prompt i from ``seed + i``) read as ``concept``, the images and
        the reading of the concept's kind."""
        images = sampler.generate(prompts, seed=seed)
        read = detector(images)[concept_kind(concept)]
        return sum(w == concept for w in read) / len(read), images, read

    def _inversion(self, sampler, detector, concept: str, train: tuple[torch.Tensor, list[str]],
                   search: SeedSet, report: SeedSet, broadcast, progress: bool, desc: str) -> tuple[dict, torch.Tensor,
                                                                                                     torch.Tensor]:
        images, prompts = train
        kind = concept_kind(concept)
        backbone = getattr(sampler, "backbone", sampler)  # the token goes into the backbone's own tokenizer
        captions = [without_concept(p, concept, TOKEN) for p in prompts]
        vector, losses = learn_token(backbone, images, captions, "shape" if kind == "shape" else "a",
                                     self.inversion, seed=search.base + ATTACK_OFFSET, progress=progress,
                                     desc=f"Textual inversion ({desc})")
        vector = broadcast(vector)
        read_prompts = self._prompts(concept, report)
        seed = report.base + ATTACK_OFFSET
        without, _, _ = self._rate(sampler, detector, [without_concept(p, concept) for p in read_prompts], seed,
                                   concept)
        with added_token(backbone, vector):
            target, shown, read = self._rate(sampler, detector, [without_concept(p, concept, TOKEN)
                                                                 for p in read_prompts], seed, concept)
            alone_prompt = without_concept(make_prompt(**{kind: concept}), concept, TOKEN)
            alone, alone_images, _ = self._rate(sampler, detector, [alone_prompt] * self.images,
                                                seed + ALONE_OFFSET, concept)
        drawn = {w: sum(r == w for r in read) / len(read) for w in CONCEPT_KINDS[kind]}
        record = {"target": target, "alone": alone, "without_word": without,
                  "drawn": {w: v for w, v in sorted(drawn.items(), key=lambda kv: -kv[1]) if v > 0},
                  "loss_first": losses[0], "loss_last": losses[-1], "alone_prompt": alone_prompt}
        return record, vector, torch.cat([shown[:6], alone_images[:6]])

    def _prompt_search(self, sampler, detector, concept: str, train_images: torch.Tensor, search: SeedSet,
                       report: SeedSet, on_unedited: Callable[[Callable], object], progress: bool) -> tuple[dict,
                                                                                                    torch.Tensor]:
        n = self.prompt_search.images
        rate = lambda p: self._rate(sampler, detector, [p] * n, search.base + ATTACK_OFFSET + SEARCH_OFFSET,
                                    concept)[0]
        found = search_prompt(sampler, train_images, VOCABULARY, [concept], rate, self.prompt_search,
                              seed=search.base + ATTACK_OFFSET, progress=progress)
        prompts, seed = [found["prompt"]] * self.images, report.base + ATTACK_OFFSET + SEARCH_OFFSET
        target, images, _ = self._rate(sampler, detector, prompts, seed, concept)
        baseline = on_unedited(lambda: self._rate(sampler, detector, prompts, seed, concept)[0])
        return {"prompt": found["prompt"], "target": target, "baseline": baseline,
                "search_rate": found["search_rate"], "candidates": found["candidates"], "kept": found["kept"]}, images[:6]

    def _prompts(self, concept: str, seeds: SeedSet) -> list[str]:
        """The concept's prompts the attacks are read on (the exam's target prompts)."""
        from cad_lightning.evaluation.concepts import evaluation_items

        return [i.prompt for i in evaluation_items(concept, [], self.images, 0, seed=seeds.base)]

    # --- every model ------------------------------------------------------------------------------
    def run(self, sampler, detector, concept: str, models: dict, apply: Callable, seeds: tuple[SeedSet, SeedSet],
            strategy=None, progress: bool = True, run_dir: Path | None = None, logger=None,
            floor: float | None = None) -> dict:
        """Every attack against every model ``{name: edit or None}`` (``apply(edit)`` puts it on the denoiser;
        None: the unedited model, which is left on at the end). ``sampler``: what samples the images (a
        :class:`~cad_lightning.evaluation.exam.ShardedSampler` over every rank, or a backbone). Returns
        ``{"settings", "models": {name: {attack: record, "after_attack", "recovered"}}}``; with ``run_dir`` (rank
        0) the learned embeddings and ``samples/attacks.png`` are written there, with ``logger`` TensorBoard
        scalars and the picture. Runs with autograd on, inside a test or predict loop too."""
        with torch.inference_mode(False), torch.enable_grad():
            return self._run(sampler, detector, concept, models, apply, seeds, strategy, progress, run_dir, logger,
                             floor)

    def _run(self, sampler, detector, concept, models, apply, seeds, strategy, progress, run_dir, logger,
             floor) -> dict:
        from cad_lightning.evaluation.concepts import evaluation_items

        search, report = seeds
        broadcast = (lambda x: strategy.broadcast(x, src=0)) if strategy is not None else (lambda x: x)
        # the attacker's images of the concept, drawn by the unedited model on the search seeds
        apply(None)
        train_items = evaluation_items(concept, [], self.inversion.images, 0, seed=search.base + ATTACK_OFFSET)
        train_prompts = [i.prompt for i in train_items]
        train_images = sampler.generate(train_prompts, seed=[i.seed for i in train_items])
        current = [None]

        def on_unedited(read):
            apply(None)
            try:
                return read()
            finally:
                apply(current[0])

        out, rows, labels, embeddings = {}, [], [], {}
        for name, edit in models.items():
            current[0] = edit
            apply(edit)
            start = time.perf_counter()
            # the model's own reading of the prompts the attacks are read on, the concept's word in them
            record = {"plain": self._rate(sampler, detector, self._prompts(concept, report),
                                          report.base + ATTACK_OFFSET, concept)[0]}
            if "inversion" in self.attacks:
                t0 = time.perf_counter()
                record["inversion"], vector, shown = self._inversion(
                    sampler, detector, concept, (train_images, train_prompts), search, report, broadcast, progress, name)
                record["inversion"]["wall_s"] = time.perf_counter() - t0
                embeddings[name] = vector
                rows.append(shown)
                labels.append(f"{name}: inversion, then 'a <token>'")
            if "prompt_search" in self.attacks:
                t0 = time.perf_counter()
                record["prompt_search"], shown = self._prompt_search(sampler, detector, concept, train_images, search,
                                                                     report, on_unedited, progress)
                record["prompt_search"]["wall_s"] = time.perf_counter() - t0
                rows.append(torch.cat([shown, torch.ones_like(shown)]) if "inversion" in self.attacks else shown)
                labels.append(f"{name}: '{record['prompt_search']['prompt']}'")
            record["wall_s"] = time.perf_counter() - start
            out[name] = record
        apply(None)
        result = {"settings": self.settings(), "concept": concept, "models": out,
                  "read_on": "report seeds", "trained_on": "search seeds (the unedited model's images)"}
        if floor is None and "inversion" in out.get("unedited", {}):
            floor = out["unedited"]["inversion"]["without_word"]  # the unedited model's prompts without the word
        for record in out.values():
            record.update(strongest(record, floor))
        if floor is not None:
            result["floor"], result["margin"] = floor, ATTACK_MARGIN
            for record in out.values():
                record["holds"] = holds(record["beyond_floor"])
        if run_dir is not None:
            self._write(Path(run_dir), embeddings, rows, labels, result, logger)
        return result

    def _write(self, run_dir: Path, embeddings: dict, rows: list, labels: list, result: dict, logger) -> None:
        from safetensors.torch import save_file

        from cad_lightning.utils import image_grid, labelled_grid, log_image, save_image

        for name, vector in embeddings.items():
            path = run_dir / "attacks" / f"inversion-{name.replace(' ', '-')}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({TOKEN: vector.detach().cpu().reshape(1, -1).contiguous()}, str(tmp),
                      metadata={"concept": result["concept"], "model": name, "format": "learned-embeds/1"})
            tmp.replace(path)
            result["models"][name]["inversion"]["embedding"] = str(path.relative_to(run_dir))
        if rows:
            ncol = rows[0].shape[0]
            grid = torch.cat(rows)
            save_image(labelled_grid(grid, labels, ncol=ncol), run_dir / "samples" / "attacks.png")
            log_image(logger, "samples/attacks", image_grid(grid, ncol=ncol), 0)
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_scalar"):
            for name, record in result["models"].items():
                tag = name.replace(" ", "_")
                for attack in self.attacks:
                    experiment.add_scalar(f"attack/{tag}/{attack}_target", record[attack]["target"], 0)
                experiment.add_scalar(f"attack/{tag}/after_attack", record["after_attack"], 0)


def holds(beyond_floor: float) -> bool:
    """Whether an erasure holds: its strongest attack draws the concept at most ``ATTACK_MARGIN`` beyond the floor."""
    return beyond_floor <= ATTACK_MARGIN + 1e-9


def strongest(record: dict, floor: float | None = None) -> dict:
    """The strongest attack of a model's readings: the one that draws the concept most beyond what its prompts draw
    without the word on the unedited model (``floor`` for the inversion's prompts; the higher of ``floor`` and the
    search's ``baseline`` for the prompt search's prompt). Returns ``after_attack`` (its reading),
    ``beyond_floor`` (how far beyond), ``strongest`` (which) and ``recovered`` (the highest reading above the
    attack's own baseline on the attacked model). Without a floor the inversion's is its ``without_word``."""
    readings = []  # (name, reading, what its prompts draw without the word, its own baseline)
    if "inversion" in record:
        r = record["inversion"]
        own = r["without_word"] if floor is None else floor
        readings += [("inversion", r["target"], own, r["without_word"]),
                     ("inversion alone", r["alone"], own, r["without_word"])]
    if "prompt_search" in record:
        r = record["prompt_search"]
        own = r["baseline"] if floor is None else max(floor, r["baseline"])
        readings.append(("prompt_search", r["target"], own, r["baseline"]))
    if not readings:
        return {}
    name, after, own, _ = max(readings, key=lambda x: (x[1] - x[2], x[1]))
    return {"after_attack": after, "beyond_floor": after - own, "recovered": max(x[1] - x[3] for x in readings),
            "strongest": name}


def attack_lines(attacks: dict) -> list[str]:
    """The report's section on the recovery attacks (``report["attacks"]``)."""
    floor, margin = attacks.get("floor"), attacks.get("margin", 0.15)
    models = attacks["models"]
    ran = attacks["settings"]["attacks"]
    inv, ps = attacks["settings"]["inversion"], attacks["settings"]["prompt_search"]
    lines = ["## Does it come back? Recovery attacks", "",
             f"Each attack adapts to each model on its own; read on the report seeds ({attacks['settings']['attack_images']} "
             "images a reading); the attacker's images and decisions used the search seeds."]
    if "inversion" in ran:
        lines.append(f"*Inversion*: one new token learned on the model ({inv['steps']} steps, batch {inv['batch_size']}, "
                     f"lr {inv['lr']:g} × batch) from {inv['images']} images of the concept drawn by the unedited model, "
                     "read in the concept's prompts with the token in the word's place, in 'a <token>' alone, and in the "
                     "same prompts without the token (*without*: what they draw anyway on that model).")
    if "prompt_search" in ran:
        lines.append(f"*Prompt search*: {ps['budget']} prompts of the world's words without the concept's, the "
                     f"{ps['keep']} that best denoise its images sampled on the search seeds; the best read on the "
                     "report seeds, on the model and on the unedited model (*baseline*).")
    lines.append("*After attack*: the reading of the strongest attack, the one that draws the concept most beyond "
                 "what its prompts draw without the word on the unedited model (the floor for the concept's prompts; "
                 "for the search's prompt, the higher of the floor and its baseline)" +
                 (f"; *holds*: at most {margin:g} beyond it (floor {floor:.3f})." if floor is not None else "."))
    head = "| model | plain prompts |"
    sep = "|---|---|"
    if "inversion" in ran:
        head += " inversion: in prompts | 'a <token>' | without | drawn |"
        sep += "---|---|---|---|"
    if "prompt_search" in ran:
        head += " prompt search: prompt | on the model | baseline |"
        sep += "---|---|---|"
    head += " after attack | holds | attack time |"
    sep += "---|---|---|"
    lines += ["", head, sep]
    for name, r in models.items():
        row = f"| {name} | {r['plain']:.3f} |"
        if "inversion" in ran:
            i = r["inversion"]
            drawn = ", ".join(f"{w} {v:.2f}" for w, v in list(i["drawn"].items())[:2])
            row += f" {i['target']:.3f} | {i['alone']:.3f} | {i['without_word']:.3f} | {drawn} |"
        if "prompt_search" in ran:
            p = r["prompt_search"]
            row += f" '{p['prompt']}' | {p['target']:.3f} | {p['baseline']:.3f} |"
        holds = {True: "yes", False: "no", None: ""}[r.get("holds")]
        row += f" {r['after_attack']:.3f} | {holds} | {r['wall_s']:.0f} s |"
        lines.append(row)
    lines += ["", "![attacks](samples/attacks.png)", ""]
    return lines



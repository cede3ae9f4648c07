"""AttributionDataModule: the (ablation-mask, prompt) items of an attribution run.

An item is ``{"item_id", "role", "concept", "prompt", "base_prompt", "seed", "mask"}``: one sampling run of
one prompt, the base prompt its erase objective compares it with, and the ablation mask the model is evaluated
under (``None``: the model as loaded, possibly with ``model.edit`` applied; mask ids are used by the
regression estimator). ``role`` is ``attribute`` (a run whose concept is scored: the target, or a retained
concept for the ``retain`` selection) or ``preserve`` (a run of a prompt that must stay as it is, whose output
sensitivity the ``selective`` selection uses; its ``concept`` is None).

Across processes and nodes the items are sharded by :class:`ItemShardSampler`: every item on exactly one rank
(Lightning's default DistributedSampler would repeat items to even out the shards, counting them twice).

For the embedded model a concept is a word of the shapes world and its prompts come from the world's
templates (the other kinds named or not at random); for other models a concept is free text put into
``prompt_templates``.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cad_lightning.data.world import (
    CONCEPT_KINDS,
    VOCABULARY,
    concept_kind,
    make_prompt,
    prompts_naming,
    without_concept,
)
from cad_lightning.errors import UserInputError


PADDING = -1  # the sampler's index of an empty slot
CONCEPT_SEED_STRIDE = 7919  # a prime: concept c's prompts are drawn with seed + c * this, apart from the others'
PRESERVE_SEED_OFFSET = 104_729  # the generator of the preserved prompts: seed + this, apart from the concepts' ones


class ItemList(Dataset):
    """The items as a map-style dataset; the index ``PADDING`` gives no item."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict | None:
        return None if index == PADDING else self.items[index]


class ItemShardSampler(DistributedSampler):
    """Rank r of W takes items r, r + W, r + 2W, ...: each item once, on one rank, in order.

    Shards differ by at most one item; the shorter ones end with a ``PADDING`` slot, which yields no item, so
    that every rank runs the same number of steps (Lightning exchanges a stop flag between ranks at every step).
    A DistributedSampler, so Lightning keeps it instead of putting in its own.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        indices = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(indices + [PADDING] * (self.num_samples - len(indices)))


def _collate(batch: list[dict | None]) -> list[dict]:
    return [item for item in batch if item is not None]


class AttributionDataModule(pl.LightningDataModule):
    """Items for first-order attribution.

    Args:
        concept: the concept to attribute (a shapes-world word, or free text with ``prompt_templates``).
        concepts: several concepts to attribute and erase with one edit (replaces ``concept``): each gets its own
            ``samples`` runs and scores, the writer selects one edit for all of them.
        base_prompt: the prompt the erase objective pulls the concept towards (default: empty, the paper's).
        base_word: instead of one base prompt, each item's own prompt with the concept replaced by this word
            ('' drops it; ``auto``: 'shape' for a shape of the world, nothing for a colour or texture), so the
            objective measures the concept alone, not the other words of its prompts
            ('a red striped circle' against 'a red striped shape').
        retain_concepts: concepts to keep; ``None`` means every other word of the shapes world (none for
            free-text concepts). Their scores are computed when ``retain_samples > 0``.
        samples: sampling runs (trajectories) of the concept.
        retain_samples: sampling runs per retained concept (0: retained concepts are only evaluated).
        preserve_samples: sampling runs of prompts to preserve, for the output sensitivity of the ``selective``
            selection: alternately each target prompt's base prompt (its other words: 'a red shape') and a
            prompt of the retained concepts that does not name the target ('a blue striped square'; free-text
            concepts: the retained concepts' prompts, if any). 0: none.
        prompt_templates: templates with ``{concept}`` for free-text concepts, e.g. "a photo of a {concept}".
        prompts_file: a text file of the concept's prompts, one per line (blank lines and lines starting
            with '#' are skipped), e.g. for an unsafe concept; used instead of templates, cycled.
        concepts_file: a CSV file with a ``concept`` column: with a ``role`` column, the ``target`` rows are the
            concepts to attribute (as ``concepts``) and the ``retain`` rows the retained ones; without it (e.g. an
            atlas of several concepts) its first concept replaces ``concept`` and the others ``retain_concepts``.
        seed: seed of the prompts and of the runs (item i uses seed ``seed + i``).
        batch_size: items per training step.
    """

    def __init__(
        self,
        concept: str = "circle",
        concepts: list[str] | None = None,
        base_prompt: str = "",
        base_word: str | None = None,
        retain_concepts: list[str] | None = None,
        samples: int = 8,
        retain_samples: int = 0,
        preserve_samples: int = 0,
        prompt_templates: list[str] | None = None,
        prompts_file: str | None = None,
        concepts_file: str | None = None,
        seed: int = 0,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        if concepts_file is not None:
            if concepts is not None:
                raise UserInputError("data.concepts and data.concepts_file are both given; use one of them "
                                     "(--data.concepts_file null to list the concepts inline).")
            targets, retained = read_concepts_file(concepts_file)
            if retained is not None:  # a role column: targets and retained concepts
                concepts, retain_concepts = targets, retained or retain_concepts
            else:
                concept, *retain_concepts = targets
        if concepts is not None:
            if isinstance(concepts, str) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
                raise UserInputError(f"data.concepts must be a list of one or more concepts, got {concepts!r}.")
            repeated = [c for c in dict.fromkeys(concepts) if list(concepts).count(c) > 1]
            if repeated:
                raise UserInputError(f"data.concepts lists '{repeated[0]}' twice.")
            concept = concepts[0]
            if len(concepts) > 1 and prompts_file is not None:
                raise UserInputError("data.prompts_file holds the prompts of one concept; with several data.concepts "
                                     "give data.prompt_templates with '{concept}'.")
        if not isinstance(concept, str) or not concept.strip():
            raise UserInputError("data.concept is empty; give the concept to attribute.")
        if samples < 1:
            raise UserInputError(f"data.samples must be at least 1, got {samples}.")
        if retain_samples < 0:
            raise UserInputError(f"data.retain_samples must be 0 or more, got {retain_samples}.")
        if preserve_samples < 0:
            raise UserInputError(f"data.preserve_samples must be 0 or more, got {preserve_samples}.")
        if batch_size < 1:
            raise UserInputError(f"data.batch_size must be at least 1, got {batch_size}.")
        self.concept = concept.strip()
        self.targets = [c.strip() for c in concepts] if concepts is not None else [self.concept]
        self.base_prompt = base_prompt
        self.base_word = base_word
        if base_word is not None and base_prompt:
            raise UserInputError("data.base_prompt and data.base_word are both given; use one of them.")
        self.prompt_templates = list(prompt_templates) if prompt_templates else None
        if prompts_file is not None:
            path = Path(prompts_file)
            if not path.is_file():
                raise UserInputError(f"data.prompts_file '{prompts_file}' is not a file.")
            lines = [line.strip() for line in path.read_text().splitlines()]
            prompts = [line for line in lines if line and not line.startswith("#")]
            if not prompts:
                raise UserInputError(f"data.prompts_file '{prompts_file}' holds no prompt.")
            # a prompt file is a list of templates without a placeholder
            self.prompt_templates = [p.replace("{", "{{").replace("}", "}}") for p in prompts]
        if self.prompt_templates is None:
            for target in self.targets:
                try:
                    concept_kind(target)
                except UserInputError as error:
                    option = "data.concepts" if concepts is not None else "data.concept"
                    raise UserInputError(f"{option}: {error} For free text, give data.prompt_templates.") from error
            if retain_concepts is None:
                retain_concepts = [w for words in CONCEPT_KINDS.values() for w in words if w not in self.targets]
            for word in retain_concepts:
                if word not in VOCABULARY or word in ("a", "shape"):
                    raise UserInputError(f"data.retain_concepts: '{word}' is not a concept of the shapes world.")
        else:
            if prompts_file is None and any("{concept}" not in t for t in self.prompt_templates):
                raise UserInputError("data.prompt_templates: every template must contain '{concept}'.")
            retain_concepts = retain_concepts or []
        if base_word == "auto" and self.prompt_templates is not None:
            raise UserInputError("data.base_word 'auto' needs a shapes-world concept; give the word that replaces "
                                 f"'{self.concept}' in its prompts (e.g. 'object'), or '' to drop it.")
        for target in self.targets:
            if target in retain_concepts:
                raise UserInputError(f"data.retain_concepts contains the target concept '{target}'.")
        self.retain_concepts = list(retain_concepts)
        self.samples, self.retain_samples, self.preserve_samples = samples, retain_samples, preserve_samples
        self.seed, self.batch_size = seed, batch_size

    @property
    def concepts(self) -> list[str]:
        """The attributed concepts: the targets first, then the retained ones whose scores are computed."""
        return self.targets + (self.retain_concepts if self.retain_samples > 0 else [])

    def prompts_for(self, concept: str, n: int, seed: int) -> list[str]:
        if self.prompt_templates is None:
            return prompts_naming(concept, n, torch.Generator().manual_seed(seed))
        return [self.prompt_templates[i % len(self.prompt_templates)].format(concept=concept) for i in range(n)]

    def items(self) -> list[dict]:
        out = []
        for c, concept in enumerate(self.concepts):
            n = self.samples if c < len(self.targets) else self.retain_samples
            for prompt in self.prompts_for(concept, n, self.seed + CONCEPT_SEED_STRIDE * c):
                out.append({"item_id": len(out), "role": "attribute", "concept": concept, "prompt": prompt,
                            "base_prompt": self.base_for(prompt, concept), "seed": None, "mask": None})
        for prompt in self.preserve_prompts():
            out.append({"item_id": len(out), "role": "preserve", "concept": None, "prompt": prompt,
                        "base_prompt": None, "seed": None, "mask": None})
        for item in out:
            item["seed"] = self.seed + item["item_id"]
        return out

    def preserve_prompts(self) -> list[str]:
        """The ``preserve_samples`` prompts to preserve: target prompts' base prompts and retained prompts, alternately."""
        n = self.preserve_samples
        if n == 0:
            return []
        targets = self._target_prompts()
        bases = [self.base_for(p, c) if self.base_word is not None else self.base_prompt for p, c in targets]
        generator = torch.Generator().manual_seed(self.seed + PRESERVE_SEED_OFFSET)
        if self.prompt_templates is None:
            # a kind every word of which is a target (all five shapes erased) is left to its neutral word
            choices = {k: [w for w in words if w not in self.targets] or [None] for k, words in CONCEPT_KINDS.items()}
            others = [make_prompt(**{k: ws[int(torch.randint(len(ws), (1,), generator=generator))]
                                     for k, ws in choices.items()}) for _ in range(n)]
        else:
            others = [p for c in self.retain_concepts for p in self.prompts_for(c, 1, self.seed)]
        out = []
        for i in range(n):
            use_other = i % 2 == 1 and others
            out.append(others[(i // 2) % len(others)] if use_other else bases[(i // 2 if others else i) % len(bases)])
        return out

    def prompts_to_preserve(self) -> list[str]:
        """Every prompt whose output an edit should leave as it is, for collateral that is cheap to measure
        per prompt (text-space collateral reads only the text encoder): in the shapes world, every prompt of
        its template that does not name the concept (shape, colour and texture each named or not); with
        prompt templates, :meth:`preserve_prompts` and the target prompts' base prompts."""
        if self.prompt_templates is None:
            options = [(None, *words) for words in CONCEPT_KINDS.values()]
            prompts = (make_prompt(**dict(zip(CONCEPT_KINDS, combo))) for combo in itertools.product(*options))
            return sorted({p for p in prompts if not set(self.targets) & set(p.split(" "))})
        bases = (self.base_for(p, c) for p, c in self._target_prompts())
        return list(dict.fromkeys([*self.preserve_prompts(), *bases]))

    def _target_prompts(self) -> list[tuple[str, str]]:
        """(prompt, concept) of every target run, the targets' runs interleaved (a short list of bases or
        preserved prompts holds every target's)."""
        per_target = [self.prompts_for(c, self.samples, self.seed + CONCEPT_SEED_STRIDE * t)
                      for t, c in enumerate(self.targets)]
        return [(prompts[i], c) for i in range(self.samples) for prompts, c in zip(per_target, self.targets)]

    def base_for(self, prompt: str, concept: str) -> str:
        """The erase objective's base prompt of an item."""
        if self.base_word is None:
            return self.base_prompt
        if self.prompt_templates is not None:
            return prompt.replace(concept, self.base_word).replace("  ", " ").strip()
        return without_concept(prompt, concept, self.base_word)

    def all_prompts(self) -> list[str]:
        items = self.items()
        return [i["prompt"] for i in items] + [i["base_prompt"] for i in items if i["base_prompt"] is not None] \
            + [self.base_prompt]

    def loader_items(self) -> list[dict]:
        """What the training loader yields: here every sampling run of :meth:`items` (``mask`` None: the unmasked
        model), scored by first-order attribution."""
        return self.items()

    def train_dataloader(self) -> DataLoader:
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        dataset = ItemList(self.loader_items())
        sampler = ItemShardSampler(dataset, num_replicas=world_size, rank=rank)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=_collate)


def read_concepts_file(path: str) -> tuple[list[str], list[str] | None]:
    """The ``concept`` column of a CSV file, in order, without blanks and repeats: (every concept, None), or with
    a ``role`` column (``target`` / ``retain``), (the targets, the retained concepts)."""
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"data.concepts_file '{path}' is not a file.")
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "concept" not in [n.strip() for n in reader.fieldnames]:
            raise UserInputError(f"data.concepts_file '{path}' has no 'concept' column (its header: "
                                 f"{', '.join(reader.fieldnames or []) or 'none'}).")
        column = next(n for n in reader.fieldnames if n.strip() == "concept")
        role = next((n for n in reader.fieldnames if n.strip() == "role"), None)
        rows = [(row[column].strip(), (row.get(role) or "").strip().lower() if role else "")
                for row in reader if (row.get(column) or "").strip()]
    if role is None:
        concepts = list(dict.fromkeys(c for c, _ in rows))
        if not concepts:
            raise UserInputError(f"data.concepts_file '{path}' lists no concept.")
        return concepts, None
    wrong = next(((c, r) for c, r in rows if r not in ("target", "retain")), None)
    if wrong is not None:
        raise UserInputError(f"data.concepts_file '{path}': the role of '{wrong[0]}' is '{wrong[1]}'; "
                             "a role is 'target' or 'retain'.")
    targets = list(dict.fromkeys(c for c, r in rows if r == "target"))
    if not targets:
        raise UserInputError(f"data.concepts_file '{path}' has no row with the role 'target'.")
    return targets, list(dict.fromkeys(c for c, r in rows if r == "retain"))

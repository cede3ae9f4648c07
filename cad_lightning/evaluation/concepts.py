"""Erasure and retention on the shapes world: accuracy of the concept classifier on generated images.

An evaluation set is a fixed list of (prompt, seed, named concepts) items, so the model is evaluated on the
same prompts and initial noise before and after an edit. The target concept is measured on prompts naming
it; the retained concepts on fully specified prompts ("a red striped square") that do not name the target,
each image counting for the shape, the colour and the texture its prompt names. The accuracy of concept X
is the per-class accuracy (recall) of torchmetrics over the images whose prompt names X.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.classification import MulticlassAccuracy

from cad_lightning.backbones.backbone import DiffusionBackbone
from cad_lightning.data.world import CONCEPT_KINDS, make_prompt, prompts_naming
from cad_lightning.evaluation.classifier import ConceptDetector


@dataclass
class EvalItem:
    prompt: str
    seed: int
    named: dict[str, str]  # kind → the concept word the prompt names
    group: str  # "target" or "retain"
    target: str | None = None  # the target concept a "target" item's prompt was made for


def _named(prompt: str) -> dict[str, str]:
    out = {}
    for word in prompt.split():
        for kind, words in CONCEPT_KINDS.items():
            if word in words:
                out[kind] = word
    return out


PROMPT_SEED = 1_000_000  # the evaluation set's prompts: one draw, the same in the search and the report seeds


def evaluation_items(concept: str | list[str], retain_concepts: list[str], n_target: int, n_retain: int,
                     seed: int = 1_000_000, prompt_seed: int = PROMPT_SEED) -> list[EvalItem]:
    """Items for the target (``n_target`` prompts naming it) and the retained concepts (``n_retain`` prompts).

    Item i samples from seed ``seed + i``; the target prompts are drawn with ``prompt_seed``, so two seed sets
    (cad_lightning/evaluation/exam.py) hold the same prompts with other noise. With several targets, each gets
    ``n_target`` prompts of its own (a target prompt counts only for its own target, never for another target it
    happens to name) and the retained prompts name none of them."""
    targets = [concept] if isinstance(concept, str) else list(concept)
    generator = torch.Generator().manual_seed(prompt_seed)
    items = []
    for target in targets:
        for p in prompts_naming(target, n_target, generator):
            named = {k: w for k, w in _named(p).items() if w == target or w not in targets}
            items.append(EvalItem(p, seed + len(items), named, "target", target))
    # a kind every word of which is a target (all five shapes erased) is left to its neutral word: 'a red shape'
    choices = {k: [w for w in words if w not in targets] or [None] for k, words in CONCEPT_KINDS.items()}
    for i in range(n_retain):
        # walk the full factorial of the kinds, so every retained concept gets its share of images
        parts, rest = {}, i
        for k, words in choices.items():
            rest, index = divmod(rest, len(words))
            parts[k] = words[index]
        prompt = make_prompt(**parts)
        items.append(EvalItem(prompt, seed + len(targets) * n_target + i, _named(prompt), "retain"))
    wanted = set(retain_concepts)
    for item in items:
        if item.group == "retain":
            item.named = {k: w for k, w in item.named.items() if w in wanted}
    return items


def accuracy_from_predictions(items: list[EvalItem], predicted: dict[str, list[str]]) -> dict[str, float]:
    """``{concept: accuracy}``: per-class accuracy over the items whose prompt names the concept; a retained
    concept is measured on the retained group's prompts (which never name the target), the target on its own."""
    result: dict[str, float] = {}
    for group in ("retain", "target"):
        for kind, words in CONCEPT_KINDS.items():
            rows = [(n, i.named[kind]) for n, i in enumerate(items) if i.group == group and kind in i.named]
            if not rows:
                continue
            metric = MulticlassAccuracy(num_classes=len(words), average=None)
            per_class = metric(
                torch.tensor([words.index(predicted[kind][n]) for n, _ in rows]),
                torch.tensor([words.index(w) for _, w in rows]),
            )
            for word in sorted({w for _, w in rows}, key=words.index):
                result.setdefault(word, float(per_class[words.index(word)]))
    return result


@torch.no_grad()
def empty_prompt_rates(
    backbone: DiffusionBackbone, detector: ConceptDetector, base_prompt: str | list[str], n: int, seed: int = 2_000_000,
    **sampler
) -> dict[str, float]:
    """The floor: for every concept, the fraction of images of the base prompt (or of base prompts, cycled)
    classified as it."""
    prompts = [base_prompt] if isinstance(base_prompt, str) else list(base_prompt)
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    predicted = detector(backbone.generate(prompts, seed=seed, batch_size=64, **sampler).cpu())
    return {w: sum(p == w for p in predicted[k]) / n for k, words in CONCEPT_KINDS.items() for w in words}

"""Evaluation of edits on the shapes world: accuracy of the target and the retained concepts, and collateral.

One function, :func:`evaluate_edits`, used by every writer of edits (first-order and regression): the model
is sampled on the evaluation set without an edit and under each edit, with the same prompts, seeds and
sampler noise; each edit's row holds the target's accuracy, the retained concepts' accuracies and the
collateral of :mod:`cad_lightning.evaluation.collateral`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from cad_lightning.backbones.backbone import DiffusionBackbone
from cad_lightning.editing import count_ablated
from cad_lightning.evaluation.classifier import ConceptDetector
from cad_lightning.evaluation.collateral import ClassifierFeatures, collateral, drawn_instead, image_ssim
from cad_lightning.evaluation.concepts import EvalItem, accuracy_from_predictions

Masks = dict[str, torch.Tensor]


def generate_and_read(backbone: DiffusionBackbone, detector: ConceptDetector, items: list[EvalItem],
                      batch_size: int) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """Images (N, 3, H, W) of the items, each from its own seed, and the classifier's reading of them."""
    images = backbone.generate([i.prompt for i in items], seed=[i.seed for i in items], batch_size=batch_size).cpu()
    return images, detector(images)


def edit_row(items: list[EvalItem], concept: str | list[str], retained: list[str], before: dict[str, float],
             images: torch.Tensor, predicted: dict[str, list[str]], reference_images: torch.Tensor,
             reference_predicted: dict[str, list[str]], features: ClassifierFeatures) -> dict:
    """One edit's numbers: target accuracy (``targets``: each target's; ``target``: the highest of them),
    retained accuracies (and the worst relative to unedited), collateral."""
    targets = [concept] if isinstance(concept, str) else list(concept)
    accuracy = accuracy_from_predictions(items, predicted)
    retained_acc = {c: accuracy[c] for c in retained if c in accuracy}
    relative = {c: accuracy[c] / before[c] for c in retained_acc if before.get(c, 0) > 0}
    worst = min(relative, key=relative.get) if relative else None
    row = {
        "target": max(accuracy[c] for c in targets),
        "targets": {c: accuracy[c] for c in targets},
        "retained": retained_acc,
        "retained_mean": sum(retained_acc.values()) / max(1, len(retained_acc)),
        "retained_min_relative": relative[worst] if worst else None,
        "retained_worst": worst,
        **collateral(items, targets[0], images, predicted, reference_images, reference_predicted, features),
    }
    if len(targets) > 1:
        row["drawn_instead_by_target"] = {c: drawn_instead(items, c, predicted) for c in targets}
    return row


def evaluate_edits(
    backbone: DiffusionBackbone,
    detector: ConceptDetector,
    concept: str | list[str],
    retained: list[str],
    items: list[EvalItem],
    edits: dict[str, dict[float, Masks]],
    apply: Callable[[Masks | None], None],
    batch_size: int = 96,
    progress: bool = True,
    ssim_only: dict[str, dict[float, Masks]] | None = None,
    until: Callable[[list[dict]], bool] | None = None,
    desc: str = "Evaluating edits",
    screen: Callable[[dict], bool] | None = None,
) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    """Evaluate the unedited model and every edit ``{selection: {ratio: masks}}``.

    ``apply(masks)`` puts an edit on the model (``apply(None)``: the unedited model); the model is left
    unedited. Returns the unedited accuracies ``{concept: accuracy}``, one row per edit (``selection``,
    ``ratio``, ``ablated`` and the numbers of :func:`edit_row`), and the images of each selection's edits,
    ``{"unedited": (N, 3, H, W), "<selection> <ratio>": ...}``.

    ``ssim_only`` edits (e.g. further draws of a random control) are sampled on the retained items only: their
    rows hold ``selection``, ``ratio``, ``ablated`` and ``retained_ssim``, and no images are returned for them.

    The edits are evaluated ratio by ratio, smallest first (every selection's edit of a ratio, then its
    ``ssim_only`` edits); after each ratio ``until(rows so far)`` may end the evaluation (True), leaving the larger
    ratios unevaluated. The rows come back in the order of ``edits`` (then ``ssim_only``), by ratio.

    ``screen(row)``: each edit is first sampled on the target items alone, and its partial row (``target``,
    ``targets``, ``drawn_instead``, ``other_words``, ``other_words_relative``) is screened; an edit that fails
    gets that row with ``screened`` True (no retained images, no images returned), and a ratio whose every
    edit fails skips its ``ssim_only`` edits too. What passes is sampled on the retained items as well, so its
    row is the one without a screen (each image from its own seed, whatever else is sampled beside it).
    """
    apply(None)
    reference_images, reference_predicted = generate_and_read(backbone, detector, items, batch_size)
    before = accuracy_from_predictions(items, reference_predicted)
    features = ClassifierFeatures(detector)
    rows, images = [], {"unedited": reference_images}
    ssim_only = ssim_only or {}
    retain = [n for n, item in enumerate(items) if item.group == "retain"]
    target = [n for n, item in enumerate(items) if item.group == "target"]
    total = sum(len(v) for v in edits.values()) + sum(len(v) for v in ssim_only.values())
    ratios = sorted({r for per_ratio in [*edits.values(), *ssim_only.values()] for r in per_ratio})
    bar = tqdm(total=total, desc=desc, unit="edit", disable=not progress)
    try:
        for ratio in ratios:
            passed = screen is None
            for selection, per_ratio in edits.items():
                if ratio not in per_ratio:
                    continue
                bar.set_postfix_str(f"{selection} {ratio:g}")
                masks = per_ratio[ratio]
                head = {"selection": selection, "ratio": ratio, "ablated": count_ablated(masks)}
                apply(masks)
                try:
                    if screen is None:
                        edited, predicted = generate_and_read(backbone, detector, items, batch_size)
                    else:
                        edited, predicted, partial = _screened(backbone, detector, items, target, retain, concept,
                                                               retained, before, reference_images,
                                                               reference_predicted, features, batch_size, screen)
                finally:
                    apply(None)
                bar.update()
                if edited is None:
                    rows.append({**head, **partial, "screened": True})
                    continue
                passed = True
                rows.append({**head, **edit_row(items, concept, retained, before, edited, predicted, reference_images,
                                                reference_predicted, features)})
                images[f"{selection} {ratio:g}"] = edited
            for selection, per_ratio in ssim_only.items():
                if ratio not in per_ratio:
                    continue
                if not passed:  # no edit of this ratio to read against its control
                    bar.update()
                    continue
                bar.set_postfix_str(f"{selection} {ratio:g}")
                masks = per_ratio[ratio]
                apply(masks)
                try:
                    edited = backbone.generate([items[n].prompt for n in retain], seed=[items[n].seed for n in retain],
                                               batch_size=batch_size).cpu()
                finally:
                    apply(None)
                rows.append({"selection": selection, "ratio": ratio, "ablated": count_ablated(masks),
                             "retained_ssim": image_ssim(edited, reference_images[retain])})
                bar.update()
            if until is not None and until(rows):
                bar.total = bar.n  # the larger ratios are not evaluated: the bar ends full
                bar.refresh()
                break
    finally:
        bar.close()
    order = {selection: n for n, selection in enumerate([*edits, *ssim_only])}
    rows.sort(key=lambda row: (order[row["selection"]], row["ratio"]))
    return before, rows, images


TARGET_KEYS = ("target", "targets", "drawn_instead", "drawn_instead_by_target", "other_words", "other_words_relative")


def _screened(backbone, detector, items, target, retain, concept, retained, before, reference_images,
              reference_predicted, features, batch_size, screen):
    """The edit on the model: its target items sampled and screened; when they pass, its retained items too.
    Returns (images, readings, partial row) of all items, or (None, None, partial row) when screened out."""
    subset = [items[n] for n in target]
    target_images, target_read = generate_and_read(backbone, detector, subset, batch_size)
    partial = edit_row(subset, concept, retained, before, target_images, target_read, reference_images[target],
                       {k: [v[n] for n in target] for k, v in reference_predicted.items()}, features)
    partial = {k: partial[k] for k in TARGET_KEYS if k in partial}
    if not screen(partial):
        return None, None, partial
    retain_images, retain_read = generate_and_read(backbone, detector, [items[n] for n in retain], batch_size)
    images = torch.empty(len(items), *target_images.shape[1:], dtype=target_images.dtype)
    images[target], images[retain] = target_images, retain_images
    predicted = {k: [None] * len(items) for k in target_read}
    for indices, read in ((target, target_read), (retain, retain_read)):
        for k, words in read.items():
            for n, w in zip(indices, words):
                predicted[k][n] = w
    return images, predicted, partial


def read_against_controls(rows: list[dict], floor: float | dict[str, float] | None, erase: bool = True) -> list[dict]:
    """The rows of :func:`evaluate_edits` with the random control's draws folded in: the ``random`` row (draw 0,
    when it was evaluated in full) gets the retained SSIM of every draw (it and the ``random draw N`` rows,
    dropped here), every other edit the control of its ratio (``random_retained_ssim``, the mean of the draws,
    and the draws) and, for an erase edit, whether it meets the goal (:func:`selective` with ``floor``; None for
    amplify edits and for the controls)."""
    draws: dict[float, list[float]] = {}
    for r in rows:
        if r["selection"] == "random" or r["selection"].startswith("random draw "):
            draws.setdefault(r["ratio"], []).append(r["retained_ssim"])
    rows = [r for r in rows if not r["selection"].startswith("random draw ")]
    controls = {ratio: {"retained_ssim": sum(ssim) / len(ssim)} for ratio, ssim in draws.items()}
    for r in rows:
        if r["selection"] == "random":
            r["retained_ssim_draws"] = draws[r["ratio"]]
        control = controls.get(r["ratio"]) if r["selection"] != "random" else None
        r["random_retained_ssim"] = control["retained_ssim"] if control else None
        r["random_retained_ssim_draws"] = draws[r["ratio"]] if control else None
        # an amplify edit is read by its gain (and the same collateral), not by this goal
        if r.get("screened"):  # its target images alone already missed the goal
            r["selective"] = False if erase else None
        else:
            r["selective"] = selective(r, control, floor) if erase and r["selection"] != "random" else None
    return rows


def goal_met(rows: list[dict]) -> bool:
    """Whether every edited selection among ``rows`` (read by :func:`read_against_controls`) has an edit that meets
    the goal."""
    selections = {r["selection"] for r in rows if r["selection"] != "random"}
    return bool(selections) and all(any(r["selective"] for r in rows if r["selection"] == s) for s in selections)


def target_reached(row: dict, floor: float | dict[str, float] | None, margin: float = 0.05, keep: float = 0.9) -> bool:
    """The part of the goal the target prompts' images decide: the target at most floor + ``margin`` (each target
    its own, with ``floor`` ``{concept: floor}``) and their other words at least ``keep`` of unedited."""
    if floor is None:
        return False
    if isinstance(floor, dict):
        erased = all(accuracy <= floor.get(c, 0.0) + margin for c, accuracy in row["targets"].items())
    else:
        erased = row["target"] <= floor + margin
    other = row.get("other_words_relative")
    return erased and (other is None or other >= keep)


def selective(row: dict, control: dict | None, floor: float | dict[str, float] | None, margin: float = 0.05,
              keep: float = 0.9) -> bool:
    """Whether an edit meets the selective-edit goal: target at most floor + ``margin`` (with several targets,
    ``floor`` ``{concept: floor}``: each target at most its own floor + ``margin``), every retained concept and
    the target prompts' other words at least ``keep`` of unedited, and retained images no further from the
    unedited ones (SSIM) than the random control of equal count."""
    if floor is None or control is None:
        return False
    return (target_reached(row, floor, margin, keep)
            and (row["retained_min_relative"] is None or row["retained_min_relative"] >= keep)
            and row["retained_ssim"] >= control["retained_ssim"])


def first_reaching(ratios: list[float], reaches: Callable[[float], bool]) -> float | None:
    """The smallest of the ascending ``ratios`` for which ``reaches`` holds, by bisection, or None when it holds
    for none. ``reaches`` is taken to be monotone (once it holds, it holds for every larger ratio: nested edits
    of a growing size) and is called about log2(len(ratios) + 1) times; a ratio is never asked twice."""
    if list(ratios) != sorted(ratios):
        raise ValueError(f"first_reaching needs ascending ratios, got {ratios}.")
    low, high = 0, len(ratios)  # ratios[high] reaches (high == len: none known to)
    while low < high:
        middle = (low + high) // 2
        if reaches(ratios[middle]):
            high = middle
        else:
            low = middle + 1
    return ratios[high] if high < len(ratios) else None


def search_floor(
    backbone: DiffusionBackbone,
    detector: ConceptDetector,
    concept: str,
    per_ratio: dict[float, Masks],
    apply: Callable[[Masks | None], None],
    goal: float,
    items: list[EvalItem],
    batch_size: int = 96,
    progress: bool = True,
) -> tuple[float | None, list[dict]]:
    """The smallest ratio of the nested edits ``per_ratio`` whose target accuracy is at most ``goal``.

    Each probe samples the target ``items`` (the evaluation's target prompts on the *search* seeds of
    cad_lightning/evaluation/exam.py: the edit found is then reported on images it was not chosen on) and reads
    the target's accuracy. Returns the ratio (None when even the largest edit stays above ``goal``) and the probes,
    ascending: ``{"ratio", "ablated", "target", "drawn_instead", "reached"}``. The model is left unedited.
    """
    probes: dict[float, dict] = {}
    bar = tqdm(total=math.ceil(math.log2(len(per_ratio) + 1)), desc="Searching the floor", unit="edit",
               disable=not progress)

    def reaches(ratio: float) -> bool:
        bar.set_postfix_str(f"{ratio:g}")
        apply(per_ratio[ratio])
        try:
            _, predicted = generate_and_read(backbone, detector, items, batch_size)
        finally:
            apply(None)
        target = accuracy_from_predictions(items, predicted)[concept]
        probes[ratio] = {"ratio": ratio, "ablated": count_ablated(per_ratio[ratio]), "target": target,
                         "drawn_instead": drawn_instead(items, concept, predicted), "reached": target <= goal}
        bar.update()
        return target <= goal

    try:
        found = first_reaching(sorted(per_ratio), reaches)
    finally:
        bar.close()
    return found, [probes[r] for r in sorted(probes)]

"""Collateral of an edit: how far it moves what it should leave alone.

An edit is read against the unedited model on the same prompts, seeds and sampler noise (the evaluation set of
:func:`~cad_lightning.evaluation.concepts.evaluation_items`):

- **retained images**: SSIM of each edited image to the unedited image of the same item (torchmetrics), and
  KID between the edited and unedited images on the concept classifier's features (torchmetrics
  ``KernelInceptionDistance`` with that classifier as the feature extractor). They see what accuracy cannot:
  a colour cast, a changed background, a redrawn object that the classifier still reads correctly;
- **the target prompts' other words**: "a red striped circle" erased should still be red and striped. The
  share of the other named words the classifier reads, relative to the unedited model, and what the prompts'
  kind (e.g. the shape) is drawn as instead.

Same-seed image comparisons under ancestral sampling (eta > 0) diverge for any edit, random ones included, so
these numbers are meant to be read against a random control of equal count (docs/design-notes.md).
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.kid import KernelInceptionDistance

from cad_lightning.data.world import concept_kind
from cad_lightning.evaluation.classifier import ConceptDetector
from cad_lightning.evaluation.concepts import EvalItem

KID_SEED = 0  # KID draws random subsets of the features; a fixed seed makes reports repeatable


class ClassifierFeatures(torch.nn.Module):
    """The concept classifier's penultimate features (N, d) of images (N, 3, H, W) in [0, 1], for KID, scaled to
    length sqrt(d)."""

    def __init__(self, detector: ConceptDetector) -> None:
        super().__init__()
        self.classifier = detector.classifier

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        classifier = self.classifier
        images = images.to(classifier.device, classifier.dtype)
        if images.shape[-1] != classifier.resolution or images.shape[-2] != classifier.resolution:
            images = torch.nn.functional.interpolate(images, size=(classifier.resolution,) * 2, mode="bilinear",
                                                     antialias=True)
        features = classifier.features(images * 2 - 1).double()
        # unit length times sqrt(d): the polynomial kernel (x·y/d + 1)³ of KID then sees cosines, not the
        # arbitrary scale of the classifier's activations
        return torch.nn.functional.normalize(features, dim=1) * features.shape[1] ** 0.5


def image_ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of images (N, 3, H, W) in [0, 1] to the reference images of the same items."""
    if len(images) == 0:
        return float("nan")
    kernel = min(11, (min(images.shape[-2:]) // 2) * 2 - 1)  # an odd window that fits small images
    return float(structural_similarity_index_measure(images.float(), reference.float(), data_range=1.0,
                                                     kernel_size=kernel))


def balanced_halves(groups: list[str]) -> tuple[list[int], list[int]]:
    """Two disjoint halves of the indices with the same content: the items of each group (e.g. each prompt) are
    dealt alternately to the two halves, continuing the alternation across groups."""
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    halves: tuple[list[int], list[int]] = ([], [])
    turn = 0
    for indices in by_group.values():
        for index in indices:
            halves[turn].append(index)
            turn = 1 - turn
    return halves


def _kid(features: ClassifierFeatures, real: torch.Tensor, fake: torch.Tensor) -> float:
    with warnings.catch_warnings():  # a note that features are kept in memory: a few hundred, here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        # every rank holds all the images it reads (see evaluation/exam.py): nothing to synchronise on compute
        metric = KernelInceptionDistance(feature=features, subset_size=min(len(real), len(fake)), subsets=10,
                                         sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(KID_SEED)
        mean, _ = metric.compute()
    return 1000 * float(mean)


def feature_kid(features: ClassifierFeatures, images: torch.Tensor, reference: torch.Tensor,
                groups: list[str] | None = None) -> float:
    """Excess KID (×1000) of edited over unedited images on the classifier's features: 0 for an edit that
    changes nothing, > 0 when the edited images' features move away from the unedited ones'.

    The two sets are paired (same seeds), and KID's estimator assumes independent samples: an image and its
    own reference would count as a perfect match. So the items are dealt into two halves holding the same
    prompts (``groups``), and KID(unedited half A, edited half B) is read against KID(unedited half A,
    unedited half B), whose value is the estimator's offset for halves of this make-up."""
    n = min(len(images), len(reference))
    first, second = balanced_halves(groups if groups is not None else ["" for _ in range(n)])
    size = min(len(first), len(second))
    if size < 2:
        return float("nan")
    first, second = first[:size], second[:size]
    return _kid(features, reference[first], images[second]) - _kid(features, reference[first], reference[second])


def other_words(items: list[EvalItem], concept: str, predicted: dict[str, list[str]]) -> tuple[float, int]:
    """Share of the words of the target prompts other than their target's kind that the images show, and how
    many such words there are (``nan, 0`` when the target prompts name nothing else). ``concept`` is the target
    of items made for no particular one."""
    words = [(n, k, w) for n, item in enumerate(items) if item.group == "target"
             for k, w in item.named.items() if k != concept_kind(item.target or concept)]
    if not words:
        return float("nan"), 0
    return sum(predicted[k][n] == w for n, k, w in words) / len(words), len(words)


def drawn_instead(items: list[EvalItem], concept: str, predicted: dict[str, list[str]]) -> dict[str, float]:
    """What the concept's target prompts' kind is drawn as: share of each word of that kind on its prompts."""
    kind = concept_kind(concept)
    rows = [predicted[kind][n] for n, item in enumerate(items)
            if item.group == "target" and item.target in (None, concept)]
    counts = Counter(rows)
    return {w: counts[w] / len(rows) for w in sorted(counts, key=lambda w: (-counts[w], w))} if rows else {}


def collateral(
    items: list[EvalItem],
    concept: str,
    images: torch.Tensor,
    predicted: dict[str, list[str]],
    reference_images: torch.Tensor,
    reference_predicted: dict[str, list[str]],
    features: ClassifierFeatures,
) -> dict:
    """Collateral of an edit: images (N, 3, H, W) and predictions of the edited model against the unedited
    model's on the same items. Returns ``retained_ssim``, ``retained_kid`` (×1000), ``other_words`` (share
    kept, edited), ``other_words_relative`` (edited / unedited) and ``drawn_instead``."""
    retain = [n for n, item in enumerate(items) if item.group == "retain"]
    kept, count = other_words(items, concept, predicted)
    kept_before, _ = other_words(items, concept, reference_predicted)
    return {
        "retained_ssim": image_ssim(images[retain], reference_images[retain]),
        "retained_kid": feature_kid(features, images[retain], reference_images[retain],
                                    [items[n].prompt for n in retain]),
        "other_words": kept,
        "other_words_relative": kept / kept_before if count and kept_before > 0 else None,
        "drawn_instead": drawn_instead(items, concept, predicted),
    }

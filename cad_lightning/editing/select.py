"""Choose which weights to ablate from attribution scores: erase / amplify, per row, matrix or globally.

Conventions: a *score* dict maps UNet parameter names to fp32 tensors of the parameter's
shape (α > 0: the weight induces the concept); a *mask* dict maps the same names to bool tensors of that shape,
True = keep, False = ablate (zero).

Design notes
------------
* **Exact counts.** The target number of ablated weights is ``K = round(ratio × total weights)`` (see
  :func:`target_count`; ``ratio`` is read as the decimal it prints as, so ``0.29 × 100`` is 29, not 28).
  Every scope hits K exactly whenever enough eligible weights exist. The official CAD code rounds the
  per-row count, so rows shorter than ``1 / ratio`` ablate nothing; here rows get ``floor(ratio × row_len)``
  and the ``K − Σ floors`` left over go, one each, to the rows whose next-best candidate scores highest.
* **Sign restriction.** Only strictly positive (erase) / strictly negative (amplify) scores are eligible:
  ablating a weight of the wrong sign would work *against* the edit. When a quota cannot be filled, fewer
  weights are ablated (never wrong-signed ones); :func:`count_ablated` reports the real count.
* **Determinism.** Ties are broken by flat index: parameters in the score dict's order, then row-major
  inside each parameter (for the row scope's extras: the row's position in the same order).
* **Rows.** A row is an output neuron: index 0 of the parameter; a 1-D (or 0-D) parameter is one row; the
  trailing dims of a convolution weight are flattened into its row.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Mapping

import torch

from cad_lightning.editing.delta import WeightDelta, random_delta_like
from cad_lightning.errors import UserInputError

MODES = ("erase", "amplify")
SCOPES = ("row", "matrix", "global")


# --------------------------------------------------------------------------------------------- validation
def _check_ratio(ratio) -> Fraction:
    """``ratio`` as an exact fraction, or a UserInputError when it is not a number strictly between 0 and 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(float(ratio)) \
            or not 0.0 < float(ratio) < 1.0:
        raise UserInputError(
            f"ratio must be a number in (0, 1) (the fraction of weights to ablate), got {ratio!r}.")
    return Fraction(repr(float(ratio)))


def _check_choice(field: str, value, accepted: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise UserInputError(f"{field} must be one of {', '.join(repr(a) for a in accepted)}, got {value!r}.")
    return value


def _check_scores(scores: Mapping[str, torch.Tensor], field: str = "scores") -> dict[str, torch.Tensor]:
    """The score dict as fp32 tensors; UserInputError when empty, not tensors, or holding NaN/inf."""
    if not isinstance(scores, Mapping) or len(scores) == 0:
        raise UserInputError(
            f"{field} is empty (got {type(scores).__name__} of length {len(scores) if hasattr(scores, '__len__') else '?'}),"
            " so the selection selects nothing; pass a dict of parameter name -> score tensor.")
    out = {}
    for name, score in scores.items():
        if not isinstance(score, torch.Tensor):
            raise UserInputError(
                f"{field}[{name!r}] must be a torch.Tensor of the parameter's shape, got {type(score).__name__}.")
        score = score.detach().float()
        bad = int((~torch.isfinite(score)).sum())
        if bad:
            raise UserInputError(
                f"{field}[{name!r}] has {bad} non-finite (NaN/inf) entries out of {score.numel()}; scores must be finite.")
        out[name] = score
    return out


def _check_exclude(exclude, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``exclude`` restricted to the score keys (others ignored); shape / dtype errors name the key."""
    if exclude is None:
        return {}
    if not isinstance(exclude, Mapping):
        raise UserInputError(f"exclude must be a dict of parameter name -> bool tensor, got {type(exclude).__name__}.")
    out = {}
    for name, protected in exclude.items():
        if name not in scores:
            continue
        if not isinstance(protected, torch.Tensor) or protected.dtype != torch.bool:
            raise UserInputError(
                f"exclude[{name!r}] must be a bool tensor (True = protected), got "
                f"{getattr(protected, 'dtype', type(protected).__name__)}.")
        if protected.shape != scores[name].shape:
            raise UserInputError(
                f"exclude[{name!r}] has shape {tuple(protected.shape)} but its score has shape "
                f"{tuple(scores[name].shape)}; they must match.")
        out[name] = protected.to(scores[name].device)
    return out


# --------------------------------------------------------------------------------------------- helpers
def _rows(t: torch.Tensor) -> torch.Tensor:
    """View a parameter-shaped tensor as (rows, row_len): dim 0 = output neurons; ≤1-D = one row."""
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def _top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (n,) of the k largest finite entries of ``values`` (n,); -inf marks ineligible entries.

    Ties go to the lower index. Uses a k-th-value threshold instead of a full sort (memory: SD-size vectors).
    """
    sel = torch.zeros_like(values, dtype=torch.bool)
    k = min(int(k), int(torch.isfinite(values).sum()))
    if k <= 0:
        return sel
    threshold = torch.kthvalue(values, values.numel() - k + 1).values
    sel |= values > threshold
    need = k - int(sel.sum())
    if need > 0:
        sel[(values == threshold).nonzero().flatten()[:need]] = True
    return sel


def _signed_eligible(scores: dict[str, torch.Tensor], mode: str, exclude: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Edit-direction scores (score for erase, −score for amplify); -inf where ineligible (≤ 0 or protected)."""
    out = {}
    for name, score in scores.items():
        s = score if mode == "erase" else -score
        ineligible = s <= 0
        if name in exclude:
            ineligible = ineligible | exclude[name]
        out[name] = s.masked_fill(ineligible, float("-inf"))
    return out


def target_count(scores: Mapping[str, torch.Tensor], ratio: float) -> int:
    """K = round(ratio × total weights in ``scores``): the number of weights a selection aims to ablate."""
    r = _check_ratio(ratio)
    return round(r * sum(int(t.numel()) for t in scores.values()))


def count_ablated(masks: Mapping[str, torch.Tensor]) -> int:
    """Number of ablated (False) entries over all masks: the real count, which may fall short of the target.
    A :class:`~cad_lightning.editing.delta.WeightDelta`: the number of weights it changes."""
    if isinstance(masks, WeightDelta):
        return masks.changed()
    return sum(int((~m.bool()).sum()) for m in masks.values())


# --------------------------------------------------------------------------------------------- selection
def select_components(
    scores: Mapping[str, torch.Tensor],
    ratio: float,
    mode: str = "erase",
    scope: str = "row",
    exclude: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks (True = keep) that ablate the ``ratio`` fraction of weights that most push the edit's direction.

    ``mode="erase"`` ablates the highest positive scores, ``"amplify"`` the most negative; ``scope`` is
    ``"row"`` (each output neuron its share, extras to the best next candidates), ``"matrix"`` (each
    parameter round(ratio × numel), largest remainders so the sum is K) or ``"global"`` (top-K overall).
    ``exclude`` (bool tensors, True = protected) is never selected. Returns a bool mask for every score key,
    on the scores' device; ``count_ablated`` gives the real count (< K only if eligible weights ran out).
    """
    r = _check_ratio(ratio)
    _check_choice("mode", mode, MODES)
    _check_choice("scope", scope, SCOPES)
    scores = _check_scores(scores)
    protected = _check_exclude(exclude, scores)
    signed = _signed_eligible(scores, mode, protected)
    total = sum(t.numel() for t in signed.values())
    k = round(r * total)

    if scope == "global":
        names = list(signed)
        flat = torch.cat([signed[n].reshape(-1).to(signed[names[0]].device) for n in names])
        chosen = _top_k(flat, k)
        masks, start = {}, 0
        for n in names:
            size = signed[n].numel()
            masks[n] = ~chosen[start:start + size].reshape(signed[n].shape).to(signed[n].device)
            start += size
        return masks

    if scope == "matrix":
        names = list(signed)
        exact = [r * signed[n].numel() for n in names]
        quota = {n: math.floor(x) for n, x in zip(names, exact)}
        left = k - sum(quota.values())
        # Largest remainders get the extras; ties go to the earlier parameter.
        order = sorted(range(len(names)), key=lambda i: (-(exact[i] - quota[names[i]]), i))
        for i in order[:left]:
            quota[names[i]] += 1
        return {n: ~_top_k(t.reshape(-1), quota[n]).reshape(t.shape) for n, t in signed.items()}

    # scope == "row"
    masks, candidates, where, floors = {}, [], [], 0
    for n, t in signed.items():
        rows = _rows(t)
        n_rows, row_len = rows.shape
        floor = math.floor(r * row_len)
        floors += floor * n_rows
        chosen = torch.zeros_like(rows, dtype=torch.bool)
        if row_len > 0 and n_rows > 0:
            # Descending stable order per row: equal scores keep row-major order (-inf sort last).
            order = torch.argsort(-rows, dim=1, stable=True)[:, : floor + 1]
            best = rows.gather(1, order)
            take = torch.isfinite(best[:, :floor])
            chosen.scatter_(1, order[:, :floor], take)
            if floor < row_len:
                candidates.append(best[:, floor])
                where.append((n, order[:, floor]))
        masks[n] = chosen
    left = k - floors
    if candidates and left > 0:
        device = candidates[0].device
        extra = _top_k(torch.cat([c.to(device) for c in candidates]), left)
        start = 0
        for (n, pos), c in zip(where, candidates):
            rows_extra = extra[start:start + c.numel()].to(pos.device)
            idx = rows_extra.nonzero().flatten()
            masks[n][idx, pos[idx]] = True
            start += c.numel()
    return {n: ~masks[n].reshape(signed[n].shape) for n in signed}


# --------------------------------------------------------------------------------------------- several concepts
MULTI_CONCEPT = ("joint", "union")


def joint_scores(per_concept: list[Mapping[str, torch.Tensor]], mode: str = "erase") -> dict[str, torch.Tensor]:
    """One score per weight for an edit of several concepts: the sum of each concept's scores divided by its
    own mass in the edit's direction (the sum of its positive scores for erase, of its negative ones' magnitude
    for amplify), so every concept weighs the same however large its scores are, and a weight that serves two
    concepts ranks by both. Any selection (:func:`select_components`, the ``selective`` rounds) takes the result
    as it takes one concept's scores."""
    _check_choice("mode", mode, MODES)
    if not per_concept:
        raise UserInputError("joint_scores needs the scores of at least one concept.")
    checked = [_check_scores(s) for s in per_concept]
    names = list(checked[0])
    if any(list(s) != names for s in checked[1:]):
        raise UserInputError("joint_scores: every concept's scores must cover the same parameters.")
    sign = 1.0 if mode == "erase" else -1.0
    out = {n: torch.zeros_like(checked[0][n]) for n in names}
    for scores in checked:
        mass = sum(float((sign * t).clamp(min=0).double().sum()) for t in scores.values())
        if mass <= 0:
            raise UserInputError(f"A concept's scores hold no weight that pushes towards {mode}: nothing to select.")
        for n in names:
            out[n] += scores[n] / mass
    return out


def union_selection(per_concept: list[Mapping[str, torch.Tensor]], ratio: float, mode: str = "erase",
                    scope: str = "row") -> dict[str, torch.Tensor]:
    """Masks (True = keep) of the union of the concepts' own top sets, the budget split evenly: each concept's
    :func:`select_components` at ``ratio`` / (number of concepts). Where the sets overlap the union ablates
    fewer than ``ratio`` of the weights (:func:`count_ablated` gives the count)."""
    r = _check_ratio(ratio)
    share = float(r / len(per_concept))
    masks: dict[str, torch.Tensor] | None = None
    for scores in per_concept:
        chosen = select_components(scores, share, mode=mode, scope=scope)
        masks = chosen if masks is None else {n: masks[n] & chosen[n] for n in masks}
    return masks


# --------------------------------------------------------------------------------------------- retain set
def _std(scores: dict[str, torch.Tensor], keys) -> float:
    """Population standard deviation over every entry of ``scores[k]`` for k in keys (float64 sums)."""
    n = sum(scores[k].numel() for k in keys)
    s1 = sum(float(scores[k].double().sum()) for k in keys)
    s2 = sum(float((scores[k].double() ** 2).sum()) for k in keys)
    mean = s1 / max(n, 1)
    return math.sqrt(max(s2 / max(n, 1) - mean * mean, 0.0))


def retain_adjusted_scores(
    target: Mapping[str, torch.Tensor],
    retained: list[Mapping[str, torch.Tensor]],
    weight: float = 1.0,
    mode: str = "erase",
) -> dict[str, torch.Tensor]:
    """Target scores lowered where a component also drives a retained concept, so selection protects it.

    Each dict is divided by its own standard deviation over all components (σ, population; a constant dict
    is left unscaled) so concepts are comparable; with ŝ = s / σ(s) and sign σₑ = +1 (erase) or −1 (amplify):

        adjusted = t̂ − σₑ · weight · maxᵣ max(σₑ · r̂, 0)

    i.e. erase: ``t̂ − weight · maxᵣ r̂⁺`` (positive part); amplify: ``t̂ + weight · maxᵣ (−r̂)⁺`` (magnitude
    of the negative part, pushed towards positive so the amplify edit avoids it). Centring is deliberately
    not done: it would change which components have the edit's sign. Retained dicts must cover every target
    key with the same shape (extra keys are ignored; σ is taken over the target keys). Returns fp32 tensors.
    """
    _check_choice("mode", mode, MODES)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)) \
            or float(weight) < 0:
        raise UserInputError(f"weight must be a finite number >= 0 (how strongly retained concepts are protected), got {weight!r}.")
    target = _check_scores(target, "target")
    if not isinstance(retained, (list, tuple)):
        raise UserInputError(f"retained must be a list of score dicts, got {type(retained).__name__}.")
    keys = list(target)
    sign = 1.0 if mode == "erase" else -1.0

    def normalised(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        std = _std(d, keys)
        return {k: d[k] / std if std > 0 else d[k].clone() for k in keys}

    t_hat = normalised(target)
    penalty: dict[str, torch.Tensor] | None = None
    for i, r in enumerate(retained):
        field = f"retained[{i}]"
        if not isinstance(r, Mapping):
            raise UserInputError(f"{field} must be a dict of parameter name -> score tensor, got {type(r).__name__}.")
        for k in keys:
            if k not in r:
                raise UserInputError(f"{field} has no score for parameter {k!r}; it must cover every target parameter.")
            if tuple(r[k].shape) != tuple(target[k].shape):
                raise UserInputError(
                    f"{field}[{k!r}] has shape {tuple(r[k].shape)} but the target score has shape {tuple(target[k].shape)}.")
        r = _check_scores({k: r[k] for k in keys}, field)
        r_hat = normalised(r)
        part = {k: (sign * r_hat[k].to(t_hat[k].device)).clamp(min=0) for k in keys}
        penalty = part if penalty is None else {k: torch.maximum(penalty[k], part[k]) for k in keys}
    if penalty is None:
        return t_hat
    return {k: (t_hat[k] - sign * float(weight) * penalty[k]).float() for k in keys}


# --------------------------------------------------------------------------------------------- collateral
def collateral_penalised_scores(
    scores: Mapping[str, torch.Tensor],
    sensitivity: Mapping[str, torch.Tensor],
    offset: float = 0.03,
) -> dict[str, torch.Tensor]:
    """Scores per unit of collateral: the concept gap a weight carries over how much its removal moves the
    model's output on prompts to preserve,

        adjusted = α / (s + offset · mean(s))

    with s ≥ 0 the output sensitivity of :mod:`cad_lightning.attribution.sensitivity` (mean over every scored
    weight in the denominator). Taking the top of this ranking until a count is reached is the greedy answer to
    "remove as much of the concept as possible for the least output change on what must stay" (a knapsack with
    first-order gains and diagonal costs). A weight whose removal moves every output (a colour cast, a contrast
    change) has a large s and loses its rank, even when CAD's gap objective, blind to changes common to both of
    its branches, scores it high. ``offset`` → ∞ gives CAD's own ranking; 0 ranks by the ratio alone. The sign
    of α is kept, so erase (top positive) and amplify (top negative) select as before; the ranking does not
    depend on the scale of α. Returns fp32 tensors for the score keys."""
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not math.isfinite(float(offset)) \
            or float(offset) < 0:
        raise UserInputError(f"offset must be a finite number >= 0 (the share of the mean sensitivity added to each "
                             f"weight's), got {offset!r}.")
    scores = _check_scores(scores)
    sensitivity = _check_scores(sensitivity, "sensitivity")
    for name, score in scores.items():
        if name not in sensitivity:
            raise UserInputError(f"sensitivity has no entry for parameter {name!r}; it must cover every scored parameter.")
        if sensitivity[name].shape != score.shape:
            raise UserInputError(f"sensitivity[{name!r}] has shape {tuple(sensitivity[name].shape)} but its score has "
                                 f"shape {tuple(score.shape)}.")
        if bool((sensitivity[name] < 0).any()):
            raise UserInputError(f"sensitivity[{name!r}] has negative entries; it is a mean of squares and must be >= 0.")
    total = sum(float(sensitivity[n].double().sum()) for n in scores)
    mean = total / max(1, sum(sensitivity[n].numel() for n in scores))
    floor = float(offset) * mean
    if floor == 0:
        floor = torch.finfo(torch.float32).tiny  # all sensitivities 0 (or offset 0): avoid 0 / 0
    return {name: score / (sensitivity[name].to(score.device) + floor) for name, score in scores.items()}


# --------------------------------------------------------------------------------------------- control
def random_like(masks: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random-ablation control: same number of ablated weights in every row of every parameter, positions
    uniform at random within the row (so per-parameter and total counts match too), drawn from ``generator``.
    A :class:`~cad_lightning.editing.delta.WeightDelta`: a random change of the same Frobenius norm in each of
    its parameters (:func:`~cad_lightning.editing.delta.random_delta_like`).
    """
    if isinstance(masks, WeightDelta):
        return random_delta_like(masks, generator)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (for a reproducible control), got {type(generator).__name__}.")
    if not isinstance(masks, Mapping) or len(masks) == 0:
        raise UserInputError("masks is empty, so the random control selects nothing; pass a dict of parameter name -> bool mask.")
    out = {}
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise UserInputError(f"masks[{name!r}] must be a bool tensor (True = keep), got "
                                 f"{getattr(mask, 'dtype', type(mask).__name__)}.")
        rows = _rows(mask)
        n_rows, row_len = rows.shape
        if mask.numel() == 0:
            out[name] = mask.clone()
            continue
        per_row = (~rows).sum(dim=1).to(generator.device)  # (rows,)
        order = torch.rand(n_rows, row_len, generator=generator, device=generator.device).argsort(dim=1)
        ablate_sorted = torch.arange(row_len, device=generator.device)[None, :] < per_row[:, None]
        ablate = torch.zeros(n_rows, row_len, dtype=torch.bool, device=generator.device)
        ablate.scatter_(1, order, ablate_sorted)
        out[name] = (~ablate).reshape(mask.shape).to(mask.device)
    return out

"""Selective edits of the cross-attention keys and values, with their collateral computed exactly in text space.

Why
---
A cross-attention key or value weight reads only the prompt: ``K = W_k E``, with ``E`` the text encoder's
token embeddings (D per token), which no UNet edit changes. So the change an edit of ``W`` makes to the keys
and values of *any* prompt is known without sampling: ablating the set ``S_i`` of row ``i`` changes that
row's output on token ``e`` by ``−Σ_{j∈S_i} W_ij e_j``. Over the tokens of the prompts to preserve, the mean
squared change of row ``i`` is ``u_i^T C u_i``, with ``u_i = W_i ⊙ 1_{S_i}`` and ``C`` (D × D) the second
moment of their token embeddings. On the embedded model ``C`` is far from isotropic (half its eigenvalues are
under 1e-4 of the largest): a concept's words differ from the other prompts' mostly in directions the other
prompts barely use, and removals that point there, or whose changes cancel on the preserved tokens, are
almost free. Charging each weight its diagonal share (``W_ij² C_jj``) cannot see either.

How
---
The edit grows in rounds of ``step`` of the weights. Rows are not independent downstream: removals in two
rows whose outputs move the model's prediction the same way add up, and a concept's removals are correlated
across rows (they read the same words). So the collateral of removing ``U`` (``u_i``: the removed part of
row ``i``) from one matrix is

    Σ_{i,i'} H_ii' u_iᵀ C u_i' = tr(H U C Uᵀ),

with ``H_ii' = √h_i ρ_ii' √h_i'``: ``h_i`` is the row's downstream weight (how much the model's output moves
per unit of change of that row's output, read off the output sensitivity ``s``: ``h_i = Σ_j s_ij /
Σ_j W_ij² C_jj``) and ``ρ`` the correlation of the rows' output gradients on the preserved runs (the row
moments of :mod:`cad_lightning.attribution.sensitivity`), shrunk halfway towards the identity since it is
estimated from a few hundred states. Without row moments ``H = diag(h)``. A weight's charge is its exact
marginal cost given the removals so far,

    h_i W_ij² C_jj + 2 W_ij (H U C)_ij            (negative when it cancels what the removals already change).

The round takes the weights with the highest ``α / max(charge + offset · mean, 0.05 · offset · mean)``
(``mean``: the mean diagonal charge), so a cancelling weight is preferred but its priority stays finite.
The credit is safe here, unlike a cancellation predicted from a few sampled runs
(:mod:`cad_lightning.editing.coherent`): the change in text space is exact for every token of every
preserved prompt (only its downstream weighting H is estimated). Cost: a few D × D and rows × rows products
per round; no UNet call.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Mapping, Sequence

import torch

from cad_lightning.editing.coherent import check_rounds, round_schedule
from cad_lightning.editing.select import select_components, target_count

# parameters that read the text encoder's output and nothing else (cross-attention keys and values)
TEXT_INPUT_PATTERN = re.compile(r"attn2\.to_[kv]\.weight$")
TEXT_SPACE_STEP = 0.005  # rounds are cheap (no UNet call): small steps follow the cancellation closely
MIN_OFFSET = 1e-6
ROW_SHRINK = 0.5  # the rows' correlations are estimated from the preserved states: halved towards independence


def reads_text_only(name: str) -> bool:
    """Whether the parameter ``name`` is a cross-attention key or value weight (its input is the prompt's embeddings)."""
    return bool(TEXT_INPUT_PATTERN.search(name))


@torch.no_grad()
def token_second_moment(backbone, prompts: Sequence[str]) -> torch.Tensor:
    """C = mean over ``prompts`` of Σ over their token positions of e eᵀ (D × D, float64 on the CPU): the second
    moment of the text encoder's outputs that the cross-attention keys and values read."""
    if len(prompts) == 0:
        raise ValueError("token_second_moment needs at least one prompt to preserve.")
    embeddings = backbone.encode(list(prompts)).double().cpu()
    flat = embeddings.reshape(-1, embeddings.shape[-1])
    return flat.T @ flat / len(prompts)


def preserved_moment(backbone, prompts: Sequence[str], base_prompt: str) -> torch.Tensor:
    """C of the text-space collateral: the token embeddings' second moment over the prompts to preserve, the base
    prompt and the unconditional branch of guidance ("")."""
    return token_second_moment(backbone, list(dict.fromkeys([*prompts, base_prompt, ""])))


def token_ids(backbone, prompts: Sequence[str]) -> list[list[int]]:
    """The token ids of ``prompts`` as :meth:`DiffusionBackbone.encode` feeds them to the text encoder."""
    tokenizer = backbone.tokenizer
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.tolist()


def aligned_difference(concept: torch.Tensor, base: torch.Tensor, concept_ids: Sequence[int],
                       base_ids: Sequence[int]) -> torch.Tensor:
    """The token embeddings of a concept prompt minus those of its base prompt (rows × D), the tokens aligned:
    tokens of both prompts (the same word, or a word replaced by one as long: 'circle' → 'shape') give their
    difference, a token only the concept prompt has ('red' in 'a red star' against 'a star') gives its whole
    embedding (the base prompt has nothing there for a key or value to read), a token only the base prompt
    has gives minus its embedding; the padding the concept's longer prompt pushes off the end is left out."""
    matcher = difflib.SequenceMatcher(a=list(concept_ids), b=list(base_ids), autojunk=False)
    rows = []
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and a1 - a0 == b1 - b0):
            rows.append(concept[a0:a1] - base[b0:b1])
            continue
        rows.append(concept[a0:a1])
        if b1 < len(base_ids) or a1 < len(concept_ids):  # not the tail pushed off by the concept's own tokens
            rows.append(-base[b0:b1])
    return torch.cat(rows)


@torch.no_grad()
def concept_difference(backbone, prompts: Sequence[str], base_prompts: Sequence[str]) -> torch.Tensor:
    """Δ (tokens × D, float64 on the CPU): the token embeddings of the concept's prompts minus those of their
    base prompts, token by token (:func:`aligned_difference`), every prompt's rows stacked: what a
    cross-attention key or value row reads differently when the concept is named."""
    if len(prompts) == 0 or len(prompts) != len(base_prompts):
        raise ValueError(f"concept_difference needs prompts and as many base prompts, got {len(prompts)} and {len(base_prompts)}.")
    concept, base = backbone.encode(list(prompts)).double().cpu(), backbone.encode(list(base_prompts)).double().cpu()
    ids, base_ids = token_ids(backbone, prompts), token_ids(backbone, base_prompts)
    return torch.cat([aligned_difference(concept[k], base[k], ids[k], base_ids[k]) for k in range(len(prompts))])


def concept_shares(weight: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
    """Each weight's share of its row's concept output (rows × D, float64; every row sums to 1).

    Row ``i`` of a key or value matrix changes its outputs on the concept's tokens by ``v_i = Δ W_iᵀ`` (one value
    per row of Δ: per token); weight ``j`` contributes ``W_ij Δ_·j`` of it, which is ``⟨W_ij Δ_·j, v_i⟩ / ‖v_i‖²`` of the
    row's change along ``v_i`` (exact: the shares of a row add up to 1; a weight pulling against the row's change
    gets a negative share). A row whose output does not change with the concept (``v_i = 0``) spreads evenly."""
    w = weight.detach().double().cpu()
    delta = difference.double().cpu()
    change = delta @ w.T  # positions × rows: v
    norm = change.pow(2).sum(0)  # rows
    shares = w * (delta.T @ change).T / norm.clamp(min=1e-300)[:, None]
    flat = norm <= 1e-30 * max(float(norm.max()), 1e-300)
    shares[flat] = 1.0 / w.shape[1]
    return shares


def spread_over_text(row_coefficients: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                     difference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-weight scores (fp32, each weight's shape) from one coefficient per row of key/value matrices: row
    ``i``'s coefficient times each weight's :func:`concept_shares` (Σ over a row stays its coefficient), so a row's
    credit goes to the weights that carry the concept's tokens into it, not evenly to all of them."""
    out = {}
    for name, coefficients in row_coefficients.items():
        if not reads_text_only(name):
            raise ValueError(f"spread_over_text: {name!r} is not a cross-attention key or value weight.")
        shares = concept_shares(weights[name], difference)
        out[name] = (coefficients.detach().double().cpu().reshape(-1, 1) * shares).float().contiguous()
    return out


def uniform_sensitivity(weights: Mapping[str, torch.Tensor], second_moment: torch.Tensor) -> dict[str, torch.Tensor]:
    """An output sensitivity for :func:`text_space_selection` that weighs every row's change the same
    (``h_i = 1``): ``W_ij² C_jj``. For scores that come without the gradient passes that measure how much
    each row's change moves the model's output (the regression estimator): the collateral is then the exact
    change of the keys and values over the prompts to preserve, rows unweighted."""
    diagonal = second_moment.double().cpu().diagonal()
    return {n: (w.detach().double().cpu() ** 2 * diagonal[None, :]).float() for n, w in weights.items()}


def measured_sensitivity(weights: Mapping[str, torch.Tensor], second_moment: torch.Tensor,
                         damage: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An output sensitivity for :func:`text_space_selection` from measured row ablations: ``damage[name][i]``
    is how far ablating row ``i`` alone moves the model's predictions on the prompts to preserve (e.g.
    :func:`cad_lightning.attribution.mask_scores.ablation_damage`). The row's downstream weight is the damage
    per unit of its exact change in text space, ``h_i = damage_i / W_i C W_iᵀ``, so removing a whole row is
    charged what its ablation was measured to cost; the sensitivity is ``h_i W_ij² C_jj`` (rows sum to
    ``h_i Σ_j W_ij² C_jj``, as :func:`text_space_selection` reads it). A row that changes nothing in text
    space (``W_i C W_iᵀ = 0``) gets h = 0."""
    C = second_moment.double().cpu()
    out = {}
    for name, w in weights.items():
        w = w.detach().double().cpu()
        quadratic = ((w @ C) * w).sum(1)
        d = damage[name].detach().double().cpu().reshape(-1)
        if d.shape[0] != w.shape[0]:
            raise ValueError(f"measured_sensitivity: {d.shape[0]} damages for the {w.shape[0]} rows of {name!r}.")
        h = torch.where(quadratic > 0, d.clamp(min=0) / quadratic.clamp(min=1e-300), torch.zeros_like(d))
        out[name] = (h[:, None] * w.pow(2) * C.diagonal()[None, :]).float()
    return out


def coupling(h: torch.Tensor, moments: torch.Tensor | None, shrink: float) -> torch.Tensor:
    """H (rows × rows): ``diag(h)`` without row moments; else ``√h_i ρ_ii' √h_i'`` with ρ the correlation of the
    moments shrunk towards the identity, ``(1 − shrink) ρ + shrink I`` (its diagonal stays h)."""
    if moments is None:
        return torch.diag(h)
    P = moments.detach().double().cpu()
    scale = P.diagonal().clamp(min=0).sqrt()
    live = (scale[:, None] > 0) & (scale[None, :] > 0)
    safe = scale.clamp(min=1e-300)
    rho = torch.where(live, P / safe[:, None] / safe[None, :], torch.zeros_like(P))  # a dead row: uncoupled
    rho = (1 - shrink) * rho + shrink * torch.eye(len(h), dtype=P.dtype)
    rho.diagonal().fill_(1.0)
    root = h.sqrt()
    return root[:, None] * rho * root[None, :]


def text_space_selection(
    scores: Mapping[str, torch.Tensor],
    sensitivity: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    second_moment: torch.Tensor,
    ratios: Sequence[float],
    step: float = TEXT_SPACE_STEP,
    offset: float = 0.03,
    mode: str = "erase",
    scope: str = "matrix",
    row_moments: Mapping[str, torch.Tensor] | None = None,
    row_shrink: float = ROW_SHRINK,
    initial: Mapping[str, torch.Tensor] | None = None,
) -> dict[float, dict[str, torch.Tensor]]:
    """Nested masks (True = keep), one per ratio, grown in rounds of ``step`` (see the module docstring).

    ``scores``: α of cross-attention key/value weights (2-D, inputs of size D); ``sensitivity``: their output
    sensitivity on prompts to preserve (same shapes); ``weights``: their values; ``second_moment``: C (D × D)
    from :func:`token_second_moment`; ``row_moments``: optional rows × rows moments P of the output gradients
    (cad_lightning/attribution/sensitivity.py), which couple the rows: their correlation, shrunk towards the
    identity by ``row_shrink``, scales the rows' changes against each other. ``initial``: masks of weights
    already removed (True = keep), e.g. by an earlier round on the unedited model's scores: the edit grows from
    them and their change is charged as part of the edit (``weights`` are the unedited values); a ratio at or
    under their count gets them unchanged. Nothing is changed on the model.
    """
    names = list(scores)
    check_rounds(ratios, step, offset)
    if not 0.0 <= row_shrink <= 1.0:
        raise ValueError(f"row_shrink must be between 0 and 1, got {row_shrink}.")
    row_moments = row_moments or {}
    C = second_moment.double().cpu()
    dim = C.shape[0]
    if C.ndim != 2 or C.shape[1] != dim:
        raise ValueError(f"second_moment must be a square D × D matrix, got shape {tuple(C.shape)}.")
    for n in names:
        missing = [what for what, table in (("sensitivity", sensitivity), ("weights", weights)) if n not in table]
        if missing:
            raise ValueError(f"text_space_selection: no {' or '.join(missing)} for {n!r}.")
        if scores[n].ndim != 2 or scores[n].shape[1] != dim:
            raise ValueError(f"text_space_selection: {n!r} has shape {tuple(scores[n].shape)}; a cross-attention key or "
                             f"value weight reading {dim}-dimensional token embeddings was expected.")
        if n in row_moments and tuple(row_moments[n].shape) != (scores[n].shape[0],) * 2:
            raise ValueError(f"text_space_selection: the row moments of {n!r} have shape "
                             f"{tuple(row_moments[n].shape)}; {scores[n].shape[0]} × {scores[n].shape[0]} was expected.")
    alpha = {n: scores[n].detach().double().cpu() for n in names}
    w = {n: weights[n].detach().double().cpu() for n in names}
    c_diag = C.diagonal()
    diagonal, rows = {}, {}
    for n in names:
        own = w[n].pow(2) * c_diag  # W_ij² C_jj
        h = sensitivity[n].detach().double().cpu().clamp(min=0).sum(1) / own.sum(1).clamp(min=1e-300)
        rows[n] = coupling(h, row_moments.get(n), row_shrink)
        diagonal[n] = h[:, None] * own
    total = sum(a.numel() for a in alpha.values())
    mean = sum(float(d.sum()) for d in diagonal.values()) / total
    # the offset also bounds the credit of a cancelling weight, so it never goes below MIN_OFFSET
    floor = max(offset, MIN_OFFSET) * mean if mean > 0 else 1.0

    keep = {n: torch.ones_like(alpha[n], dtype=torch.bool) for n in names}
    if initial is not None:
        for n in names:
            if n not in initial or tuple(initial[n].shape) != tuple(alpha[n].shape):
                raise ValueError(f"text_space_selection: the initial mask of {n!r} is missing or of another shape.")
            keep[n] = initial[n].detach().cpu().bool().clone()
    out: dict[float, dict[str, torch.Tensor]] = {}
    ratios = sorted(float(r) for r in ratios)
    for mark in round_schedule(ratios, step):
        already = total - sum(int(k.sum()) for k in keep.values())
        want = target_count(alpha, mark) - already
        if want > 0:
            priority = {}
            for n in names:
                removed = w[n] * ~keep[n]
                charge = diagonal[n] + 2 * w[n] * (rows[n] @ (removed @ C))
                priority[n] = (alpha[n] / (charge + floor).clamp(min=0.05 * floor)).float()
            new = select_components(priority, want / total, mode=mode, scope=scope,
                                    exclude={n: ~keep[n] for n in names})
            keep = {n: keep[n] & new[n] for n in names}
        for r in ratios:
            if math.isclose(mark, r):
                out[r] = {n: k.clone() for n, k in keep.items()}
    return out

"""Where a concept lives: its attribution by denoiser block and by component kind, and how concepts overlap.

Plain torch over score dicts ``{parameter name: scores}`` (one score per weight), used by every attribution
report (:func:`localisation`, :func:`top_components`) and by the atlas of several concepts (:func:`overlap`).

- A weight's *block* is the UNet block that holds it, with the resolution of the latents there
  (``down 1 (8×8)``; diffusers numbers up blocks from the lowest resolution up); its *kind* is what it does:
  ``conv`` (ResNet and stem convolutions), ``self-attention``, cross-attention ``keys``, ``values`` (these two
  read only the prompt) and ``(query, out)``, ``feed-forward`` or ``other`` (projections in and out of the
  transformers, time embedding, norms). In the diffusion transformers a block is ``block i`` (FLUX's
  double-stream blocks too) or ``single i`` (FLUX's single-stream blocks); the joint attention's projections of
  the prompt tokens (``add_k_proj``, ``add_v_proj``; ``add_q_proj``, ``to_add_out``) count as cross-attention
  keys, values and (query, out), its image projections and the single-stream attention as self-attention, the
  prompt stream's ``ff_context`` and the single-stream ``proj_mlp`` as feed-forward.
- The *top-k* sets are the ``top_fraction`` of all scored weights with the largest scores (positive: they
  induce the concept, what CAD-Erase ablates) and with the most negative (they suppress it). A group's share of
  the positive mass is the sum of its top-k positive scores over the sum of all top-k positive scores; the
  negative share likewise with |score|; the weights share is its part of all scored weights. Each adds up to 1
  over the blocks, and over the kinds.
"""

from __future__ import annotations

import re

import torch

KINDS = ("conv", "self-attention", "cross-attention keys", "cross-attention values", "cross-attention (query, out)",
         "feed-forward", "other")


# the first pattern a parameter name matches gives its kind; the joint attention of SD3 and FLUX projects the
# prompt tokens with add_k_proj / add_v_proj (keys, values) and add_q_proj / to_add_out
KIND_PATTERNS = (
    (r"\.attn1\.", "self-attention"),
    (r"\.attn2\.to_k\.|\.attn\.add_k_proj\.", "cross-attention keys"),
    (r"\.attn2\.to_v\.|\.attn\.add_v_proj\.", "cross-attention values"),
    (r"\.attn2\.|\.attn\.(add_q_proj|to_add_out)\.", "cross-attention (query, out)"),
    (r"transformer_blocks\.\d+\.attn\.", "self-attention"),
    (r"\.ff(_context)?\.|\.proj_mlp\.", "feed-forward"),
    (r"^(?!.*attn).*((^|\.)conv[^.]*\.weight$|conv_shortcut|downsamplers|upsamplers)", "conv"),
)


def component_kind(name: str) -> str:
    return next((kind for pattern, kind in KIND_PATTERNS if re.search(pattern, name)), "other")


def component_block(name: str, levels: int | None = None, sample_size: int | None = None) -> str:
    """``down i`` / ``mid`` / ``up i`` (with the latents' resolution there when ``levels`` and ``sample_size``
    are known), or ``other`` (stem, time embedding, output head)."""
    match = re.match(r"(single_)?transformer_blocks\.(\d+)\.", name)
    if match:
        return f"{'single' if match.group(1) else 'block'} {match.group(2)}"
    match = re.match(r"(down|up)_blocks\.(\d+)\.", name)
    if match:
        kind, index = match.group(1), int(match.group(2))
        level = index if kind == "down" else (levels - 1 - index if levels else None)
        label = f"{kind} {index}"
    elif name.startswith("mid_block."):
        level = levels - 1 if levels else None
        label = "mid"
    else:
        return "other"
    if level is not None and sample_size:
        size = max(1, sample_size // 2**level)
        label += f" ({size}×{size})"
    return label


def _block_order(label: str) -> tuple:
    head = label.split(" (")[0]
    if head.startswith("down"):
        return (0, int(head.split()[1]))
    if head == "mid":
        return (1, 0)
    if head.startswith("up"):
        return (2, int(head.split()[1]))
    if head.startswith("block"):
        return (3, int(head.split()[1]))
    if head.startswith("single"):
        return (4, int(head.split()[1]))
    return (5, 0)


def top_count(n: int, top_fraction: float) -> int:
    """k: the size of a top-k set of ``n`` weights (at least one)."""
    return max(1, round(top_fraction * n))


def top_k_threshold(scores: dict[str, torch.Tensor], top_fraction: float) -> tuple[int, float, float]:
    """``k`` and the k-th largest and k-th most negative score over all weights (the top-k sets' edges)."""
    flat = torch.cat([t.detach().flatten().float() for t in scores.values()])
    k = top_count(flat.numel(), top_fraction)
    positive = float(torch.topk(flat, k).values[-1])
    negative = float(torch.topk(-flat, k).values[-1])
    return k, positive, negative


def localisation(scores: dict[str, torch.Tensor], top_fraction: float = 0.01, levels: int | None = None,
                 sample_size: int | None = None) -> dict:
    """The shares of weights and of top-k positive and negative attribution mass, by block and by kind:
    ``{"top_fraction", "k", "by_block": {label: {"weights", "positive", "negative"}}, "by_kind": {...}}``.

    Ties at the edge of a top-k set are all counted (the sets can be slightly larger than k)."""
    k, positive_edge, negative_edge = top_k_threshold(scores, top_fraction)
    sums: dict[str, dict[str, dict[str, float]]] = {"by_block": {}, "by_kind": {}}
    totals = {"weights": 0.0, "positive": 0.0, "negative": 0.0}
    for name, tensor in scores.items():
        t = tensor.detach().flatten().float()
        part = {"weights": float(t.numel()),
                "positive": float(t[(t >= positive_edge) & (t > 0)].sum()),
                "negative": float(-t[(-t >= negative_edge) & (t < 0)].sum())}
        for key, label in (("by_block", component_block(name, levels, sample_size)), ("by_kind", component_kind(name))):
            group = sums[key].setdefault(label, {"weights": 0.0, "positive": 0.0, "negative": 0.0})
            for field, value in part.items():
                group[field] += value
        for field, value in part.items():
            totals[field] += value
    out = {"top_fraction": top_fraction, "k": k}
    for key, groups in sums.items():
        order = sorted(groups, key=_block_order) if key == "by_block" else [g for g in KINDS if g in groups]
        out[key] = {g: {f: (groups[g][f] / totals[f] if totals[f] > 0 else 0.0) for f in totals} for g in order}
    return out


def top_components(scores: dict[str, torch.Tensor], n: int = 20, levels: int | None = None,
                   sample_size: int | None = None) -> list[dict]:
    """The ``n`` weights with the largest scores: parameter, index in it, block, kind and score."""
    names = list(scores)
    flat = torch.cat([scores[name].detach().flatten().float() for name in names])
    values, indices = torch.topk(flat, min(n, flat.numel()))
    offsets = torch.tensor([0] + [scores[name].numel() for name in names]).cumsum(0)
    rows = []
    for value, index in zip(values.tolist(), indices.tolist()):
        p = int(torch.searchsorted(offsets, torch.tensor(index), right=True)) - 1
        name = names[p]
        position = torch.unravel_index(torch.tensor(index - int(offsets[p])), scores[name].shape)
        rows.append({"parameter": name, "index": [int(i) for i in position], "score": value,
                     "block": component_block(name, levels, sample_size), "kind": component_kind(name)})
    return rows


def overlap(scores: dict[str, dict[str, torch.Tensor]], others: dict[str, dict[str, torch.Tensor]] | None = None,
            top_fraction: float = 0.01) -> dict:
    """Concept × concept overlap: Jaccard of the top-k positive sets and Spearman correlation of all scores.

    ``scores``: ``{concept: {parameter: scores}}``, all over the same parameters; ``others``: a second set to
    compare with (e.g. the same concepts scored with other seeds; default: ``scores`` itself). Returns
    ``{"rows", "columns", "jaccard": [[...]], "spearman": [[...]], "top_fraction"}``."""
    from scipy.stats import rankdata
    from torchmetrics.functional import pearson_corrcoef

    others = scores if others is None else others
    rows, columns = list(scores), list(others)
    names = list(next(iter(scores.values())))  # one order of the parameters for every concept of both sets
    if any(set(per) != set(names) for per in [*scores.values(), *others.values()]):
        raise ValueError("overlap needs every concept scored over the same parameters.")
    flat = {("a", c): torch.cat([scores[c][n].detach().flatten().double() for n in names]) for c in rows}
    flat.update({("b", c): torch.cat([others[c][n].detach().flatten().double() for n in names]) for c in columns})
    # the top-k sets: exactly k weights each, ties broken by position
    tops = {key: set(torch.topk(v, top_count(v.numel(), top_fraction)).indices.tolist()) for key, v in flat.items()}
    jaccard = [[len(tops["a", r] & tops["b", c]) / len(tops["a", r] | tops["b", c]) for c in columns] for r in rows]
    # Spearman's correlation is Pearson's of the ranks (ties share their mean rank): each vector ranked once
    ranks = {key: torch.from_numpy(rankdata(v.numpy())) for key, v in flat.items()}
    spearman = [[float(pearson_corrcoef(ranks["a", r], ranks["b", c])) for c in columns] for r in rows]
    return {"rows": rows, "columns": columns, "jaccard": jaccard, "spearman": spearman, "top_fraction": top_fraction}


def unet_levels(unet) -> tuple[int | None, int | None]:
    """(resolution levels, latent size) of a diffusers UNet's config, for the block labels."""
    config = getattr(unet, "config", None)
    if config is None:
        return None, None
    channels = getattr(config, "block_out_channels", None)
    size = getattr(config, "sample_size", None)
    return (len(channels) if channels else None), (size if isinstance(size, int) else None)

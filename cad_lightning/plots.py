"""Figures of the reports, drawn with matplotlib's object API (no pyplot state, no backend switch), so that
they work the same in a script, on a cluster node and in a notebook."""

from __future__ import annotations

from pathlib import Path

from cad_lightning.utils import atomic_path

SERIES = (("weights", "share of weights", "#bbbbbb"), ("positive", "top-k positive mass (induce)", "#d62728"),
          ("negative", "top-k negative mass (suppress)", "#1f77b4"))


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def localisation_figure(loc: dict, title: str):
    """Two panels, by block and by kind: the share of weights and of the top-k positive and negative mass."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(1, len(loc["by_block"])), max(1, len(loc["by_kind"]))]})
    for ax, key, label in ((axes[0], "by_block", "UNet block (latent resolution)"), (axes[1], "by_kind", "component kind")):
        groups = list(loc[key])
        width = 0.8 / len(SERIES)
        for s, (field, name, colour) in enumerate(SERIES):
            ax.bar([g + (s - 1) * width for g in range(len(groups))], [loc[key][g][field] for g in groups],
                   width=width, label=name, color=colour)
        ax.set_xticks(range(len(groups)), groups, rotation=20, fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("share")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{title}: top {loc['top_fraction']:.2%} of scored weights (k = {loc['k']})", fontsize=10)
    fig.tight_layout()
    return fig


def heatmap(ax, matrix: list[list[float]], rows: list[str], columns: list[str], title: str, vmin: float = 0.0,
            vmax: float = 1.0, fmt: str = ".2f", aspect: str = "equal") -> None:
    image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap="viridis", aspect=aspect)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=6,
                    color="black" if value > vmin + 0.6 * (vmax - vmin) else "white")
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def overlap_figure(result: dict, row_label: str = "", column_label: str = ""):
    """Jaccard of the top-k sets and Spearman of the scores, concept × concept, side by side."""
    from matplotlib.figure import Figure

    n = max(len(result["rows"]), len(result["columns"]))
    fig = Figure(figsize=(2 * (2.2 + 0.45 * n), 1.6 + 0.45 * n))
    axes = fig.subplots(1, 2)
    heatmap(axes[0], result["jaccard"], result["rows"], result["columns"],
            f"Jaccard of the top {result['top_fraction']:.1%} (induce)")
    heatmap(axes[1], result["spearman"], result["rows"], result["columns"], "Spearman of all scores", vmin=-1.0)
    for ax in axes:
        ax.set_ylabel(row_label, fontsize=8)
        ax.set_xlabel(column_label, fontsize=8)
    fig.tight_layout()
    return fig


def localisation_atlas_figure(locs: dict[str, dict]):
    """Every concept's top-k positive mass by block and by kind, as two heat maps (one row per concept; the
    first row is the share of weights, for reference)."""
    from matplotlib.figure import Figure

    concepts = list(locs)
    first = locs[concepts[0]]
    blocks, kinds = list(first["by_block"]), list(first["by_kind"])
    fig = Figure(figsize=(4 + 0.75 * (len(blocks) + len(kinds)), 2.2 + 0.32 * (len(concepts) + 1)))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [len(blocks), len(kinds)]})
    for ax, key, groups in ((axes[0], "by_block", blocks), (axes[1], "by_kind", kinds)):
        matrix = [[first[key][g]["weights"] for g in groups]]
        matrix += [[locs[c][key].get(g, {}).get("positive", 0.0) for g in groups] for c in concepts]
        heatmap(ax, matrix, ["(weights)", *concepts], groups,
                "top-k positive mass by " + ("block" if key == "by_block" else "kind"), aspect="auto")
    fig.tight_layout()
    return fig

"""Fidelity: how well an estimator's attribution predicts the real effect of random ablations.

On held-out random masks of one fixed density, the predicted concept score (or its change) is compared
with the one measured on the masked model: Pearson and Spearman correlation (torchmetrics), written to
``attribution/fidelity.json`` with a scatter plot ``attribution/fidelity.png`` and logged to TensorBoard.

- regression: predicted = intercept + Σ coef_i · mask_i, measured = the score of the held-out mask;
- first order: predicted ΔJ = −Σ over the ablated weights of α (α = w·∂J/∂w), measured ΔJ = J under the
  mask − J of the unmasked model, on the same states (``first_order_fidelity``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

from cad_lightning.attribution.mask_scores import freeze_base, objective_scores
from cad_lightning.attribution.masks import MaskLayout, sample_masks
from cad_lightning.plots import save_figure


def correlations(predicted, actual) -> dict[str, float]:
    p = torch.as_tensor(predicted, dtype=torch.float64).flatten()
    a = torch.as_tensor(actual, dtype=torch.float64).flatten()
    return {"pearson": float(pearson_corrcoef(p, a)), "spearman": float(spearman_corrcoef(p, a)), "masks": int(p.numel())}


def plot_fidelity(path: Path, predicted, actual, title: str, xlabel: str, ylabel: str):
    """Scatter of predicted vs measured, with the diagonal's direction; returns the matplotlib figure."""
    from matplotlib.figure import Figure

    p = torch.as_tensor(predicted, dtype=torch.float64).numpy()
    a = torch.as_tensor(actual, dtype=torch.float64).numpy()
    fig = Figure(figsize=(4.2, 4))
    ax = fig.subplots()
    ax.scatter(p, a, s=10, alpha=0.7)
    lo, hi = float(min(p.min(), a.min())), float(max(p.max(), a.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def write_fidelity(run_dir: Path, record: dict, predicted, actual, logger=None, xlabel="predicted", ylabel="measured") -> dict:
    """Correlations of ``predicted`` vs ``actual`` merged into ``record``, written to attribution/fidelity.json,
    attribution/fidelity.png and TensorBoard (scalars ``fidelity/pearson``, ``fidelity/spearman`` and the figure).
    With ``min_spearman`` in ``record``, ``trusted`` says whether the Spearman correlation reaches it."""
    from cad_lightning.utils import write_json

    record = {**record, **correlations(predicted, actual)}
    if "min_spearman" in record:
        record["trusted"] = record["spearman"] >= record["min_spearman"]
    folder = Path(run_dir) / "attribution"
    title = f"{record.get('estimator', '')}: Pearson {record['pearson']:.3f}, Spearman {record['spearman']:.3f}"
    fig = plot_fidelity(folder / "fidelity.png", predicted, actual, title, xlabel, ylabel)
    record["plot"] = "attribution/fidelity.png"
    write_json(folder / "fidelity.json", record)
    experiment = getattr(logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_scalar"):
        experiment.add_scalar("fidelity/pearson", record["pearson"], 0)
        experiment.add_scalar("fidelity/spearman", record["spearman"], 0)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure("fidelity/scatter", fig, 0)
    return record


@torch.no_grad()
def first_order_fidelity(backbone, objective, prompts: list[str], seeds: list[int], scores: dict[str, torch.Tensor],
                         density: float = 0.02, masks: int = 64, seed: int = 12_345, chunk_size: int = 256):
    """Predicted and measured ΔJ (each (masks,) float64) of first-order per-weight ``scores`` on random masks
    ablating each selected weight with probability ``density``, on the states of ``prompts``/``seeds``
    (the base branch of erase held at the unmasked model, as the scores hold it)."""
    names = list(scores)
    layout = MaskLayout(backbone.denoiser, names, "weight")
    rows = sample_masks(layout.n_components, range(masks), 1.0 - density, seed)
    alpha = layout.component_sums({n: s.cpu() for n, s in scores.items()})
    predicted = -((~rows).double() @ alpha)
    inputs = freeze_base(backbone, objective, objective.inputs(backbone, prompts, seeds))
    unmasked = float(objective.value(backbone, inputs).double().mean())
    measured = objective_scores(backbone, objective, inputs, layout, rows, chunk_size) - unmasked
    return predicted, measured

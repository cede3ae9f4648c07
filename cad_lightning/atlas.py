"""AtlasWriter: where several concepts live and how much they share, from one attribution run.

With the data module's retained concepts scored (``data.retain_samples > 0``), one ``cad fit`` scores every
concept (each from its own sampling runs); at the end the writer puts into ``<run>/atlas/``:

- ``scores.safetensors``: every concept's scores (keys ``<concept>::<parameter>``);
- ``overlap.png`` / the report's tables: concept × concept Jaccard of the top-k positive sets and Spearman
  correlation of all scores (cad_lightning/attribution/localisation.py);
- ``localisation.png``: every concept's top-k positive mass by UNet block and by component kind, side by side;
- with ``compare_with`` (an earlier atlas's ``scores.safetensors``, e.g. the same concepts scored with another
  ``data.seed``): ``overlap_vs_other.png``, this run's concepts against that run's. Its diagonal is how
  reproducible each concept's top set is; a concept whose other run overlaps less than another concept does
  has no top set of its own at these settings;
- ``report.md`` / ``report.json`` in the run folder, and the figures in TensorBoard.

Two concepts whose top sets overlap cannot be erased one without the other by ablating those weights: the
atlas is the quickest way to see why an edit is not selective.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from safetensors.torch import load_file, save_file

from cad_lightning.attribution.localisation import localisation, overlap, unet_levels
from cad_lightning.errors import UserInputError
from cad_lightning.plots import localisation_atlas_figure, overlap_figure, save_figure
from cad_lightning.utils import atomic_path, write_json, write_text


def load_atlas_scores(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{concept: {parameter: scores}}`` from an atlas's ``scores.safetensors``."""
    path = Path(path)
    if path.is_dir():
        path = path / "atlas" / "scores.safetensors" if (path / "atlas").is_dir() else path / "scores.safetensors"
    if not path.is_file():
        raise UserInputError(f"AtlasWriter compare_with: '{path}' is not an atlas's scores.safetensors.")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        concept, sep, name = key.partition("::")
        if not sep:
            raise UserInputError(f"AtlasWriter compare_with: '{path}' holds '{key}', not '<concept>::<parameter>' keys.")
        out.setdefault(concept, {})[name] = tensor
    return out


class AtlasWriter(Callback):
    """Scores of every attributed concept, their overlap and their localisation (see the module docstring).

    Args:
        top_fraction: the fraction of scored weights in each concept's top-k set (by score), for the Jaccard
            overlap and the localisation charts.
        compare_with: an earlier atlas (its run folder or its ``atlas/scores.safetensors``) over the same
            components, to compare this run's concepts with (e.g. another ``data.seed``).
    """

    def __init__(self, top_fraction: float = 0.01, compare_with: str | None = None) -> None:
        super().__init__()
        if not (isinstance(top_fraction, (int, float)) and 0 < top_fraction < 1):
            raise UserInputError(f"AtlasWriter top_fraction must be in (0, 1), got {top_fraction!r}.")
        self.top_fraction = float(top_fraction)
        self.other = load_atlas_scores(compare_with) if compare_with else None
        self.scores: dict[str, dict[str, torch.Tensor]] = {}
        self._start = 0.0

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        concepts = trainer.datamodule.concepts
        if len(concepts) < 2:
            raise UserInputError("AtlasWriter compares concepts: score more than one (data.retain_samples > 0 with "
                                 "data.retain_concepts, or data.concepts_file).")
        self._start = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.other is not None:
            names = set(pl_module.component_names)
            for concept, per_param in self.other.items():
                if set(per_param) != names:
                    raise UserInputError(f"AtlasWriter compare_with: its '{concept}' is scored over other components "
                                         "than this run's model.components.")

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast from rank 0: on every rank
        if not trainer.is_global_zero:
            return
        self.scores = pl_module.concept_scores  # reduced by the module at the end of its epoch
        atlas = run_dir / "atlas"
        with atomic_path(atlas / "scores.safetensors") as tmp:
            save_file({f"{c}::{k}": v.contiguous() for c, per in self.scores.items() for k, v in per.items()}, str(tmp))
        levels, size = unet_levels(pl_module.backbone.denoiser)
        locs = {c: localisation(s, self.top_fraction, levels, size) for c, s in self.scores.items()}
        within = overlap(self.scores, top_fraction=self.top_fraction)
        figures = {"overlap": overlap_figure(within), "localisation": localisation_atlas_figure(locs)}
        report = {"concepts": list(self.scores), "components": pl_module.component_names,
                  "top_fraction": self.top_fraction, "samples": trainer.datamodule.samples,
                  "seed": trainer.datamodule.seed, "overlap": within, "localisation": locs}
        if self.other is not None:
            common = {c: self.other[c] for c in self.scores if c in self.other}
            across = overlap(self.scores, common, top_fraction=self.top_fraction)
            report["overlap_vs_other"] = across
            report["reproducible"] = reproducible(across)
            figures["overlap_vs_other"] = overlap_figure(across, "this run", "the other run")
        experiment = getattr(trainer.logger, "experiment", None)
        for name, fig in figures.items():
            save_figure(fig, atlas / f"{name}.png")
            if experiment is not None and hasattr(experiment, "add_figure"):
                experiment.add_figure(f"atlas/{name}", fig, 0)
        report["wall_time_s"] = time.perf_counter() - self._start
        write_json(run_dir / "report.json", report)
        write_text(run_dir / "report.md", atlas_report(report))
        rank_zero_info(f"Atlas of {len(self.scores)} concepts written to {run_dir}")


def reproducible(across: dict) -> dict[str, dict]:
    """Per concept of a comparison with another run: its Jaccard with itself there, the largest with any other
    concept there, and whether its own is the larger."""
    out = {}
    for i, concept in enumerate(across["rows"]):
        if concept not in across["columns"]:
            continue
        own = across["jaccard"][i][across["columns"].index(concept)]
        others = [(v, c) for v, c in zip(across["jaccard"][i], across["columns"]) if c != concept]
        best, which = max(others) if others else (0.0, None)
        out[concept] = {"own": own, "best_other": best, "best_other_concept": which, "own_is_highest": own > best}
    return out


def _matrix_table(result: dict, key: str) -> list[str]:
    lines = ["| | " + " | ".join(result["columns"]) + " |", "|---|" + "---|" * len(result["columns"])]
    lines += [f"| **{r}** | " + " | ".join(f"{v:.2f}" for v in row) + " |" for r, row in zip(result["rows"], result[key])]
    return lines + [""]


def atlas_report(report: dict) -> str:
    k = report["top_fraction"]
    lines = [f"# Atlas of {len(report['concepts'])} concepts", "",
             f"Each concept scored from {report['samples']} sampling runs (data.seed {report['seed']}) over "
             f"{len(report['components'])} parameters; top-k sets: the top {k:.2%} of scored weights by score.", "",
             "![overlap](atlas/overlap.png)", "", f"## Jaccard of the top {k:.2%} sets", ""]
    lines += _matrix_table(report["overlap"], "jaccard")
    lines += ["## Spearman correlation of the scores", ""] + _matrix_table(report["overlap"], "spearman")
    if "overlap_vs_other" in report:
        rep = report["reproducible"]
        held = [c for c, r in rep.items() if r["own_is_highest"]]
        lines += ["## Against the other run", "", "![overlap vs other](atlas/overlap_vs_other.png)", "",
                  f"{len(held)} of {len(rep)} concepts overlap more with their own other run than with any other "
                  "concept's" + (f" (not: {', '.join(c for c in rep if c not in held)})" if len(held) < len(rep) else "")
                  + ".", "", "| concept | own other run | highest other concept |", "|---|---|---|"]
        lines += [f"| {c} | {r['own']:.2f} | {r['best_other']:.2f} ({r['best_other_concept']}) |" for c, r in rep.items()]
        lines += [""] + ["Jaccard, rows this run, columns the other:", ""] + _matrix_table(report["overlap_vs_other"], "jaccard")
    lines += ["## Where each concept lives", "", "![localisation](atlas/localisation.png)", ""]
    locs = report["localisation"]
    first = next(iter(locs.values()))
    for key, title in (("by_block", "block"), ("by_kind", "kind")):
        groups = list(first[key])
        lines += [f"Top-k positive mass by {title}:", "", "| concept | " + " | ".join(groups) + " |",
                  "|---|" + "---|" * len(groups), "| (weights) | " + " | ".join(f"{first[key][g]['weights']:.2f}" for g in groups) + " |"]
        lines += [f"| {c} | " + " | ".join(f"{loc[key].get(g, {}).get('positive', 0.0):.2f}" for g in groups) + " |"
                  for c, loc in locs.items()]
        lines += [""]
    lines += [f"wall time: {report['wall_time_s']:.0f} s", ""]
    return "\n".join(lines)

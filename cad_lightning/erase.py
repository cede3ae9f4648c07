"""One call that erases: a model, concepts and a method in; an edited model folder and the exam's summary out.

    from cad_lightning import erase
    summary = erase("tiny-shapes", "circle", method="uce", out="runs/erase")
    print(summary["edit"]["target"], summary["model_folder"])

``method``: ``cad`` (the project's default job, the settings of configs/attribute.yaml), ``cad_paper`` (the
paper's CAD-Erase: FF weights, row scope, 0.1% of them), or a peer: ``uce``, ``esd_x``, ``conceptprune``
(cad_lightning/editing/peers.py, the settings of configs/peers/*.yaml). Every method runs as a Lightning job and
is read by the same exam (decided on search seeds, reported on held-out report seeds, beside a random control of
the same size); the run directory is the job's (report.md, samples, edits, TensorBoard events), and
``<run directory>/model`` is a copy of the model folder with the edited denoiser, which plain diffusers opens part
by part (``UNet2DConditionModel.from_pretrained(folder / "unet")``) and every ``cad`` command takes as
``model_path``.

The command line runs the same jobs: ``cad fit --config configs/attribute.yaml`` (cad),
``cad fit --config configs/peers/uce.yaml`` (uce, and so on), ``cad fit --config configs/cad_paper.yaml``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl

from cad_lightning.errors import UserInputError

METHODS = ("cad", "cad_paper", "uce", "esd_x", "conceptprune")

# the exam of every method: configs/attribute.yaml's (tests/test_erase.py checks the configs say the same)
EXAM = {"evaluate_at": "goal", "random_at": "all", "random_draws": 3, "evaluate": True, "eval_target_images": 32,
        "eval_retain_images": 64, "floor_images": 64}
DATA = {"base_word": "auto", "samples": 8, "preserve_samples": 32, "seed": 0, "batch_size": 8}
CAD = {"components": ["cross_attn_kv"], "objective": "erase", "dtype": "fp32",
       "editing": {"ratios": [0.2, 0.25, 0.3, 0.35, 0.4], "rescore_every": 0.2, "scope": "matrix",
                   "selections": ["selective", "random"], "collateral_offset": 0.03, "collateral_space": "auto"}}
CAD_PAPER = {"components": ["ff"], "objective": "erase", "dtype": "fp32",
             "editing": {"ratios": [0.001], "scope": "row", "selections": ["cad", "random"]}}


def build(method: str, model: str, concepts: str | Sequence[str], exam: dict | None = None,
          data: dict | None = None, settings: dict | None = None):
    """The (module, data module) of a method's job on ``model`` and ``concepts``."""
    from cad_lightning.data.attribution_datamodule import AttributionDataModule
    from cad_lightning.editing.settings import EditSettings, ExamSettings

    if method not in METHODS:
        raise UserInputError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
    exam_settings = ExamSettings(**{**EXAM, **(exam or {})})
    settings = dict(settings or {})
    names = [concepts] if isinstance(concepts, str) else list(concepts)
    if not names:
        raise UserInputError("concepts is empty; give the concept to erase, or a list of them.")
    what = {"concept": names[0]} if len(names) == 1 else {"concepts": names}
    own = {"preserve_samples": 0} if method == "cad_paper" else {}  # its selection reads no preserved runs
    datamodule = AttributionDataModule(**{**DATA, **own, **what, **(data or {})})
    if method in ("cad", "cad_paper"):
        from cad_lightning.attribution.module import CADModule

        defaults = CAD if method == "cad" else CAD_PAPER
        editing = {**defaults["editing"], **settings.pop("editing", {})}
        arguments = {**{k: v for k, v in defaults.items() if k != "editing"}, **settings}
        module = CADModule(model_path=model, editing=EditSettings(**editing), exam=exam_settings, **arguments)
    else:
        from cad_lightning.editing.peers import PeerEditModule

        module = PeerEditModule(method=method, model_path=model, exam=exam_settings, **settings)
    return module, datamodule


def chosen_row(report: dict) -> dict | None:
    """The edit the exam reports: with ``evaluate_at`` goal the one the search stopped at; otherwise the smallest
    that meets the goal, or the largest."""
    rows = [r for r in report.get("results", []) if r["selection"] != "random"]
    if not rows:
        return None
    met = [r for r in rows if r.get("selective")]
    return min(met, key=lambda r: r["ratio"]) if met else max(rows, key=lambda r: r["ratio"])


def erase(model: str = "tiny-shapes", concepts: str | Sequence[str] = "circle", method: str = "cad",
          out: str = "runs/erase", seed: int = 0, accelerator: str = "auto", devices: int = 1,
          progress: bool = True, exam: dict | None = None, data: dict | None = None,
          settings: dict | None = None) -> dict:
    """Erase ``concepts`` from ``model`` with ``method`` and examine the edit; returns the exam's summary.

    Args:
        model: a local diffusers model folder, or the name of a shipped model.
        concepts: a concept, or several to erase with one edit.
        method: ``cad``, ``cad_paper``, ``uce``, ``esd_x`` or ``conceptprune`` (see the module docstring).
        out: the jobs' root folder (the run directory is ``<out>/lightning_logs/version_N``).
        seed: the run's ``seed_everything`` (its exam seeds and controls follow from it).
        accelerator / devices: the Trainer's (several devices run the attribution-only strategy).
        exam / data / settings: overrides of the exam's settings (``ExamSettings``), the data module's
            (``AttributionDataModule``) and the method module's arguments (e.g. ``{"esd": {"steps": 400}}``).

    Returns ``{"method", "concepts", "run_dir", "model_folder", "edit", "random", "floor", "selective",
    "wall_time_s", "report"}``: ``edit`` is the reported edit's row of the exam (target accuracy, retained
    accuracies, other words, SSIM and KID against the unedited images), ``random`` its control's.
    """
    from cad_lightning.editing import load_edit, save_edited_unet

    pl.seed_everything(seed, verbose=False)
    module, datamodule = build(method, model, concepts, exam, data, settings)
    strategy = "auto"
    if devices != 1:
        from cad_lightning.strategy import AttributionStrategy

        strategy = AttributionStrategy()
    trainer = pl.Trainer(**module.trainer_arguments, accelerator=accelerator, devices=devices, strategy=strategy,
                         default_root_dir=out, enable_checkpointing=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, enable_progress_bar=progress, enable_model_summary=False)
    trainer.fit(module, datamodule)
    run_dir = Path(trainer.log_dir)
    report = json.loads((run_dir / "report.json").read_text())
    row = chosen_row(report)
    summary = {"method": method, "concepts": module.targets, "run_dir": str(run_dir), "model_folder": None,
               "edit": row, "random": None, "floor": report.get("floor"),
               "selective": None if row is None else row.get("selective"), "wall_time_s": report.get("wall_time_s"),
               "report": str(run_dir / "report.md")}
    if row is not None:
        summary["random"] = next((r for r in report["results"] if r["selection"] == "random"
                                  and r["ratio"] == row["ratio"]), None)
        entry = next(e for e in report["edits"] if e["selection"] == row["selection"] and e["ratio"] == row["ratio"])
    else:  # not evaluated: the first edit written
        entry = next((e for e in report.get("edits", []) if e["selection"] != "random"), None)
    if entry is not None and trainer.is_global_zero:
        folder = run_dir / "model"
        part = module.backbone.part
        source = Path(module.model_folder)
        shutil.copytree(source, folder, ignore=lambda d, names: [part] if Path(d) == source else [],
                        dirs_exist_ok=True)
        module.apply_edit(None)
        save_edited_unet(module.backbone.denoiser, load_edit(run_dir / entry["masks"]), folder / part)
        summary["model_folder"] = str(folder)
    return summary

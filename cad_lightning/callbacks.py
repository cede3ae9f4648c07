"""AttributionWriter: writes a first-order job's scores, edits and exam at the end of ``fit``.

Added by :class:`~cad_lightning.attribution.module.CADModule` itself when it has edits to make
(``model.init_args.editing``); it has no options of its own. The module reduces the scores, selects the edits
at its epoch boundaries and puts each edit on the model; this callback writes what the module made and runs
its exam (:class:`cad_lightning.edit_outputs.EditOutputs`, the module's ``outputs``), through the module.

Run directory (``trainer.log_dir``, under ``trainer.default_root_dir``; every file is listed in docs/main-job.md):
``config.yaml`` (written by LightningCLI), ``attribution/scores.safetensors`` and ``meta.json``,
``edits/<selection>-<mode>-<ratio>.safetensors`` (ablation masks) with ``edits/<...>/unet/`` (the edited UNet),
``report.json``, ``report.md``, ``samples/*.png``, ``tradeoff.png`` and TensorBoard events. Every file is
written atomically.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from safetensors.torch import save_file

from cad_lightning.utils import atomic_path, write_json


class AttributionWriter(Callback):
    """Writes scores, edits, the exam and the report of a first-order job (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._start = 0.0

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self._start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        pl_module.take_saved()  # a rerun of a run stopped after attribution (no epoch ran)
        pl_module.apply_edit(None)
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast from rank 0: on every rank
        pl_module.stop_point("writing")
        editing, outputs = pl_module.editing, pl_module.outputs
        targets = pl_module.targets
        report = None
        if trainer.is_global_zero:  # rank 0 writes; every rank takes part in the selection's broadcast and the exam
            scores = pl_module.edit_scores()
            self._write_scores(run_dir, trainer, pl_module, scores)
            datamodule = trainer.datamodule
            report = {
                "concept": targets[0], "objective": pl_module.hparams.objective, "mode": pl_module.mode,
                "scope": editing.scope, "base_prompt": datamodule.base_prompt, "base_word": datamodule.base_word,
                "ratios": editing.ratios, "evaluate_at": outputs.evaluate_at,
            }
            if len(targets) > 1:
                report.update(concepts=targets, multi_concept=editing.multi_concept)
            report.update(outputs.localise(run_dir, trainer, pl_module, scores))
            if "selective" in editing.selections:
                report["collateral_space"] = pl_module.selector.space(scores)
                # in text space, whether the rows' changes were combined through their output gradients' correlation
                report["row_coupling"] = report["collateral_space"] == "text" and pl_module.row_moments is not None
                report["rescored_at"] = editing.rescore_stops
        edits = pl_module.selected_edits()
        outputs.emit(run_dir, trainer, pl_module, {k: dict(v) for k, v in edits.items()}, report,
                     apply=pl_module.exam_apply, random="random" in editing.selections,
                     random_fallback=next(iter(pl_module.concept_scores.values())), start=self._start,
                     checkpoint=lambda: pl_module.stop_point("writing"), strategy=trainer.strategy)
        rank_zero_info(f"Attribution of '{' + '.join(targets)}' written to {run_dir}")

    def _write_scores(self, run_dir: Path, trainer, pl_module, scores: dict[str, torch.Tensor]) -> None:
        attribution = run_dir / "attribution"
        label = " + ".join(pl_module.targets)
        with atomic_path(attribution / "scores.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp), metadata={"concept": label})
        targets, retained = pl_module.targets, pl_module.concepts[pl_module.n_targets:]
        if len(targets) > 1:  # each target's own scores beside the joint ones the edits were selected on
            with atomic_path(attribution / "concept_scores.safetensors") as tmp:
                save_file({f"{c}::{k}": v.contiguous() for c in targets for k, v in pl_module.concept_scores[c].items()}, str(tmp))
        if retained:
            with atomic_path(attribution / "retain_scores.safetensors") as tmp:
                flat = {f"{c}::{k}": v.contiguous() for c in retained for k, v in pl_module.concept_scores[c].items()}
                save_file(flat, str(tmp))
        if pl_module.sensitivity is not None:
            with atomic_path(attribution / "sensitivity.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in pl_module.sensitivity.items()}, str(tmp),
                          metadata={"concept": label})
        if pl_module.row_moments is not None:
            with atomic_path(attribution / "row_moments.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in pl_module.row_moments.items()}, str(tmp),
                          metadata={"concept": label})
        datamodule, editing = trainer.datamodule, pl_module.editing
        meta = {
            "model": pl_module.model_id,
            "model_sha256": pl_module.weights_sha256(),
            "concept": pl_module.concepts[0],
            **({"concepts": pl_module.targets, "multi_concept": editing.multi_concept,
                "scores": "the joint scores the edits were selected on; each concept's own in concept_scores.safetensors"}
               if len(pl_module.targets) > 1 else {}),
            "retained_concepts_scored": pl_module.concepts[pl_module.n_targets:],
            "base_prompt": datamodule.base_prompt,
            "base_word": datamodule.base_word,
            "base_prompts": [i["base_prompt"] for i in datamodule.items()],
            "estimator": "first_order",
            "objective": pl_module.hparams.objective,
            "score": "alpha = w * dJ/dw, mean over the states of all sampling runs (fp32)",
            "components": {"patterns": pl_module.space.patterns, "parameters": pl_module.component_names,
                           "weights": sum(t.numel() for t in scores.values())},
            "granularity": "weight",
            "sensitivity": None if pl_module.sensitivity is None else {
                "file": "sensitivity.safetensors", "preserve_prompts": datamodule.preserve_prompts(),
                "meaning": "s = mean over preserved states of mean_k (w * d eps_k/dw)^2 (one Rademacher probe per run)",
                "row_moments": None if pl_module.row_moments is None else {
                    "file": "row_moments.safetensors",
                    "meaning": "P = mean over preserved states of G_s G_s^T / elements, G_s = d(v.eps)/dW at one state "
                               "(rows x rows, cross-attention K/V weights)"},
                "collateral_offset": editing.collateral_offset, "selective_step": editing.selective_step,
                "rescore_every": editing.rescore_every,
                "collateral_runs": editing.collateral_runs},
            "items": sum(i.get("role", "attribute") == "attribute" for i in datamodule.items()),
            "preserve_items": sum(i.get("role") == "preserve" for i in datamodule.items()),
            "seeds": [i["seed"] for i in datamodule.items() if i.get("role", "attribute") == "attribute"],
            "sampler": pl_module.backbone.sampler_settings(pl_module.hparams.num_inference_steps,
                                                           pl_module.hparams.guidance_scale),
            "edit_applied_before": pl_module.hparams.edit,
            "world_size": trainer.world_size,
            "versions": {p: metadata.version(p) for p in ("torch", "lightning", "diffusers", "transformers", "cad-lightning")},
            "python": platform.python_version(),
            "wall_time_s": time.perf_counter() - self._start,
        }
        write_json(attribution / "meta.json", meta)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_histogram"):
            for name, tensor in scores.items():
                experiment.add_histogram(f"scores/{name}", tensor.flatten(), 0)

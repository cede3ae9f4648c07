"""Helpers of the distributed and Slurm tests: tiny ``cad fit`` runs in subprocesses and score comparisons."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
TINY = ["fit", "--config", str(ROOT / "configs" / "attribute.yaml"), "--model.num_inference_steps", "2",
        "--data.samples", "5", "--data.preserve_samples", "2", "--data.batch_size", "1", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--model.exam.evaluate", "false",
        "--model.editing.save_unet", "false"]
TOLERANCE = 1e-5


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    for key in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "SLURM_JOB_ID",
                "SLURM_NTASKS"):
        env.pop(key, None)
    env.update(extra)
    return env


def cad_fit(root: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cad_lightning.cli", *TINY, "--trainer.default_root_dir", str(root),
                             *extra], env=environment(), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def latest_scores(root: Path) -> dict[str, torch.Tensor]:
    """The scores of the latest run, its output sensitivity and row moments (keys ``sensitivity::<parameter>``,
    ``row_moments::<parameter>``)."""
    runs = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    scores = load_file(runs[-1] / "attribution" / "scores.safetensors")
    for extra in ("sensitivity", "row_moments"):
        path = runs[-1] / "attribution" / f"{extra}.safetensors"
        if path.is_file():
            scores.update({f"{extra}::{k}": v for k, v in load_file(path).items()})
    return scores


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|a − b| / max|b|."""
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""A real Slurm job: configs/slurm/attribute.sbatch with 2 tasks on a single-host Slurm (tests/slurm/run_job.sh),
preempted mid-run with SIGUSR1, requeued by the run itself, resumed, and ending with the one-process scores.

Runs only where Slurm is installed (Debian's slurm-wlm and munge) and as root, who starts the daemons.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_runs import ROOT, TINY, TOLERANCE, cad_fit, environment, latest_scores, max_relative_difference

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,  # starts the daemons and runs a preempted two-task job
    pytest.mark.skipif(shutil.which("sbatch") is None or shutil.which("slurmctld") is None,
                       reason="Slurm is not installed (apt-get install slurm-wlm munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting the Slurm daemons needs root"),
]


def test_sbatch_job_preempted_and_requeued_gives_the_one_process_scores(tmp_path):
    cad_fit(tmp_path / "one_process")
    reference = latest_scores(tmp_path / "one_process")

    cad_args = TINY[3:]  # without "fit --config <file>": the sbatch gives them
    job = subprocess.run([str(ROOT / "tests" / "slurm" / "run_job.sh"), str(tmp_path / "slurm"), *cad_args,
                          "--trainer.callbacks+=signal_at.SignalAt", "--trainer.callbacks.init_args.batch", "1"],
                         env=environment(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])),
                         capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "restart 1" in job.stdout and "Requeued SLURM job" in job.stdout, job.stdout[-4000:]
    assert "4 item(s) already attributed" in job.stdout, job.stdout[-4000:]
    assert max_relative_difference(latest_scores(tmp_path / "slurm" / "run"), reference) <= TOLERANCE

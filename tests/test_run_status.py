"""A run's state is visible and a refused run leaves nothing: ``status.json`` (running / preempted / complete),
the rerun's word on an incomplete last run, and output folders that cannot be written refused before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli

ATTRIBUTE = str(Path(__file__).resolve().parent.parent / "configs" / "attribute.yaml")


def test_a_refused_input_leaves_no_folder(tmp_path, capsys):
    """Refused in the writer's set-up, after the logger and the config saver have started: nothing stays."""
    root = tmp_path / "runs"
    code = run_cli(["fit", "--config", ATTRIBUTE, "--data.preserve_samples", "0", "--trainer.default_root_dir", str(root)])
    assert code == 2 and "preserve_samples" in capsys.readouterr().err
    assert not root.exists()


def test_a_refused_input_leaves_earlier_runs_alone(tmp_path, capsys):
    earlier = tmp_path / "lightning_logs" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("kept: true\n")
    code = run_cli(["fit", "--config", ATTRIBUTE, "--data.preserve_samples", "0", "--trainer.default_root_dir", str(tmp_path)])
    assert code == 2
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert (earlier / "config.yaml").read_text() == "kept: true\n"


def test_an_output_folder_under_a_file_is_refused_in_one_sentence(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = run_cli(["fit", "--config", ATTRIBUTE, "--trainer.default_root_dir", str(blocker / "runs")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the error, not a traceback's last line
    assert code == 2 and last.startswith("cad: error:") and f"'{blocker}' is a file, not a folder" in last


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root from writing")
def test_a_read_only_output_folder_is_refused_in_one_sentence(tmp_path, capsys):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        code = run_cli(["fit", "--config", ATTRIBUTE, "--trainer.default_root_dir", str(read_only / "runs")])
    finally:
        read_only.chmod(0o755)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("cad: error:") and "cannot be written" in last
    assert not (read_only / "runs").exists()


@pytest.mark.slow
def test_a_killed_run_stays_marked_running_and_the_rerun_says_so(tmp_path):
    from distributed_runs import cad_fit

    killed = cad_fit(tmp_path, "--trainer.callbacks+=signal_at.SignalAt", "--trainer.callbacks.init_args.batch", "2",
                     "--trainer.callbacks.init_args.signum", "SIGKILL", check=False)
    assert killed.returncode == -9
    status = json.loads((tmp_path / "lightning_logs" / "version_0" / "status.json").read_text())
    assert status["status"] == "running" and status["pid"] and status["started"]

    rerun = cad_fit(tmp_path)
    output = rerun.stdout + rerun.stderr
    assert "(version_0) did not complete: its status is 'running'" in output and "writes to version_1" in output
    assert "already attributed" not in output  # nothing was saved: it starts afresh, by the stated rule
    assert json.loads((tmp_path / "lightning_logs" / "version_1" / "status.json").read_text())["status"] == "complete"
    assert json.loads((tmp_path / "lightning_logs" / "version_0" / "status.json").read_text())["status"] == "running"


@pytest.mark.slow
def test_a_crash_is_marked_failed_with_its_error(tmp_path):
    from distributed_runs import cad_fit

    crashed = cad_fit(tmp_path, "--trainer.callbacks+=signal_at.FailAt", check=False)
    assert crashed.returncode == 1 and "Traceback" in crashed.stderr
    status = json.loads((tmp_path / "lightning_logs" / "version_0" / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "RuntimeError: a failure injected by the test"

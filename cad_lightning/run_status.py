"""Whether a run finished, for people and for the next run: ``status.json`` in the run's folder.

A run's folder (``<default_root_dir>/lightning_logs/version_N``, or ``default_root_dir`` without a logger)
holds ``status.json`` from the moment training starts:

- ``running``: started, not ended. A run killed with SIGKILL (or by the node going down) stays ``running``;
  so does one still running elsewhere. ``pid`` and ``host`` say which process it was.
- ``preempted``: a signal (SIGTERM, SIGUSR1) stopped it with its progress saved; the same command resumes.
- ``failed``: an error stopped it (``error``: the error's first line). ``refused``: an input was refused after
  the run had started (a refusal before any work leaves no folder at all, see :func:`remove_refused_run`).
- ``complete``: every artifact is written.

The rule for a rerun, stated when it starts: a run resumes only from progress saved under the same config
(``<default_root_dir>/preemption/<fingerprint>``, cad_lightning/preemption.py), wherever that run's folder
is; otherwise it starts afresh. Either way it writes to a new folder, and the incomplete run's folder is left
as it is, its status saying what happened.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from cad_lightning.errors import UserInputError, first_line, user_error_in
from cad_lightning.utils import write_json

STATUS_FILE = "status.json"
# what a run writes before its first batch (LightningCLI's config, the logger's files, its status)
START_FILES = ("config.yaml", "hparams.yaml", STATUS_FILE)


def run_folder(trainer: pl.Trainer) -> Path:
    """The run's folder: the logger's version folder, or ``default_root_dir`` without a logger. This process's
    view, without the broadcast of ``trainer.log_dir`` (which every rank would have to join)."""
    log_dir = getattr(trainer.logger, "log_dir", None)
    return Path(log_dir or trainer.default_root_dir)


def read_status(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def previous_run(folder: Path) -> tuple[Path, dict] | None:
    """The run folder before ``folder`` among its ``version_*`` siblings, with its status (None: no earlier run,
    or one that wrote no status)."""
    if not folder.name.startswith("version_") or not folder.parent.is_dir():
        return None

    def number(path: Path) -> int:
        tail = path.name.removeprefix("version_")
        return int(tail) if tail.isdigit() else -1

    earlier = [p for p in folder.parent.glob("version_*") if p.is_dir() and p != folder and number(p) < number(folder)]
    if not earlier:
        return None
    last = max(earlier, key=number)
    status = read_status(last)
    return (last, status) if status is not None else None


class RunStatus(Callback):
    """Writes ``status.json`` (rank 0) and says, when a run starts, whether the root's last run completed."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.started = ""

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self.folder = run_folder(trainer)  # rank 0's view is the run's folder
        last = previous_run(self.folder)
        if last is not None and last[1].get("status") != "complete":
            path, status = last
            rank_zero_info(
                f"The last run in {path.parent} ({path.name}) did not complete: its status is '{status.get('status')}'"
                f" (updated {status.get('updated', '?')}). A run resumes only from progress saved under the same "
                f"config, else starts afresh; this one writes to {self.folder.name}.")
        self.started = now()
        self._write("running")

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self._write("complete")  # after the trainer's callbacks (the writer): every artifact is written

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._write("preempted", str(exception))
        elif isinstance(exception, KeyboardInterrupt):
            self._write("interrupted")
        elif user_error_in(exception) is not None:
            self._write("refused", f"{type(exception).__name__}: {first_line(exception)}")
        else:
            self._write("failed", f"{type(exception).__name__}: {first_line(exception)}")

    def _write(self, status: str, detail: str | None = None) -> None:
        if self.folder is None:  # not rank 0, or training never started
            return
        record = {"status": status, "started": self.started, "updated": now(), "host": socket.gethostname(),
                  "pid": os.getpid(), "command": sys.argv}
        if detail:
            record["error" if status in ("failed", "refused") else "detail"] = detail
        write_json(self.folder / STATUS_FILE, record)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")




# --- before a run and after a refusal (used by the cad command line) --------------------------------------
def check_output_folder(root: str) -> None:
    """``trainer.default_root_dir`` can be written: its nearest existing folder takes a new file. Refused in one
    sentence otherwise (read-only file system, no permission, a file in the way). Remote paths are not checked."""
    if "://" in root:
        return
    path = Path(root).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"trainer.default_root_dir '{root}' cannot be created: '{existing}' is a file, not a folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "" if existing == path else f" (its nearest existing folder is '{existing}')"
        raise UserInputError(f"trainer.default_root_dir '{root}' cannot be written{where}: {error.strerror}; "
                             "choose a folder you can write to.") from error


def output_snapshot(trainer: pl.Trainer) -> dict:
    """Which of the output folders exist before a run (see :func:`remove_refused_run`)."""
    root = Path(trainer.default_root_dir)
    logs = Path(getattr(trainer.logger, "root_dir", "") or root)
    return {"root": root, "logs": logs, "root_existed": root.exists(), "logs_existed": logs.exists(),
            "runs": {p.name for p in logs.iterdir()} if logs.is_dir() else set()}


def remove_refused_run(trainer: pl.Trainer, before: dict) -> None:
    """After an input was refused before any training batch: remove what the run created (its folder, holding
    only the config, the logger's files and its status; the root and log folders if this run made them)."""
    if trainer.fit_loop.epoch_loop.batch_progress.total.started > 0:
        return  # work was done: the folder and its status stay
    logs = before["logs"]
    folder = run_folder(trainer)
    if folder.parent == logs and folder.name not in before["runs"] and folder.is_dir():
        if all(f.is_file() and (f.name in START_FILES or f.name.startswith("events.out.tfevents"))
               for f in folder.iterdir()):
            shutil.rmtree(folder)
    for made, existed in ((logs, before["logs_existed"]), (before["root"], before["root_existed"])):
        if not existed:
            try:
                made.rmdir()  # only when empty
            except OSError:
                pass

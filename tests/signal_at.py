"""A callback for tests: the process sends itself a signal at a chosen moment of a run.

- ``batch``: when that training batch of epoch ``epoch`` starts (mid-attribution);
- ``after_last_epoch``: when the last epoch ends (all items attributed, nothing written yet);
- ``when_written``: as soon as a file matching ``pattern`` (a glob under ``trainer.default_root_dir``) exists,
  watched from a thread started when the last epoch ends, e.g. ``lightning_logs/*/edits/*.safetensors`` to land
  in the evaluation of the edits.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send ``signum`` at ``batch`` (on the ranks in ``ranks``; default: every rank), or at a later moment
    (``after_last_epoch``, ``when_written``); under Slurm only in the job's first run (a requeued job runs the
    same command again)."""

    def __init__(self, batch: int = 1, signum: str = "SIGUSR1", ranks: list[int] | None = None, epoch: int = 0,
                 after_last_epoch: bool = False, when_written: str | None = None) -> None:
        self.batch, self.signum, self.ranks, self.epoch = batch, signal.Signals[signum], ranks, epoch
        self.after_last_epoch, self.when_written = after_last_epoch, when_written

    def _armed(self, trainer) -> bool:
        if self.ranks is not None and trainer.global_rank not in self.ranks:
            return False
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if (not (self.after_last_epoch or self.when_written) and trainer.current_epoch == self.epoch
                and batch_idx == self.batch and self._armed(trainer)):
            os.kill(os.getpid(), self.signum)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch != trainer.max_epochs - 1 or not self._armed(trainer):
            return
        if self.after_last_epoch:
            os.kill(os.getpid(), self.signum)
        elif self.when_written:
            root = Path(trainer.default_root_dir)

            def watch() -> None:
                while not list(root.glob(self.when_written)):
                    time.sleep(0.02)
                os.kill(os.getpid(), self.signum)

            threading.Thread(target=watch, daemon=True).start()


class FailAt(Callback):
    """Raise a RuntimeError (a genuine failure, not a refused input) when training batch ``batch`` starts."""

    def __init__(self, batch: int = 1) -> None:
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.batch:
            raise RuntimeError("a failure injected by the test")

"""A callback for tests: the process sends itself a signal when a given training batch starts (mid-run)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send ``signum`` at the start of batch ``batch`` (on the ranks in ``ranks``; default: every rank); under
    Slurm only in the job's first run (a requeued job runs the same command again)."""

    def __init__(self, batch: int = 1, signum: str = "SIGUSR1", ranks: list[int] | None = None) -> None:
        self.batch, self.signum, self.ranks = batch, signal.Signals[signum], ranks

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.ranks is not None and trainer.global_rank not in self.ranks:
            return
        if batch_idx == self.batch and int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0:
            os.kill(os.getpid(), self.signum)

"""Preemption without loss: the accumulated state of an attribution run survives SIGUSR1 / SIGTERM and a restart.

How it works:
- A signal only sets a flag (the handler does nothing else: no collective, no file). At the end of every batch
  the ranks agree whether any of them was signalled (one one-element all-reduce); if so, every rank writes its
  own state file (``<default_root_dir>/preemption/``, atomically): its score buffers, counts and the ids of the
  items it finished, all summed over exactly those items. After a barrier (every rank has saved) rank 0
  requeues the job under SLURM if the signal was SIGUSR1 (``scontrol requeue``, as Lightning's own SLURM
  handler does; Slurm then terminates every task), and every rank stops with Lightning's ``SIGTERMException``.
  The files go to a folder of their own run, ``preemption/<fingerprint>/``, named by a hash of everything that
  decides the scores (:func:`run_fingerprint`).
- A rank whose peers are gone (the agreement or the barrier fails) still saves its own state; a rank that is
  killed before writing only loses its own unsaved work: its items are not marked done and are attributed again.
- A run started with the same config and ``trainer.default_root_dir`` (a requeued SLURM job, or the same
  command again) loads every state file of its folder: the union of the finished items is skipped. At the
  preempted run's world size each rank takes its own file into its buffers and adds the remaining batches in
  the order of an uninterrupted run, so the scores are bit for bit equal; at another world size the saved sums
  are added once in :meth:`CADModule.reduced_scores` (equal to the tolerance of runs at different world sizes,
  whose batches hold other items anyway). A later save names the files it takes the place of (``covers``), so
  a run preempted several times counts every item once. Runs of other configs in the same root neither read
  nor remove that folder.
- After the last epoch rank 0 writes the scores and selects the edits, and every rank samples its share of the
  exam's images (cad_lightning/evaluation/exam.py). A signal then is honoured at the writer's safe points (before
  each step, before each edit is evaluated; the ranks agree on it there and stop together): the results the
  artifacts are made from (scores, sensitivity, staged edits) are saved as ``results.pt``, and a rerun skips
  attribution altogether and writes (and evaluates) from them; the scores are never computed twice.
- When the artifacts are written, the run's own folder is removed (and ``preemption/`` once it is empty).

Runs with several epochs (the ``iterative`` selection, a staged ``selective`` edit) edit the model between epochs.
A signal in a later epoch saves the writer's results of the epochs before it (their scores, the edit so far)
as ``results.pt``; the restart runs those epochs' batches as no-ops, puts the edit back on the model and
attributes from the epoch that was stopped.

Why not a Lightning checkpoint: Lightning writes checkpoints from rank 0 only (the other ranks' partial sums
would be lost), its SLURM handler saves inside the signal handler (possibly halfway through adding a batch to
the buffers), its SIGTERM handler runs a broadcast inside the signal handler (which fails when rank 0 has
already left, e.g. after a requeue), and it resumes a mid-epoch loop only with a stateful data loader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from cad_lightning.errors import UserInputError
from cad_lightning.utils import atomic_path

log = logging.getLogger(__name__)

STATE_FOLDER = "preemption"
RESULTS_FILE = "results.pt"  # what the artifacts are made from, saved by a run stopped while writing them
# the signals that stop a run with its progress saved; a larger code wins when ranks disagree
SIGNAL_CODES = {signal.SIGTERM: 1, signal.SIGUSR1: 2}


def state_root(trainer: pl.Trainer) -> Path:
    return Path(trainer.default_root_dir) / STATE_FOLDER


def state_folder(trainer: pl.Trainer, fingerprint: str) -> Path:
    """Where the run with this fingerprint saves its progress: one folder per run, so that any number of runs
    can share a ``default_root_dir``."""
    return state_root(trainer) / fingerprint[:16]


def run_fingerprint(pl_module, datamodule) -> str:
    """A hash of everything that decides the scores: the module's hyperparameters and the items."""
    items = [(i["item_id"], i["concept"], i["prompt"], i["seed"]) for i in datamodule.items()]
    h = pl_module.hparams
    content = {"model": dict(h), "components": pl_module.component_names, "items": items,
               "base_prompt": datamodule.base_prompt,
               "sampler": pl_module.backbone.sampler_settings(h.get("num_inference_steps"), h.get("guidance_scale"))}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def save_rank_state(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str, rank: int, world_size: int,
                    covers: list[str]) -> None:
    """One rank's saved progress: its sums, the items they cover, and the earlier files it takes the place of
    (``covers``: files whose sums it holds too)."""
    with atomic_path(path) as tmp:
        torch.save({"fingerprint": fingerprint, "rank": rank, "world_size": world_size, "covers": list(covers),
                    "tensors": {k: v.detach().cpu() for k, v in tensors.items()}}, tmp)


def load_states(paths: list[Path], fingerprint: str) -> dict[str, dict]:
    """The saved states that hold progress of their own, ``{file name: state}``: files whose sums a later file
    holds too (its ``covers``) are left out."""
    states = {}
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise UserInputError(
                f"{path.parent} holds the saved progress of a run with a different config; restart with the same "
                "config, or remove that folder (or use another trainer.default_root_dir) to start afresh."
            )
        states[path.name] = state
    covered = {name for state in states.values() for name in state.get("covers", [])}
    return {name: state for name, state in states.items() if name not in covered}


def sum_states(states: list[dict]) -> dict[str, torch.Tensor]:
    """The sum of the states' tensors (``items_done``: their union; an item in two states is an error)."""
    total: dict[str, torch.Tensor] = {}
    for state in states:
        for name, tensor in state["tensors"].items():
            if name not in total:
                total[name] = tensor.clone()
            elif name == "items_done":
                if (total[name] & tensor).any():
                    raise RuntimeError("Two saved states of this run mark the same item done.")
                total[name] |= tensor
            else:
                total[name] += tensor
    return total


class Preemption(Callback):
    """Saves the accumulated state on SIGUSR1 / SIGTERM, requeues under SLURM, resumes from a saved state.

    Added by :class:`CADModule` itself (``configure_callbacks``), so every attribution config has it.
    """

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self._previous: dict[int, object] = {}
        self._fingerprint = ""
        self._generation = 0
        self._saved = False
        self._covers: list[str] = []  # the saved files whose sums this rank's buffers hold
        self._inherited: torch.Tensor | None = None  # items whose sums are not in this rank's buffers
        self.results: dict | None = None  # what the writer saved when a run stopped after its first epoch
        self.epochs_done = 0  # epochs of a stopped run that need not run again (their results are in ``results``)
        self._results_provider = None

    # --- resume -------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._fingerprint = run_fingerprint(pl_module, trainer.datamodule)
        folder = state_folder(trainer, self._fingerprint)
        # rank 0 decides which files make the resumed state, so every rank loads the same ones
        found = None
        if trainer.is_global_zero:
            found = (sorted(p.name for p in folder.glob("state-*.pt")), (folder / RESULTS_FILE).is_file())
        names, has_results = trainer.strategy.broadcast(found, src=0)
        if trainer.is_global_zero:
            others = [p for p in state_root(trainer).glob("*/") if p.is_dir() and p != folder
                      and (any(p.glob("state-*.pt")) or (p / RESULTS_FILE).is_file())]
            if others:
                rank_zero_info(f"{state_root(trainer)} holds the saved progress of {len(others)} run(s) of other "
                               "configs; this run leaves it for them.")
        if has_results:  # the writer's results after whole epochs: those epochs do not run again
            self.results = torch.load(folder / RESULTS_FILE, map_location="cpu", weights_only=True)
            if self.results.get("fingerprint") != self._fingerprint:
                raise UserInputError(f"{folder / RESULTS_FILE} was saved by a run with a different config; "
                                     "remove it to start afresh.")
            self.epochs_done = int(self.results["epochs_done"])
            if self.epochs_done >= trainer.max_epochs:  # attribution was complete: no epoch runs
                trainer.should_stop = True
                rank_zero_info(f"Resumed after attribution from {folder / RESULTS_FILE}: the saved scores are used "
                               "(none is computed again); the artifacts are written and evaluated again.")
            else:
                rank_zero_info(f"Resumed from {folder / RESULTS_FILE} after epoch {self.epochs_done} of "
                               f"{trainer.max_epochs}: the scores of those epochs are used, the rest is attributed.")
        elif names:
            self._resume(trainer, pl_module, load_states([folder / n for n in names], self._fingerprint))
        self._generation = 1 + max((int(n.split("-")[1][1:]) for n in names), default=-1)
        self._install_handlers()

    def _resume(self, trainer: pl.Trainer, pl_module, states: dict[str, dict]) -> None:
        """Same world size, one saved file per rank: each rank takes its own file into its buffers (the scores
        are then bit for bit those of an uninterrupted run). Otherwise the saved sums are kept apart and added
        once when reducing (equal to the tolerance of runs at different world sizes)."""
        world, rank = trainer.world_size, trainer.global_rank
        by_rank = {state["rank"]: name for name, state in states.items() if state.get("world_size") == world}
        in_place = len(states) == world and sorted(by_rank) == list(range(world))
        everything = sum_states(list(states.values()))
        if in_place:
            own = states[by_rank[rank]]["tensors"]
            pl_module.restore_accumulated({**own, "items_done": everything["items_done"]}, in_place=True)
            self._covers = [by_rank[rank]]
            self._inherited = everything["items_done"] & ~own["items_done"]
        else:
            pl_module.restore_accumulated(everything)
            self._inherited = everything["items_done"].clone()
        rank_zero_info(f"Resumed from {len(states)} saved state(s) in {state_folder(trainer, self._fingerprint)}: "
                       f"{int(everything['items_done'].sum())} item(s) already attributed"
                       + (" (each rank continues its own sums)." if in_place else "."))

    # --- signals ------------------------------------------------------------------------------
    def _install_handlers(self) -> None:
        # Lightning registered its handlers before training starts: its SLURM SIGUSR1 handler saves a checkpoint
        # inside the handler and its SIGTERM handler runs a collective there; both are replaced while training
        for signum in SIGNAL_CODES:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if SIGNAL_CODES[signum] > SIGNAL_CODES.get(self.signal_received, 0):
            self.signal_received = signum  # SIGUSR1 (requeue) wins over SIGTERM

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        code = self._agreed_signal(trainer, SIGNAL_CODES.get(self.signal_received, 0))
        if not code:
            return
        self._save(trainer, pl_module)
        self._barrier(trainer)  # every rank has saved before the requeue, after which Slurm stops every task
        if code == SIGNAL_CODES[signal.SIGUSR1] and trainer.is_global_zero and SLURMEnvironment.detect():
            requeue_slurm_job()
        name = next(s.name for s, c in SIGNAL_CODES.items() if c == code)
        raise SIGTERMException(f"Stopped by signal {name}; progress saved in {state_folder(trainer, self._fingerprint)}.")

    def provide_results(self, results) -> None:
        """``results()``: what the writer has made of the epochs so far (a dict of tensors, numbers and strings),
        saved by a signal in a later epoch so that the restart begins with the next epoch."""
        self._results_provider = results

    def checkpoint(self, trainer: pl.Trainer, phase: str, results, every_rank: bool = False) -> None:
        """A safe point after the last epoch (writing the artifacts, evaluating the edits): if a signal was
        received, save ``results()`` (what the artifacts are made from: the scores, the staged edits; a dict of
        tensors, numbers and strings; from rank 0), remove the per-rank states it replaces, requeue under SLURM
        for SIGUSR1, and stop. A rerun takes them instead of attributing again. ``every_rank``: every rank passes
        this point (the exam is sharded), so the ranks agree on the signal first and stop together; otherwise only
        rank 0 calls it."""
        if not self._fingerprint:
            return
        code = SIGNAL_CODES.get(self.signal_received, 0)
        if every_rank:
            code = self._agreed_signal(trainer, code)
        if not code:
            return
        self._saved = True  # nothing else to save on the way out
        folder = state_folder(trainer, self._fingerprint)
        if trainer.is_global_zero:
            self._save_results(folder, results(), trainer.max_epochs)
        if every_rank:
            self._barrier(trainer)
        name = next(s.name for s, c in SIGNAL_CODES.items() if c == code)
        if code == SIGNAL_CODES[signal.SIGUSR1] and trainer.is_global_zero and SLURMEnvironment.detect():
            requeue_slurm_job()
        raise SIGTERMException(f"Stopped by signal {name} during {phase}; the scores are saved in "
                               f"{folder / RESULTS_FILE} and a rerun continues from them.")

    def _save_results(self, folder: Path, results: dict, epochs_done: int) -> None:
        with atomic_path(folder / RESULTS_FILE) as tmp:
            torch.save({"fingerprint": self._fingerprint, "epochs_done": epochs_done, **results}, tmp)
        for path in folder.glob("state-*.pt"):  # their sums are in the results
            path.unlink()

    @staticmethod
    def _agreed_signal(trainer: pl.Trainer, code: int) -> int:
        """The strongest signal any rank received (0: none)."""
        if trainer.world_size == 1:
            return code
        try:
            flag = torch.tensor(code, device=trainer.strategy.root_device)
            return int(trainer.strategy.reduce(flag, reduce_op="max"))
        except Exception as error:  # a peer is gone: keep what this rank has
            log.warning(f"[rank {trainer.global_rank}] could not reach the other ranks ({error}); saving alone.")
            return code or SIGNAL_CODES[signal.SIGTERM]

    @staticmethod
    def _barrier(trainer: pl.Trainer) -> None:
        if trainer.world_size > 1:
            try:
                trainer.strategy.barrier("preemption-saved")
            except Exception as error:
                log.warning(f"[rank {trainer.global_rank}] could not wait for the other ranks: {error}")

    # --- save ---------------------------------------------------------------------------------
    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        # SIGTERMException is raised only at batch boundaries (by this callback, or by Lightning for a SIGTERM
        # received before training started), where the buffers hold whole batches
        if isinstance(exception, SIGTERMException):
            self._save(trainer, pl_module)

    def _save(self, trainer: pl.Trainer, pl_module) -> None:
        if self._saved or not self._fingerprint:
            return
        self._saved = True
        if trainer.current_epoch > 0:  # a model edited between epochs: the results of the epochs before this one
            if self._results_provider is None:
                rank_zero_warn("Progress after the first epoch is not saved; a restart begins again.")
            elif trainer.is_global_zero:  # the same on every rank
                folder = state_folder(trainer, self._fingerprint)
                self._save_results(folder, self._results_provider(), trainer.current_epoch)
                log.warning(f"saved the results of {trainer.current_epoch} epoch(s) to {folder / RESULTS_FILE}")
            return
        tensors = dict(pl_module.accumulated_state())
        if self._inherited is not None:  # items whose sums another file holds are not this file's
            tensors["items_done"] = tensors["items_done"] & ~self._inherited.to(tensors["items_done"].device)
        if not tensors["items_done"].any():
            return
        path = state_folder(trainer, self._fingerprint) / f"state-g{self._generation:04d}-rank{trainer.global_rank:05d}.pt"
        save_rank_state(path, tensors, self._fingerprint, trainer.global_rank, trainer.world_size, self._covers)
        log.warning(f"[rank {trainer.global_rank}] saved {int(tensors['items_done'].sum())} attributed item(s) "
                    f"to {path}")

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        """The artifacts are written (callbacks of the trainer run before this one): this run's saved states are
        spent; the folders are removed once empty (other runs' states stay)."""
        self._restore_handlers()
        if trainer.is_global_zero and self._fingerprint:
            folder = state_folder(trainer, self._fingerprint)
            for path in [*folder.glob("state-*.pt"), folder / RESULTS_FILE]:
                path.unlink(missing_ok=True)
            for empty in (folder, state_root(trainer)):
                try:
                    empty.rmdir()
                except OSError:  # absent, or holding other runs' progress
                    break

    def teardown(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self._restore_handlers()


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (an array task included)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job], check=False)
    if result.returncode == 0:
        log.warning(f"Requeued SLURM job {job}.")
    else:
        log.warning(f"Requeuing SLURM job {job} failed (scontrol exit code {result.returncode}).")

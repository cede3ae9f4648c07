"""Runs the ``cad`` command line with torch.distributed's collectives recorded (for the distributed tests).

    python tests/ddp_probe.py OUT.json cad-arguments...

Every call of a collective is recorded with its tensor size and the phase of the run it happened in
(``step``: inside a training step; ``between``: anywhere else after training started; ``setup``: before), and
at the end whether the module was wrapped in DistributedDataParallel and whether any component got a ``.grad``.
Each process writes ``OUT.json`` with ``.rank<global rank>`` before the suffix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

CALLS: list[dict] = []
PHASE = ["setup"]
RESULT: dict = {}


def _recorded(name: str, function):
    def wrapper(*args, **kwargs):
        first = args[0] if args else None
        if isinstance(first, list) and first and isinstance(first[-1], torch.Tensor):
            first = first[-1]
        numel = first.numel() if isinstance(first, torch.Tensor) else None
        CALLS.append({"op": name, "numel": numel, "phase": PHASE[0]})
        return function(*args, **kwargs)

    return wrapper


for _name in ("all_reduce", "reduce", "broadcast", "all_gather", "gather", "scatter", "reduce_scatter", "all_to_all",
              "broadcast_object_list", "all_gather_object", "barrier", "_broadcast_coalesced"):
    if hasattr(dist, _name):
        setattr(dist, _name, _recorded(_name, getattr(dist, _name)))


class Phase(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        PHASE[0] = "step"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        PHASE[0] = "between"

    def on_train_start(self, trainer, pl_module) -> None:
        PHASE[0] = "between"

    def on_train_end(self, trainer, pl_module) -> None:
        params = dict(pl_module.backbone.denoiser.named_parameters())
        RESULT.update(
            rank=trainer.global_rank, world_size=trainer.world_size, steps=trainer.global_step,
            batches=trainer.fit_loop.epoch_loop.batch_progress.total.completed,
            strategy=type(trainer.strategy).__name__, wrapped=type(trainer.strategy.model).__name__,
            grads=[n for n in pl_module.component_names if params[n].grad is not None],
        )


def main() -> None:
    out = Path(sys.argv[1])
    sys.modules["ddp_probe"] = sys.modules[__name__]  # the callback below is this module, not a second copy
    sys.argv = [sys.argv[0], *sys.argv[2:]]  # what Lightning sees
    from cad_lightning.cli import main as cad

    try:
        cad(sys.argv[1:] + ["--trainer.callbacks+=ddp_probe.Phase"])
    finally:
        rank = RESULT.get("rank", "unknown")
        out.with_suffix(f".rank{rank}.json").write_text(json.dumps({"calls": CALLS, **RESULT}, indent=1))


if __name__ == "__main__":
    main()

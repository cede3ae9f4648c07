"""Attribution throughput at 1 and 2 processes (DDP on the CPU, gloo) and the communication of a run.

For each world size the script runs ``cad fit`` on the same items and prints the items per second of the
training epoch (model loading and process start excluded), the collectives every rank called and the bytes
they moved, measured by wrapping torch.distributed's functions, beside the bytes of the score buffers (the
one reduction the design needs: number of buffers × their size). It also checks that the scores agree.

    python benchmarks/ddp_throughput.py [--samples 16] [--steps 10] [--batch-size 2]

On a 2-core machine expect little speed-up: the point is the overhead and the communication volume.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CALLS: Counter = Counter()
BYTES: Counter = Counter()
TIMES: dict = {}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _record(name, function):
    def wrapper(*args, **kwargs):
        CALLS[name] += 1
        BYTES[name] += _nbytes(args[0]) if args else 0
        return function(*args, **kwargs)

    return wrapper


def child(out: Path, cad_args: list[str]) -> None:
    """One rank of a run: collectives counted, the epoch timed, a JSON written per rank."""
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback

    for name in ("all_reduce", "broadcast", "reduce", "all_gather", "broadcast_object_list", "all_gather_object",
                 "barrier", "_broadcast_coalesced"):
        setattr(dist, name, _record(name, getattr(dist, name)))

    class EpochTimer(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            TIMES["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            TIMES["end"] = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            TIMES.update(rank=trainer.global_rank, world_size=trainer.world_size,
                         items=int(pl_module.items_done.sum()), run_dir=str(trainer.log_dir))

    sys.modules["ddp_throughput"] = sys.modules[__name__]
    sys.modules[__name__].EpochTimer = EpochTimer
    from cad_lightning.cli import main as cad

    cad(cad_args + ["--trainer.callbacks+=ddp_throughput.EpochTimer"])
    summary = {**TIMES, "calls": dict(CALLS), "bytes": dict(BYTES)}
    Path(f"{out}.rank{TIMES['rank']}.json").write_text(json.dumps(summary))


def run(world_size: int, root: Path, args) -> list[dict]:
    cad_args = ["fit", "--config", str(ROOT / "configs" / "attribute.yaml"), "--trainer.accelerator", "cpu",
                "--trainer.devices", str(world_size), "--trainer.strategy", "ddp" if world_size > 1 else "auto",
                "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                "--model.exam.evaluate", "false", "--model.editing.save_unet", "false",
                "--model.num_inference_steps", str(args.steps), "--data.samples", str(args.samples),
                "--data.batch_size", str(args.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    out = root / "summary"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(out), *cad_args], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world_size)]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        out, cad_args = Path(sys.argv[2]), sys.argv[3:]
        sys.argv = [sys.argv[0], *sys.argv[1:]]  # Lightning starts the other ranks with this command line
        child(out, cad_args)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    from safetensors.torch import load_file

    print(f"items: {args.samples} sampling runs x {args.steps} DDIM steps, batch {args.batch_size}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores, OMP_NUM_THREADS=1 per process")
    results, scores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for world_size in (1, 2):
            ranks = run(world_size, Path(tmp) / f"w{world_size}", args)
            seconds = max(r["end"] - r["start"] for r in ranks)
            results[world_size] = (ranks, seconds)
            scores[world_size] = load_file(Path(ranks[0]["run_dir"]) / "attribution" / "scores.safetensors")
    buffer_bytes = sum(t.numel() * t.element_size() for t in scores[1].values())
    print(f"score buffers: {len(scores[1])} x fp32, {buffer_bytes:,} bytes in all")
    print("| processes | items/s | epoch s | collectives per rank (calls) | bytes moved per rank |")
    print("|---|---|---|---|---|")
    for world_size, (ranks, seconds) in results.items():
        calls = ", ".join(f"{k} {v}" for k, v in sorted(ranks[0]["calls"].items())) or "none"
        moved = sum(ranks[0]["bytes"].values())
        print(f"| {world_size} | {args.samples / seconds:.2f} | {seconds:.1f} | {calls} | {moved:,} |")
    difference = max(float((scores[2][k] - scores[1][k]).abs().max() / scores[1][k].abs().max()) for k in scores[1])
    print(f"2-process scores vs 1-process: max relative difference {difference:.2e}")


if __name__ == "__main__":
    main()

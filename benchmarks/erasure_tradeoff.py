"""Erasure on the embedded model: plain CAD against retain-aware selection, iterative re-scoring and random
ablation of the same counts, for one shape, one colour and one texture (configs/attribute_compare.yaml).

For each concept it prints the floor (how often the base prompt draws the concept), the unedited accuracy,
and per selection and ratio: target accuracy, mean retained accuracy and the worst retained concept relative
to its unedited accuracy. The goal: target <= floor + 0.05 while every retained concept keeps >= 0.9 of its
unedited accuracy. Trade-off curves are written as tradeoff.png in each run directory.

    python benchmarks/erasure_tradeoff.py [--concepts circle red striped] [--out runs/erasure_tradeoff]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", nargs="+", default=["circle", "red", "striped"])
    parser.add_argument("--out", default=str(ROOT / "runs" / "erasure_tradeoff"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "attribute_compare.yaml"))
    args = parser.parse_args()

    for concept in args.concepts:
        out = Path(args.out) / concept
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "cad_lightning.cli", "fit", "--config", args.config, "--data.concept", concept,
             "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false"],
            check=True, capture_output=True,
        )
        run = sorted((out / "lightning_logs").glob("version_*"))[-1]
        report = json.loads((run / "report.json").read_text())
        floor, before = report["floor"][concept], report["before"][concept]
        print(f"\n== erase '{concept}'  (floor {floor:.3f}, unedited {before:.3f}, "
              f"{time.perf_counter() - start:.0f} s, {run})")
        print(f"{'selection':<10} {'ratio':>6} {'target':>7} {'retained mean':>14} {'worst retained/unedited':>24} {'goal':>5}")
        for r in report["results"]:
            worst = r["retained_min_relative"]
            worst_name = min((c for c in r["retained"] if report["before"].get(c, 0) > 0),
                             key=lambda c: r["retained"][c] / report["before"][c])
            goal = r["target"] <= floor + 0.05 and worst is not None and worst >= 0.9
            print(f"{r['selection']:<10} {r['ratio']:>6g} {r['target']:>7.3f} {r['retained_mean']:>14.3f} "
                  f"{worst:>15.3f} ({worst_name:>7}) {'yes' if goal else 'no':>5}")


if __name__ == "__main__":
    main()

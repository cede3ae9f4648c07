"""Amplify as recall: erase a concept with the default main job (configs/attribute.yaml: selective CAD-Erase),
then compute CAD-Amplify on the erased model and measure how much of the concept comes back, and what happens
to the retained concepts.

Picks the smallest erase edit that takes the target to its floor (+0.05), or, if none does, the one with the
lowest target, then runs configs/amplify.yaml with --model.edit on it. Target: the amplified model's target
accuracy is >= 30 points above the erased model's, or within 5 points of the unedited one, with retained
concepts moved by <= 5 points.

    python benchmarks/amplify_recall.py [--concept circle] [--out runs/amplify_recall] [--erase-run RUN]

``--erase-run`` takes the erase edits of an existing main-job run (e.g. one of ``benchmarks/erase_all.py``'s)
instead of running the main job again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cad(*args: str) -> Path:
    out = Path(args[args.index("--trainer.default_root_dir") + 1])
    subprocess.run([sys.executable, "-m", "cad_lightning.cli", "fit", *args, "--trainer.enable_progress_bar", "false"],
                   check=True, capture_output=True)
    return sorted((out / "lightning_logs").glob("version_*"))[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--erase-ratios", default=None, help="erase ratios, a list such as '[0.2, 0.25]' (default: the main job's)")
    parser.add_argument("--amplify-ratios", default=None, help="amplify ratios, a list such as '[0.02, 0.05]' (default: configs/amplify.yaml's)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "amplify_recall"))
    parser.add_argument("--erase-run", default=None, help="an existing main-job run directory to take the edit from")
    args = parser.parse_args()
    out = Path(args.out)

    ratios = ["--model.editing.ratios", args.erase_ratios] if args.erase_ratios else []
    if args.erase_run:
        erase_run = Path(args.erase_run)
    else:
        erase_run = cad("--config", str(ROOT / "configs" / "attribute.yaml"), "--data.concept", args.concept, *ratios,
                        "--trainer.default_root_dir", str(out / "erase"))
    erase = json.loads((erase_run / "report.json").read_text())
    floor, unedited = erase["floor"][args.concept], erase["before"][args.concept]
    edits = [r for r in erase["results"] if r["selection"] != "random"]
    print(f"erase '{args.concept}': floor {floor:.3f}, unedited {unedited:.3f}; "
          + ", ".join(f"{r['selection']} {r['ratio']:g} → {r['target']:.3f}" for r in edits))
    at_floor = [r for r in edits if r["target"] <= floor + 0.05]
    chosen = min(at_floor, key=lambda r: r["ratio"]) if at_floor else min(edits, key=lambda r: (r["target"], r["ratio"]))
    edit = erase_run / "edits" / f"{chosen['selection']}-erase-{chosen['ratio']:g}.safetensors"
    amplify_ratios = ["--model.editing.ratios", args.amplify_ratios] if args.amplify_ratios else []
    amplify_run = cad("--config", str(ROOT / "configs" / "amplify.yaml"), "--data.concept", args.concept,
                      "--model.edit", str(edit), *amplify_ratios, "--trainer.default_root_dir", str(out / "amplify"))
    amplify = json.loads((amplify_run / "report.json").read_text())
    erased = amplify["before"]
    print(f"erased model ({chosen['selection']} {chosen['ratio']:g}): target {erased[args.concept]:.3f}")
    print(f"{'amplify ratio':>13} {'target':>7} {'gain (points)':>14} {'max retained move (points)':>27} {'goal':>5}")
    for r in amplify["results"]:
        gain = 100 * (r["target"] - erased[args.concept])
        moves = {c: 100 * abs(r["retained"][c] - erased[c]) for c in r["retained"] if c in erased}
        worst = max(moves, key=moves.get)
        goal = (gain >= 30 or abs(r["target"] - unedited) <= 0.05) and moves[worst] <= 5
        print(f"{r['ratio']:>13g} {r['target']:>7.3f} {gain:>14.1f} {moves[worst]:>19.1f} ({worst:>7}) {'yes' if goal else 'no':>5}")
    print(f"runs: {erase_run}  {amplify_run}")


if __name__ == "__main__":
    main()

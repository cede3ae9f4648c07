"""The regression estimator on every shape and colour of the world with the shipped config, in one table.

For each concept it runs ``cad fit --config configs/attribute_regression.yaml --data.concept <c>`` (nothing else
changed) and reads the run's artifacts: held-out Spearman and Pearson of the fit (``attribution/fidelity.json``),
the masks and the wall time (``meta.json``, ``report.json``), and for each edit of the fitted coefficients the
target's accuracy after it, the worst retained concept relative to unedited and the retained images' SSIM, each
beside the random control of equal count, and the smallest edit that meets the selective goal (read exactly as
for first-order edits: target <= floor + 0.05, retained concepts and the other words of the target prompts
>= 0.90 of unedited, retained SSIM no lower than the control's). With ``--first-order DIR`` (the ``--out`` of
``benchmarks/erase_all.py``, the first-order default config) it adds the first-order default's chosen edit for
the same concept: its count, target after, SSIM and whether it meets the selective goal. Below the table: the
held-out Spearman of fits on the first 100–800 of the run's masks (their stored scores, no model call).

    python benchmarks/regression_all.py [--concepts square,red] [--out runs/regression_all]
                                        [--first-order runs/erase_all] [--reuse] [-- extra cad arguments]

``--reuse`` rebuilds the table from the latest run of each concept under ``--out`` without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from erase_all import choose, fmt, run  # noqa: E402

from cad_lightning.data.world import CONCEPT_KINDS  # noqa: E402


def latest(root: Path) -> Path:
    return sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]


def masks_curve(meta: dict, sizes=(100, 200, 400, 800)) -> dict[int, float]:
    """Held-out Spearman of fits on the first n training masks of the run (their stored scores; no model call)."""
    from cad_lightning.attribution.fidelity import correlations
    from cad_lightning.attribution.linear_fit import fit_linear
    from cad_lightning.attribution.masks import sample_masks
    from cad_lightning.attribution.store import MaskScoreStore
    from cad_lightning.data.mask_datamodule import HELDOUT_BASE

    masks = meta["masks"]
    scores = MaskScoreStore(masks["store"], {}).load()
    rows = lambda ids: sample_masks(meta["layout"]["n_components"], ids, masks["keep_prob"], masks["mask_seed"])  # noqa: E731
    held = [HELDOUT_BASE + k for k in range(masks["heldout"])]
    out = {}
    for n in (n for n in sizes if n < masks["train"]):
        fit = fit_linear(rows, list(range(n)), [scores[i] for i in range(n)])
        out[n] = correlations(fit.predict(rows(held).numpy()), [scores[i] for i in held])["spearman"]
    return out


def row_for(concept: str, run_dir: Path, first_order: Path | None) -> dict:
    fidelity = json.loads((run_dir / "attribution" / "fidelity.json").read_text())
    meta = json.loads((run_dir / "attribution" / "meta.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    edits = {}
    for r in report["results"]:
        edits.setdefault(r["ratio"], {})[r["selection"]] = r
    row = {"concept": concept, "spearman": fidelity["spearman"], "pearson": fidelity["pearson"],
           "trusted": fidelity.get("trusted"), "masks": meta["masks"]["train"], "heldout": fidelity["masks"],
           "spearman_with_fewer_masks": masks_curve(meta),
           # the fits of a staged edit after the first (rescore_every): where, and their held-out Spearman
           "refits": [{"at": s["at"], "spearman": s.get("spearman")} for s in report.get("stages", [])[1:]],
           "fit_minutes": meta["wall_time_s"] / 60, "minutes": report["wall_time_s"] / 60,
           "floor": report["floor"][concept], "unedited": report["before"][concept],
           "edits": [{"ratio": ratio, "ablated": e["regression"]["ablated"], "target": e["regression"]["target"],
                      "random_target": e["random"]["target"], "worst_retained": e["regression"]["retained_min_relative"],
                      "ssim": e["regression"]["retained_ssim"],
                      # what the goal reads: the mean SSIM of the control's draws (one draw: the control's own)
                      "random_ssim": e["regression"].get("random_retained_ssim") or e["random"]["retained_ssim"],
                      "other_words": e["regression"].get("other_words_relative"),
                      "goal": bool(e["regression"].get("selective"))}
                     for ratio, e in sorted(edits.items())]}
    if first_order is not None and (first_order / concept / "lightning_logs").is_dir():
        chosen, control = choose(json.loads((latest(first_order / concept) / "report.json").read_text()))
        row["first_order"] = {"selection": chosen["selection"], "ratio": chosen["ratio"], "ablated": chosen["ablated"],
                              "target": chosen["target"], "ssim": chosen["retained_ssim"],
                              "random_ssim": chosen.get("random_retained_ssim"), "goal": bool(chosen.get("selective"))}
    return row


def table(rows: list[dict]) -> str:
    ratios = sorted({e["ratio"] for row in rows for e in row["edits"]})  # with evaluate_at goal, rows stop early
    head = ["concept", "held-out Spearman (Pearson)", "masks", "minutes (fit / with edits)", "floor"]
    head += [f"regression {r:g}: target (random) · SSIM (random)" for r in ratios]
    head += ["regression: smallest edit meeting the goal", "first-order default: edit, target · SSIM (random), goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        refits = "".join(f"; re-fit at {r['at']:g}: {fmt(r['spearman'])}" for r in row.get("refits", []))
        cells = [row["concept"], f"{row['spearman']:.3f} ({row['pearson']:.3f})" + ("" if row["trusted"] is not False else " untrusted")
                 + refits,
                 str(row["masks"]), f"{row['fit_minutes']:.1f} / {row['minutes']:.1f}", f"{row['floor']:.3f}"]
        evaluated = {e["ratio"]: e for e in row["edits"]}
        cells += [f"{e['target']:.3f} ({e['random_target']:.3f}) · {e['ssim']:.3f} ({e['random_ssim']:.3f})"
                  if (e := evaluated.get(r)) else "not evaluated" for r in ratios]
        met = [e for e in row["edits"] if e["goal"]]
        cells.append(f"{met[0]['ratio']:g} ({met[0]['ablated']})" if met else "none")
        fo = row.get("first_order")
        cells.append("n/a" if fo is None else f"{fo['selection']} {fo['ratio']:g}: {fo['target']:.3f} · {fo['ssim']:.3f} "
                     f"({fmt(fo['random_ssim'])}), {'met' if fo['goal'] else 'missed'}")
        lines.append("| " + " | ".join(cells) + " |")
    spearman = [r["spearman"] for r in rows]
    lines.append("")
    met = sum(any(e["goal"] for e in r["edits"]) for r in rows)
    first_order = [r for r in rows if "first_order" in r]
    for n in rows[0]["spearman_with_fewer_masks"]:
        fewer = [r["spearman_with_fewer_masks"][n] for r in rows]
        lines.append(f"fit on the first {n} masks: held-out Spearman {min(fewer):.3f}–{max(fewer):.3f}")
    lines.append(f"held-out Spearman: min {min(spearman):.3f}, mean {sum(spearman) / len(spearman):.3f}; "
                 f"{sum(s >= 0.6 for s in spearman)} of {len(rows)} concepts at 0.6 or more; "
                 f"fit minutes: max {max(r['fit_minutes'] for r in rows):.1f}; regression edits meeting the goal: "
                 f"{met} of {len(rows)} concepts" + (f"; first-order default: {sum(r['first_order']['goal'] for r in first_order)} "
                                                     f"of {len(first_order)}" if first_order else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default=",".join(CONCEPT_KINDS["shape"] + CONCEPT_KINDS["colour"]))
    parser.add_argument("--config", default=str(ROOT / "configs" / "attribute_regression.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "regression_all"))
    parser.add_argument("--first-order", default=None, help="the --out of benchmarks/erase_all.py, for the comparison")
    parser.add_argument("--reuse", action="store_true", help="rebuild the table from the runs already under --out")
    parser.add_argument("extra", nargs="*", help="more cad arguments, after --")
    args = parser.parse_args()
    out = Path(args.out)
    first_order = Path(args.first_order) if args.first_order else None
    rows = []
    for concept in args.concepts.split(","):
        run_dir = latest(out / concept) if args.reuse else run(concept, out, Path(args.config), args.extra)[0]
        rows.append(row_for(concept, run_dir, first_order))
        print(table(rows[-1:]).splitlines()[2], flush=True)
    text = table(rows)
    print(text)
    (out / "regression_all.md").write_text(text + "\n")
    (out / "regression_all.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

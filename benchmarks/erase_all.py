"""Erase every concept of the shapes world with the shipped default config and print one table.

For each of the 11 concepts (5 shapes, 4 colours, 2 textures) it runs ``cad fit --config configs/attribute.yaml
--data.concept <c>`` (nothing else changed) and reads the run's report.json. The run decides on its *search*
seeds (goal mode: the smallest ratio that meets the selective-edit goal there) and reports on disjoint *report*
seeds; the table is the report seeds' reading: floor, unedited accuracy, and for the chosen edit (the one the
search stopped at; with ``evaluate_at all``, the smallest that meets the goal, or the one that misses it by the
least) the target after, the worst retained concept relative to unedited, the target prompts' other words
kept, SSIM and KID of the retained images against the unedited ones, and the same for the random control of
equal count (SSIM: the mean over the control's draws, with their range); then the wall time of the run. It
writes the table (``erase_all.md``), all rows (``erase_all.json``) and one picture (``erase_all.png``: each
concept's before/after grid, stacked).

    python benchmarks/erase_all.py [--concepts circle,red,square+triangle] [--out runs/erase_all] [--reuse] [-- extra cad arguments]

``--reuse`` rebuilds the table from the latest run of each concept under ``--out`` without running anything.

An entry ``a+b`` erases several concepts with one edit (``--data.concepts [a, b]``): its row gives each
target's accuracy after the edit, and a second row the baseline, the chosen single-concept edits of ``a`` and of
``b`` (from their own runs under ``--out``, run if missing) applied one after the other, evaluated on the same
images as the one edit, beside a random control of its count. The goal then holds each target to its own floor.

The goal per concept: target <= floor + 0.05, every retained concept >= 0.90 of unedited, the other words of
the target prompts >= 0.90 of unedited, and retained SSIM no lower than the random control's at the same count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cad_lightning.data.world import CONCEPT_KINDS  # noqa: E402


def run(concept: str, out: Path, config: Path, extra: list[str]) -> tuple[Path, float]:
    root = out / concept
    start = time.perf_counter()
    targets = concept.split("+")
    what = ["--data.concept", concept] if len(targets) == 1 else ["--data.concepts", f"[{', '.join(targets)}]"]
    subprocess.run([sys.executable, "-m", "cad_lightning.cli", "fit", "--config", str(config), *what,
                    "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra],
                   check=True, capture_output=True)
    return sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1], \
        time.perf_counter() - start


def accuracy_shortfall(row: dict, floor: float | dict[str, float]) -> float:
    """How far an edit is from the accuracy part of the goal (target, retained, other words): the sum of its misses
    (with several targets, ``floor`` ``{concept: floor}`` and each target's miss)."""
    if isinstance(floor, dict):
        miss = sum(max(0.0, a - (floor[c] + 0.05)) for c, a in row["targets"].items())
    else:
        miss = max(0.0, row["target"] - (floor + 0.05))
    miss += max(0.0, 0.9 - (row["retained_min_relative"] if row["retained_min_relative"] is not None else 1.0))
    miss += max(0.0, 0.9 - (row["other_words_relative"] if row.get("other_words_relative") is not None else 1.0))
    return miss


def shortfall(row: dict, floor: float) -> float:
    """How far an edit is from the goal (0 when it meets it): the sum of its misses."""
    miss = accuracy_shortfall(row, floor)
    if row.get("random_retained_ssim") is not None:
        miss += max(0.0, row["random_retained_ssim"] - row["retained_ssim"])
    return miss


def goal_floor(report: dict) -> float | dict[str, float]:
    """The target's floor, or each target's."""
    targets = report.get("concepts", [report["concept"]])
    return report["floor"][targets[0]] if len(targets) == 1 else {c: report["floor"][c] for c in targets}


def choose(report: dict) -> tuple[dict, dict | None]:
    floor = goal_floor(report)
    edits = [r for r in report["results"] if r["selection"] != "random"]
    met = [r for r in edits if r.get("selective")]
    row = min(met, key=lambda r: r["ratio"]) if met else min(edits, key=lambda r: (shortfall(r, floor), r["ratio"]))
    control = next((r for r in report["results"] if r["selection"] == "random" and r["ratio"] == row["ratio"]), None)
    return row, control


def search_text(report: dict) -> str:
    """What the run's search decided on its search seeds: the ratios it evaluated and whether the last met the goal."""
    exam = report.get("exam", {})
    if "search_results" not in exam:
        return "n/a"
    tried = sorted({r["ratio"] for r in exam["search_results"]})
    return f"{', '.join(f'{r:g}' for r in tried)}: {'met' if exam['goal_met_on_search'] else 'missed'}"


def random_ssim(row: dict) -> str:
    """The random controls' mean SSIM, with the range of the draws when there are several."""
    draws = row.get("random_retained_ssim_draws") or []
    text = fmt(row.get("random_retained_ssim"))
    return text + (f" ({min(draws):.3f}–{max(draws):.3f})" if len(draws) > 1 else "")


def fmt(value, spec=".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def per_target(values: dict[str, float], spec: str = ".3f") -> str:
    return ", ".join(f"{c} {format(v, spec)}" for c, v in values.items())


def sequence_baseline(concepts: list[str], runs: dict[str, Path], multi_run: Path) -> list[dict]:
    """The single-concept edits chosen in ``runs`` applied one after the other (their masks combined), evaluated
    like the multi-concept run's edits (same items, sampler and floors), with a random control of the same count.
    Returns the rows of :func:`cad_lightning.evaluation.edits.evaluate_edits`, read against the control."""
    import torch
    import yaml

    from cad_lightning import load_backbone
    from cad_lightning.editing import combine_masks, count_ablated, load_masks, random_like, restore_weights
    from cad_lightning.evaluation.classifier import load_concept_classifier
    from cad_lightning.evaluation.concepts import evaluation_items
    from cad_lightning.evaluation.edits import evaluate_edits, read_against_controls
    from cad_lightning.generation import resolve_model_path

    report = json.loads((multi_run / "report.json").read_text())
    config = yaml.safe_load((multi_run / "config.yaml").read_text())
    exam = config["model"]["init_args"]["exam"]
    masks = None
    for concept in concepts:
        single = json.loads((runs[concept] / "report.json").read_text())
        row, _ = choose(single)
        edit = next(e for e in single["edits"] if e["selection"] == row["selection"] and e["ratio"] == row["ratio"])
        chosen = load_masks(runs[concept] / edit["masks"])
        masks = chosen if masks is None else combine_masks(masks, chosen)
    folder = resolve_model_path(config["model"]["init_args"]["model_path"])
    backbone = load_backbone(folder)
    detector = load_concept_classifier(folder)
    original = {n: p.detach().clone() for n, p in backbone.denoiser.named_parameters() if n in masks}
    retained = [c for c in report["before"] if c not in concepts]
    items = evaluation_items(concepts, retained, exam["eval_target_images"], exam["eval_retain_images"])
    draws = exam.get("random_draws", 1)
    edits = {"sequence": {0.0: masks}, "random": {0.0: random_like(masks, torch.Generator().manual_seed(0))}}
    ssim_only = {f"random draw {d}": {0.0: random_like(masks, torch.Generator().manual_seed(d))} for d in range(1, draws)}
    _, rows, _ = evaluate_edits(backbone, detector, concepts, retained, items, edits,
                                lambda m: restore_weights(backbone.denoiser, original, m), progress=False,
                                ssim_only=ssim_only)
    rows = read_against_controls(rows, goal_floor(report))
    for r in rows:
        r["ratio"] = count_ablated(masks) / sum(t.numel() for t in masks.values())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default=",".join(w for words in CONCEPT_KINDS.values() for w in words))
    parser.add_argument("--config", default=str(ROOT / "configs" / "attribute.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "erase_all"))
    parser.add_argument("--reuse", action="store_true", help="rebuild the table from the runs already under --out")
    parser.add_argument("extra", nargs="*", help="more cad arguments, after --")
    args = parser.parse_args()
    out = Path(args.out)
    header = ("| concept | floor | unedited | edit | target after | worst retained / unedited | other words kept | "
              "SSIM | KID | random: target | random: worst retained | random: SSIM (draws) | random: KID | SSIM − random | "
              "accuracy goal | goal (report seeds) | search seeds: ratios tried, goal | wall (s) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    rows, pictures = [], []
    print(header)
    print(lines[1])
    runs: dict[str, Path] = {}
    entries = args.concepts.split(",")
    # a set's single concepts are run first: its baseline combines their edits
    order = list(dict.fromkeys([c for e in entries if "+" in e for c in e.split("+") if c not in entries] + entries))
    for concept in order:
        if args.reuse or (concept not in entries and (out / concept / "lightning_logs").is_dir()):
            run_dir = sorted((out / concept / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
            report = json.loads((run_dir / "report.json").read_text())
            wall = report["wall_time_s"]
        else:
            run_dir, wall = run(concept, out, Path(args.config), args.extra)
            report = json.loads((run_dir / "report.json").read_text())
        runs[concept] = run_dir
        if concept not in entries:
            continue
        row, control = choose(report)
        floor = goal_floor(report)
        targets = concept.split("+")
        worst = fmt(row["retained_min_relative"], ".2f")
        if row.get("retained_worst") and (row["retained_min_relative"] or 1) < 1:
            worst += f" ({row['retained_worst']})"
        several = len(targets) > 1
        floor_text = per_target(floor) if several else f"{floor:.3f}"
        before_text = per_target({c: report["before"][c] for c in targets}) if several else f"{report['before'][concept]:.3f}"
        after_text = per_target(row["targets"]) if several else f"{row['target']:.3f}"
        line = (f"| {concept} | {floor_text} | {before_text} | {row['selection']} {row['ratio']:g} ({row['ablated']}) | "
                f"{after_text} | {worst} | {fmt(row.get('other_words_relative'), '.2f')} | "
                f"{row['retained_ssim']:.3f} | {row['retained_kid']:.2f} | "
                f"{fmt(control and control['target'])} | {fmt(control and control['retained_min_relative'], '.2f')} | "
                f"{random_ssim(row)} | {fmt(control and control['retained_kid'], '.2f')} | "
                f"{fmt(row.get('random_retained_ssim') and row['retained_ssim'] - row['random_retained_ssim'], '+.3f')} | "
                f"{'yes' if accuracy_shortfall(row, floor) == 0 else 'no'} | "
                f"{'yes' if row.get('selective') else 'no'} | {search_text(report)} | {wall:.0f} |")
        print(line, flush=True)
        lines.append(line)
        rows.append({"concept": concept, "floor": floor,
                     "unedited": {c: report["before"][c] for c in targets} if several else report["before"][concept],
                     "edit": row,
                     "random": control, "wall_s": wall, "run": str(run_dir)})
        pictures.append((concept, run_dir / "samples" / f"{row['selection']}-{report['mode']}.png"))
        if several:  # the baseline: the single-concept edits applied one after the other
            baseline = sequence_baseline(targets, runs, run_dir)
            seq = next(r for r in baseline if r["selection"] == "sequence")
            ctrl = next(r for r in baseline if r["selection"] == "random")
            line = (f"| {concept}: single edits in sequence | {per_target(floor)} | | sequence {seq['ratio']:.3g} "
                    f"({seq['ablated']}) | {per_target(seq['targets'])} | {fmt(seq['retained_min_relative'], '.2f')} | "
                    f"{fmt(seq.get('other_words_relative'), '.2f')} | {seq['retained_ssim']:.3f} | "
                    f"{seq['retained_kid']:.2f} | {fmt(ctrl['target'])} | {fmt(ctrl['retained_min_relative'], '.2f')} | "
                    f"{random_ssim(seq)} | {fmt(ctrl['retained_kid'], '.2f')} | "
                    f"{seq['retained_ssim'] - seq['random_retained_ssim']:+.3f} | "
                    f"{'yes' if accuracy_shortfall(seq, floor) == 0 else 'no'} | "
                    f"{'yes' if seq.get('selective') else 'no'} | | |")
            print(line, flush=True)
            lines.append(line)
            rows[-1]["sequence_baseline"] = {"edit": seq, "random": ctrl}
    met = sum(bool(r["edit"].get("selective")) for r in rows)
    accurate = sum(accuracy_shortfall(r["edit"], r["floor"]) == 0 for r in rows)
    slowest = max(rows, key=lambda r: r["wall_s"])
    summary = (f"{met} of {len(rows)} concepts meet the goal on the report seeds, {accurate} its accuracy part "
               f"(target, retained, other words); mean wall time {sum(r['wall_s'] for r in rows) / len(rows):.0f} s, "
               f"slowest {slowest['concept']} {slowest['wall_s']:.0f} s")
    print(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "erase_all.md").write_text("\n".join(lines + ["", summary]) + "\n")
    (out / "erase_all.json").write_text(json.dumps(rows, indent=2) + "\n")
    stack_pictures(pictures, out / "erase_all.png")
    print(f"written: {out / 'erase_all.md'}, {out / 'erase_all.png'}")


def stack_pictures(pictures: list[tuple[str, Path]], path: Path) -> None:
    """The concepts' before/after grids one under the other, each under its concept's name."""
    from PIL import Image, ImageDraw

    images = [(c, Image.open(p).convert("RGB")) for c, p in pictures if p.is_file()]
    if not images:
        return
    width = max(im.width for _, im in images)
    caption = 14
    canvas = Image.new("RGB", (width, sum(im.height + caption for _, im in images)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for concept, im in images:
        draw.text((4, y + 1), f"erase '{concept}'", fill="black")
        canvas.paste(im, (0, y + caption))
        y += im.height + caption
    canvas.convert("P", palette=Image.ADAPTIVE, colors=256).save(path, optimize=True)


if __name__ == "__main__":
    main()

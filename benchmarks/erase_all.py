"""Erase every concept of the shapes world with the shipped default config (and, with ``--methods``, with the
peers) and print one table.

For each of the 11 concepts (5 shapes, 4 colours, 2 textures) and each method it runs the method's shipped config,
``cad fit --config <config> --data.concept <c>`` (nothing else changed), and reads the run's report.json. The
methods and their configs: ``cad`` configs/attribute.yaml (the default job), ``cad_paper`` configs/cad_paper.yaml
(the paper's CAD-Erase: FF weights, row scope, 0.1%), ``uce`` / ``esd_x`` / ``conceptprune``
configs/peers/<method>.yaml (docs/peers.md). Every method is read by the same exam: the same search and report
seeds, floor and images; the control of an ablation is random ablation of the same count, of a weight change a
random change of the same Frobenius norm in the same matrices. The run decides on its *search*
seeds (goal mode: the smallest ratio that meets the selective-edit goal there) and reports on disjoint *report*
seeds; the table is the report seeds' reading: floor, unedited accuracy, and for the chosen edit (the one the
search stopped at; with ``evaluate_at all``, the smallest that meets the goal, or the one that misses it by the
least) the target after, the worst retained concept relative to unedited, the target prompts' other words
kept, SSIM and KID of the retained images against the unedited ones, and the same for the random control of
equal count (SSIM: the mean over the control's draws, with their range); then the wall time of the run. It
writes the table (``erase_all.md``), all rows (``erase_all.json``) and one picture (``erase_all.png``: each
concept's before/after grid, stacked).

    python benchmarks/erase_all.py [--concepts circle,red,square+triangle] [--methods cad,uce,esd_x,conceptprune,cad_paper]
                                   [--out runs/erase_all] [--reuse | --resume] [--no-sequence]
                                   [-- extra cad arguments]

``--reuse`` rebuilds the table from the latest run of each (method, concept) under ``--out`` without running
anything; ``--resume`` reuses the runs that finished and runs the others (a stopped sweep goes on where it was).
The default job's runs are ``<out>/<concept>``, the other methods' ``<out>/<method>/<concept>``. With
several methods it also writes, per concept, ``methods-<concept>.png``: the unedited model's row and each method's
reported edit below it, on the same report seeds (the exam's first six target and last six retained images), and
``erase_all_methods.png`` stacking them.

An entry ``a+b`` erases several concepts with one edit (``--data.concepts [a, b]``): its row gives each
target's accuracy after the edit, and (for the methods whose edits are ablations) a second row the baseline, the chosen single-concept edits of ``a`` and of
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

CONFIGS = {"cad": ROOT / "configs" / "attribute.yaml", "cad_paper": ROOT / "configs" / "cad_paper.yaml",
           "uce": ROOT / "configs" / "peers" / "uce.yaml", "esd_x": ROOT / "configs" / "peers" / "esd_x.yaml",
           "conceptprune": ROOT / "configs" / "peers" / "conceptprune.yaml"}
MASKED = ("cad", "cad_paper", "conceptprune")  # methods whose edits are ablations (their sequence baseline)


def run_root(out: Path, method: str, concept: str) -> Path:
    """Where a (method, concept) job writes: the default job's under ``<out>/<concept>``, the others' under
    ``<out>/<method>/<concept>``."""
    return out / concept if method == "cad" else out / method / concept


def latest(root: Path) -> Path:
    return sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]


def run(concept: str, out: Path, config: Path, extra: list[str], root: Path | None = None) -> tuple[Path, float]:
    """Run ``config`` on ``concept`` under ``root`` (default ``<out>/<concept>``); the run directory and wall time."""
    root = root or out / concept
    start = time.perf_counter()
    targets = concept.split("+")
    what = ["--data.concept", concept] if len(targets) == 1 else ["--data.concepts", f"[{', '.join(targets)}]"]
    subprocess.run([sys.executable, "-m", "cad_lightning.cli", "fit", "--config", str(config), *what,
                    "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra],
                   check=True, capture_output=True)
    return latest(root), time.perf_counter() - start


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


def table_line(method: str, concept: str, report: dict, row: dict, control: dict | None, wall: float) -> str:
    floor = goal_floor(report)
    targets = concept.split("+")
    worst = fmt(row["retained_min_relative"], ".2f")
    if row.get("retained_worst") and (row["retained_min_relative"] or 1) < 1:
        worst += f" ({row['retained_worst']})"
    several = len(targets) > 1
    floor_text = per_target(floor) if several else f"{floor:.3f}"
    before_text = per_target({c: report["before"][c] for c in targets}) if several else f"{report['before'][concept]:.3f}"
    after_text = per_target(row["targets"]) if several else f"{row['target']:.3f}"
    return (f"| {concept} | {method} | {floor_text} | {before_text} | {row['selection']} {row['ratio']:.3g} "
            f"({row['ablated']}) | {after_text} | {worst} | {fmt(row.get('other_words_relative'), '.2f')} | "
            f"{row['retained_ssim']:.3f} | {row['retained_kid']:.2f} | "
            f"{fmt(control and control['target'])} | {fmt(control and control['retained_min_relative'], '.2f')} | "
            f"{random_ssim(row)} | {fmt(control and control['retained_kid'], '.2f')} | "
            f"{fmt(row.get('random_retained_ssim') and row['retained_ssim'] - row['random_retained_ssim'], '+.3f')} | "
            f"{'yes' if accuracy_shortfall(row, floor) == 0 else 'no'} | "
            f"{'yes' if row.get('selective') else 'no'} | {search_text(report)} | {wall:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", default=",".join(w for words in CONCEPT_KINDS.values() for w in words))
    parser.add_argument("--methods", default="cad", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--config", default=None, help="the default job's config (default configs/attribute.yaml)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "erase_all"))
    parser.add_argument("--reuse", action="store_true", help="rebuild the table from the runs already under --out")
    parser.add_argument("--resume", action="store_true",
                        help="reuse each (method, concept) run under --out that finished (its report.json), run the rest")
    parser.add_argument("--no-sequence", action="store_true",
                        help="no sequence baseline for the entries a+b (it runs each concept's single edit first)")
    parser.add_argument("extra", nargs="*", help="more cad arguments, after --")
    args = parser.parse_args()
    out = Path(args.out)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in CONFIGS]
    if unknown or not methods:
        parser.error(f"--methods takes {', '.join(CONFIGS)}; got {args.methods!r}")
    configs = {**CONFIGS, **({"cad": Path(args.config)} if args.config else {})}
    header = ("| concept | method | floor | unedited | edit (weights changed) | target after | worst retained / unedited | "
              "other words kept | SSIM | KID | random: target | random: worst retained | random: SSIM (draws) | "
              "random: KID | SSIM − random | accuracy goal | goal (report seeds) | search seeds: ratios tried, goal | "
              "wall (s) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    rows, failed = [], []
    pictures: list[tuple[str, Path]] = []
    by_concept: dict[str, list[tuple[str, Path, dict]]] = {}
    print(header)
    print(lines[1])
    entries = args.concepts.split(",")
    # concept by concept, every method on each; a set's single concepts come first: its baseline combines their edits
    singles = [] if args.no_sequence else [c for e in entries if "+" in e for c in e.split("+") if c not in entries]
    order = list(dict.fromkeys(singles + entries))
    runs: dict[str, dict[str, Path]] = {m: {} for m in methods}
    for concept in order:
        for method in methods:
            if concept not in entries and method not in MASKED:
                continue
            root = run_root(out, method, concept)
            finished = any((root / "lightning_logs").glob("version_*")) and (latest(root) / "report.json").is_file()
            if args.reuse or ((args.resume or concept not in entries) and finished):
                if not (root / "lightning_logs").is_dir():
                    continue
                run_dir = latest(root)
                if not (run_dir / "report.json").is_file():
                    continue
                report = json.loads((run_dir / "report.json").read_text())
                wall = report["wall_time_s"]
            else:
                try:
                    run_dir, wall = run(concept, out, configs[method], args.extra, root=root)
                except subprocess.CalledProcessError as error:  # one failed job does not lose the others
                    tail = (error.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
                    failed.append(f"{method} on {concept}: exit {error.returncode}: {' / '.join(tail)}")
                    print(f"FAILED {failed[-1]}", flush=True)
                    continue
                report = json.loads((run_dir / "report.json").read_text())
            runs[method][concept] = run_dir
            if concept not in entries:
                continue
            row, control = choose(report)
            floor = goal_floor(report)
            line = table_line(method, concept, report, row, control, wall)
            print(line, flush=True)
            lines.append(line)
            targets = concept.split("+")
            rows.append({"concept": concept, "method": method, "floor": floor,
                         "unedited": {c: report["before"][c] for c in targets} if len(targets) > 1 else report["before"][concept],
                         "edit": row, "random": control, "wall_s": wall, "run": str(run_dir)})
            picture = run_dir / "samples" / f"{row['selection']}-{report['mode']}.png"
            if method == methods[0]:
                pictures.append((concept, picture))
            by_concept.setdefault(concept, []).append((method, picture, report))
            if (len(targets) > 1 and method in MASKED and not args.no_sequence
                    and all(c in runs[method] for c in targets)):
                baseline = sequence_baseline(targets, runs[method], run_dir)
                seq = next(r for r in baseline if r["selection"] == "sequence")
                ctrl = next(r for r in baseline if r["selection"] == "random")
                line = (f"| {concept}: single edits in sequence | {method} | {per_target(floor)} | | sequence "
                        f"{seq['ratio']:.3g} ({seq['ablated']}) | {per_target(seq['targets'])} | "
                        f"{fmt(seq['retained_min_relative'], '.2f')} | {fmt(seq.get('other_words_relative'), '.2f')} | "
                        f"{seq['retained_ssim']:.3f} | {seq['retained_kid']:.2f} | {fmt(ctrl['target'])} | "
                        f"{fmt(ctrl['retained_min_relative'], '.2f')} | {random_ssim(seq)} | {fmt(ctrl['retained_kid'], '.2f')} | "
                        f"{seq['retained_ssim'] - seq['random_retained_ssim']:+.3f} | "
                        f"{'yes' if accuracy_shortfall(seq, floor) == 0 else 'no'} | "
                        f"{'yes' if seq.get('selective') else 'no'} | | |")
                print(line, flush=True)
                lines.append(line)
                rows[-1]["sequence_baseline"] = {"edit": seq, "random": ctrl}
    summaries = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        met = sum(bool(r["edit"].get("selective")) for r in mine)
        accurate = sum(accuracy_shortfall(r["edit"], r["floor"]) == 0 for r in mine)
        slowest = max(mine, key=lambda r: r["wall_s"])
        summaries.append(f"{method}: {met} of {len(mine)} meet the goal on the report seeds, {accurate} its accuracy "
                         f"part (target, retained, other words); mean wall time "
                         f"{sum(r['wall_s'] for r in mine) / len(mine):.0f} s, slowest {slowest['concept']} "
                         f"{slowest['wall_s']:.0f} s")
    summaries += [f"failed: {f}" for f in failed]
    print("\n".join(summaries))
    out.mkdir(parents=True, exist_ok=True)
    if len(methods) > 1:
        matrix = method_matrix(rows, methods)
        print("\n".join(matrix))
        (out / "erase_all_methods.md").write_text("\n".join(matrix) + "\n")
    (out / "erase_all.md").write_text("\n".join(lines + [""] + summaries) + "\n")
    (out / "erase_all.json").write_text(json.dumps(rows, indent=2) + "\n")
    stack_pictures(pictures, out / "erase_all.png")
    if len(methods) > 1:
        grids = []
        for concept, entries_ in by_concept.items():
            path = out / f"methods-{concept}.png"
            if method_grid(entries_, path):
                grids.append((concept, path))
        stack_pictures(grids, out / "erase_all_methods.png", caption="methods on '{}'")
    print(f"written: {out / 'erase_all.md'}, {out / 'erase_all.png'}")


NAMES = {"cad": "CAD (default)", "uce": "UCE", "esd_x": "ESD-x", "conceptprune": "ConceptPrune",
         "cad_paper": "CAD (paper)"}


def method_matrix(rows: list[dict], methods: list[str]) -> list[str]:
    """The short table: one row per concept, one column per method; each cell the target after the edit, its
    retained SSIM less its control's, the worst retained concept when below 0.90 of unedited, and ✓ when the edit
    meets the whole goal on the report seeds; then each method's count and mean wall time."""
    header = "| concept | floor | " + " | ".join(NAMES.get(m, m) for m in methods) + " |"
    lines = [header, "|" + "---|" * (len(methods) + 2)]
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    for concept in concepts:
        cells = []
        floor = None
        for method in methods:
            row = next((r for r in rows if r["concept"] == concept and r["method"] == method), None)
            if row is None:
                cells.append("")
                continue
            floor, edit = row["floor"], row["edit"]
            target = per_target(edit["targets"], ".2f") if isinstance(floor, dict) else f"{edit['target']:.2f}"
            margin = edit.get("random_retained_ssim") and edit["retained_ssim"] - edit["random_retained_ssim"]
            cell = f"{target}, SSIM {fmt(margin, '+.3f')}"
            worst = edit.get("retained_min_relative")
            if worst is not None and worst < 0.9:
                cell += f", retained {worst:.2f}"
            other = edit.get("other_words_relative")
            if other is not None and other < 0.9:
                cell += f", other words {other:.2f}"
            cells.append(("✓ " if edit.get("selective") else "") + cell)
        floor_text = per_target(floor, ".2f") if isinstance(floor, dict) else fmt(floor, ".2f")
        lines.append(f"| {concept} | {floor_text} | " + " | ".join(cells) + " |")
    totals = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method and "+" not in r["concept"]]
        met = sum(bool(r["edit"].get("selective")) for r in mine)
        wall = sum(r["wall_s"] for r in mine) / max(len(mine), 1)
        totals.append(f"{met} of {len(mine)}, {wall:.0f} s")
    lines.append("| **single concepts selective, mean wall** | | " + " | ".join(totals) + " |")
    return lines


def picture_rows(path: Path, n_rows: int, scale: int = 4, label_width: int = 180):
    """The rows of a sample picture (``labelled_grid``'s layout: rows of ``(H + 1) * scale`` pixels after one
    ``scale`` of padding, labels in the first ``label_width`` pixels), without their labels."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    row_h = (image.height - scale) // n_rows
    return [image.crop((label_width, r * row_h, image.width, (r + 1) * row_h + scale)) for r in range(n_rows)]


def method_grid(entries: list[tuple[str, Path, dict]], path: Path) -> bool:
    """One picture for a concept: the unedited row, then each method's reported edit, all on the same report
    seeds (every method's exam draws the same images), each row headed by its method and edit."""
    from PIL import Image, ImageDraw

    rows = []
    for method, picture, report in entries:
        if not picture.is_file():
            continue
        row, _ = choose(report)
        shown = sorted(r["ratio"] for r in report["results"] if r["selection"] == row["selection"])
        strips = picture_rows(picture, 1 + len(shown))
        if not rows:
            rows.append(("unedited", strips[0]))
        label = f"{method}: {row['target']:.2f}" + (" sel." if row.get("selective") else "")
        rows.append((label, strips[1 + shown.index(row["ratio"])]))
    if not rows:
        return False
    label_width = 150
    width = label_width + max(im.width for _, im in rows)
    canvas = Image.new("RGB", (width, sum(im.height for _, im in rows)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for label, im in rows:
        canvas.paste(im, (label_width, y))
        draw.text((4, y + im.height // 2 - 6), label, fill="black")
        y += im.height
    canvas.save(path, optimize=True)
    return True


def stack_pictures(pictures: list[tuple[str, Path]], path: Path, caption: str = "erase '{}'") -> None:
    """The concepts' before/after grids one under the other, each under its concept's name."""
    from PIL import Image, ImageDraw

    images = [(c, Image.open(p).convert("RGB")) for c, p in pictures if p.is_file()]
    if not images:
        return
    width = max(im.width for _, im in images)
    text, caption = caption, 14
    canvas = Image.new("RGB", (width, sum(im.height + caption for _, im in images)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for concept, im in images:
        draw.text((4, y + 1), text.format(concept), fill="black")
        canvas.paste(im, (0, y + caption))
        y += im.height + caption
    canvas.convert("P", palette=Image.ADAPTIVE, colors=256).save(path, optimize=True)


if __name__ == "__main__":
    main()

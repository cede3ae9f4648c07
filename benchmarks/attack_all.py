"""Does an erased concept come back? The recovery attacks of the exam against every concept's edit, one table.

For each concept and each variant it runs the default job, ``cad fit --config configs/attribute.yaml --data.concept
<c>`` with ``--model.exam.attacks [inversion, prompt_search]`` (and the variant's arguments), so the exam attacks
the reported edit, its random control of equal count and the unedited model, each on its own
(cad_lightning/attacks/exam.py): textual inversion (Pham et al.: one new token, 500 steps, from 25 images of the
concept that the unedited model draws) and a prompt search (300 prompts of the world's words without the concept's).
Everything reported is read on the report seeds; the attacker's images and the search's decisions use the search
seeds. The table (``attack_all.md``, rows in ``attack_all.json``) gives per (concept, variant): the floor, the
edit's plain reading and whether it met the selective goal, its readings after each attack (inversion in the
concept's prompts and in 'a <token>'; the prompt search's prompt on the edit and on the unedited model), the
strongest attack's reading (the attack that draws the concept most beyond what its prompts draw without the word on
the unedited model: the floor, or for the search's prompt the higher of the floor and its baseline) and whether it
holds (at most 0.15 beyond), the random control's and the unedited model's strongest reading, and the wall time of
the attacks and of the whole job. ``attack_all.png`` stacks each run's ``samples/attacks.png``.

    python benchmarks/attack_all.py [--concepts circle,red] [--variants default,robust] [--out runs/attack_all]
                                    [--resume | --reuse] [-- extra cad arguments]

Variants: ``default`` (the shipped config as it is), ``robust`` (its robust mode, cad_lightning/editing/robust.py:
the column *edit* then counts the weights the rounds added beyond the K/V weights, and *attacks / job* the rounds'
time too); others are named in ``VARIANTS`` with the arguments they add.
``--resume`` reuses the runs that finished (their report.json), ``--reuse`` only rebuilds the table.
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

from cad_lightning.attacks.exam import ATTACK_MARGIN, holds, strongest  # noqa: E402
from cad_lightning.data.world import CONCEPT_KINDS  # noqa: E402

CONFIG = ROOT / "configs" / "attribute.yaml"
ATTACKS = ["--model.exam.attacks", "[inversion, prompt_search]"]
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "robust": ["--model.editing.robust.enabled", "true"],  # cad_lightning/editing/robust.py
}


def latest(root: Path) -> Path | None:
    runs = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return runs[-1] if runs else None


def run(concept: str, root: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cad_lightning.cli", "fit", "--config", str(CONFIG), "--data.concept",
                    concept, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
                    *ATTACKS, *extra], check=True, capture_output=True)
    return time.perf_counter() - start


def row(concept: str, variant: str, report: dict) -> dict:
    attacks = report["attacks"]
    models = attacks["models"]
    edit_name = next(n for n in models if n not in ("unedited",) and not n.startswith("random"))
    random_name = next((n for n in models if n.startswith("random")), None)
    floor = attacks.get("floor")
    # the exam's reading of the strongest attack, recomputed from the raw readings (cad_lightning/attacks/exam.py)
    edit, control, unedited = ({**models[n], **strongest(models[n], floor)} if n else None
                               for n in (edit_name, random_name, "unedited"))
    result = next(r for r in report["results"] if r["selection"] != "random")
    robust = report.get("exam", {}).get("robust", {}).get(result["selection"], {})
    return {
        "concept": concept, "variant": variant, "floor": floor, "edit": edit_name,
        "ablated": result["ablated"], "plain": edit["plain"], "selective": result.get("selective"),
        "retained_ssim": result.get("retained_ssim"), "random_retained_ssim": result.get("random_retained_ssim"),
        "inversion": edit.get("inversion", {}).get("target"), "inversion_alone": edit.get("inversion", {}).get("alone"),
        "search_prompt": edit.get("prompt_search", {}).get("prompt"),
        "search_target": edit.get("prompt_search", {}).get("target"),
        "search_baseline": edit.get("prompt_search", {}).get("baseline"),
        "after_attack": edit["after_attack"], "beyond_floor": edit["beyond_floor"], "strongest": edit["strongest"],
        "holds": None if floor is None else holds(edit["beyond_floor"]),
        "random_after_attack": control["after_attack"] if control else None,
        "unedited_after_attack": unedited["after_attack"],
        "attack_s": sum(m["wall_s"] for m in models.values()), "wall_s": report.get("wall_time_s"),
        "robust_beyond": robust.get("ablated_beyond"), "robust_s": robust.get("wall_s"),
    }


def table(rows: list[dict]) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.2f}"
    f3 = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = ["| concept | variant | floor | edit | plain | selective (SSIM: edit / random) | inversion: prompts / 'a <token>' | "
             "prompt search: prompt, edit / unedited | after attack | holds (≤ 0.15 beyond the floor) | random control after "
             "attack | unedited after attack | attacks / job |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['concept']} | {r['variant']} | {f(r['floor'])} | {r['edit']} ({r['ablated']} w.) | {f(r['plain'])} | "
            f"{'yes' if r['selective'] else 'no'} ({f3(r['retained_ssim'])} / {f3(r['random_retained_ssim'])}) | "
            f"{f(r['inversion'])} / {f(r['inversion_alone'])} | "
            + (f"'{r['search_prompt']}' {f(r['search_target'])} / {f(r['search_baseline'])}" if r["search_prompt"]
               is not None else "not run") + f" | {f(r['after_attack'])} | "
            f"{'yes' if r['holds'] else 'no (+' + format(r['beyond_floor'] - ATTACK_MARGIN, '.2f') + ')'} | "
            f"{f(r['random_after_attack'])} | {f(r['unedited_after_attack'])} | "
            f"{r['attack_s']:.0f} s / {r['wall_s']:.0f} s"
            + (f" (rounds {r['robust_s']:.0f} s, +{r['robust_beyond']} w. beyond K/V)" if r.get("robust_s") else "")
            + " |")
    held = sum(bool(r["holds"]) for r in rows)
    lines += ["", f"{held} of {len(rows)} hold after the strongest attack."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concepts", default=",".join(w for words in CONCEPT_KINDS.values() for w in words))
    parser.add_argument("--variants", default="default")
    parser.add_argument("--out", default="runs/attack_all")
    parser.add_argument("--resume", action="store_true", help="reuse the runs under --out that finished")
    parser.add_argument("--reuse", action="store_true", help="only rebuild the table from the runs under --out")
    parser.add_argument("extra", nargs="*", help="more cad arguments, after --")
    args = parser.parse_args()
    out = Path(args.out)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    rows, pictures = [], []
    for concept in args.concepts.split(","):
        for variant in variants:
            root = out / variant / concept
            last = latest(root)
            done = last is not None and (last / "report.json").is_file()
            if not (args.reuse or (args.resume and done)):
                try:
                    run(concept, root, VARIANTS[variant] + args.extra)
                except subprocess.CalledProcessError as error:  # one failed job does not lose the others
                    print(f"{concept} / {variant}: failed\n{error.stderr.decode()[-2000:]}", flush=True)
                    continue
                last = latest(root)
            if last is None or not (last / "report.json").is_file():
                continue
            r = row(concept, variant, json.loads((last / "report.json").read_text()))
            rows.append(r)
            pictures.append((f"{concept} ({variant})", last / "samples" / "attacks.png"))
            print(table([r]).splitlines()[2], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack_all.md").write_text(table(rows), encoding="utf-8")
    (out / "attack_all.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if pictures:
        stack(pictures, out / "attack_all.png")
    print(table(rows))


def stack(pictures: list[tuple[str, Path]], path: Path) -> None:
    """The runs' attack pictures one under the other, each under its title."""
    from PIL import Image, ImageDraw

    images = [(title, Image.open(p).convert("RGB")) for title, p in pictures if p.is_file()]
    width = max(im.width for _, im in images)
    canvas = Image.new("RGB", (width, sum(im.height + 18 for _, im in images)), "white")
    y = 0
    for title, im in images:
        ImageDraw.Draw(canvas).text((4, y + 3), title, fill="black")
        canvas.paste(im, (0, y + 18))
        y += im.height + 18
    canvas.save(path)


if __name__ == "__main__":
    main()

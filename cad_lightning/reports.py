"""The run's report of an attribution and its edits: ``report.md`` from ``report.json``, the trade-off chart, the
localisation section."""

from __future__ import annotations

from pathlib import Path

from cad_lightning.plots import save_figure


def plot_tradeoff(path: Path, concept: str | list[str], before: dict, floor: dict[str, float] | float | None,
                  results: list[dict], retained: list[str], search: dict | None = None) -> None:
    """Ablated fraction → target accuracy (each target's, for several), mean retained accuracy and retained SSIM,
    one line per selection (and the floor search's probes of the target, when there was one); ``floor``: the
    floor of every concept (or the target's)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3, sharex=True)
    retained_before = sum(before[c] for c in retained if c in before) / max(1, sum(c in before for c in retained))
    targets = [concept] if isinstance(concept, str) else list(concept)
    floors = floor if isinstance(floor, dict) else {targets[0]: floor}
    for selection in dict.fromkeys(r["selection"] for r in results):
        rows = sorted((r for r in results if r["selection"] == selection), key=lambda r: r["ratio"])
        x = [0.0] + [r["ratio"] for r in rows]
        for n, c in enumerate(targets):
            accuracy = [r.get("targets", {}).get(c, r["target"]) for r in rows]
            axes[0].plot(x, [before[c]] + accuracy, marker="o", linestyle=("-", "--", ":", "-.")[n % 4],
                         label=selection if len(targets) == 1 else f"{selection}: {c}")
        axes[1].plot(x, [retained_before] + [r["retained_mean"] for r in rows], marker="o", label=selection)
        axes[2].plot(x, [1.0] + [r.get("retained_ssim", float("nan")) for r in rows], marker="o", label=selection)
    for selection, search in (search or {}).items():
        probes = search["probes"]
        axes[0].plot([p["ratio"] for p in probes], [p["target"] for p in probes], linestyle="none", marker="x",
                     label=f"{selection}: search probes")
    for n, c in enumerate(targets):
        if floors.get(c) is not None:
            axes[0].axhline(floors[c], color="grey", linestyle=("--", ":", "-.", "-")[n % 4],
                            label="floor (base prompt)" if len(targets) == 1 else f"floor: {c}")
    axes[0].set_title(f"target: {', '.join(targets)}")
    axes[1].set_title("retained concepts (mean)")
    axes[2].set_title("retained images: SSIM to unedited")
    for ax in axes:
        ax.set_xlabel("ablated fraction of components")
        ax.set_ylabel("classifier accuracy" if ax is not axes[2] else "SSIM (same seeds)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def markdown_report(report: dict) -> str:
    estimator = f" ({report['estimator']} estimator)" if "estimator" in report else ""
    targets = report.get("concepts", [report["concept"]])
    several = (f", one edit for {len(targets)} concepts (selection: {report['multi_concept']})"
               if len(targets) > 1 else "")
    method = {"uce": "UCE", "esd_x": "ESD-x", "conceptprune": "ConceptPrune"}.get(report.get("method"), "CAD")
    lines = [f"# {method} {report['mode']} of {' and '.join(repr(c) for c in targets)}{estimator}{several}", "",
             f"objective: {report['objective']}, scope: {report['scope']}, "
             + (f"selective collateral measured in {report['collateral_space']} space"
                + (" (rows coupled by their output gradients' correlation)" if report.get("row_coupling") else "")
                + (f", grown on scores of the edited model from {', '.join(f'{r:g}' for r in report['rescored_at'])} on"
                   if report.get("rescored_at") else "")
                + ", " if "collateral_space" in report else "")
             + (
                 f"base prompt: '{report['base_prompt']}'" if report.get("base_word") is None else
                 f"base prompts: each prompt without {' or '.join(repr(c) for c in targets)}"
                 + ("" if report["base_word"] in ("auto", "") else f" ('{report['base_word']}' in its place)")), ""]
    changed = "edit_norm" in report  # a weight change: its weights are changed, not ablated
    if "results" in report:
        control = report.get("control", "random ablation of equal count")
        lines += ["; ".join(f"unedited accuracy on '{c}': {report['before'][c]:.3f}, floor (base prompts drawn as "
                            f"'{c}'): {report['floor'].get(c, float('nan')):.3f}" for c in targets), "",
                  "Every edit is evaluated on the same prompts, seeds and sampler noise as the unedited model. *other "
                  "words*: the target prompts' other named words still drawn, relative to unedited; *SSIM*, *KID*: "
                  "retained images against the unedited ones (KID ×1000 on the concept classifier's features); "
                  "*selective*: target ≤ floor + 0.05 (each target its own), retained and other words ≥ 0.90 of unedited, SSIM ≥ the "
                  f"random control's (*random SSIM*: the mean over the control's draws; the control: {control})."
                  + (f" The edit changes weights instead of ablating them: *ratio* is the fraction of the edited "
                     f"parameters' weights it changes, by {report['edit_norm']:.4g} in Frobenius norm." if changed else ""),
                  "", ] + result_table(report["results"], targets, changed)
        exam = report.get("exam", {})
        if exam.get("report_seeds"):
            lines += ["", f"Read on the *report* seeds ({exam['report_seeds'][0]:,}–{exam['report_seeds'][1] - 1:,}), "
                      "which no decision of the run saw; decisions read the *search* seeds "
                      f"({exam['search_seeds'][0]:,}–{exam['search_seeds'][1] - 1:,}), same prompts, other noise."]
        if report.get("evaluate_at") == "goal" and "search_results" in exam:
            searched = sorted({r["ratio"] for r in exam["search_results"]})
            skipped = [r for r in report["ratios"] if r > max(searched, default=0.0)]
            lines += ["", "**The search** (evaluate_at goal): edits evaluated smallest first on the search seeds until one "
                      "met the goal there: " + (f"{exam['chosen']:g} meets it, and only it is evaluated on the report "
                                                "seeds above" if exam["goal_met_on_search"] else
                                                f"none does; the largest, {exam['chosen']:g}, is reported above")
                      + (f"; {', '.join(f'{r:g}' for r in skipped)} neither evaluated nor written." if skipped else ".")
                      + " What the search read:", ""]
            lines += result_table(exam["search_results"], targets, changed)
        for selection, record in exam.get("robust", {}).items():
            lines += robust_lines(selection, exam["chosen"], record)
        for selection, search in report.get("search", {}).items():
            found = search["found"]
            lines += ["", f"**{selection}: the smallest edit that reaches the floor** (goal: target ≤ floor + margin = "
                      f"{search['goal']:.3f} on {search['images']} images of the target prompts on the search seeds; the edits are nested, so it is found by bisection): "
                      + (f"{found:g}, evaluated above." if found is not None else
                         f"none of the ratios reaches it; the largest, {max(p['ratio'] for p in search['probes']):g}, "
                         "is evaluated above."), "",
                      "| ratio | ablated weights | target accuracy (search prompts) | drawn instead | reaches the goal |",
                      "|---|---|---|---|---|"]
            for p in search["probes"]:
                instead = ", ".join(f"{w} {v:.2f}" for w, v in list(p["drawn_instead"].items())[:2])
                lines.append(f"| {p['ratio']:g} | {p['ablated']} | {p['target']:.3f} | {instead} | "
                             f"{'yes' if p['reached'] else 'no'} |")
        lines += ["", "![trade-off](tradeoff.png)", ""]
        lines += [f"![{s}](samples/{s}-{report['mode']}.png)" for s in dict.fromkeys(r["selection"] for r in report["results"])]
        lines += [""]
    else:
        lines += [str(report.get("evaluation", "not evaluated")), ""]
    if "attacks" in report:
        from cad_lightning.attacks.exam import attack_lines

        lines += attack_lines(report["attacks"])
    lines += localisation_lines(report)
    lines += ["## Edits", ""] + [f"- `{e['masks']}` ({e['ablated']} weights{' changed' if changed else ''})"
                                 for e in report["edits"]]
    return "\n".join(lines) + "\n"


def result_table(results: list[dict], targets: list[str], changed: bool = False) -> list[str]:
    """The markdown table of evaluated edits (the rows of ``evaluate_edits`` read against their controls);
    ``changed``: the edits change weights (a weight delta) instead of ablating them."""
    lines = [f"| selection | ratio | {'changed' if changed else 'ablated'} weights | target accuracy | drawn instead | retained mean | "
             "worst retained / unedited | other words | SSIM | KID | random SSIM | selective |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        worst = "screened out by its target images" if r.get("screened") else _fmt(r.get("retained_min_relative"))
        if r.get("retained_worst") and r["retained_min_relative"] is not None and r["retained_min_relative"] < 1:
            worst += f" ({r['retained_worst']})"
        instead = ", ".join(f"{w} {v:.2f}" for w, v in list(r.get("drawn_instead", {}).items())[:2])
        flag = {True: "yes", False: "no", None: ""}[r.get("selective")]
        target = (f"{r['target']:.3f}" if len(targets) == 1 else
                  ", ".join(f"{c} {r['targets'][c]:.3f}" for c in targets))
        if len(targets) > 1:
            instead = "; ".join(f"{c}: " + ", ".join(f"{w} {v:.2f}" for w, v in list(d.items())[:2])
                                for c, d in r.get("drawn_instead_by_target", {}).items())
        lines.append(f"| {r['selection']} | {r['ratio']:g} | {r['ablated']} | {target} | {instead} | "
                     f"{_fmt(r.get('retained_mean'))} | {worst} | {_fmt(r.get('other_words_relative'), '.2f')} | "
                     f"{_fmt(r.get('retained_ssim'))} | {_fmt(r.get('retained_kid'), '.2f')} | "
                     f"{_fmt(r.get('random_retained_ssim'))} | {flag} |")
    return lines


def localisation_lines(report: dict) -> list[str]:
    """The report's section on where the concept's attribution sits (see attribution/localisation.py)."""
    loc = report.get("localisation")
    if loc is None:
        return []
    lines = ["## Where the concept lives", "",
             f"Shares of the top {loc['top_fraction']:.2%} of scored weights by score ({loc['k']} weights: *positive*, "
             "they induce the concept; *negative*, they suppress it), of their attribution mass, against the share of "
             "weights.", "", "![localisation](localisation.png)", ""]
    for key, title in (("by_block", "UNet block (latent resolution)"), ("by_kind", "component kind")):
        lines += [f"| {title} | weights | top-k positive mass | top-k negative mass |", "|---|---|---|---|"]
        lines += [f"| {g} | {v['weights']:.3f} | {v['positive']:.3f} | {v['negative']:.3f} |" for g, v in loc[key].items()]
        lines += [""]
    top = report.get("top_components", [])
    if top:
        lines += [f"The {len(top)} weights with the largest scores:", "", "| # | parameter | index | block | kind | score |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {i + 1} | `{r['parameter']}` | {tuple(r['index'])} | {r['block']} | {r['kind']} | {r['score']:.3g} |"
                  for i, r in enumerate(top)]
        lines += [""]
    return lines


def robust_lines(selection: str, ratio: float, record: dict) -> list[str]:
    """The report's paragraph on the robust mode's rounds (cad_lightning/editing/robust.py) for one selection."""
    lines = ["", f"**Robust mode, {selection} {ratio:g}**: the edit the search stopped at grew, in adversarial rounds on "
             f"the search seeds, by {record['ablated_beyond']:,} weights outside its components "
             f"({100 * record['fraction_beyond']:.2f}% of {record['weights']:,}); its files and the readings above are "
             f"the grown edit's, beside random ablation of the same count in every row. A round learns a token on the "
             f"current edit and adds the weights that draw the concept under it until a token learned afresh on the "
             f"grown edit reads at most {record['goal']:.3f} (search floor {record['floor']:.3f} + margin) with every "
             f"retained concept kept ({record['wall_s']:.0f} s):", "",
             "| round | token before | fraction | weights | fresh token | worst retained / unedited |",
             "|---|---|---|---|---|---|"]
    for r in record["rounds"]:
        probes = r["probes"] or [None]
        for i, p in enumerate(probes):
            head = f"| {r['round']} | {r['token_before']:.3f} |" if i == 0 else "| | |"
            if p is None:
                lines.append(f"{head} {r.get('stopped', '')} | | | |")
            else:
                mark = " (kept)" if p["fraction"] == r.get("fraction") else ""
                lines.append(f"{head} {p['fraction']:g}{mark} | {p['weights']:,} | {p['token']:.3f} | "
                             f"{p['retained_worst']} {p['retained_relative']:.2f} |")
    return lines

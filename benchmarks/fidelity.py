"""Fidelity of both estimators on the embedded model: do the attributions predict random ablations?

1. First order: α = w·∂J/∂w of the FF weights (erase objective, concept ``circle``); on held-out random
   masks ablating each FF weight with probability 0.1%, 0.5% and 2% (CAD's edits ablate 0.1–0.3%),
   predicted ΔJ = −Σ α over the ablated weights against ΔJ measured under the mask (base branch frozen, as
   the scores hold it). Target: Spearman ≥ 0.7.
2. Regression: ``cad fit --config configs/attribute_regression.yaml`` (the shipped config: K/V neuron masks,
   keep-probability 0.95, the concept's presence under each mask, ridge with cross-validated strength); held-out
   Spearman on masks of the same density (target >= 0.6) and the fitting time. Mask scores are kept in
   ``--root``/mask_scores, so a rerun with more masks computes only the new ones. Every shape and colour:
   ``benchmarks/regression_all.py``.

Measured on 2 CPU cores (shipped weights, 8 runs x 25 steps, 64 masks per density, default sampler: guidance
3.0, eta 1, eps from the clipped x0), first order, Spearman at 0.1% / 0.5% / 2%: FF weights 0.755 / 0.453 /
-0.018 (Pearson 0.761 / 0.426 / -0.019); conv weights (``--fo-components conv``) 0.513 / 0.516 / 0.341; about
3 minutes each; cross-attention K/V weights (``--fo-components cross_attn_kv``, the default job's) 0.986 / 0.974 /
0.937 (Pearson 0.994 / 0.985 / 0.942) in 73 s. The previous weights gave 0.801 / 0.476 / -0.361 on FF at eta 0, and 0.968 / 0.877 / 0.491 with
their previous sampler (``--fo-guidance 2 --fo-clipped-eps off``).
Regression on 'circle' and every other shape and colour with the shipped config: docs/regression.md, "The regression
estimator" (``benchmarks/regression_all.py``). The previous shipped config (classifier log-odds on FF neurons,
2,000 masks, 15 minutes) reached held-out Spearman 0.730 with the previous weights, 0.249 with 400 masks on
'square' with the current ones, and its edits did not erase.

    python benchmarks/fidelity.py [--masks 1600] [--heldout 200] [--samples 4] [--steps 10] [--skip-first-order]
                                  [--skip-regression] [--fo-components ff|conv|...] [--fo-guidance G]
                                  [--fo-clipped-eps on|off]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cad_lightning import load_backbone
from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.fidelity import correlations, first_order_fidelity
from cad_lightning.attribution.scoring import first_order_scores
from cad_lightning.attribution.objectives import EraseObjective
from cad_lightning.cli import main as cad
from cad_lightning.data.world import prompts_naming

ROOT = Path(__file__).resolve().parent.parent


def first_order(args) -> None:
    backbone = load_backbone(ROOT / "checkpoints" / "tiny-shapes")
    if args.fo_guidance is not None:
        backbone.guidance_scale = args.fo_guidance
    if args.fo_clipped_eps is not None:
        backbone.use_clipped_model_output = args.fo_clipped_eps == "on"
    names = ComponentSpace(args.fo_components).names(backbone.denoiser)
    params = dict(backbone.denoiser.named_parameters())
    objective = EraseObjective(num_inference_steps=args.fo_steps)
    prompts = prompts_naming(args.concept, args.fo_samples, torch.Generator().manual_seed(0))
    seeds = list(range(len(prompts)))
    start = time.perf_counter()
    scores, _ = first_order_scores(backbone, objective, names, prompts, seeds)
    scored = time.perf_counter() - start
    print(f"first order: {'+'.join(args.fo_components)} weights ({sum(params[n].numel() for n in names)}), erase J of '{args.concept}', "
          f"{len(prompts)} runs x {args.fo_steps} DDIM steps, {args.fo_masks} held-out masks per density; "
          f"scoring {scored:.1f} s")
    for density in args.fo_densities:
        begin = time.perf_counter()
        predicted, measured = first_order_fidelity(backbone, objective, prompts, seeds, scores, density=density,
                                                   masks=args.fo_masks)
        result = correlations(predicted, measured)
        print(f"  masks ablating {100 * density:g}% of the weights: Spearman {result['spearman']:.3f}  "
              f"Pearson {result['pearson']:.3f}  (target Spearman >= 0.7); check {time.perf_counter() - begin:.1f} s")


def regression(args) -> None:
    root = Path(args.root)
    start = time.perf_counter()
    cad(["fit", "--config", str(ROOT / "configs" / "attribute_regression.yaml"), "--trainer.default_root_dir", str(root),
         "--data.concept", args.concept, "--data.masks", str(args.masks), "--data.heldout_masks", str(args.heldout),
         "--data.samples", str(args.samples), "--model.num_inference_steps", str(args.steps),
         "--data.keep_prob", str(args.keep_prob), "--data.batch_size", str(args.batch_size),
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    wall = time.perf_counter() - start
    run = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    meta = json.loads((run / "attribution" / "meta.json").read_text())
    fidelity = json.loads((run / "attribution" / "fidelity.json").read_text())
    fit = meta["fit"]
    print(f"regression: {meta['layout']['n_components']} {meta['granularity']} components of "
          f"{', '.join(meta['components']['patterns'])}, keep-prob {args.keep_prob}, "
          f"{meta['masks']['train']} training masks ({meta['masks']['computed_this_run']} of the "
          f"{meta['masks']['train'] + meta['masks']['heldout']} masks computed in this run, the rest from the store), {args.samples} prompts x {args.steps} DDIM steps per mask, score {meta['score_kind']} of '{args.concept}'")
    print(f"  held-out ({fidelity['masks']} masks): Spearman {fidelity['spearman']:.3f}  Pearson {fidelity['pearson']:.3f}"
          f"  (target Spearman >= 0.6)")
    print(f"  fit: {fit['method']} ({fit['solver']}), strength {fit['strength']:.3g}, train R2 {fit['train_r2']:.3f}, "
          f"fitting time {fit['fit_time_s']:.2f} s; score mean {fit['score_mean']:.3f} sd {fit['score_std']:.3f}; "
          f"wall time of this run {wall:.0f} s")
    report_path = run / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        print(f"  edits of the fitted coefficients: unedited accuracy on '{args.concept}' "
              f"{report['before'][args.concept]:.3f}, floor {report['floor'].get(args.concept, float('nan')):.3f}")
        for r in report["results"]:
            print(f"    {r['selection']:<10} {100 * r['ratio']:g}% ({r['ablated']} weights): target {r['target']:.3f}  "
                  f"retained mean {r['retained_mean']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--fo-samples", type=int, default=8)
    parser.add_argument("--fo-steps", type=int, default=25)
    parser.add_argument("--fo-masks", type=int, default=64)
    parser.add_argument("--fo-densities", type=float, nargs="+", default=[0.001, 0.005, 0.02],
                        help="fractions of the scored weights each held-out mask ablates (CAD's edits ablate 0.1-0.5%%)")
    parser.add_argument("--fo-components", nargs="+", default=["ff"],
                        help="components scored and masked: presets (ff, conv, transformer_linear, ...) or name regexes")
    parser.add_argument("--fo-guidance", type=float, default=None, help="guidance of the trajectories (default: the model's)")
    parser.add_argument("--fo-clipped-eps", choices=["on", "off"], default=None,
                        help="DDIM step re-derives eps from the clipped x0 (default: the model's)")
    parser.add_argument("--masks", type=int, default=1600)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--keep-prob", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--root", default=str(ROOT / "runs" / "benchmark-fidelity"))
    parser.add_argument("--skip-first-order", action="store_true")
    parser.add_argument("--skip-regression", action="store_true")
    args = parser.parse_args()
    if not args.skip_first_order:
        first_order(args)
    if not args.skip_regression:
        regression(args)


if __name__ == "__main__":
    main()

"""Masks per second of the regression estimator's concept scores, measured in one process on the embedded model.

Every score is measured on the same masks (the shipped config's: K/V neurons of the cross-attention, keep
probability 0.95, 4 prompts of the concept x 10 DDIM steps, 16 masks per step); the baseline is the classifier
score (images generated under each mask, then classified), the score the regression estimator shipped with
(2.7 masks/s on FF neurons, measured with the previous weights). ``presence`` and ``objective`` score the
unmasked model's states (sampled once, not counted) with one UNet pass per state (presence) or two with the
base branch frozen once (objective: one), so their cost per mask is a fraction of a full guided sampling run.

    python benchmarks/regression_throughput.py [--concept square] [--masks 48] [--chunks 128,256,512] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cad_lightning import load_backbone  # noqa: E402
from cad_lightning.attribution.components import ComponentSpace  # noqa: E402
from cad_lightning.attribution.mask_scores import (classifier_scores, freeze_base, objective_scores,  # noqa: E402
                                                   presence_inputs, presence_scores)
from cad_lightning.attribution.masks import MaskLayout, sample_masks  # noqa: E402
from cad_lightning.attribution.objectives import EraseObjective  # noqa: E402
from cad_lightning.data.mask_datamodule import MaskDataModule  # noqa: E402
from cad_lightning.evaluation.classifier import load_concept_classifier  # noqa: E402
from cad_lightning.generation import resolve_model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="square")
    parser.add_argument("--masks", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16, help="masks per step (data.batch_size)")
    parser.add_argument("--chunks", default="128,256,512", help="states per batched pass (model.chunk_size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path("tiny-shapes")
    backbone = load_backbone(path)
    backbone.requires_grad_(False)
    detector = load_concept_classifier(path)
    layout = MaskLayout(backbone.denoiser, ComponentSpace(["cross_attn_kv"]).names(backbone.denoiser), "neuron")
    items = MaskDataModule(concept=args.concept, base_word="auto", samples=args.samples).evaluation_items()
    prompts, seeds, bases = [i["prompt"] for i in items], [int(i["seed"]) for i in items], [i["base_prompt"] for i in items]
    objective = EraseObjective(num_inference_steps=args.steps)
    masks = sample_masks(layout.n_components, range(args.masks), 0.95, 0)
    print(f"{layout.n_components} K/V neuron components, {args.masks} masks in steps of {args.batch}, "
          f"{args.samples} prompts of '{args.concept}' x {args.steps} steps, {torch.get_num_threads()} threads")

    def rate(score_batch) -> tuple[float, torch.Tensor]:
        score_batch(masks[:1])  # warm-up
        start = time.perf_counter()
        out = torch.cat([score_batch(masks[s : s + args.batch]) for s in range(0, args.masks, args.batch)])
        return args.masks / (time.perf_counter() - start), out

    base, _ = rate(lambda m: classifier_scores(backbone, detector, args.concept, prompts, seeds, layout, m,
                                               args.steps, None))
    print(f"classifier (baseline)        {base:6.2f} masks/s  1.00x")
    start = time.perf_counter()
    inputs = objective.inputs(backbone, prompts, seeds, bases)
    frozen, presence = freeze_base(backbone, objective, inputs), presence_inputs(backbone, objective, inputs)
    print(f"unmasked states (once a run) {time.perf_counter() - start:6.2f} s")
    reference = None
    for chunk in [int(c) for c in args.chunks.split(",")]:
        r, out = rate(lambda m: presence_scores(backbone, presence, layout, m, chunk))
        same = "" if reference is None else f"  (max change vs chunk {args.chunks.split(',')[0]}: {float((out - reference).abs().max()):.1e})"
        reference = out if reference is None else reference
        print(f"presence, chunk {chunk:4d}        {r:6.2f} masks/s  {r / base:.2f}x{same}")
    r, _ = rate(lambda m: objective_scores(backbone, objective, frozen, layout, m, 256))
    print(f"objective, chunk  256        {r:6.2f} masks/s  {r / base:.2f}x")


if __name__ == "__main__":
    main()

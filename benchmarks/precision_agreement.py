"""How far first-order scores computed in half precision are from fp32 scores (the embedded model).

The erase objective is the squared gap between two nearly equal noise predictions, so rounding in the
UNet's forward pass is amplified in J and its gradient; accumulating the scores in fp32 does not undo it.
For each precision this prints the Pearson correlation with the fp32 scores, the relative L1 gap and the
overlap of the top 1% of weights (what CAD-Erase would ablate at ratio 0.01).

    python benchmarks/precision_agreement.py [--concept circle] [--samples 8] [--dtypes bf16 fp16]
"""

from __future__ import annotations

import argparse
import time

import torch

from cad_lightning import load_backbone
from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.module import accumulate_first_order
from cad_lightning.attribution.objectives import EraseObjective
from cad_lightning.data.attribution_datamodule import AttributionDataModule
from cad_lightning.generation import resolve_model_path


def scores(dtype: str, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, float]:
    backbone = load_backbone(resolve_model_path("tiny-shapes"), dtype=dtype)
    names = ComponentSpace(["ff"]).names(backbone.unet)
    params = dict(backbone.unet.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    buffers = [torch.zeros(params[n].shape, dtype=torch.float32) for n in names]
    start = time.perf_counter()
    accumulate_first_order(backbone, EraseObjective(), names, prompts, seeds, buffers)
    return torch.cat([b.flatten() for b in buffers]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    args = parser.parse_args()
    items = AttributionDataModule(concept=args.concept, samples=args.samples).items()
    prompts, seeds = [i["prompt"] for i in items], [i["seed"] for i in items]
    reference, seconds = scores("fp32", prompts, seeds)
    k = max(1, reference.numel() // 100)
    top = set(reference.topk(k).indices.tolist())
    print(f"concept '{args.concept}', {args.samples} trajectories, {reference.numel()} FF weights; fp32: {seconds:.1f} s")
    print("| dtype | Pearson vs fp32 | relative L1 gap | top-1% overlap | seconds |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        other, seconds = scores(dtype, prompts, seeds)
        pearson = float(torch.corrcoef(torch.stack([reference, other]))[0, 1])
        gap = float((other - reference).abs().sum() / reference.abs().sum())
        overlap = len(top & set(other.topk(k).indices.tolist())) / k
        print(f"| {dtype} | {pearson:.4f} | {gap:.3f} | {overlap:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()

"""How far first-order scores computed in half precision are from fp32 scores, for any model.

The erase objective is the squared gap between two nearly equal noise predictions, so rounding in the
UNet's forward pass is amplified in J and its gradient; accumulating the scores in fp32 does not undo it.
For each precision this prints the Pearson correlation with the fp32 scores, the relative L1 gap and the
overlap of the top 1% of weights (what CAD-Erase would ablate at ratio 0.01).

    python benchmarks/precision_agreement.py [--concept circle] [--samples 8] [--dtypes bf16 fp16]
    python benchmarks/precision_agreement.py --model /models/stable-diffusion-v1-4 --device cuda \
        --concept "golf ball" --template "a photo of a {concept}" --steps 50 --guidance 7.5
"""

from __future__ import annotations

import argparse
import time

import torch

from cad_lightning import load_backbone
from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.base import use_ieee_fp32
from cad_lightning.attribution.scoring import accumulate_first_order
from cad_lightning.attribution.objectives import EraseObjective
from cad_lightning.data.attribution_datamodule import AttributionDataModule
from cad_lightning.generation import resolve_model_path


def scores(args, dtype: str, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, float]:
    backbone = load_backbone(resolve_model_path(args.model), device=args.device, dtype=dtype)
    if args.device.startswith("cuda"):
        use_ieee_fp32(torch.device(args.device))
    names = ComponentSpace(["ff"]).names(backbone.denoiser)
    params = dict(backbone.denoiser.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    buffers = [torch.zeros(params[n].shape, dtype=torch.float32, device=args.device) for n in names]
    objective = EraseObjective(guidance_scale=args.guidance, num_inference_steps=args.steps)
    start = time.perf_counter()
    for prompt, seed in zip(prompts, seeds):
        accumulate_first_order(backbone, objective, names, [prompt], [seed], buffers, chunk_size=args.chunk)
    return torch.cat([b.flatten().cpu() for b in buffers]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-shapes", help="shipped model name or a local diffusers folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--template", help="prompt template with {concept} (free-text concepts)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    parser.add_argument("--chunk", type=int, default=25, help="states per forward/backward")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    args = parser.parse_args()
    templates = [args.template] if args.template else None
    items = AttributionDataModule(concept=args.concept, samples=args.samples, prompt_templates=templates).items()
    prompts, seeds = [i["prompt"] for i in items], [i["seed"] for i in items]
    reference, seconds = scores(args, "fp32", prompts, seeds)
    k = max(1, reference.numel() // 100)
    top = set(reference.topk(k).indices.tolist())
    print(f"{args.model}: concept '{args.concept}', {args.samples} trajectories, {reference.numel()} FF weights; fp32: {seconds:.1f} s")
    print("| dtype | Pearson vs fp32 | relative L1 gap | top-1% overlap | seconds |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes:
        other, seconds = scores(args, dtype, prompts, seeds)
        pearson = float(torch.corrcoef(torch.stack([reference, other]))[0, 1])
        gap = float((other - reference).abs().sum() / reference.abs().sum())
        overlap = len(top & set(other.topk(k).indices.tolist())) / k
        print(f"| {dtype} | {pearson:.4f} | {gap:.3f} | {overlap:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()

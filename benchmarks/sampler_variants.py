"""How the DDIM step variant changes what the embedded model draws: wrong and empty images per variant.

For each variant, 64 images of prompts naming each of six concepts are generated from the same seeds and read
by the shipped classifier. An image is *empty* when fewer than 6 pixels differ from its median colour by more
than 0.3 (L1 over RGB): no object was drawn. The table is in checkpoints/tiny-shapes/model_card.md.

    python benchmarks/sampler_variants.py [--model checkpoints/tiny-shapes] [--guidance 2.0] [--n 64] [variant ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from cad_lightning import load_backbone, load_concept_classifier
from cad_lightning.data.world import concept_kind, prompts_naming

ROOT = Path(__file__).resolve().parent.parent
CONCEPTS = ("circle", "cross", "red", "green", "solid", "yellow")
# name: (guidance factor per step index i of n, scheduler config overrides, eta, use_clipped_model_output)
VARIANTS = {
    "unclipped-eps": (lambda i, n: 1.0, {}, 0.0, False),
    "no-guidance-first-3": (lambda i, n: 0.0 if i < 3 else 1.0, {}, 0.0, False),
    "no-guidance-first-6": (lambda i, n: 0.0 if i < 6 else 1.0, {}, 0.0, False),
    "no-clipping": (lambda i, n: 1.0, {"clip_sample": False}, 0.0, False),
    "dynamic-thresholding": (lambda i, n: 1.0, {"thresholding": True, "dynamic_thresholding_ratio": 0.995,
                                                 "sample_max_value": 1.5}, 0.0, False),
    "ancestral": (lambda i, n: 1.0, {}, 1.0, False),
    "clipped-eps": (lambda i, n: 1.0, {}, 0.0, True),
}


def empty(images: torch.Tensor) -> torch.Tensor:
    median = images.flatten(2).median(dim=2).values[:, :, None, None]
    object_pixels = ((images - median).abs().sum(1) > 0.3).flatten(1).sum(1)
    return object_pixels < 6


@torch.no_grad()
def sample(backbone, prompts, seed, guidance, variant, steps=25) -> torch.Tensor:
    """DDIM with the variant; guidance g on a step means the scale 1 + (guidance - 1) * factor."""
    factor, overrides, eta, clipped = VARIANTS[variant]
    scheduler = DDIMScheduler.from_config({**backbone.scheduler.config, **overrides})
    scheduler.set_timesteps(steps)
    cond, uncond = backbone.encode(prompts), backbone.encode([""] * len(prompts))
    generators = backbone.generators(len(prompts), seed)
    x = backbone.draw_noise(generators)
    backbone.use_clipped_model_output = clipped
    for i, t in enumerate(scheduler.timesteps):
        eps = backbone.guided_noise(x, t, cond, uncond, 1 + (guidance - 1) * factor(i, steps))
        x = backbone.denoise_step(scheduler, eps, t, x, eta, generators)
    return backbone.decode(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "tiny-shapes"))
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), choices=[[]] + list(VARIANTS))
    args = parser.parse_args()
    backbone, detector = load_backbone(args.model), load_concept_classifier(args.model)
    print(f"model: {args.model}  DDIM 25 steps, guidance {args.guidance}, {args.n} images per concept, seed 0")
    print(f"{'variant':<22} {'wrong':>6} {'empty':>6}  per concept (wrong/empty among wrong)")
    for variant in args.variants:
        start, generator, wrong_total, empty_total, cells = time.perf_counter(), torch.Generator().manual_seed(0), 0, 0, []
        for word in CONCEPTS:
            images = sample(backbone, prompts_naming(word, args.n, generator), 0, args.guidance, variant)
            wrong = torch.tensor([p != word for p in detector(images)[concept_kind(word)]])
            wrong_empty = int((wrong & empty(images)).sum())
            wrong_total, empty_total = wrong_total + int(wrong.sum()), empty_total + wrong_empty
            cells.append(f"{word} {int(wrong.sum())}/{wrong_empty}")
        print(f"{variant:<22} {wrong_total:>6} {empty_total:>6}  {', '.join(cells)}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

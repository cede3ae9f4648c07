"""First-order CAD attribution: one sampling run reused for every timestep, against the official algorithm.

The official code resamples the trajectory from scratch for every timestep it scores: for timestep k it runs
k guided sampling steps, then evaluates J at that x_t (O(T²) UNet evaluations). cad-lightning samples each
trajectory once and reuses every x_t, and the guided sampler's unconditional branch is ε(x_t, c_base, t)
itself when the base prompt is the negative prompt (O(T)). Both run here side by side on the same items,
with the same x_t (DDIM is deterministic), so their scores must agree; the script prints UNet evaluations
(images through the UNet), wall time, their ratios and the agreement of the scores.

    python benchmarks/attribution_speed.py [--model checkpoints/tiny-shapes] [--steps 50] [--samples 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cad_lightning import load_backbone
from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.scoring import accumulate_first_order
from cad_lightning.attribution.objectives import EraseObjective

ROOT = Path(__file__).resolve().parent.parent


class UNetCounter:
    """Counts images passed through the UNet (a batch of 8 is 8 evaluations)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.count = 0
        unet.register_forward_pre_hook(self.hook)

    def hook(self, module, args) -> None:
        self.count += int(args[0].shape[0])


def official_scores(backbone, names, prompts, seeds, steps, guidance, base_prompt="") -> dict[str, torch.Tensor]:
    """The official algorithm: for each timestep k, sample from scratch down to step k, then score J there."""
    params = dict(backbone.denoiser.named_parameters())
    selected = [params[n] for n in names]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in selected]
    cond = backbone.encode(prompts)
    uncond = backbone.encode([""] * len(prompts))
    base = backbone.encode([base_prompt] * len(prompts))
    for k in range(steps):
        scheduler = backbone.new_scheduler(steps)
        with torch.no_grad():
            generators = backbone.generators(len(prompts), seeds)
            x = backbone.draw_noise(generators) * scheduler.init_noise_sigma
            for t in scheduler.timesteps[:k]:
                eps = backbone.guided_noise(x, t, cond, uncond, guidance)
                x = backbone.denoise_step(scheduler, eps, t, x, backbone.eta, generators)
        t = scheduler.timesteps[k]
        with torch.no_grad():
            eps_base = backbone.predict_noise(x, t, base)
        with torch.enable_grad():
            eps = backbone.predict_noise(x, t, cond)
            j = (eps_base.float() - eps.float()).pow(2).flatten(1).mean(1)
            grads = torch.autograd.grad(j.sum(), selected)
        for s, p, g in zip(sums, selected, grads):
            s.add_(p.float() * g.float())
    return {n: s for n, s in zip(names, sums)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "tiny-shapes"))
    parser.add_argument("--steps", type=int, default=50, help="T, sampler steps per trajectory")
    parser.add_argument("--samples", type=int, default=4, help="trajectories (prompts) of the concept")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--skip-default-run", action="store_true", help="do not time the default `cad fit` job")
    args = parser.parse_args()

    backbone = load_backbone(args.model)
    guidance = backbone.guidance_scale
    names = ComponentSpace(["ff"]).names(backbone.denoiser)
    for name, param in backbone.denoiser.named_parameters():
        param.requires_grad_(name in names)
    prompts = [f"a {args.concept}"] * args.samples
    seeds = list(range(args.samples))
    counter = UNetCounter(backbone.denoiser)

    start, counter.count = time.perf_counter(), 0
    objective = EraseObjective(base_prompt="", guidance_scale=guidance, num_inference_steps=args.steps)
    params = dict(backbone.denoiser.named_parameters())
    ours = [torch.zeros_like(params[n], dtype=torch.float32) for n in names]
    accumulate_first_order(backbone, objective, names, prompts, seeds, ours, chunk_size=256)
    ours_time, ours_evals = time.perf_counter() - start, counter.count

    start, counter.count = time.perf_counter(), 0
    official = official_scores(backbone, names, prompts, seeds, args.steps, guidance)
    official_time, official_evals = time.perf_counter() - start, counter.count

    a = torch.cat([o.flatten() for o in ours])
    b = torch.cat([official[n].flatten() for n in names])
    # the official code sums J over samples per timestep; ours sums over (timestep, sample): same sum
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    rel = ((a - b).norm() / b.norm()).item()
    top = max(1, a.numel() // 50)
    overlap = len(set(a.topk(top).indices.tolist()) & set(b.topk(top).indices.tolist())) / top

    print(f"model: {args.model}  T = {args.steps}  trajectories: {args.samples}  components: {a.numel()} FF weights")
    print(f"{'algorithm':<34} {'UNet evaluations':>17} {'wall time (s)':>14}")
    print(f"{'official (resample per timestep)':<34} {official_evals:>17} {official_time:>14.2f}")
    print(f"{'cad-lightning (one run, reused)':<34} {ours_evals:>17} {ours_time:>14.2f}")
    print(f"ratio: {official_evals / ours_evals:.1f}x fewer UNet evaluations, {official_time / ours_time:.1f}x less wall time"
          "  (targets: >= 15x and >= 10x)")
    print(f"agreement of the scores: Pearson {corr:.6f}, relative L2 difference {rel:.2e}, top-2% overlap {overlap:.3f}")
    if not args.skip_default_run:
        time_default_run()


def time_default_run() -> None:
    """Wall time of the default main job, `cad fit --config configs/attribute.yaml`, end to end."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "cad_lightning.cli", "fit", "--config", str(ROOT / "configs" / "attribute.yaml"),
             "--trainer.default_root_dir", tmp, "--trainer.enable_progress_bar", "false"],
            check=True, capture_output=True,
        )
        elapsed = time.perf_counter() - start
    print(f"default job `cad fit --config configs/attribute.yaml`: {elapsed:.1f} s end to end (target <= 150 s)")


if __name__ == "__main__":
    main()

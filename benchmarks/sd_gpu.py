"""First-order CAD attribution on a full-size Stable Diffusion 1.4 UNet (random weights) on a GPU.

Builds the UNet and text encoder from Stable Diffusion v1.4's configurations in benchmarks/reference/sd-v1-4
(no weights are downloaded; scores of random weights are meaningless, the cost is real), then measures for T = 50 and 8 trajectories of one prompt:
wall time, UNet evaluations and peak GPU memory, for each precision; and the same work the official way
(resampling the trajectory from scratch for every timestep) on a subset of timesteps, extrapolated to T.

    python benchmarks/sd_gpu.py [--reference benchmarks/reference/sd-v1-4] [--variants fp16 bf16 fp16+ckpt] [--official-steps 6]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.module import accumulate_first_order
from cad_lightning.attribution.objectives import EraseObjective
from cad_lightning.backbones.backbone import DTYPES, DiffusionBackbone

ROOT = Path(__file__).resolve().parent.parent


class WordTokenizer:
    """Stands in for CLIP's tokenizer (its vocabulary is not shipped): hashes words to ids, pads to 77."""

    model_max_length = 77
    all_special_tokens: list[str] = []

    def __call__(self, prompts, **kwargs):
        ids = torch.zeros(len(prompts), 77, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = [49406] + [hash(w) % 49000 for w in p.split()] + [49407]
            ids[i, : len(words)] = torch.tensor(words[:77])
        return type("Batch", (), {"input_ids": ids})()


def build(reference: Path, dtype: torch.dtype, device: str) -> DiffusionBackbone:
    unet = UNet2DConditionModel.from_config(json.loads((reference / "unet_config.json").read_text()))
    text = CLIPTextModel(CLIPTextConfig(**json.loads((reference / "text_encoder_config.json").read_text())))
    scheduler = DDIMScheduler.from_config(json.loads((reference / "scheduler_config.json").read_text()))
    backbone = DiffusionBackbone(unet.to(dtype), text, WordTokenizer(), scheduler, num_inference_steps=50, guidance_scale=7.5)
    return backbone.requires_grad_(False).to(device)


def measure(args, name: str, checkpointing: bool, device: str) -> dict:
    backbone = build(Path(args.reference), DTYPES[name], device)
    if checkpointing:
        backbone.denoiser.enable_gradient_checkpointing()
    names = ComponentSpace(["ff"]).names(backbone.denoiser)
    params = dict(backbone.denoiser.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    weights = sum(params[n].numel() for n in names)
    evals = {"count": 0}
    backbone.denoiser.register_forward_pre_hook(lambda m, a: evals.__setitem__("count", evals["count"] + a[0].shape[0]))
    buffers = [torch.zeros_like(params[n], dtype=torch.float32) for n in names]
    objective = EraseObjective(num_inference_steps=args.steps)
    prompts, seeds = ["a photo of a golf ball"] * args.samples, list(range(args.samples))
    # warm-up (kernel selection, allocator) on one trajectory of 2 steps, not timed
    accumulate_first_order(backbone, EraseObjective(num_inference_steps=2), names, prompts[:1], seeds[:1],
                           [b.clone() for b in buffers], chunk_size=args.chunk)
    evals["count"] = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for p, s in zip(prompts, seeds):  # one trajectory at a time, as a GPU run with data.batch_size 1 does
        accumulate_first_order(backbone, objective, names, [p], [s], buffers, chunk_size=args.chunk)
    if device == "cuda":
        torch.cuda.synchronize()
    ours = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    ours_evals = evals["count"]
    result = {
        "dtype": name, "gradient_checkpointing": checkpointing, "ff_weights": weights, "steps": args.steps,
        "samples": args.samples, "chunk": args.chunk, "seconds": ours, "unet_evaluations": ours_evals,
        "peak_gpu_gib": peak, "finite": all(bool(torch.isfinite(b).all()) for b in buffers),
    }
    label = f"{name}{' + gradient checkpointing' if checkpointing else ''}"
    print(f"{label}: {weights / 1e6:.1f} M FF weights scored; T = {args.steps}, {args.samples} trajectories, "
          f"chunk {args.chunk}")
    print(f"  cad-lightning: {ours:.1f} s, {ours_evals} UNet evaluations, peak GPU memory {peak:.1f} GiB, "
          f"scores finite: {result['finite']}")

    if args.official_steps > 0 and not checkpointing:
        # official: for timestep k, k guided steps from scratch + 2 evaluations; run a few k, extrapolate
        cond, uncond = backbone.encode(prompts[:1]), backbone.encode([""])
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ks = list(range(0, args.steps, max(1, args.steps // args.official_steps)))[: args.official_steps]
        for k in ks:
            scheduler = backbone.new_scheduler(args.steps)
            with torch.no_grad():
                generators = backbone.generators(1, [0])
                x = backbone.draw_noise(generators)
                for t in scheduler.timesteps[:k]:
                    eps = backbone.guided_noise(x, t, cond, uncond, 7.5)
                    x = backbone.denoise_step(scheduler, eps, t, x, backbone.eta, generators)
            t = scheduler.timesteps[k]
            with torch.no_grad():
                eps_base = backbone.predict_noise(x, t, uncond)
            with torch.enable_grad():
                j = (eps_base.float() - backbone.predict_noise(x, t, cond).float()).pow(2).mean()
                torch.autograd.grad(j, [params[n] for n in names])
        if device == "cuda":
            torch.cuda.synchronize()
        sampled = time.perf_counter() - start
        official_evals = args.samples * sum(2 * k + 2 for k in range(args.steps))
        # the subset's mean cost per timestep, rescaled by the evaluations of every k and every sample
        per_eval = sampled / sum(2 * k + 2 for k in ks)
        official = per_eval * official_evals
        result.update(official_seconds_extrapolated=official, official_unet_evaluations=official_evals,
                      official_timesteps_run=len(ks))
        print(f"  official (extrapolated from {len(ks)} timesteps): {official:.1f} s, {official_evals} UNet evaluations")
        print(f"  ratio: {official_evals / ours_evals:.1f}x fewer evaluations, {official / ours:.1f}x less wall time")
    del backbone, buffers
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=str(ROOT / "benchmarks" / "reference" / "sd-v1-4"))
    parser.add_argument("--variants", nargs="+", default=["fp16", "bf16", "fp16+ckpt"],
                        help="precision, with +ckpt for gradient checkpointing")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=16, help="states per forward/backward")
    parser.add_argument("--official-steps", type=int, default=6, help="timesteps of the official algorithm to run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    results = []
    for variant in args.variants:
        name, _, extra = variant.partition("+")
        results.append(measure(args, name, extra == "ckpt", device))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()

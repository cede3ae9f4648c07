"""First-order CAD attribution on full-size denoisers with random weights on a GPU: Stable Diffusion 1.4, SDXL,
SD3-medium and FLUX.1-dev.

Builds the denoiser and text encoders from the published configurations in benchmarks/reference/<model>
(no weights are downloaded; scores of random weights are meaningless, the cost is real), then measures for T
steps and N trajectories of one prompt: wall time, denoiser evaluations and peak GPU memory, for each precision;
for SD 1.4 also the same work the official way (resampling the trajectory from scratch for every timestep) on a
subset of timesteps, extrapolated to T.

    python benchmarks/sd_gpu.py [--family sd|sdxl|sd3|flux] [--variants fp16 bf16 fp16+ckpt] [--steps T] [--samples N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from cad_lightning.attribution.components import ComponentSpace
from cad_lightning.attribution.objectives import EraseObjective
from cad_lightning.attribution.scoring import accumulate_first_order
from cad_lightning.backbones.backbone import DTYPES, DiffusionBackbone
from cad_lightning.backbones.families import FluxBackbone, SD3Backbone, SDXLBackbone

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "benchmarks" / "reference"
# per family: reference folder, default steps, guidance; every one at its native resolution (1024 px but SD 1.4's 512)
FAMILIES = {"sd": ("sd-v1-4", 50, 7.5), "sdxl": ("sdxl-base-1.0", 50, 5.0), "sd3": ("sd3-medium", 28, 7.0),
            "flux": ("flux-1-dev", 28, 1.0)}


class WordTokenizer:
    """Stands in for the CLIP and T5 tokenizers (their vocabularies are not shipped): hashes words to ids below
    ``vocab``, pads to ``max_length``."""

    all_special_tokens: list[str] = []

    def __init__(self, model_max_length: int = 77, vocab: int = 49000) -> None:
        self.model_max_length, self.vocab = model_max_length, vocab

    def __call__(self, prompts, max_length=None, **kwargs):
        length = max_length or self.model_max_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = ([1] + [hash(w) % (self.vocab - 2) + 2 for w in p.split()] + [0])[:length]
            ids[i, : len(words)] = torch.tensor(words)
            mask[i, : len(words)] = 1
        return type("Batch", (), {"input_ids": ids, "attention_mask": mask})()


def _config(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}_config.json").read_text())


def _clip(folder: Path, name: str, projection: bool = False):
    config = CLIPTextConfig(**_config(folder, name))
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def build(family: str, dtype: torch.dtype, device: str, steps: int, guidance: float,
          reference: Path = REFERENCE) -> DiffusionBackbone:
    """The family's denoiser and text encoders with random weights, built on the device; the CLIP encoders in
    fp32, T5 in bf16 when the denoiser is (as load_backbone does)."""
    folder = reference / FAMILIES[family][0]
    with torch.device(device):
        if family in ("sd", "sdxl"):
            denoiser = UNet2DConditionModel.from_config(_config(folder, "unet"))
        else:
            cls = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[family]
            denoiser = cls.from_config(_config(folder, "transformer"))
        denoiser = denoiser.to(dtype)
        t5_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        defaults = {"num_inference_steps": steps, "guidance_scale": guidance}
        clip = WordTokenizer(77, _config(folder, "text_encoder")["vocab_size"])
        if family == "sd":
            scheduler = DDIMScheduler.from_config(_config(folder, "scheduler"))
            backbone = DiffusionBackbone(denoiser, _clip(folder, "text_encoder"), clip, scheduler, **defaults)
        elif family == "sdxl":
            scheduler = DDIMScheduler.from_config(_config(folder, "scheduler"))
            backbone = SDXLBackbone(denoiser, _clip(folder, "text_encoder"), clip, scheduler,
                                    text_encoder_2=_clip(folder, "text_encoder_2", True), tokenizer_2=clip, **defaults)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(_config(folder, "scheduler"))
            t5_config = T5Config(**_config(folder, "text_encoder_3" if family == "sd3" else "text_encoder_2"))
            t5 = T5EncoderModel(t5_config).to(t5_dtype)
            if family == "sd3":
                backbone = SD3Backbone(denoiser, _clip(folder, "text_encoder", True), clip, scheduler,
                                       text_encoder_2=_clip(folder, "text_encoder_2", True), tokenizer_2=clip,
                                       text_encoder_3=t5, tokenizer_3=WordTokenizer(256, t5_config.vocab_size), **defaults)
            else:
                backbone = FluxBackbone(denoiser, _clip(folder, "text_encoder"), clip, scheduler, text_encoder_2=t5,
                                        tokenizer_2=WordTokenizer(512, t5_config.vocab_size), **defaults)
    return backbone.requires_grad_(False).eval()


def measure(args, name: str, checkpointing: bool, device: str) -> dict:
    backbone = build(args.family, DTYPES[name], device, args.steps, args.guidance, Path(args.reference))
    if device == "cuda":
        torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
    if checkpointing:
        backbone.denoiser.enable_gradient_checkpointing()
    names = ComponentSpace(["ff"]).names(backbone.denoiser)
    params = dict(backbone.denoiser.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    weights = sum(params[n].numel() for n in names)
    evals = {"count": 0}

    def count(module, args, kwargs):  # the UNet takes its sample positionally, the transformers by keyword
        evals["count"] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    backbone.denoiser.register_forward_pre_hook(count, with_kwargs=True)
    buffers = [torch.zeros_like(params[n], dtype=torch.float32) for n in names]
    objective = EraseObjective(num_inference_steps=args.steps, guidance_scale=args.guidance)
    prompts, seeds = ["a photo of a golf ball"] * args.samples, list(range(args.samples))
    # warm-up (kernel selection, allocator) on one trajectory of 2 steps, not timed
    accumulate_first_order(backbone, EraseObjective(num_inference_steps=2, guidance_scale=args.guidance), names,
                           prompts[:1], seeds[:1],
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
        "family": args.family, "model": FAMILIES[args.family][0], "latents": list(backbone.latent_shape),
        "guidance_scale": args.guidance, "resident_gib": resident, "dtype": name, "gradient_checkpointing": checkpointing, "ff_weights": weights, "steps": args.steps,
        "samples": args.samples, "chunk": args.chunk, "seconds": ours, "unet_evaluations": ours_evals,
        "peak_gpu_gib": peak, "finite": all(bool(torch.isfinite(b).all()) for b in buffers),
    }
    label = f"{name}{' + gradient checkpointing' if checkpointing else ''}"
    print(f"{FAMILIES[args.family][0]} {label}: {weights / 1e6:.1f} M FF weights scored; latents "
          f"{tuple(backbone.latent_shape)}, T = {args.steps}, {args.samples} trajectories, chunk {args.chunk}, "
          f"guidance {args.guidance}")
    print(f"  cad-lightning: {ours:.1f} s ({ours / args.samples:.1f} s per trajectory), {ours_evals} denoiser "
          f"evaluations, peak GPU memory {peak:.1f} GiB (weights {resident:.1f} GiB), scores finite: {result['finite']}")

    if args.official_steps > 0 and not checkpointing and args.family == "sd":
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
    parser.add_argument("--family", choices=list(FAMILIES), default="sd")
    parser.add_argument("--reference", default=str(REFERENCE), help="folder of the <model>/ configuration folders")
    parser.add_argument("--variants", nargs="+", default=["fp16", "bf16", "fp16+ckpt"],
                        help="precision, with +ckpt for gradient checkpointing")
    parser.add_argument("--steps", type=int, help="sampling steps T (default: the family's, 50 or 28)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the family's)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=16, help="states per forward/backward")
    parser.add_argument("--official-steps", type=int, default=6, help="timesteps of the official algorithm to run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    _, default_steps, default_guidance = FAMILIES[args.family]
    args.steps = args.steps or default_steps
    args.guidance = default_guidance if args.guidance is None else args.guidance
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

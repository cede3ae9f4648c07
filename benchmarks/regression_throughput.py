"""Masks per second of the regression estimator's concept scores, measured in one process.

Every score is measured on the same masks (the shipped config's: K/V neurons of the cross-attention, keep
probability 0.95, 4 prompts of the concept x 10 DDIM steps, 16 masks per step). On the embedded model the
baseline is the classifier score (images generated under each mask, then classified), the score the regression
estimator shipped with (2.7 masks/s on FF neurons, measured with the previous weights). ``presence`` and
``objective`` score the unmasked model's states (sampled once, not counted) with one UNet pass per state and
mask (objective: its base branch frozen once), so their cost per mask is a fraction of a full guided sampling run.

With ``--dtypes`` each precision's mask passes are measured on the same masks and the same unmasked states (sampled
in fp32), and their scores are compared with fp32's (Spearman over the masks, largest difference): a precision is worth using when it is
faster and ranks the masks as fp32 does. ``--family sd`` measures Stable Diffusion 1.4's UNet at 512 px with
random weights built from benchmarks/reference (no weights are downloaded; the scores are meaningless, the cost
is real), with fp32 presence as the baseline.

    python benchmarks/regression_throughput.py [--concept square] [--masks 48] [--chunks 128,256,512] [--threads 2]
    python benchmarks/regression_throughput.py --device cuda --dtypes fp32,bf16,fp16 --chunks 256,1024,4096
    python benchmarks/regression_throughput.py --device cuda --family sd --dtypes fp32,bf16,fp16 --chunks 40,120,240
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cad_lightning import load_backbone  # noqa: E402
from cad_lightning.attribution.components import ComponentSpace  # noqa: E402
from cad_lightning.attribution.mask_scores import (classifier_scores, freeze_base, objective_scores,  # noqa: E402
                                                   presence_inputs, presence_scores)
from cad_lightning.attribution.masks import MaskLayout, sample_masks  # noqa: E402
from cad_lightning.attribution.objectives import EraseObjective  # noqa: E402
from cad_lightning.backbones.backbone import DTYPES  # noqa: E402
from cad_lightning.data.mask_datamodule import MaskDataModule  # noqa: E402
from cad_lightning.evaluation.classifier import load_concept_classifier  # noqa: E402
from cad_lightning.generation import resolve_model_path  # noqa: E402

# the prompts of --family sd: a concept word against its base word, as base_word auto pairs them
SD_PROMPTS = ["a photo of a golf ball", "a golf ball on grass", "a close-up of a golf ball", "a golf ball in the sand"]


def load(args):
    """(backbone, prompts, seeds, base prompts, classifier or None) on ``args.device``, in fp32."""
    if args.family == "sd":
        from sd_gpu import build  # the reference configurations' UNet and text encoder, random weights

        backbone = build("sd", torch.float32, args.device, args.steps, 7.5)
        bases = [p.replace("golf ball", "ball") for p in SD_PROMPTS]
        return backbone, SD_PROMPTS[: args.samples], list(range(args.samples)), bases[: args.samples], None
    path = resolve_model_path("tiny-shapes")
    backbone = load_backbone(path, device=args.device)
    backbone.requires_grad_(False)
    items = MaskDataModule(concept=args.concept, base_word="auto", samples=args.samples).items()
    detector = load_concept_classifier(path)
    detector.classifier.to(args.device)
    return (backbone, [i["prompt"] for i in items], [int(i["seed"]) for i in items],
            [i["base_prompt"] for i in items], detector)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="square")
    parser.add_argument("--family", choices=["tiny", "sd"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="fp32", help="precisions of the UNet, fp32 first (the reference)")
    parser.add_argument("--masks", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16, help="masks per step (data.batch_size)")
    parser.add_argument("--chunks", default="128,256,512", help="states per batched pass (model.chunk_size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes, chunks = args.dtypes.split(","), [int(c) for c in args.chunks.split(",")]
    if dtypes[0] != "fp32":
        parser.error("--dtypes must start with fp32, the reference the other precisions are compared with")
    objective = EraseObjective(num_inference_steps=args.steps)
    rows, reference, base = [], None, None

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    backbone, prompts, seeds, bases, detector = load(args)
    layout = MaskLayout(backbone.denoiser, ComponentSpace(["cross_attn_kv"]).names(backbone.denoiser), "neuron")
    masks = sample_masks(layout.n_components, range(args.masks), 0.95, 0)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"{args.family}: {layout.n_components} K/V neuron components, {args.masks} masks in steps of "
          f"{args.batch}, {args.samples} prompts x {args.steps} steps, {args.device} ({where})")

    def rate(score_batch) -> tuple[float, torch.Tensor]:
        score_batch(masks[:1])  # warm-up
        sync()
        start = time.perf_counter()
        out = torch.cat([score_batch(masks[s : s + args.batch]) for s in range(0, args.masks, args.batch)])
        sync()
        return args.masks / (time.perf_counter() - start), out

    if detector is not None:
        base, _ = rate(lambda m: classifier_scores(backbone, detector, args.concept, prompts, seeds, layout, m,
                                                   args.steps, None))
        rows.append({"score": "classifier", "dtype": "fp32", "masks_per_s": base})
        print(f"classifier fp32 (baseline)          {base:7.2f} masks/s  1.00x")
    sync()
    start = time.perf_counter()
    inputs = objective.inputs(backbone, prompts, seeds, bases)
    frozen, presence = freeze_base(backbone, objective, inputs), presence_inputs(backbone, objective, inputs)
    sync()
    print(f"unmasked states, fp32 (once a run) {time.perf_counter() - start:7.2f} s")
    for dtype in dtypes:
        # the same states for every precision: only the mask passes change (states sampled in half precision
        # differ from fp32's, and on a model with random weights they differ entirely)
        if backbone.denoiser.dtype != DTYPES[dtype]:
            backbone.denoiser.to(DTYPES[dtype])
        cast = {"x_t": presence.x_t.to(DTYPES[dtype]), "text": presence.text.to(DTYPES[dtype])}
        presence_dt, frozen_dt = replace(presence, **cast), replace(frozen, **cast)
        for chunk in chunks:
            r, out = rate(lambda m: presence_scores(backbone, presence_dt, layout, m, chunk))
            base = base or r  # no classifier (--family sd): fp32 presence at the first chunk is the baseline
            row = {"score": "presence", "dtype": dtype, "chunk": chunk, "masks_per_s": r, "vs_baseline": r / base}
            note = ""
            if reference is None:
                reference = out
            else:
                row["spearman_vs_fp32"] = float(spearmanr(out.numpy(), reference.numpy()).statistic)
                row["max_diff_vs_fp32"] = float((out - reference).abs().max())
                note = (f"  Spearman vs fp32 {row['spearman_vs_fp32']:.4f}, max change {row['max_diff_vs_fp32']:.1e}"
                        f" (scores spread {float(reference.std()):.1e})")
            rows.append(row)
            print(f"presence {dtype}, chunk {chunk:5d}         {r:7.2f} masks/s  {r / base:.2f}x{note}")
        r, _ = rate(lambda m: objective_scores(backbone, objective, frozen_dt, layout, m, chunks[0]))
        rows.append({"score": "objective", "dtype": dtype, "chunk": chunks[0], "masks_per_s": r, "vs_baseline": r / base})
        print(f"objective {dtype}, chunk {chunks[0]:5d}        {r:7.2f} masks/s  {r / base:.2f}x")
        if args.device.startswith("cuda"):
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            torch.cuda.reset_peak_memory_stats()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

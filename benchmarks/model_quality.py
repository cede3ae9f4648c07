"""Quality of the embedded model and its concept classifier, printed as a table.

For every shape, colour and texture: the fraction of images generated from prompts naming it (other kinds
named or not at random) that the shipped classifier reads as it, at the model's default sampler. Also the
classifier's per-kind accuracy on held-out renders and the rate at which the empty prompt draws each concept
(the floor an ideal erase can reach).

    python benchmarks/model_quality.py [--model checkpoints/tiny-shapes] [--n 64] [--guidance G] [--eta E] [--seed S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchmetrics.classification import MulticlassAccuracy

from cad_lightning import load_backbone, load_concept_classifier
from cad_lightning.data.world import CONCEPT_KINDS, ShapesWorld, prompts_naming

ROOT = Path(__file__).resolve().parent.parent


def per_class_accuracy(predicted: list[str], target: list[str], words: tuple[str, ...]) -> torch.Tensor:
    metric = MulticlassAccuracy(num_classes=len(words), average=None)
    index = {w: i for i, w in enumerate(words)}
    return metric(torch.tensor([index[p] for p in predicted]), torch.tensor([index[t] for t in target]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "tiny-shapes"))
    parser.add_argument("--n", type=int, default=64, help="generated images per concept")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta, 0 deterministic, 1 ancestral (default: the model's)")
    parser.add_argument("--clipped-eps", choices=["on", "off"], default=None,
                        help="DDIM step re-derives eps from the clipped x0 (default: the model's)")
    parser.add_argument("--renders", type=int, default=2048, help="held-out renders for the classifier")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the prompts and the sampling noise (choose settings on another seed than the one reported)")
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = load_backbone(args.model)
    detector = load_concept_classifier(args.model)
    steps = args.steps or backbone.num_inference_steps
    guidance = backbone.guidance_scale if args.guidance is None else args.guidance
    eta = backbone.eta if args.eta is None else args.eta
    if args.clipped_eps is not None:
        backbone.use_clipped_model_output = args.clipped_eps == "on"
    start = time.perf_counter()

    images, _, labels = ShapesWorld(backbone.image_size).sample(args.renders, torch.Generator().manual_seed(31337))
    predicted = detector(images)
    classifier = {
        kind: float(per_class_accuracy(predicted[kind], labels.words(kind), words).min())
        for kind, words in CONCEPT_KINDS.items()
    }

    # Prompts and per-image noise seeds are drawn from one generator, so no two concepts and no two --seed values
    # share sampling noise (consecutive integer seeds would: generate(seed=s) uses s, s+1, ... per image).
    generator = torch.Generator().manual_seed(args.seed)

    def noise_seeds() -> list[int]:
        return torch.randint(2**31 - 1, (args.n,), generator=generator).tolist()

    rows = []
    empty = detector(backbone.generate([""] * args.n, seed=noise_seeds(), num_inference_steps=steps, guidance_scale=guidance, eta=eta))
    for kind, words in CONCEPT_KINDS.items():
        for word in words:
            prompts = prompts_naming(word, args.n, generator)
            generated = backbone.generate(prompts, seed=noise_seeds(), num_inference_steps=steps, guidance_scale=guidance, batch_size=64, eta=eta)
            seen = detector(generated)[kind]
            accuracy = float(per_class_accuracy(seen, [word] * args.n, words)[words.index(word)])
            floor = sum(p == word for p in empty[kind]) / args.n
            rows.append({"kind": kind, "concept": word, "accuracy": accuracy, "empty_prompt_rate": floor})
    elapsed = time.perf_counter() - start

    print(f"model: {args.model}  sampler: DDIM {steps} steps, eta {eta}, clipped eps {backbone.use_clipped_model_output}, guidance {guidance}  images per concept: {args.n}  seed {args.seed}")
    print(f"{'kind':<8} {'concept':<9} {'accuracy':>9} {'empty-prompt rate':>18}")
    for r in rows:
        print(f"{r['kind']:<8} {r['concept']:<9} {r['accuracy']:>9.3f} {r['empty_prompt_rate']:>18.3f}")
    worst = min(rows, key=lambda r: r["accuracy"])
    print(f"worst concept: {worst['concept']} {worst['accuracy']:.3f}  (target >= 0.95 for every concept)")
    print("classifier on held-out renders, worst class per kind: "
          + ", ".join(f"{k} {v:.4f}" for k, v in classifier.items()) + "  (target >= 0.99)")
    print(f"wall time: {elapsed:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "num_inference_steps": steps, "guidance_scale": guidance, "eta": eta,
            "use_clipped_model_output": backbone.use_clipped_model_output, "images_per_concept": args.n, "seed": args.seed,
            "generated": rows, "classifier_worst_class_accuracy": classifier, "wall_time_s": elapsed,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()

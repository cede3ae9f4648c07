"""Memory of first-order attribution per model and component preset, counted from the UNet's parameters.

The UNet is built from its configuration on PyTorch's meta device (no weights, no memory), so any model
folder or reference configuration can be counted in a second. Printed per component preset, in GiB:

- weights: every UNet parameter at the run's precision (text encoder and VAE come on top: 123 M and 84 M
  parameters for SD-1.x);
- gradients: one tensor per selected parameter, at the run's precision (only selected parameters get one);
- scores: the fp32 accumulation buffers, one set per attributed concept (the target, plus each retained
  concept when data.retain_samples > 0), and a copy of the same size when the writer reduces and saves them.

Activations of the forward/backward pass come on top and grow with model.chunk_size; measured on an H200
for SD-1.4 at chunk 16 (benchmarks/sd_gpu.py): 15.8 GiB peak in fp16, 6.4 GiB with gradient checkpointing.

    python benchmarks/memory_estimate.py [--config benchmarks/reference/sd-v1-4/unet_config.json] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from cad_lightning.attribution.components import PRESETS, ComponentSpace
from cad_lightning.backbones.backbone import DTYPES

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def count(config: dict) -> tuple[int, dict[str, int]]:
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    params = dict(unet.named_parameters())
    per_preset = {p: sum(params[n].numel() for n in ComponentSpace([p]).names(unet)) for p in PRESETS}
    return sum(t.numel() for t in params.values()), per_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="a unet config.json (repeatable)")
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--concepts", type=int, default=1, help="attributed concepts (target + retained)")
    args = parser.parse_args()
    configs = args.config or [str(ROOT / "benchmarks/reference/sd-v1-4/unet_config.json"),
                              str(ROOT / "checkpoints/tiny-shapes/unet/config.json")]
    size = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    print(f"UNet at {args.dtype} ({size} bytes), scores fp32, {args.concepts} concept(s)")
    print("| model | preset | UNet parameters | selected | weights GiB | gradients GiB | scores GiB | total GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for path in configs:
        total, per_preset = count(json.loads(Path(path).read_text()))
        folder = Path(path).parent
        name = folder.parent.name if folder.name == "unet" else folder.name
        for preset, selected in per_preset.items():
            weights, grads = total * size / GIB, selected * size / GIB
            scores = selected * 4 * (args.concepts + 1) / GIB
            print(f"| {name} | {preset} | {total / 1e6:.1f} M | {selected / 1e6:.2f} M | {weights:.2f} | "
                  f"{grads:.2f} | {scores:.2f} | {weights + grads + scores:.2f} |")


if __name__ == "__main__":
    main()

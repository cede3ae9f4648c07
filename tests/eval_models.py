"""Tiny, randomly initialised stand-ins for the evaluation weights of real models, written offline for tests.

An image classifier (transformers ResNet with a handful of ImageNet class names), a CLIP model with a
processor whose tokenizer is built from written vocab/merges files (tests/sd_folder.py), a folder of
reference PNGs, and an unsafe-content detector of the kind a user would install.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    ConvNextImageProcessor,
    ResNetConfig,
    ResNetForImageClassification,
)

from sd_folder import MODEL_MAX_LENGTH, build_tiny_clip_tokenizer

CLASS_NAMES = ("tench, Tinca tinca", "church, church building", "golf ball", "parachute, chute")


def write_tiny_classifier(path: str | os.PathLike, seed: int = 0, spread_over: torch.Tensor | None = None) -> Path:
    """A 4-class ResNetForImageClassification and its image processor, saved as a local folder.

    ``spread_over``: images (B, 3, H, W) in [0, 1]; the last layer is then centred and scaled on their pooled
    features, so that nearly alike images (a random tiny model draws grey noise) fall into different classes.
    """
    folder = Path(path)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=len(CLASS_NAMES), id2label=dict(enumerate(CLASS_NAMES)),
                          label2id={name: i for i, name in enumerate(CLASS_NAMES)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNetForImageClassification(config).eval()
    processor = ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    if spread_over is not None:
        pixels = processor(images=list((spread_over * 255).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = model.resnet(pixel_values=pixels).pooler_output.flatten(1)
            mean, std = features.mean(0), features.std(0) + 1e-6
            linear = model.classifier[-1]
            linear.weight.div_(std)
            linear.bias.copy_(-linear.weight @ mean)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_tiny_clip(path: str | os.PathLike, seed: int = 0) -> Path:
    """A CLIPModel with 2-layer text and vision towers (projection 16) and its CLIPProcessor, saved as a folder."""
    folder = Path(path)
    tokenizer = build_tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": MODEL_MAX_LENGTH,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_reference_images(path: str | os.PathLike, n: int = 6, size: int = 20, seed: int = 0) -> Path:
    """``n`` random RGB PNGs (not square, to exercise the crop) in a folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        array = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"ref_{i:02d}.png")
    return folder


class BrightnessDetector:
    """A stand-in unsafe-content detector: an image is 'unsafe' when its mean brightness exceeds ``threshold``."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3)) > self.threshold

"""The concept classifier: a small CNN with one head per concept kind of the shapes world.

It is the concept detector of the embedded model (the stand-in for the paper's ResNet-50 and NudeNet).
Saved with diffusers' ``ModelMixin`` (``config.json`` + ``diffusion_pytorch_model.safetensors``).
"""

from __future__ import annotations

from cad_lightning.errors import UserInputError

import os

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from cad_lightning.data.world import CONCEPT_KINDS


class ConceptClassifier(ModelMixin, ConfigMixin):
    """Images (B, 3, H, W) in [0, 1] → logits per kind, ``{kind: (B, n_concepts_of_kind)}``."""

    @register_to_config
    def __init__(
        self,
        concepts: dict[str, list[str]] | None = None,
        resolution: int = 16,
        width: int = 32,
    ) -> None:
        super().__init__()
        concepts = concepts or {k: list(v) for k, v in CONCEPT_KINDS.items()}
        self.concepts = concepts
        self.resolution = resolution
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({kind: nn.Linear(8 * width, len(words)) for kind, words in concepts.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        h = self.features(images * 2 - 1)
        return {kind: head(h) for kind, head in self.heads.items()}

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {kind: logits.softmax(-1) for kind, logits in self(images.to(self.device, self.dtype)).items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The predicted concept word of each image, per kind."""
        return {
            kind: [self.concepts[kind][i] for i in p.argmax(-1).tolist()] for kind, p in self.probabilities(images).items()
        }


class ConceptDetector:
    """Callable view of a classifier: images → ``{kind: [predicted concept word per image]}``."""

    def __init__(self, classifier: ConceptClassifier) -> None:
        self.classifier = classifier.eval()
        self.concepts = classifier.concepts

    def __call__(self, images: torch.Tensor) -> dict[str, list[str]]:
        return self.classifier.predict(images)

    def probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.classifier.probabilities(images)

    def to(self, device: str | torch.device) -> "ConceptDetector":
        self.classifier.to(device)
        return self


def load_concept_classifier(path: str | os.PathLike) -> ConceptDetector:
    """Load the concept classifier from ``path`` (a ``classifier/`` folder or a model folder holding one)."""
    from cad_lightning.shipped import resolve_model_path

    folder = resolve_model_path(path)  # a shipped model by name, from any folder
    if (folder / "classifier").is_dir():
        folder = folder / "classifier"
    if not (folder / "config.json").is_file():
        raise UserInputError(
            f"'{path}' holds no concept classifier: expected config.json and its weights in it or in its classifier/."
        )
    from cad_lightning.backbones.backbone import load_part

    return ConceptDetector(load_part(folder.parent, folder.name, ConceptClassifier.from_pretrained,
                                     local_files_only=True, low_cpu_mem_usage=False))

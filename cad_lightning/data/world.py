"""The shapes world: a seeded, vectorised renderer of small RGB images holding one object.

Three concept kinds: the object (``shape``), an attribute (``colour``) and a style (``texture``).
Every image comes with its ground-truth labels and a prompt naming one, two or all three of them
(``"a red striped circle"``, ``"a circle"``, ``"a red shape"``, ``"a striped shape"``).

Images are float tensors in [0, 1] of shape (B, 3, H, W), rendered at ``SUPERSAMPLE`` times the
resolution and average-pooled, so edges are anti-aliased.
"""

from __future__ import annotations

from cad_lightning.errors import UserInputError

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
TEXTURES: tuple[str, ...] = ("solid", "striped")
CONCEPT_KINDS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES}
# Words that are not concepts but appear in prompts.
FILLER_WORDS: tuple[str, ...] = ("a", "shape")
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(FILLER_WORDS + SHAPES + COLOURS + TEXTURES))

RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.72, 0.18),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.96, 0.86, 0.10),
}
SUPERSAMPLE = 4
STRIPE_PERIOD = 4  # pixels at the output resolution: two on, two off
DARK_STRIPE = 0.3  # the off stripes are the colour times this factor


def concept_kind(word: str) -> str:
    """The kind ('shape', 'colour' or 'texture') of a concept word of the world."""
    for kind, words in CONCEPT_KINDS.items():
        if word in words:
            return kind
    raise UserInputError(
        f"'{word}' is not a concept of the shapes world; the concepts are "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in CONCEPT_KINDS.items())
        + "."
    )


@dataclass
class Labels:
    """Ground truth of a batch: index tensors of shape (B,) into SHAPES, COLOURS and TEXTURES."""

    shape: torch.Tensor
    colour: torch.Tensor
    texture: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"shape": self.shape, "colour": self.colour, "texture": self.texture}

    def words(self, kind: str) -> list[str]:
        vocab = CONCEPT_KINDS[kind]
        return [vocab[i] for i in getattr(self, kind).tolist()]


def _polygon_inside(u: torch.Tensor, v: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """Even-odd test of points (u, v) of shape (B, P) against one polygon (V, 2)."""
    inside = torch.zeros_like(u, dtype=torch.bool)
    n = vertices.shape[0]
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (u < x_at)
    return inside


def _star_vertices(points: int = 5, inner: float = 0.45) -> torch.Tensor:
    angles = -math.pi / 2 + torch.arange(2 * points) * math.pi / points
    radii = torch.tensor([1.0, inner] * points)
    return torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], dim=1)


_TRIANGLE = torch.tensor([[0.0, -1.0], [1.0, 0.75], [-1.0, 0.75]])
_STAR = _star_vertices()


def _shape_masks(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Membership of unit-scaled coordinates (B, P) in every shape: (len(SHAPES), B, P)."""
    au, av = u.abs(), v.abs()
    masks = {
        "circle": u * u + v * v <= 1.0,
        "square": torch.maximum(au, av) <= 0.82,
        "triangle": _polygon_inside(u, v - 0.12, _TRIANGLE),
        "cross": ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)),
        "star": _polygon_inside(u, v - 0.05, _STAR * 1.1),
    }
    return torch.stack([masks[s] for s in SHAPES])


class ShapesWorld:
    """Renders images of the shapes world and the prompts that describe them.

    Args:
        resolution: side of the square images in pixels.
        min_size / max_size: object radius as a fraction of the image side.
        max_shift: largest offset of the object's centre from the image centre, as a fraction of the side.
    """

    def __init__(
        self,
        resolution: int = 16,
        min_size: float = 0.32,
        max_size: float = 0.46,
        max_shift: float = 0.1,
    ) -> None:
        if resolution < 8:
            raise UserInputError(f"resolution must be at least 8 pixels, got {resolution}.")
        self.resolution = resolution
        self.min_size, self.max_size, self.max_shift = min_size, max_size, max_shift

    def sample_labels(self, n: int, generator: torch.Generator) -> Labels:
        return Labels(
            shape=torch.randint(len(SHAPES), (n,), generator=generator),
            colour=torch.randint(len(COLOURS), (n,), generator=generator),
            texture=torch.randint(len(TEXTURES), (n,), generator=generator),
        )

    def render(self, labels: Labels, generator: torch.Generator) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] for the given labels, with random size, position and background."""
        n = labels.shape.shape[0]
        side = self.resolution * SUPERSAMPLE
        size = self.min_size + (self.max_size - self.min_size) * torch.rand(n, generator=generator)
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * self.max_shift
        grey = 0.42 + 0.3 * torch.rand(n, 1, generator=generator)
        tint = (torch.rand(n, 3, generator=generator) * 2 - 1) * 0.05
        background = (grey + tint).clamp(0, 1)

        coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side - 0.5  # (S,)
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        x = x.reshape(1, -1)
        y = y.reshape(1, -1)
        u = (x - shift[:, :1]) / size[:, None]
        v = (y - shift[:, 1:]) / size[:, None]
        inside = _shape_masks(u, v)[labels.shape, torch.arange(n)]  # (B, P)

        colour = torch.tensor([RGB[c] for c in COLOURS])[labels.colour]  # (B, 3)
        row = torch.arange(side).repeat_interleave(side)[None, :]  # (1, P), row index at supersampled res
        dark = (row // (SUPERSAMPLE * STRIPE_PERIOD // 2)) % 2 == 1
        striped = labels.texture[:, None] == TEXTURES.index("striped")
        factor = torch.where(striped & dark, DARK_STRIPE, 1.0)  # (B, P)
        fill = colour[:, :, None] * factor[:, None, :]  # (B, 3, P)
        image = torch.where(inside[:, None, :], fill, background[:, :, None])
        image = image.reshape(n, 3, side, side)
        return F.avg_pool2d(image, SUPERSAMPLE)

    def sample(self, n: int, generator: torch.Generator, kinds_p: float = 0.5) -> tuple[torch.Tensor, list[str], Labels]:
        """n images, their prompts and labels. Each kind is named in the prompt with probability ``kinds_p``."""
        labels = self.sample_labels(n, generator)
        images = self.render(labels, generator)
        named = torch.rand(n, 3, generator=generator) < kinds_p
        prompts = [
            make_prompt(
                shape=SHAPES[s] if ns else None,
                colour=COLOURS[c] if nc else None,
                texture=TEXTURES[t] if nt else None,
            )
            for s, c, t, (ns, nc, nt) in zip(
                labels.shape.tolist(), labels.colour.tolist(), labels.texture.tolist(), named.tolist()
            )
        ]
        return images, prompts, labels


def make_prompt(shape: str | None = None, colour: str | None = None, texture: str | None = None) -> str:
    """The template prompt naming the given concepts: 'a [colour] [texture] (shape|"shape")'."""
    words = ["a"] + [w for w in (colour, texture) if w] + [shape or "shape"]
    return " ".join(words)


def without_concept(prompt: str, word: str, replacement: str = "auto") -> str:
    """The prompt with the concept ``word`` taken out: ``replacement`` stands in its place ('' drops it);
    ``auto`` uses the neutral word of the world: 'shape' for a shape, nothing for a colour or a texture
    ('a red striped circle' → 'a red striped shape' for circle, 'a striped circle' for red)."""
    if replacement == "auto":
        replacement = "shape" if concept_kind(word) == "shape" else ""
    tokens = prompt.split(" ")
    return " ".join(replacement if t == word else t for t in tokens if t != word or replacement)


def prompts_naming(word: str, n: int, generator: torch.Generator) -> list[str]:
    """n prompts that name the concept ``word``, the other kinds named or not at random."""
    kind = concept_kind(word)
    out = []
    for _ in range(n):
        parts: dict[str, str | None] = {}
        for other, words in CONCEPT_KINDS.items():
            if other == kind:
                parts[other] = word
            elif torch.rand(1, generator=generator).item() < 0.5:
                parts[other] = words[int(torch.randint(len(words), (1,), generator=generator))]
            else:
                parts[other] = None
        out.append(make_prompt(**parts))
    return out

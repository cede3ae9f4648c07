"""Small shared helpers: image grids, TensorBoard images, atomic file and folder writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def image_grid(images: torch.Tensor, ncol: int, pad: int = 1) -> torch.Tensor:
    """A (3, H', W') grid of images (B, 3, H, W) in [0, 1], ``ncol`` per row, white padding."""
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    grid = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, image in enumerate(images.detach().float().cpu()):
        r, k = divmod(i, ncol)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = image
    return grid


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """A PIL image of a (3, H, W) tensor in [0, 1], enlarged ``scale`` times with sharp pixels."""
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def labelled_grid(images: torch.Tensor, row_labels: list[str], ncol: int, scale: int = 4, label_width: int = 180) -> Image.Image:
    """A picture of images (B, 3, H, W), ``ncol`` per row, each row headed by its label."""
    grid = to_pil(image_grid(images, ncol), scale)
    row_h = (images.shape[-2] + 1) * scale
    canvas = Image.new("RGB", (grid.width + label_width, grid.height), "white")
    canvas.paste(grid, (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(row_labels):
        draw.text((4, scale + r * row_h + row_h // 2 - 6), label, fill="black")
    return canvas


def log_image(logger, tag: str, image: torch.Tensor, step: int) -> None:
    """Log a (3, H, W) image to TensorBoard when the logger is a TensorBoardLogger; a no-op otherwise."""
    experiment = getattr(logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_image"):
        experiment.add_image(tag, image.clamp(0, 1), step)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, so no reader sees half a file.
    The file gets the permissions of an ordinary new file (0666 less the umask), not the temporary file's 0600,
    so a group sharing a project folder can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Yield a temporary folder beside ``folder``; on success it replaces ``folder`` (the previous one is put
    back if the rename fails), so no reader sees a half-written folder. The folder gets the permissions of an
    ordinary new folder (0777 less the umask), not the temporary folder's 0700."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
            os.replace(folder, old / folder.name)
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.replace(tmp, folder)
        except OSError:
            if old is not None and not folder.exists():
                os.replace(old / folder.name, folder)  # put the previous folder back
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in blocks of 1 MiB."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Streams of shapes-world batches for pretraining the embedded model and its concept classifier."""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cad_lightning.data.world import ShapesWorld


class ShapesStream(IterableDataset):
    """An endless (or ``num_batches`` long) seeded stream of ``(images, prompts, labels)`` batches.

    Batches are made whole (the renderer is vectorised), so the DataLoader runs with ``batch_size=None``.
    """

    def __init__(self, world: ShapesWorld, batch_size: int, seed: int, num_batches: int | None = None, kinds_p: float = 0.5):
        self.world, self.batch_size, self.seed, self.num_batches, self.kinds_p = world, batch_size, seed, num_batches, kinds_p

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        generator = torch.Generator().manual_seed(self.seed * 1009 + worker)
        i = 0
        while self.num_batches is None or i < self.num_batches:
            images, prompts, labels = self.world.sample(self.batch_size, generator, kinds_p=self.kinds_p)
            yield images, prompts, labels.as_dict()
            i += 1


class ShapesDataModule(pl.LightningDataModule):
    """Training batches rendered on the fly and a fixed, held-out validation set of renders.

    Args:
        batch_size: images per batch.
        resolution: image side in pixels.
        seed: seed of the training stream; validation uses a different, fixed seed.
        val_batches: number of validation batches.
        kinds_p: probability that a prompt names each concept kind.
    """

    def __init__(self, batch_size: int = 64, resolution: int = 16, seed: int = 0, val_batches: int = 4, kinds_p: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.world = ShapesWorld(resolution)

    def train_dataloader(self) -> DataLoader:
        stream = ShapesStream(self.world, self.hparams.batch_size, self.hparams.seed, kinds_p=self.hparams.kinds_p)
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        stream = ShapesStream(
            self.world, self.hparams.batch_size, seed=10_000 + self.hparams.seed, num_batches=self.hparams.val_batches,
            kinds_p=self.hparams.kinds_p,
        )
        return DataLoader(stream, batch_size=None)

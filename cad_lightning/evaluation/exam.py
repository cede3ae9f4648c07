"""The exam's two seed sets and its sharded sampling.

An edit is *decided* on one set of images and *reported* on another: goal mode's stop, the floor search and the
floor an edit is held to while deciding read the **search** seeds; ``report.json`` / ``report.md`` read the
**report** seeds, which no decision saw. Both sets hold the same prompts (the evaluation set of
:func:`~cad_lightning.evaluation.concepts.evaluation_items`) with other initial noise, and both are drawn from
the run's ``seed_everything``, so another run seed gives other images of both.

Sampling is sharded across the ranks of a multi-process run: rank ``r`` of ``w`` samples items ``r, r + w, …``,
each with its own seed (so an image does not depend on the number of processes), and the images are gathered once
(torchmetrics' ``gather_all_tensors``, which takes shards of unequal length). Every rank then holds every image
and reads the same numbers from them, so decisions taken on them agree on every rank without further messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

SEED_SET_SPAN = 1_000_000  # the seeds of one set: its items from its base, its floor images from base + FLOOR_OFFSET
FLOOR_OFFSET = 500_000


@dataclass(frozen=True)
class SeedSet:
    """One set of exam seeds: the evaluation items use ``base + i``, the floor's images ``floor + i``."""

    name: str  # "search" or "report"
    base: int

    @property
    def floor(self) -> int:
        return self.base + FLOOR_OFFSET

    def range(self) -> tuple[int, int]:
        """The half-open range of every seed this set uses."""
        return self.base, self.base + SEED_SET_SPAN


def exam_seeds(run_seed: int) -> tuple[SeedSet, SeedSet]:
    """The (search, report) seed sets of a run with ``seed_everything`` ``run_seed``: disjoint from each other,
    from those of every other run seed, and from the attribution's sampling runs (seeds below 1,000,000 for any
    data.seed below 900,000). Run seed 0 reports on the seeds the evaluation always used (1,000,000 + i)."""
    run_seed = abs(int(run_seed))
    report = 1_000_000 + 2 * SEED_SET_SPAN * run_seed
    return SeedSet("search", report + SEED_SET_SPAN), SeedSet("report", report)


class ShardedSampler:
    """``generate`` of a backbone, with the images of a multi-process run sampled in shards and gathered.

    Stands in for the backbone wherever the evaluation samples (every other attribute is the backbone's).
    ``strategy``: the trainer's strategy (None, or one process: the backbone's own ``generate``).
    """

    def __init__(self, backbone, strategy=None) -> None:
        self._backbone = backbone
        self._world = strategy.world_size if strategy is not None else 1
        self._rank = strategy.global_rank if strategy is not None else 0

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    @property
    def backbone(self):
        """The backbone it samples with (what changes its tokenizer or weights changes this sampler's images)."""
        return self._backbone

    @property
    def world_size(self) -> int:
        return self._world

    def generate(self, prompts: Sequence[str], seed=0, batch_size: int | None = None, **sampler) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] on the CPU, prompt i from seed ``seed + i`` (or ``seed[i]``), on every rank."""
        from cad_lightning.backbones.backbone import _seed_list

        prompts = list(prompts)
        seeds = _seed_list(seed, len(prompts))
        if self._world == 1:
            return self._backbone.generate(prompts, seed=seeds, batch_size=batch_size, **sampler).cpu()
        from torchmetrics.utilities.distributed import gather_all_tensors

        mine = list(range(self._rank, len(prompts), self._world))
        images = self._backbone.generate([prompts[i] for i in mine], seed=[seeds[i] for i in mine],
                                         batch_size=batch_size, **sampler)
        shards = gather_all_tensors(images.contiguous())  # one per rank, rank r holding items r, r + w, ...
        out = torch.empty(len(prompts), *images.shape[1:], dtype=images.dtype)
        for rank, shard in enumerate(shards):
            out[rank::self._world] = shard.cpu()
        return out


def gather_items(index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-item results held by the ranks of a multi-process run, gathered once: ``index`` (n,) the items' ids on
    this rank and ``tensors`` (n, ...) their results; returns every rank's items, each once (a sampler that pads
    its shards repeats some), ordered by id. One process: the inputs ordered by id."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torchmetrics.utilities.distributed import gather_all_tensors

        index = torch.cat(gather_all_tensors(index.contiguous()))
        tensors = tuple(torch.cat([t.cpu() for t in gather_all_tensors(x.contiguous())]) for x in tensors)
    order = torch.argsort(index.cpu(), stable=True)
    index = index.cpu()[order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    return (index[first], *(x.cpu()[order][first] for x in tensors))

"""The exam's seed sets (decisions on search seeds, numbers on disjoint report seeds) and its sharded sampling."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import SHIPPED_MODEL
from distributed_runs import free_port

from cad_lightning.evaluation.concepts import evaluation_items
from cad_lightning.evaluation.exam import ShardedSampler, exam_seeds


def seeds_of(seed_set, n_items: int, n_floor: int) -> set[int]:
    return set(range(seed_set.base, seed_set.base + n_items)) | set(range(seed_set.floor, seed_set.floor + n_floor))


@pytest.mark.parametrize("run_seed", [0, 1, 7, 123_456])
def test_search_and_report_seeds_are_disjoint_and_hold_the_same_prompts(run_seed):
    search, report = exam_seeds(run_seed)
    assert (search.name, report.name) == ("search", "report")
    low, high = sorted([search.range(), report.range()])
    assert low[1] <= high[0]  # the two ranges do not overlap
    for s in (search, report):  # every seed a set uses lies in its range
        assert s.range()[0] <= s.base and s.floor + 1000 <= s.range()[1]
    a = evaluation_items("circle", ["red", "square"], 32, 64, seed=search.base)
    b = evaluation_items("circle", ["red", "square"], 32, 64, seed=report.base)
    assert [i.prompt for i in a] == [i.prompt for i in b]  # same prompts ...
    assert not {i.seed for i in a} & {i.seed for i in b}  # ... other noise
    assert not seeds_of(search, len(a), 64) & seeds_of(report, len(b), 64)
    assert min(i.seed for i in a + b) >= 1_000_000  # apart from the attribution's runs (data.seed + item)


def test_other_run_seeds_draw_other_exam_seeds():
    sets = [s for run_seed in range(4) for s in exam_seeds(run_seed)]
    ranges = sorted(s.range() for s in sets)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert exam_seeds(0)[1].base == 1_000_000  # run seed 0 reports on the evaluation's historical seeds


def _sharded(rank: int, world: int, port: int, prompts, seeds, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from cad_lightning import load_backbone

        class Strategy:  # what ShardedSampler reads of a trainer's strategy
            world_size, global_rank = world, rank

        images = ShardedSampler(load_backbone(SHIPPED_MODEL), Strategy()).generate(
            prompts, seed=seeds, batch_size=2, num_inference_steps=3)
        torch.save(images, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_sampling_on_two_processes_gives_every_rank_the_one_process_images(tmp_path, tiny_backbone):
    """Five items on two ranks (shards of 3 and 2): each rank ends with all five images, in item order, equal to
    one process's images of the same items (up to one level of 255: other batch compositions)."""
    prompts = ["a red circle", "a blue striped square", "a star", "a green shape", "a yellow solid cross"]
    seeds = [1_000_000 + 3 * i for i in range(5)]
    one = ShardedSampler(tiny_backbone).generate(prompts, seed=seeds, batch_size=5, num_inference_steps=3)
    out = str(tmp_path / "images")
    mp.start_processes(_sharded, args=(2, free_port(), prompts, seeds, out), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        images = torch.load(f"{out}.{rank}", weights_only=True)
        assert images.shape == one.shape
        assert float((images - one).abs().max()) <= 1 / 255
    # the items are in their own order, not the shards': each image is its own prompt's
    assert float((one[0] - one[1]).abs().max()) > 0.1

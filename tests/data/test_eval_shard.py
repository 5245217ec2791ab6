"""Evaluation sharding: whole batches per rank, so DDP batches equal one device's batches."""

from __future__ import annotations

import pytest
import torch

from xaudit.data.base import TensorDictDataset, UnpaddedDistributedSampler, eval_shard


def batches(indices: torch.Tensor, batch_size: int) -> list[list[int]]:
    return [indices[i:i + batch_size].tolist() for i in range(0, indices.numel(), batch_size)]


@pytest.mark.parametrize(("n", "batch_size", "world"), [(29, 8, 2), (13, 5, 2), (100, 7, 3), (64, 8, 8), (9, 4, 3)])
def test_ranks_take_the_one_device_batches_round_robin(n: int, batch_size: int, world: int) -> None:
    one = batches(torch.arange(n), batch_size)
    shards = [eval_shard(n, batch_size, r, world) for r in range(world)]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))  # every sample once: no padding, no duplicate
    for r, shard in enumerate(shards):
        assert batches(shard, batch_size) == one[r::world]  # the same batches as on one device
        assert shard.numel() > 0


@pytest.mark.parametrize(("n", "batch_size", "world"), [(5, 8, 2), (12, 8, 3), (3, 64, 3)])
def test_fewer_batches_than_ranks_still_gives_every_rank_work(n: int, batch_size: int, world: int) -> None:
    shards = [eval_shard(n, batch_size, r, world) for r in range(world)]
    assert torch.cat(shards).tolist() == list(range(n))  # contiguous parts in rank order
    assert all(s.numel() in (n // world, -(-n // world)) for s in shards)


def test_sampler_serves_the_shard_and_reports_its_length() -> None:
    data = TensorDictDataset(torch.zeros(13, 1, 2, 2, dtype=torch.uint8), torch.zeros(13, dtype=torch.long),
                             (0.0,), (1.0,))
    sampler = UnpaddedDistributedSampler(data, num_replicas=2, rank=0, batch_size=5)
    assert list(sampler) == [0, 1, 2, 3, 4, 10, 11, 12] and len(sampler) == 8
    with pytest.raises(ValueError, match="0 <= rank < world"):
        eval_shard(13, 5, 2, 2)

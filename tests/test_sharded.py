"""`sharded_global_masks`: the exact global threshold over scores sharded across processes, never gathered."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_tgprune.core.masking import global_masks, mask_hash
from hf_tgprune.core.sharded import process_group_all_reduce, sharded_global_masks

SHAPES = {"a.weight": (7, 5), "b.weight": (16, 3, 3, 3), "c.weight": (3, 11), "head.weight": (5, 4)}
REPLICATED = {"head.weight"}


def scores(seed: int, ties: bool, signed: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        values = torch.randn(shape, generator=generator)
        if ties:  # few distinct values: many keys equal the threshold
            values = (values * 2).round() / 2
        out[name] = values if signed else values.abs()
    return out


def shard(full: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s rows of every sharded layer (dim 0, rank order; shards may be empty), replicated layers whole."""
    return {
        name: value if name in REPLICATED else torch.tensor_split(value, world_size, dim=0)[rank].clone()
        for name, value in full.items()
    }


def expected_masks(full, sparsity):
    """`global_masks` over every weight, a replicated layer counted once."""
    return global_masks(full, sparsity)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.98])
def test_one_process_gives_exactly_global_masks(ties, signed, sparsity):
    full = scores(0, ties, signed)
    masks = sharded_global_masks(full, sparsity, all_reduce=lambda t: t, rank=0, world_size=1, replicated=REPLICATED)
    assert mask_hash(masks) == mask_hash(expected_masks(full, sparsity))


def _worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        out = {}
        for seed, ties, signed, sparsity in [(0, True, False, 0.9), (1, True, True, 0.5), (2, False, False, 0.98)]:
            local = shard(scores(seed, ties, signed), rank, world_size)
            masks = sharded_global_masks(
                local, sparsity, all_reduce=process_group_all_reduce(), rank=rank, world_size=world_size,
                replicated=REPLICATED,
            )  # fmt: skip
            out[(seed, ties, signed, sparsity)] = masks
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_processes_with_shards_give_the_single_process_masks(world_size, tmp_path, monkeypatch):
    """gloo processes, each holding only its rows: the masks put together equal `global_masks` over the full
    scores, ties included, and every process holds the same mask for the replicated layer."""
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned processes inherit it
    mp.start_processes(
        _worker, args=(world_size, str(tmp_path / "init"), results), nprocs=world_size, start_method="spawn"
    )
    for (seed, ties, signed, sparsity), _ in results[0].items():
        full = scores(seed, ties, signed)
        per_rank = [results[rank][(seed, ties, signed, sparsity)] for rank in range(world_size)]
        joined = {
            name: per_rank[0][name] if name in REPLICATED else torch.cat([masks[name] for masks in per_rank], dim=0)
            for name in SHAPES
        }
        assert mask_hash(joined) == mask_hash(expected_masks(full, sparsity)), (seed, ties, signed, sparsity)
        assert all(torch.equal(masks["head.weight"], per_rank[0]["head.weight"]) for masks in per_rank)


@pytest.mark.parametrize("signed", [False, True])
def test_zero_weights_first_without_copying_the_scores_equals_prune_zeros_first(signed):
    from hf_tgprune.core.masking import prune_zeros_first

    full = scores(3, True, signed)
    generator = torch.Generator().manual_seed(4)
    weights = {name: torch.randn(s.shape, generator=generator) * (torch.rand(s.shape, generator=generator) > 0.4)
               for name, s in full.items()}  # fmt: skip
    lowest = min(float(s.min()) for s in full.values())
    for sparsity in (0.2, 0.5, 0.9):  # below, at and above the share of zero weights
        masks = sharded_global_masks(
            full, sparsity, all_reduce=lambda t: t, rank=0, world_size=1, zeros_first=weights,
            fill=min(-1.0, lowest - 1.0),
        )  # fmt: skip
        assert mask_hash(masks) == mask_hash(global_masks(prune_zeros_first(full, weights), sparsity))

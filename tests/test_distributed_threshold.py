"""The global magnitude threshold over weights sharded across gloo ranks (composer_imp.functional.distributed) gives
every rank exactly its slice of the single-process masks, ties included, with uneven (and empty) shards: flat slices
('rank-major', FSDP1's flat parameter) and every tensor split by rows ('tensor-major', FSDP2's Shard(0))."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from composer_imp.functional import masks_at_density
from composer_imp.functional.distributed import sharded_masks_at_density
from helpers import finish_gloo, free_port, init_gloo

# head.weight has fewer rows than 4 ranks: under Shard(0) some ranks hold an empty part of it
SHAPES = {'conv.weight': (16, 8, 3, 3), 'fc1.weight': (300, 40), 'fc2.weight': (10, 300), 'head.weight': (3, 5)}
# (densities of two successive levels, how the weights are drawn): continuous, and few distinct magnitudes (ties)
CASES = [((0.8, 0.5), 'normal'), ((0.7, 0.33), 'ties'), ((0.5, 0.2), 'zeros_and_ties')]


def _weights(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(len(kind))
    weights = {}
    for name, shape in SHAPES.items():
        w = torch.randn(shape, generator=generator)
        if kind != 'normal':
            w = torch.randint(-3, 4, shape, generator=generator).float() * 0.25  # 4 magnitudes, thousands of ties
        if kind == 'zeros_and_ties':
            w[:, :1] = 0.0
        weights[name] = w
    return weights


def _shard_bounds(total: int, world: int) -> list[tuple[int, int]]:
    """Uneven contiguous slices of the flat order; with 4 ranks, rank 2 holds nothing."""
    cuts = {2: [0, total // 3, total], 4: [0, total // 5, total // 2, total // 2, total]}[world]
    return list(zip(cuts[:-1], cuts[1:]))


def _shard(tensors: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """This rank's pieces of the flat concatenation [start, stop), named by tensor, cut at tensor boundaries."""
    pieces, offset = {}, 0
    for name, t in tensors.items():
        lo, hi = max(start, offset), min(stop, offset + t.numel())
        if lo < hi:
            pieces[name] = t.flatten()[lo - offset:hi - offset]
        offset += t.numel()
    return pieces


def _rows(tensors: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's rows of every tensor, as FSDP2's Shard(0) splits them (``torch.chunk``; empty past the last chunk)."""
    parts = {}
    for name, t in tensors.items():
        chunks = torch.chunk(t, world, dim=0)
        parts[name] = chunks[rank] if rank < len(chunks) else t[:0]
    return parts


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    try:
        results = {'rank-major': [], 'tensor-major': []}
        for densities, kind in CASES:
            weights = _weights(kind)
            start, stop = _shard_bounds(sum(w.numel() for w in weights.values()), world)[rank]
            for layout, shard in (('rank-major', _shard(weights, start, stop)),
                                  ('tensor-major', _rows(weights, rank, world))):
                masks, levels = None, []
                for density in densities:
                    masks = sharded_masks_at_density(shard, density, masks, layout=layout)
                    levels.append(masks)
                results[layout].append(levels)
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        finish_gloo()


@pytest.mark.parametrize('world', [2, 4])
def test_sharded_masks_equal_the_single_process_slices_ties_included(world, tmp_path):
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f'rank{rank}.pt') for rank in range(world)]
    for case, (densities, kind) in enumerate(CASES):
        weights = _weights(kind)
        bounds = _shard_bounds(sum(w.numel() for w in weights.values()), world)
        reference = None
        for level, density in enumerate(densities):
            reference = masks_at_density(weights, density, reference, scope='global')
            kept = sum(int(m.sum()) for m in reference.values())
            assert kept == round(density * sum(w.numel() for w in weights.values()))
            for rank, (start, stop) in enumerate(bounds):
                for layout, expected in (('rank-major', _shard(reference, start, stop)),
                                         ('tensor-major', _rows(reference, rank, world))):
                    got = per_rank[rank][layout][case][level]
                    assert list(got) == list(expected), (layout, kind, level, rank)
                    for name in expected:
                        assert got[name].dtype == torch.bool
                        assert torch.equal(got[name], expected[name]), (layout, kind, level, rank, name)

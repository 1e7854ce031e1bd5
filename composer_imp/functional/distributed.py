"""The global magnitude threshold over weights sharded across ranks, with all-reduces only. Pure torch.

Each rank holds a *shard*: a mapping of names to tensors (pieces of the model's weights). Two global element orders
(``LAYOUTS``) say where each piece sits in the whole:

- ``'tensor-major'``: every rank holds a part of every tensor, the same names in the same order, and each tensor is
  the concatenation of the ranks' parts in rank order (FSDP2's ``Shard(0)``: rows split as ``torch.chunk`` does, some
  ranks possibly empty). The global order is then the single-process order: tensors in mapping order, row-major.
- ``'rank-major'``: rank 0's elements (its tensors in mapping order, row-major), then rank 1's, and so on (a flat
  parameter split into slices, FSDP1's layout).

:func:`sharded_masks_at_density` gives every rank the masks of its own shard, equal element for element to
``masks_at_density(..., scope='global')`` computed in one process over the whole tensors in that order, ties included
(the first tied weights in the global order are pruned first).

No weight leaves its rank. The k-th smallest magnitude is found by a radix selection on the magnitudes' float32 bit
patterns (monotonic for non-negative floats, and the pruned entries' -1 sorts below them): each round all-reduces one
histogram of ``bins`` integer counts over an integer window, exact at the bin edges, and narrows the window by
``bins``; 32-bit keys need at most four rounds at the default 4096 bins. Ties are split with one all-reduce of the
tie counts per rank and tensor.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as torch_dist

__all__ = ['LAYOUTS', 'sharded_kth_smallest', 'sharded_keep_largest', 'sharded_masks_at_density']

LAYOUTS = ('tensor-major', 'rank-major')

_PRUNED = -1.0  # a pruned weight's magnitude: below every alive one


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    torch_dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys of the same order, for values that are >= 0 or exactly -1 (pruned)."""
    return values.float().view(torch.int32).to(torch.int64)


def sharded_kth_smallest(values: torch.Tensor, k: int, bins: int = 4096, group=None) -> torch.Tensor:
    """The k-th smallest (1-based) entry of the concatenation of every rank's 1-D float32 ``values``, on every rank.

    ``values`` must be magnitudes (>= 0, finite) or -1. Equal to ``torch.kthvalue`` over the concatenation. Costs two
    all-reduces for the range and one of ``bins`` counts per round (at most four rounds).
    """
    keys = _keys(values)
    bounds = torch.tensor([torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).max], device=values.device)
    if keys.numel():
        bounds = torch.stack([keys.min(), -keys.max()])
    bounds = _all_reduce(bounds, torch_dist.ReduceOp.MIN, group)
    low, high = int(bounds[0]), -int(bounds[1])  # the window [low, high] of keys holds the answer
    rank_in_window = k
    while low < high:
        span = high - low + 1
        inside = keys[(keys >= low) & (keys <= high)]
        counts = torch.bincount((inside - low) * bins // span, minlength=bins)
        cumulative = _all_reduce(counts, torch_dist.ReduceOp.SUM, group).cumsum(0)
        hit = int(torch.searchsorted(cumulative, torch.tensor(rank_in_window, device=cumulative.device)))
        rank_in_window -= int(cumulative[hit - 1]) if hit else 0
        # the keys of bin `hit` are those with (key - low) * bins // span == hit: [ceil(hit*span/bins), ...] + low
        low, high = low + -(-hit * span // bins), low + -(-(hit + 1) * span // bins) - 1
    return torch.tensor([low], dtype=torch.int64).to(torch.int32).view(torch.float32)[0].to(values.device)


def sharded_keep_largest(values: torch.Tensor, num_prune: int, group=None,
                         segments: list[int] | None = None) -> torch.Tensor:
    """Keep (``True``) all but the ``num_prune`` smallest entries of the concatenation of every rank's ``values`` (1-D
    float32 magnitudes, pruned entries -1, which stay pruned), the first ties in the global order pruned first; returns
    this rank's part. ``num_prune`` is the global count, the same on every rank.

    ``segments`` (sizes summing to ``values.numel()``, as many on every rank) orders the whole segment-major: segment 0
    of rank 0, of rank 1, ..., then segment 1 of every rank, and so on (``'tensor-major'``); ``None``: one segment,
    rank 0's values first (``'rank-major'``)."""
    counts = torch.tensor([values.numel(), int(torch.count_nonzero(values >= 0))], device=values.device)
    total, alive = (int(c) for c in _all_reduce(counts, torch_dist.ReduceOp.SUM, group))
    num_prune = max(0, min(num_prune, alive))
    if num_prune == 0:
        return values >= 0
    dead = total - alive
    threshold = sharded_kth_smallest(values, dead + num_prune, group=group)
    keep = values >= threshold
    ties = values == threshold
    segments = [values.numel()] if segments is None else list(segments)
    world, rank = torch_dist.get_world_size(group), torch_dist.get_rank(group)
    # entry 0: weights below the threshold; then the tie count of (segment, rank), in the global order
    below_and_ties = torch.zeros(1 + len(segments) * world, dtype=torch.int64, device=values.device)
    below_and_ties[0] = torch.count_nonzero(values < threshold)
    tie_parts = ties.split(segments)
    for index, part in enumerate(tie_parts):
        below_and_ties[1 + index * world + rank] = torch.count_nonzero(part)
    below_and_ties = _all_reduce(below_and_ties, torch_dist.ReduceOp.SUM, group)
    ties_to_prune = num_prune - (int(below_and_ties[0]) - dead)
    before = torch.cumsum(below_and_ties[1:], 0) - below_and_ties[1:]  # ties ahead of each (segment, rank)
    for (index, part), keep_part in zip(enumerate(tie_parts), keep.split(segments)):
        mine = ties_to_prune - int(before[index * world + rank])  # of this part's ties, how many are among the first
        if mine > 0:
            keep_part[torch.nonzero(part).flatten()[:mine]] = False
    return keep


def sharded_masks_at_density(shard: Mapping[str, torch.Tensor], target_density: float,
                             masks: Mapping[str, torch.Tensor] | None = None, group=None,
                             layout: str = 'rank-major') -> dict[str, torch.Tensor]:
    """This rank's masks of ``masks_at_density(weights, target_density, masks, scope='global')`` over the weights of
    all ranks, ``shard`` being this rank's part laid out as ``layout`` (``LAYOUTS``, see the module doc): exactly
    ``round(target_density * numel)`` weights stay alive over all ranks, and pruned weights stay pruned.

    Every rank must call it (collective). Non-finite alive weights raise ``ValueError`` on every rank.
    """
    if not 0.0 <= target_density <= 1.0:
        raise ValueError(f'target_density: {target_density} is not allowed; use a density in [0, 1]')
    if layout not in LAYOUTS:
        raise ValueError(f'layout: {layout!r} is not allowed; use one of {LAYOUTS}')
    tensors = {name: w.detach() for name, w in shard.items()}
    device = next(iter(tensors.values())).device if tensors else torch.device('cpu')
    sizes = [w.numel() for w in tensors.values()]
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    for (name, w), magnitude in zip(tensors.items(), flat.split(sizes)):
        torch.abs(w.flatten().float(), out=magnitude)
        if masks is not None:
            magnitude.masked_fill_(~masks[name].flatten().to(device=device, dtype=torch.bool), _PRUNED)
    non_finite = torch.tensor([int(torch.count_nonzero(~torch.isfinite(flat)))], device=device)
    if int(_all_reduce(non_finite, torch_dist.ReduceOp.SUM, group)):
        raise ValueError('weights: hold NaN or inf alive weights on some rank; magnitude pruning cannot rank them, so '
                         'no mask is computed')
    counts = torch.tensor([flat.numel(), int(torch.count_nonzero(flat >= 0))], device=device)
    total, alive = (int(c) for c in _all_reduce(counts, torch_dist.ReduceOp.SUM, group))
    keep = sharded_keep_largest(flat, alive - round(target_density * total), group,
                                segments=sizes if layout == 'tensor-major' else None)
    return {name: part.view_as(w).clone() for (name, w), part in zip(tensors.items(), keep.split(sizes))}

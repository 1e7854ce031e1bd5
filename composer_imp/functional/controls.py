"""The controls of a ticket (open_lth's ``lottery/branch/``) and the perturbation of its rewind point: pure torch.

A *ticket* is a mask ``m_L`` and a rewind point ``theta_k``. Its controls keep one of the two and replace the other:

- :func:`random_masks`: a uniformly random mask with the ticket's exact alive count in every tensor (random pruning
  at the ticket's per-layer densities);
- :func:`shuffled_masks`: each tensor's mask with its entries permuted. It has the same distribution as
  :func:`random_masks` (a uniform permutation of a mask with c ones is a uniform mask with c ones); it is the
  field's name for the same control, drawn from the ticket's own tensor;
- a re-initialisation keeps the mask and takes the rewind point from the model's own initialiser with a new seed
  (nothing to compute here: build the model again).

:func:`perturb_on_support` is the paper's §3.2 instrument: a random direction on the mask's support, scaled to a
given L2 norm, typically :func:`pruned_rewind_distance` between the ticket and the next level's ticket.
Every random draw goes through a ``torch.Generator`` (CPU), so a seed reproduces it bit for bit.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ['layer_alive_counts', 'random_masks', 'shuffled_masks', 'pruned_rewind_distance', 'perturb_on_support']


def layer_alive_counts(masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{tensor name: number of alive weights}``."""
    return {name: int(torch.count_nonzero(mask)) for name, mask in masks.items()}


def random_masks(masks: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Bool masks of the same shapes with the same alive count per tensor, alive positions uniformly at random."""
    drawn = {}
    for name, mask in masks.items():
        alive = torch.zeros(mask.numel(), dtype=torch.bool)
        alive[torch.randperm(mask.numel(), generator=generator)[:int(torch.count_nonzero(mask))]] = True
        drawn[name] = alive.view(mask.shape).to(mask.device)
    return drawn


def shuffled_masks(masks: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each mask with its entries randomly permuted (per tensor: the same alive count, the positions shuffled)."""
    return {name: mask.flatten()[torch.randperm(mask.numel(), generator=generator).to(mask.device)].view(mask.shape)
            for name, mask in masks.items()}


def _check_keys(argument: str, masks: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(masks) - set(tensors))
    if missing:
        raise ValueError(f'{argument}: masks name tensors the rewind point does not hold: {missing}')
    for name, mask in masks.items():
        if mask.shape != tensors[name].shape:
            raise ValueError(f'{argument}[{name!r}]: shape {tuple(mask.shape)} does not match the rewind point '
                             f'{tuple(tensors[name].shape)}')


@torch.no_grad()
def pruned_rewind_distance(rewind_point: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                           next_masks: Mapping[str, torch.Tensor]) -> float:
    """``||m_L * theta_k - m_{L+1} * theta_k||_2`` over the masked tensors: the norm of the rewind-point weights
    that level L+1 prunes (the distance between successive pruned rewind points). ``next_masks`` must be nested in
    ``masks``."""
    _check_keys('masks', masks, rewind_point)
    if set(next_masks) != set(masks):
        raise ValueError(f'next_masks: names {sorted(set(next_masks) ^ set(masks))} are not in both masks')
    total = torch.zeros((), dtype=torch.float64)
    for name, mask in masks.items():
        if torch.any(next_masks[name] & ~mask):
            raise ValueError(f'next_masks[{name!r}]: keeps weights that masks prunes; give the next level\'s mask')
        removed = rewind_point[name].double() * (mask & ~next_masks[name])
        total += removed.square().sum().cpu()
    return float(total.sqrt())


@torch.no_grad()
def perturb_on_support(rewind_point: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], norm: float,
                       generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A copy of ``rewind_point`` plus a Gaussian direction on the masks' support, scaled to L2 norm ``norm``.

    The direction is drawn i.i.d. N(0, 1) over every masked tensor, zeroed off ``supp(masks)`` and normalised over
    all masked tensors together; unmasked entries of the state dict (biases, normalisation, buffers) and pruned
    weights are returned unchanged, bit for bit. Computed in float64 and cast back to each tensor's dtype.
    """
    _check_keys('masks', masks, rewind_point)
    norm = float(norm)
    if not norm >= 0.0 or norm == float('inf'):
        raise ValueError(f'norm: {norm} is not allowed; give a finite norm >= 0')
    directions = {}
    for name, mask in masks.items():
        noise = torch.randn(mask.shape, generator=generator, dtype=torch.float64)
        directions[name] = noise * mask.cpu()
    length = torch.sqrt(sum(d.square().sum() for d in directions.values()))
    if length == 0 and norm > 0:
        raise ValueError('masks: keep no weight, so there is no support to perturb on')
    scale = norm / float(length) if norm > 0 else 0.0
    perturbed = {name: tensor.clone() for name, tensor in rewind_point.items()}
    for name, direction in directions.items():
        target, mask = perturbed[name], masks[name].to(perturbed[name].device)
        moved = (target.double() + scale * direction.to(target.device)).to(target.dtype)
        perturbed[name] = torch.where(mask, moved, target)
    return perturbed

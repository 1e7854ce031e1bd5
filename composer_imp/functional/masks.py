"""Magnitude masks over named weight tensors: pure torch, no Composer.

Vocabulary (open_lth): a *mask* maps a parameter name to a bool tensor of the parameter's shape, ``True`` where the
weight is alive. The *density* is the fraction of alive weights over the prunable weights.

Counting and ties. ``magnitude_masks`` prunes exactly ``round(fraction * n_alive)`` of the alive weights (Python's
round, half to even) -- globally over all tensors or separately per tensor. The pruned weights are the ones with the
smallest ``|w|``; among weights whose magnitude equals the threshold, the ones that come first (tensors in the
mapping's order, elements in row-major order) are pruned first. The result is therefore deterministic and never prunes
more or fewer weights than asked, unlike open_lth's ``sorted[k]`` rule, which prunes ``k + 1`` weights and every tie.
The threshold is found with ``torch.kthvalue`` on the tensors' own device; nothing is sorted in full and nothing goes
through numpy.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    'PRUNABLE_MODULE_TYPES',
    'prunable_weights',
    'magnitude_masks',
    'masks_at_density',
    'apply_masks',
    'mask_gradients',
    'density',
    'layer_densities',
    'alive_count',
    'kth_smallest',
]

# open_lth's rule (models/base.py: prunable_layer_names): the weight of every conv and linear layer.
PRUNABLE_MODULE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
SCOPES = ('global', 'layerwise')


def prunable_weights(model: nn.Module, ignore: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """The ``.weight`` of every Conv and Linear layer of ``model``, keyed like ``model.named_parameters()``.

    ``ignore`` holds fnmatch patterns (``'fc.weight'``, ``'*.shortcut.*'``) of parameter names to leave dense; a pattern
    that matches no prunable weight raises ``ValueError``, because a typo would otherwise silently prune that layer.
    """
    weights = {}
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_MODULE_TYPES) and isinstance(getattr(module, 'weight', None), nn.Parameter):
            weights[f'{module_name}.weight' if module_name else 'weight'] = module.weight
    ignore = list(ignore)
    for pattern in ignore:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in weights):
            raise ValueError(
                f'ignore: pattern {pattern!r} matches no prunable weight; prunable weights are {sorted(weights)}')
    weights = {n: w for n, w in weights.items() if not any(fnmatch.fnmatchcase(n, p) for p in ignore)}
    if not weights:
        raise ValueError('model: no prunable weights (the .weight of Conv and Linear layers, minus `ignore`) were found')
    return weights


def _as_tensors(weights: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(weights, nn.Module):
        weights = prunable_weights(weights)
    return {name: w.detach() for name, w in weights.items()}


def _check_masks(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    if set(masks) != set(weights):
        missing, extra = sorted(set(weights) - set(masks)), sorted(set(masks) - set(weights))
        raise ValueError(f'masks: keys do not match the weights (missing {missing}, unexpected {extra})')
    for name, w in weights.items():
        if tuple(masks[name].shape) != tuple(w.shape):
            raise ValueError(
                f'masks[{name!r}]: shape {tuple(masks[name].shape)} does not match the weight shape {tuple(w.shape)}')


def kth_smallest(values: torch.Tensor, k: int, bins: int = 4096) -> torch.Tensor:
    """The k-th smallest (1-based) entry of a 1-D tensor, exactly as ``torch.kthvalue`` returns it.

    A histogram pass finds the few bins that must hold the answer; ``kthvalue`` then runs on those entries only.
    Exact whatever ``histc`` does at bin edges, because the entries below and inside the window are counted by direct
    comparison; falls back to a full ``kthvalue`` if the window misses.
    """
    if values.numel() < bins * 64:
        return torch.kthvalue(values, k).values
    low, high = torch.aminmax(values)
    if low == high:
        return low
    cumulative = torch.histc(values, bins, float(low), float(high)).cumsum(0)
    hit = int(torch.searchsorted(cumulative, torch.tensor(float(k), device=values.device)))
    width = (high - low) / bins
    lower, upper = low + (hit - 1) * width, low + (hit + 2) * width
    below = int(torch.count_nonzero(values < lower))
    window = values[(values >= lower) & (values < upper)]
    if 1 <= k - below <= window.numel():
        return torch.kthvalue(window, k - below).values
    return torch.kthvalue(values, k).values


def _keep_largest(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None, alive: dict[str, int],
                  num_prune: int) -> dict[str, torch.Tensor]:
    """Prune the ``num_prune`` alive weights of smallest magnitude, pooled over all tensors in ``weights``."""
    sizes = [w.numel() for w in weights.values()]
    num_prune = max(0, min(num_prune, sum(alive.values())))
    # One float buffer holds every magnitude; pruned entries get -1, below every alive one, so the k-th smallest of the
    # whole buffer (k counted past the pruned entries) is the threshold and no boolean gather is needed.
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=next(iter(weights.values())).device)
    for (name, w), magnitude in zip(weights.items(), flat.split(sizes)):
        torch.abs(w.flatten().float(), out=magnitude)
        if alive[name] < w.numel():
            magnitude.masked_fill_(~masks[name].flatten(), -1.0)
    dead = flat.numel() - sum(alive.values())
    if num_prune == 0:
        keep = flat >= 0
    else:
        threshold = kth_smallest(flat, dead + num_prune)
        keep = flat >= threshold
        ties_to_prune = num_prune - (int(torch.count_nonzero(flat < threshold)) - dead)
        if ties_to_prune > 0:  # the first ties in index order go
            keep[torch.nonzero(flat == threshold).flatten()[:ties_to_prune]] = False
    return {name: part.view_as(w).clone() for (name, w), part in zip(weights.items(), keep.split(sizes))}


def _prune(weights, masks, scope: str, count: Callable[[int, int], int]) -> dict[str, torch.Tensor]:
    """Prune ``count(alive, numel)`` weights, over all tensors (global) or per tensor (layerwise)."""
    _check_scope(scope)
    tensors = _as_tensors(weights)
    if masks is not None:
        _check_masks(tensors, masks)
        masks = {n: masks[n].to(device=w.device, dtype=torch.bool) for n, w in tensors.items()}
    alive = {n: w.numel() if masks is None else int(torch.count_nonzero(masks[n])) for n, w in tensors.items()}
    if scope == 'global':
        num_prune = count(sum(alive.values()), sum(w.numel() for w in tensors.values()))
        return _keep_largest(tensors, masks, alive, num_prune)
    return {
        name: _keep_largest({name: w}, masks, {name: alive[name]}, count(alive[name], w.numel()))[name]
        for name, w in tensors.items()
    }


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f'scope: {scope!r} is not allowed; use one of {SCOPES}')


def magnitude_masks(
    weights: Mapping[str, torch.Tensor] | nn.Module,
    fraction: float,
    masks: Mapping[str, torch.Tensor] | None = None,
    scope: str = 'global',
) -> dict[str, torch.Tensor]:
    """Prune ``fraction`` of the weights still alive in ``masks`` by magnitude and return the new, nested masks.

    Args:
        weights: parameter name -> tensor, or a module (its Conv/Linear weights are used).
        fraction: fraction of the *remaining* weights to prune, in [0, 1).
        masks: the current masks (all alive when ``None``); weights already pruned stay pruned.
        scope: ``'global'`` ranks all tensors together, ``'layerwise'`` prunes ``fraction`` of each tensor.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f'fraction: {fraction} is not allowed; use a fraction of the remaining weights in [0, 1)')
    return _prune(weights, masks, scope, lambda alive, numel: round(fraction * alive))


def masks_at_density(
    weights: Mapping[str, torch.Tensor] | nn.Module,
    target_density: float,
    masks: Mapping[str, torch.Tensor] | None = None,
    scope: str = 'global',
) -> dict[str, torch.Tensor]:
    """Prune by magnitude until exactly ``round(target_density * numel)`` weights stay alive.

    ``numel`` counts all prunable weights (``'global'``) or each tensor's (``'layerwise'``), so repeated levels follow
    the geometric density sequence without compounding rounding errors. Never revives a pruned weight.
    """
    if not 0.0 <= target_density <= 1.0:
        raise ValueError(f'target_density: {target_density} is not allowed; use a density in [0, 1]')
    return _prune(weights, masks, scope, lambda alive, numel: alive - round(target_density * numel))


@torch.no_grad()
def apply_masks(weights: Mapping[str, torch.Tensor] | nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set pruned weights to exactly 0.0 in place (``masked_fill_``, so even inf/NaN become 0)."""
    tensors = dict(weights.named_parameters()) if isinstance(weights, nn.Module) else weights
    for name, mask in masks.items():
        tensors[name].masked_fill_(~mask, 0.0)


@torch.no_grad()
def mask_gradients(weights: Mapping[str, torch.Tensor] | nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned weights in place, so that no optimizer moves them."""
    tensors = dict(weights.named_parameters()) if isinstance(weights, nn.Module) else weights
    for name, mask in masks.items():
        grad = tensors[name].grad
        if grad is not None:
            grad.masked_fill_(~mask, 0.0)


def alive_count(masks: Mapping[str, torch.Tensor]) -> int:
    return sum(int(torch.count_nonzero(m)) for m in masks.values())


def density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of alive weights over all masked weights."""
    total = sum(m.numel() for m in masks.values())
    return alive_count(masks) / total if total else 1.0


def layer_densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: int(torch.count_nonzero(m)) / m.numel() for name, m in masks.items()}

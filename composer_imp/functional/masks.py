"""Magnitude masks over named weight tensors: pure torch, no Composer.

Vocabulary (open_lth): a *mask* maps a parameter name to a bool tensor of the parameter's shape, ``True`` where the
weight is alive. The *density* is the fraction of alive weights over the prunable weights.

Counting and ties. ``magnitude_masks`` prunes exactly ``round(fraction * n_alive)`` of the alive weights (Python's
round, half to even) -- globally over all tensors or separately per tensor. The pruned weights are the ones with the
smallest ``|w|`` (or LAMP score); among weights whose score equals the threshold, the ones that come first (tensors in
the mapping's order, elements in row-major order) are pruned first. The result is therefore deterministic and never
prunes more or fewer weights than asked, unlike open_lth's ``sorted[k]`` rule, which prunes ``k + 1`` weights and every
tie. The threshold is found with ``torch.kthvalue`` on the tensors' own device; nothing goes through numpy, and only
LAMP sorts (each tensor, for its scores).

Non-finite weights. NaN has no magnitude order (``histc`` fails on it, ``kthvalue`` sorts it last, so it would
survive while finite weights are over-pruned) and inf is always kept, so ``magnitude_masks`` and ``masks_at_density``
raise one ``ValueError`` naming every tensor with a NaN or inf *alive* weight (pruned entries do not count), and
``kth_smallest`` refuses non-finite values. Cost: one ``isfinite`` pass per tensor and one host sync per call.

Scopes (``SCOPES``): ``'global'`` ranks ``|w|`` over all tensors, ``'layerwise'`` prunes the fraction of each tensor,
``'lamp'`` ranks LAMP scores over all tensors (Layer-Adaptive Magnitude-based Pruning, Lee et al., ICLR 2021): with a
tensor's alive weights sorted by ``|w|`` ascending (ties in index order), weight u scores
``w_u^2 / sum_{v >= u} w_v^2``. The score does not change when a tensor is rescaled, so a layer initialized or trained
at a smaller scale (MPT's residual output projections, scaled by 1/sqrt(2 n_layers)) is not pruned away first, and each
tensor's largest weight scores 1, so every tensor keeps at least one weight unless fewer weights are to stay than
there are tensors.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from composer_imp.functional.shards import local, local_parameters

__all__ = [
    'EMBEDDING_TYPES',
    'MULTIHEAD_WEIGHT_NAMES',
    'Coverage',
    'prunable_weights',
    'prunable_coverage',
    'coverage_warning',
    'magnitude_masks',
    'masks_at_density',
    'apply_masks',
    'mask_gradients',
    'density',
    'layer_densities',
    'alive_count',
    'kth_smallest',
    'non_finite_weights',
]

EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
# nn.MultiheadAttention holds its input projections itself (packed, or one per q/k/v when the key and value sizes
# differ from the embedding size); its out_proj is a Linear and is found as one.
MULTIHEAD_WEIGHT_NAMES = ('in_proj_weight', 'q_proj_weight', 'k_proj_weight', 'v_proj_weight')
SCOPES = ('global', 'layerwise', 'lamp')


def prunable_weights(model: nn.Module, ignore: Iterable[str] = (), embeddings: bool = False) -> dict[str, nn.Parameter]:
    """The weights IMP prunes: one entry per tensor, named and ordered exactly as ``model.named_parameters()``.

    Prunable are the ``weight`` of every module that holds it as a parameter of two or more dimensions -- Conv, Linear,
    transformers' ``Conv1D``, ``Bilinear`` and any custom layer built the same way (the rule reads the weight's shape,
    not the class, so library layers need no import); 1-D weights (norm scales) are not -- and the input projections
    of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``). Further rules:

    - Embeddings (``nn.Embedding``, ``nn.EmbeddingBag``) stay dense unless ``embeddings=True``. A tensor an embedding
      shares with another layer (GPT-2's tied ``lm_head``/``wte``) counts as the embedding: it is the embedding table.
    - A tied tensor (one tensor under several module paths) is one entry, under the name ``named_parameters()`` gives
      it (its first path), so it gets one mask.
    - A parametrized weight (``torch.nn.utils.parametrize``, e.g. Composer's WeightStandardization) is pruned through
      its originals of the weight's shape: ``<layer>.parametrizations.weight.original``, or of several originals the
      element-aligned ones (weight norm's direction ``original1``, not its magnitude ``original0``). The mask zeroes the
      original; the layer's effective weight keeps those zeros only if the parametrization maps 0 to 0 (weight norm
      does, standardization does not).

    ``ignore`` holds fnmatch patterns (``'fc.weight'``, ``'*.shortcut.*'``) of parameter names to leave dense; a pattern
    may name a tied tensor by any of its paths (``'lm_head.weight'``). A pattern that matches no prunable weight raises
    ``ValueError``, because a typo would otherwise silently prune that layer.
    """
    layer_weights, embedding_ids = _layer_weights(model)
    weights = {name: w for name, w in model.named_parameters()
               if id(w) in layer_weights and (embeddings or id(w) not in embedding_ids)}
    paths = _parameter_paths(model)
    ignore = list(ignore)
    for pattern in ignore:
        if not any(fnmatch.fnmatchcase(path, pattern) for w in weights.values() for path in paths[id(w)]):
            raise ValueError(
                f'ignore: pattern {pattern!r} matches no prunable weight; prunable weights are {sorted(weights)}')
    weights = {name: w for name, w in weights.items()
               if not any(fnmatch.fnmatchcase(path, pattern) for path in paths[id(w)] for pattern in ignore)}
    if not weights:
        hint = '; pass embeddings=True to prune embeddings' if embedding_ids and not embeddings else ''
        raise ValueError('model: no prunable weights were found (the >=2-D weights of non-embedding layers and '
                         f"MultiheadAttention's input projections, minus `ignore`){hint}")
    return weights


def _layer_weights(model: nn.Module) -> tuple[dict[int, nn.Parameter], set[int]]:
    """Every weight the prunable rule names, embeddings included, by ``id``; and the ids of those an embedding owns."""
    weights, embedding_ids = {}, set()
    for module in model.modules():
        names = MULTIHEAD_WEIGHT_NAMES if isinstance(module, nn.MultiheadAttention) else ('weight',)
        for tensor_name in names:
            for weight in _trainable_tensors(module, tensor_name):
                if weight.ndim >= 2:
                    weights[id(weight)] = weight
                    if isinstance(module, EMBEDDING_TYPES):
                        embedding_ids.add(id(weight))
    return weights, embedding_ids


def _trainable_tensors(module: nn.Module, tensor_name: str) -> list[nn.Parameter]:
    """The parameters behind ``module.<tensor_name>``: itself, or a parametrized tensor's originals of its shape."""
    if parametrize.is_parametrized(module, tensor_name):
        with torch.no_grad():
            shape = getattr(module, tensor_name).shape
        originals = module.parametrizations[tensor_name].parameters(recurse=False)
        return [original for original in originals if original.shape == shape]
    tensor = dict(module.named_parameters(recurse=False)).get(tensor_name)
    return [] if tensor is None else [tensor]


def _parameter_paths(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) ->`` every name it has, the ``named_parameters()`` one first."""
    paths = defaultdict(list)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        paths[id(parameter)].append(name)
    return paths


class Coverage(NamedTuple):
    fraction: float  # of the model's weight elements that are in the prunable set
    left_out: dict[str, int]  # name -> element count of each weight not in it, in named_parameters() order


def prunable_coverage(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Coverage:
    """How much of ``model``'s weights the prunable set ``weights`` (as ``prunable_weights`` returns it) covers.

    The model's weights are its parameters of two or more dimensions, each tensor once: every layer's matrix or kernel,
    embeddings included (most of a small language model is its embeddings, the case this is meant to show), biases and
    norm scales not.
    """
    parameter_ids = {id(p) for p in model.parameters()}
    foreign = [name for name, w in weights.items() if id(w) not in parameter_ids]
    if foreign:
        raise ValueError(f'weights: {foreign} are not parameters of model; pass prunable_weights(model)')
    covered = {id(w) for w in weights.values()}
    model_weights = {name: p for name, p in model.named_parameters() if p.ndim >= 2}
    total = sum(p.numel() for p in model_weights.values())
    left_out = {name: p.numel() for name, p in model_weights.items() if id(p) not in covered}
    return Coverage((total - sum(left_out.values())) / total if total else 1.0, left_out)


def coverage_warning(model: nn.Module, weights: Mapping[str, torch.Tensor], min_fraction: float = 0.5) -> str | None:
    """A one-line warning when ``weights`` cover less than ``min_fraction`` of the model's weights, else ``None``.

    Names the largest weights left out, marks embeddings, and says how to include them.
    """
    fraction, left_out = prunable_coverage(model, weights)
    if fraction >= min_fraction:
        return None
    _, embedding_ids = _layer_weights(model)
    parameters = dict(model.named_parameters())
    embedding_names = {name for name in left_out if id(parameters[name]) in embedding_ids}
    largest = sorted(left_out, key=left_out.get, reverse=True)
    listed = ', '.join(f'{name} ({"embedding, " if name in embedding_names else ""}{left_out[name]:,})'
                       for name in largest[:5])
    more = f' and {len(largest) - 5} more' if len(largest) > 5 else ''
    hint = ('pass embeddings=True to prune the embeddings too' if embedding_names else
            "only the >=2-D weights of non-embedding layers and MultiheadAttention's input projections are prunable; "
            'check `ignore`')
    return f"IMP prunes only {fraction:.1%} of the model's weights; left out: {listed}{more}; {hint}"


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


_NON_FINITE_VALUES = ('values: hold NaN or inf, which have no order by magnitude; a k-th smallest (a pruning '
                      'threshold) of them is meaningless')


def non_finite_weights(weights: Mapping[str, torch.Tensor],
                       masks: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Names of the tensors holding NaN or inf (only alive entries count when ``masks`` is given); one host sync."""
    if not weights:
        return []
    bad = torch.stack([(torch.isfinite(w) if masks is None else torch.isfinite(w) | ~masks[name]).all().cpu()
                       for name, w in weights.items()])
    return [name for name, ok in zip(weights, bad.tolist()) if not ok]


def _check_finite(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None) -> None:
    """Refuse non-finite alive weights: NaN has no magnitude order (``histc`` fails on it, ``kthvalue`` sorts it
    last, so it would silently survive while finite weights are over-pruned), and an inf would always be kept."""
    bad = non_finite_weights(weights, masks)
    if bad:
        raise ValueError(f'weights: {bad} hold NaN or inf; magnitude pruning cannot rank them, so no mask is computed. '
                         'The network diverged (lower the learning rate, clip gradients) or was loaded from a bad '
                         'checkpoint')


def kth_smallest(values: torch.Tensor, k: int, bins: int = 4096) -> torch.Tensor:
    """The k-th smallest (1-based) entry of a 1-D tensor, exactly as ``torch.kthvalue`` returns it.

    Raises ``ValueError`` if ``values`` holds NaN or inf.

    A histogram pass finds the few bins that must hold the answer; ``kthvalue`` then runs on those entries only.
    Exact whatever ``histc`` does at bin edges, because the entries below and inside the window are counted by direct
    comparison; falls back to a full ``kthvalue`` if the window misses.
    """
    if values.numel() < bins * 64:
        if not bool(torch.isfinite(values).all()):
            raise ValueError(_NON_FINITE_VALUES)
        return torch.kthvalue(values, k).values
    low, high = torch.aminmax(values)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):  # aminmax propagates NaN: the check costs nothing
        raise ValueError(_NON_FINITE_VALUES)
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


def _lamp_scores(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Each alive weight's LAMP score ``w_u^2 / sum_{v >= u} w_v^2`` over its tensor's alive weights sorted by
    magnitude (ties in index order); pruned weights score 0 and are excluded by the caller's masks."""
    scores = {}
    for name, w in weights.items():
        squared = w.flatten().double().square()
        if masks is not None:
            squared.masked_fill_(~masks[name].flatten(), 0.0)
        ascending, order = torch.sort(squared, stable=True)
        remaining = ascending.flip(0).cumsum(0).flip(0)
        sorted_scores = torch.where(remaining > 0, ascending / remaining, torch.zeros_like(ascending))
        sorted_scores[-1] = 1.0  # the largest weight, also in a tensor of zeros
        scores[name] = torch.empty_like(sorted_scores).scatter_(0, order, sorted_scores).view_as(w)
    return scores


def _prune(weights, masks, scope: str, count: Callable[[int, int], int]) -> dict[str, torch.Tensor]:
    """Prune ``count(alive, numel)`` weights, over all tensors (global, lamp) or per tensor (layerwise)."""
    _check_scope(scope)
    tensors = _as_tensors(weights)
    if masks is not None:
        _check_masks(tensors, masks)
        masks = {n: masks[n].to(device=w.device, dtype=torch.bool) for n, w in tensors.items()}
    _check_finite(tensors, masks)
    alive = {n: w.numel() if masks is None else int(torch.count_nonzero(masks[n])) for n, w in tensors.items()}
    if scope in ('global', 'lamp'):
        num_prune = count(sum(alive.values()), sum(w.numel() for w in tensors.values()))
        ranked = _lamp_scores(tensors, masks) if scope == 'lamp' else tensors
        return _keep_largest(ranked, masks, alive, num_prune)
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
        scope: ``'global'`` ranks all tensors together by ``|w|``, ``'layerwise'`` prunes ``fraction`` of each tensor,
            ``'lamp'`` ranks all tensors together by LAMP score (scale-invariant per tensor; see the module doc).
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

    ``numel`` counts all prunable weights (``'global'``, ``'lamp'``) or each tensor's (``'layerwise'``), so repeated
    levels follow the geometric density sequence without compounding rounding errors. Never revives a pruned weight.
    """
    if not 0.0 <= target_density <= 1.0:
        raise ValueError(f'target_density: {target_density} is not allowed; use a density in [0, 1]')
    return _prune(weights, masks, scope, lambda alive, numel: alive - round(target_density * numel))


@torch.no_grad()
def apply_masks(weights: Mapping[str, torch.Tensor] | nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Set pruned weights to exactly 0.0 in place (``masked_fill_``, so even inf/NaN become 0). Of a module with sharded
    parameters, ``masks`` hold this rank's shards (``shards.local``)."""
    tensors = local_parameters(weights) if isinstance(weights, nn.Module) else weights
    for name, mask in masks.items():
        tensors[name].masked_fill_(~mask, 0.0)


@torch.no_grad()
def mask_gradients(weights: Mapping[str, torch.Tensor] | nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned weights in place, so that no optimizer moves them."""
    tensors = dict(weights.named_parameters()) if isinstance(weights, nn.Module) else weights
    for name, mask in masks.items():
        grad = tensors[name].grad
        if grad is not None:
            local(grad).masked_fill_(~mask, 0.0)


def alive_count(masks: Mapping[str, torch.Tensor]) -> int:
    return sum(int(torch.count_nonzero(m)) for m in masks.values())


def density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of alive weights over all masked weights."""
    total = sum(m.numel() for m in masks.values())
    return alive_count(masks) / total if total else 1.0


def layer_densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: int(torch.count_nonzero(m)) / m.numel() for name, m in masks.items()}

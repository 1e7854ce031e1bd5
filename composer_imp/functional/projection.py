"""Projection check: how large a pruning step a trained network tolerates without retraining. Pure torch, no Composer.

The *level-L projection* (science.md §1) is the trained network w_L with a further fraction p of its alive weights
pruned by global (or layerwise) magnitude: m_{L+1} ⊙ w_L. Paul et al. (ICLR 2023, §3.3) find that how far a solution
can be pruned in one step is set by the landscape around it: flatter solutions keep their loss when the smallest
weights are removed, sharper ones do not. This module measures that directly with forward passes only:

    delta(p) = S(projection of w_L at p) - S(w_L)        S = a lower-is-better value (error, loss), on fixed batches

and finds the largest p in [p_min, p_max] with delta(p) <= tolerance, by bisection (default) or on an ascending grid
of candidates refined by bisection ("coarse to fine"). ``delta`` is nearly monotone in p because the projections
are nested (a larger p prunes a superset); both searches assume it and never evaluate beyond the first failure.

Everything is evaluated in eval mode without gradients, on batches the caller fixes once (a train subset, no
augmentation), so that two calls on the same network give the same answer.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from composer_imp.functional.barrier import ClassificationScorer, Evaluate
from composer_imp.functional.masks import SCOPES, magnitude_masks, prunable_weights

__all__ = ['check_fraction_range', 'search_fraction', 'projection_scores', 'max_prune_fraction']


def check_fraction_range(p_min: float, p_max: float, tolerance: float, resolution: float = 0.05,
                         candidates: Sequence[float] | None = None) -> None:
    """Raise ``ValueError`` naming the argument unless 0 < p_min < p_max < 1, tolerance > 0, resolution > 0 and every
    candidate lies in [p_min, p_max]."""
    for name, value in (('p_min', p_min), ('p_max', p_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f'{name}: {value!r} is not allowed; use a fraction of the remaining weights in (0, 1)')
    if p_min >= p_max:
        raise ValueError(f'p_min, p_max: {p_min} >= {p_max}; the search needs p_min < p_max')
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0.0:
        raise ValueError(f'tolerance: {tolerance!r} is not allowed; use a positive increase of the error (a fraction, '
                         '0.01 = 1 point) or of the loss')
    if not resolution > 0.0:
        raise ValueError(f'resolution: {resolution!r} is not allowed; use a positive fraction (e.g. 0.05)')
    if candidates is not None:
        if not candidates:
            raise ValueError('candidates: empty; give fractions in [p_min, p_max] or None for bisection')
        outside = [c for c in candidates if not p_min <= c <= p_max]
        if outside:
            raise ValueError(f'candidates: {outside} leave [p_min, p_max] = [{p_min}, {p_max}]')


def search_fraction(delta: Callable[[float], float], p_min: float, p_max: float, tolerance: float, *,
                    resolution: float = 0.05, candidates: Sequence[float] | None = None) -> dict[str, Any]:
    """The largest fraction p in [p_min, p_max] with ``delta(p) <= tolerance``.

    Bisection (``candidates=None``): tries p_max (accepted at once when admissible), then p_min, then halves the
    interval between the largest admissible and the smallest inadmissible p until it is narrower than ``resolution``.
    Grid (``candidates``): tries the candidates in ascending order up to the first inadmissible one, then bisects the
    gap above the last admissible one to ``resolution``. Each p is evaluated at most once.

    Returns ``{'fraction', 'admissible', 'tried'}``: ``admissible`` is False when even the smallest fraction tried
    exceeds the tolerance (then ``fraction`` is p_min, the plain IMP step); ``tried`` lists
    ``{'fraction', 'delta'}`` in evaluation order.
    """
    check_fraction_range(p_min, p_max, tolerance, resolution, candidates)
    tried: list[dict[str, float]] = []
    cache: dict[float, float] = {}

    def admissible(p: float) -> bool:
        if p not in cache:
            cache[p] = float(delta(p))
            tried.append({'fraction': p, 'delta': cache[p]})
        return cache[p] <= tolerance

    if candidates is None:
        if admissible(p_max):
            return {'fraction': p_max, 'admissible': True, 'tried': tried}
        if not admissible(p_min):
            return {'fraction': p_min, 'admissible': False, 'tried': tried}
        low, high = p_min, p_max
    else:
        grid = sorted({float(c) for c in candidates})
        low = None
        high = None
        for p in grid:
            if not admissible(p):
                high = p
                break
            low = p
        if low is None:
            return {'fraction': p_min, 'admissible': False, 'tried': tried}
        if high is None:
            return {'fraction': low, 'admissible': True, 'tried': tried}
    while high - low > resolution:
        middle = 0.5 * (low + high)
        if admissible(middle):
            low = middle
        else:
            high = middle
    return {'fraction': low, 'admissible': True, 'tried': tried}


def _weights_and_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None,
                       ignore: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if masks is None:
        weights = prunable_weights(model, ignore)
        return weights, {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    params = dict(model.named_parameters())
    missing = sorted(set(masks) - set(params))
    if missing:
        raise ValueError(f'masks: {missing} are not parameters of the model')
    return {n: params[n] for n in masks}, {n: m.to(device=params[n].device, dtype=torch.bool) for n, m in masks.items()}


@torch.no_grad()
def projection_scores(model: nn.Module, masks: Mapping[str, torch.Tensor] | None, fractions: Iterable[float],
                      evaluate: Evaluate, scope: str = 'global', ignore: Iterable[str] = ()) -> dict[float, dict[str, float]]:
    """``evaluate`` (-> ``{name: value}``) of the trained ``model`` and of its projection at each fraction.

    ``masks`` (parameter name -> bool, True = alive) is the mask ``model`` was trained under; ``None`` means every
    prunable weight (minus ``ignore``) is alive. Fraction 0 scores the network itself. Each projection prunes that
    fraction of the alive weights by magnitude (``scope`` as in :func:`magnitude_masks`). ``model`` is changed in place
    for each evaluation and restored bit-exactly afterwards.
    """
    if scope not in SCOPES:
        raise ValueError(f'scope: {scope!r} is not allowed; use one of {SCOPES}')
    weights, masks = _weights_and_masks(model, masks, ignore)
    trained = {n: w.detach().clone() for n, w in weights.items()}
    scores: dict[float, dict[str, float]] = {}
    try:
        for fraction in fractions:
            projected = magnitude_masks(trained, fraction, masks, scope) if fraction > 0 else masks
            for name, weight in weights.items():
                weight.copy_(trained[name]).masked_fill_(~projected[name], 0.0)
            scores[float(fraction)] = {name: float(value) for name, value in evaluate(model).items()}
    finally:
        for name, weight in weights.items():
            weight.copy_(trained[name])
    return scores


def max_prune_fraction(model: nn.Module, masks: Mapping[str, torch.Tensor] | None,
                       evaluate: Evaluate | Iterable[Any], *, p_min: float = 0.2, p_max: float = 0.6,
                       tolerance: float = 0.01, metric: str = 'error', resolution: float = 0.05,
                       candidates: Sequence[float] | None = None, scope: str = 'global',
                       ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The largest fraction of the alive weights of a trained network that can be pruned at once, by projection.

    Args:
        model: the trained network.
        masks: the mask it was trained under (``None``: dense).
        evaluate: ``evaluate(model) -> {name: value}`` with lower-is-better values, on fixed data (a train subset
            without augmentation); or fixed, re-iterable ``(inputs, targets)`` batches with class-index targets, scored
            by :class:`~composer_imp.functional.ClassificationScorer` (``'error'``, ``'loss'``) on ``model(inputs)``.
        p_min, p_max: the range searched, fractions of the *remaining* weights, 0 < p_min < p_max < 1.
        tolerance: largest admissible increase of ``metric`` over the unpruned network: absolute error (0.01 =
            1 percentage point) for ``'error'``, nats of mean cross-entropy for ``'loss'``.
        metric: the value of ``evaluate`` the search reads (the others are recorded).
        resolution, candidates: see :func:`search_fraction`.
        scope, ignore: as in IMP (``ignore`` only when ``masks`` is None).

    Returns ``{'fraction', 'admissible', 'tried', 'reference', 'metric', 'evaluations', 'samples'}``: ``tried`` holds
    ``{'fraction', 'delta', <every value>}`` per evaluated p, ``reference`` the values of the unpruned network,
    ``evaluations`` the number of evaluations (reference included) and ``samples`` the samples of one evaluation
    (``evaluate.samples``, None when it does not count them). The model is left as it came.
    """
    check_fraction_range(p_min, p_max, tolerance, resolution, candidates)
    evaluate = evaluate if callable(evaluate) else ClassificationScorer(evaluate)
    reference = projection_scores(model, masks, [0.0], evaluate, scope, ignore)[0.0]
    if metric not in reference:
        raise ValueError(f'metric: {metric!r} is not allowed; evaluate gives {sorted(reference)}')
    scored: dict[float, dict[str, float]] = {}

    def delta(p: float) -> float:
        scored[p] = projection_scores(model, masks, [p], evaluate, scope, ignore)[p]
        return scored[p][metric] - reference[metric]

    result = search_fraction(delta, p_min, p_max, tolerance, resolution=resolution, candidates=candidates)
    for entry in result['tried']:
        entry.update(scored[entry['fraction']])
    result.update({'reference': reference, 'metric': metric, 'evaluations': 1 + len(result['tried']),
                   'samples': getattr(evaluate, 'samples', None)})
    return result

"""Barriers along the straight line between two networks, and the matching rule. Pure torch, no Composer.

Two conventions (science.md §3.1), both over the curve E(alpha) of a lower-is-better value (an error, a loss) of
w(alpha) = (1 - alpha) * w_a + alpha * w_b:

- ``barrier_linear`` = max_alpha [E(alpha) - ((1 - alpha) * E(0) + alpha * E(1))]: 0 for a path whose error is linear
  in alpha, so endpoints with different errors (successive IMP levels) are not penalised for that difference.
- ``barrier_max_minus_mean`` = max_alpha E(alpha) - (E(0) + E(1)) / 2 (Frankle et al. 2020, "instability"): at least
  |E(0) - E(1)| / 2, meant for exchangeable endpoints (two SGD-noise copies of one level).

Errors are fractions (0.02 = 2 percentage points), so error barriers and tolerances are absolute fractions too.
:func:`metric_curve` takes any ``evaluate(model) -> {name: value}``; :func:`error_barrier` is the plain-torch case
(arg-max error and cross-entropy on ``(inputs, targets)`` batches, :class:`ClassificationScorer`).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer_imp.functional.interpolate import (
    check_endpoints,
    load_interpolated_,
    recompute_batchnorm,
    training_mode,
)
from composer_imp.functional.rewind import rewind, snapshot
from composer_imp.functional.shards import global_sum, is_sharded, local_state

__all__ = [
    'BN_MODES',
    'DEFAULT_NUM_ALPHAS',
    'alpha_grid',
    'barrier_linear',
    'barrier_max_minus_mean',
    'ClassificationScorer',
    'classification_error',
    'error_barrier',
    'is_matching',
    'metric_curve',
]

BN_MODES = ('interpolate', 'recompute')
DEFAULT_NUM_ALPHAS = 11  # 0, 0.1, ..., 1

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float]
Evaluate = Callable[[nn.Module], Mapping[str, float]]


def alpha_grid(alphas: int | Sequence[float] | None = None) -> list[float]:
    """The interpolation grid, sorted: ``None`` -> 11 evenly spaced points, an int ``n`` -> ``n`` evenly spaced points
    from 0 to 1, a sequence -> itself. Raises ``ValueError`` if it lacks 0 or 1 or leaves [0, 1]."""
    alphas = DEFAULT_NUM_ALPHAS if alphas is None else alphas
    if isinstance(alphas, int) and not isinstance(alphas, bool):
        if alphas < 2:
            raise ValueError(f'alphas: {alphas} points cannot include both endpoints; use at least 2')
        return [i / (alphas - 1) for i in range(alphas)]
    grid = sorted(float(a) for a in alphas)
    outside = [a for a in grid if not 0.0 <= a <= 1.0]
    if outside:
        raise ValueError(f'alphas: {outside} leave [0, 1]; the path runs from state_a (0) to state_b (1)')
    if 0.0 not in grid or 1.0 not in grid:
        raise ValueError(f'alphas: {grid} must include both endpoints 0 and 1, which every barrier is measured against')
    return grid


def _curve(alphas: Sequence[float], errors: Sequence[float]) -> tuple[list[tuple[float, float]], float, float]:
    if len(alphas) != len(errors):
        raise ValueError(f'errors: {len(errors)} values for {len(alphas)} alphas')
    curve = [(float(a), float(e)) for a, e in zip(alphas, errors)]
    ends = {a: e for a, e in curve if a in (0.0, 1.0)}
    if len(ends) != 2:
        raise ValueError('alphas: must include both endpoints 0 and 1')
    return curve, ends[0.0], ends[1.0]


def _undefined(curve: Sequence[tuple[float, float]]) -> bool:
    """A NaN or inf anywhere on the path leaves the barrier undefined (Python's ``max`` would otherwise return
    whichever value comes first in a comparison with NaN)."""
    return not all(math.isfinite(e) for _, e in curve)


def barrier_linear(alphas: Sequence[float], errors: Sequence[float]) -> float:
    """max over alpha of E(alpha) - ((1 - alpha) * E(0) + alpha * E(1)); never negative (the endpoints give 0).
    ``nan`` (undefined) when any value on the path is NaN or inf."""
    curve, e0, e1 = _curve(alphas, errors)
    if _undefined(curve):
        return math.nan
    return max(e - ((1.0 - a) * e0 + a * e1) for a, e in curve)


def barrier_max_minus_mean(alphas: Sequence[float], errors: Sequence[float]) -> float:
    """max over alpha of E(alpha) - (E(0) + E(1)) / 2 (Frankle et al. 2020); ``nan`` when any value is non-finite."""
    curve, e0, e1 = _curve(alphas, errors)
    if _undefined(curve):
        return math.nan
    return max(e for _, e in curve) - 0.5 * (e0 + e1)


def is_matching(error: float, dense_error: float, tolerance: float) -> bool:
    """A sparse network is *matching* when its error is at most the dense (level-0) error plus ``tolerance``."""
    return error <= dense_error + tolerance


def classification_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of the batch whose arg-max class is not the target (targets are class indices)."""
    return (outputs.argmax(dim=1) != targets).double().mean()


def _on(device: torch.device, value: torch.Tensor | float) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float64, device=device)


def _model_device(model: nn.Module) -> torch.device:
    return next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device


class ClassificationScorer:
    """``evaluate(model) -> {'error', 'loss'}`` for a plain module on fixed ``(inputs, targets)`` batches.

    Sample-weighted means of ``error_fn`` and ``loss_fn`` (both ``(outputs, targets) -> batch mean``; default arg-max
    error and cross-entropy) of ``model(inputs)`` in eval mode; inputs and targets are moved to ``device`` (default:
    the model's). ``samples`` holds the sample count of the last call. Raises ``ValueError`` when no sample was seen.
    """

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], error_fn: Scorer = classification_error,
                 loss_fn: Scorer = F.cross_entropy, device: torch.device | str | None = None):
        self.batches, self.error_fn, self.loss_fn = batches, error_fn, loss_fn
        self.device = None if device is None else torch.device(device)
        self.samples = 0

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        device = self.device or _model_device(model)
        errors, losses, sizes = [], [], []
        with training_mode(model, False):
            for inputs, targets in self.batches:
                targets = targets.to(device)
                outputs = model(inputs.to(device))
                # Per-batch values stay on the device, unsummed: no host sync and no extra kernels per batch.
                errors.append(_on(device, self.error_fn(outputs, targets)))
                losses.append(_on(device, self.loss_fn(outputs, targets)))
                sizes.append(float(targets.shape[0]))
        self.samples = int(sum(sizes))
        if not sizes or self.samples == 0:
            raise ValueError('dataloader: yielded no samples; the barrier needs a non-empty, re-iterable dataloader')
        weights = torch.tensor(sizes, dtype=torch.float64, device=device)
        error, loss = (float(torch.stack(values).double() @ weights) / self.samples for values in (errors, losses))
        return {'error': error, 'loss': loss}


def metric_curve(model: nn.Module, state_a: Mapping[str, Any], state_b: Mapping[str, Any],
                 alphas: int | Sequence[float] | None, evaluate: Evaluate,
                 recalibrate: Callable[[nn.Module], Any] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` at every alpha of the path from ``state_a`` to ``state_b``, writing the weights in place.

    ``evaluate(model) -> {name: value}`` scores the weights currently in ``model``; every value is *lower is better*
    (an error, a loss), so each barrier is how much worse the path gets than its endpoints. ``recalibrate(model)``, if
    given, runs after each point is loaded and before it is scored (BatchNorm re-estimation). Leaves the last point
    (alpha = 1) in ``model``. Returns ``{'alphas', 'values', 'barrier_linear', 'barrier_max_minus_mean'}``, the last
    three keyed by value name: ``values[name]`` is the curve, the barriers are floats.

    Non-finite values: a point whose weights or buffers (after ``recalibrate``) hold NaN or inf scores ``nan`` for
    every value -- an arg-max error of NaN logits is a finite number that means nothing -- and a barrier over a curve
    with any non-finite value is ``nan`` (undefined). Interpolation propagates NaN: with NaN in one endpoint, every
    point is NaN (``lerp`` computes ``a + alpha * (b - a)``), so the whole curve and both barriers are ``nan``.
    """
    grid = alpha_grid(alphas)
    check_endpoints(state_a, state_b, model)
    values: dict[str, list[float]] = {}
    for alpha in grid:
        load_interpolated_(model, state_a, state_b, alpha)
        if recalibrate is not None:
            recalibrate(model)
        finite = _finite_state(model)
        for name, value in evaluate(model).items():
            values.setdefault(name, []).append(float(value) if finite else math.nan)
    return {
        'alphas': grid,
        'values': values,
        'barrier_linear': {name: barrier_linear(grid, curve) for name, curve in values.items()},
        'barrier_max_minus_mean': {name: barrier_max_minus_mean(grid, curve) for name, curve in values.items()},
    }


def _finite_state(model: nn.Module) -> bool:
    """Whether every floating parameter and buffer of ``model`` is finite (one host sync per point; with sharded
    parameters, one all-reduce, so every rank gets the same answer)."""
    tensors = [t for t in local_state(model).values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    bad = int(torch.stack([torch.count_nonzero(~torch.isfinite(t)) for t in tensors]).sum()) if tensors else 0
    return global_sum([bad], is_sharded(model))[0] == 0


def _check_not_empty(name: str, loader: Iterable[Any]) -> None:
    try:
        empty = len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        return  # no length: an empty pass raises in ClassificationScorer instead
    if empty:
        raise ValueError(f'{name}: is empty; it must yield at least one batch')


@torch.no_grad()
def error_barrier(model: nn.Module, state_a: Mapping[str, Any], state_b: Mapping[str, Any],
                  dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]], alphas: int | Sequence[float] | None = None,
                  bn: str = 'interpolate', bn_loader: Iterable[Any] | None = None, bn_batches: int = 16,
                  device: torch.device | str | None = None, error_fn: Scorer = classification_error,
                  loss_fn: Scorer = F.cross_entropy) -> dict[str, Any]:
    """Error and loss along w(alpha) = (1 - alpha) * state_a + alpha * state_b, and both barriers.

    Args:
        model: a plain module with the architecture of both state dicts; its own weights and train/eval flags are
            restored afterwards. Evaluated in eval mode without gradients.
        state_a, state_b: full state dicts (weights, biases, norm parameters, running statistics) of the endpoints.
        dataloader: re-iterable ``(inputs, targets)`` batches (a ``DataLoader`` or a list); iterated once per alpha.
        alphas: ``None`` (11 evenly spaced points), a number of evenly spaced points, or explicit values in [0, 1]
            including 0 and 1.
        bn: ``'interpolate'`` keeps the interpolated BatchNorm statistics; ``'recompute'`` re-estimates them at every
            alpha on ``bn_batches`` batches of ``bn_loader`` (train data), in train mode (no-op without BatchNorm).
        device: where batches are moved (default: the model's device; the model itself is not moved).
        error_fn, loss_fn: ``(outputs, targets) -> batch mean``; default fraction misclassified and cross-entropy.

    Returns ``{'alphas', 'errors', 'losses', 'barrier_linear', 'barrier_max_minus_mean'}``; errors and barriers are
    fractions. Every bad input raises ``ValueError`` naming the argument before anything is evaluated.
    """
    grid = alpha_grid(alphas)
    check_endpoints(state_a, state_b, model)
    if bn not in BN_MODES:
        raise ValueError(f'bn: {bn!r} is not allowed; use one of {BN_MODES}')
    _check_not_empty('dataloader', dataloader)
    if bn == 'recompute':
        if bn_loader is None:
            raise ValueError("bn_loader: bn='recompute' needs training batches to re-estimate BatchNorm statistics")
        if bn_batches < 1:
            raise ValueError(f'bn_batches: {bn_batches} is not allowed; use at least 1 batch')
        _check_not_empty('bn_loader', bn_loader)

    device = torch.device(device) if device is not None else _model_device(model)
    reference = model.state_dict()
    # Endpoints once on the model's device and dtype, so no point of the path allocates a tensor.
    state_a, state_b = ({k: v.to(reference[k]) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                        for s in (state_a, state_b))

    def recalibrate(probe: nn.Module) -> None:
        recompute_batchnorm(probe, itertools.islice(bn_loader, bn_batches), lambda m, batch: m(batch[0].to(device)))

    original = snapshot(model)
    try:
        curve = metric_curve(model, state_a, state_b, grid, ClassificationScorer(dataloader, error_fn, loss_fn, device),
                             recalibrate if bn == 'recompute' else None)
    finally:
        rewind(model, original)
    return {'alphas': curve['alphas'], 'errors': curve['values']['error'], 'losses': curve['values']['loss'],
            'barrier_linear': curve['barrier_linear']['error'],
            'barrier_max_minus_mean': curve['barrier_max_minus_mean']['error']}

"""Points on the straight line between two networks, and BatchNorm re-estimation. Pure torch, no Composer.

The path is w(alpha) = (1 - alpha) * w_a + alpha * w_b over the *whole* state_dict: weights, biases, normalization
affine parameters and BatchNorm running statistics. Integer and bool entries (``num_batches_tracked``) are copied from
``state_a``: they cannot be interpolated and nothing in evaluation mode reads them. ``alpha`` here is the interpolation
coefficient (science.md calls it gamma and keeps alpha for the kept fraction per level).
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from composer_imp.functional.shards import local_state

__all__ = ['check_endpoints', 'interpolate_state', 'load_interpolated_', 'recompute_batchnorm', 'training_mode']


def check_endpoints(state_a: Mapping[str, Any], state_b: Mapping[str, Any], model: nn.Module | None = None) -> None:
    """Raise ``ValueError`` unless the two state dicts (and ``model``'s, if given) have the same keys and shapes."""
    pairs = [('state_b', state_b)] + ([('model', local_state(model))] if model is not None else [])
    for label, other in pairs:
        if set(other) != set(state_a):
            missing, extra = sorted(set(state_a) - set(other)), sorted(set(other) - set(state_a))
            raise ValueError(f'{label}: keys do not match state_a (missing {missing}, unexpected {extra})')
        for name, a in state_a.items():
            b = other[name]
            if isinstance(a, torch.Tensor) and (not isinstance(b, torch.Tensor) or b.shape != a.shape):
                shape_b = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f'{label}[{name!r}]: shape {shape_b} does not match state_a {tuple(a.shape)}')


def _interpolable(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_floating_point()


@torch.no_grad()
def interpolate_state(state_a: Mapping[str, Any], state_b: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """A new state dict at ``alpha`` on the line from ``state_a`` (alpha = 0) to ``state_b`` (alpha = 1).

    Floating tensors are ``torch.lerp(a, b, alpha)``, exact at both ends; everything else is copied from ``state_a``.
    Allocates one new state dict; to evaluate many points, use :func:`load_interpolated_` instead.
    """
    check_endpoints(state_a, state_b)
    point = {}
    for name, a in state_a.items():
        if _interpolable(a):
            point[name] = torch.lerp(a, state_b[name].to(a), alpha)
        else:
            point[name] = a.clone() if isinstance(a, torch.Tensor) else a
    return point


@torch.no_grad()
def load_interpolated_(model: nn.Module, state_a: Mapping[str, Any], state_b: Mapping[str, Any], alpha: float) -> None:
    """Write the point at ``alpha`` into ``model``'s own parameters and buffers, in place (no new state dict).

    Same values as :func:`interpolate_state`. Keep both endpoints on the model's device and dtype (as
    :func:`~composer_imp.functional.error_barrier` does) and no tensor is allocated. Of a model with sharded parameters,
    the endpoints hold this rank's shards (``shards.local``).
    """
    check_endpoints(state_a, state_b, model)
    for name, target in local_state(model).items():
        a, b = state_a[name], state_b[name]
        if not isinstance(target, torch.Tensor):
            continue  # a module's ``_extra_state``: not part of the path
        target.copy_(a)
        if target.is_floating_point():
            target.lerp_(b.to(target), alpha)


def _forward_inputs(model: nn.Module, batch: Any) -> Any:
    """Default forward for ``(inputs, targets)`` batches: ``model(inputs)`` on the model's device."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    device = next(iter(model.parameters()), torch.empty(0)).device
    return model(inputs.to(device))


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[Any],
                        forward: Callable[[nn.Module, Any], Any] | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance of ``model`` on ``batches``; returns the batch count.

    Resets the running statistics, switches each BatchNorm to a cumulative average (``momentum=None``, so every batch
    weighs the same), runs ``forward(model, batch)`` for each batch in train mode without gradients, then restores
    each BatchNorm's momentum and every submodule's training flag. Pass ``itertools.islice(loader, n)`` for ``n``
    batches. ``forward`` defaults to ``model(inputs)`` for ``(inputs, targets)`` batches; a ComposerModel takes the
    whole batch (``lambda m, b: m(b)``). A model without BatchNorm is left untouched (returns 0). Raises
    ``ValueError`` on an empty ``batches``, before touching the statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError('batches: empty; BatchNorm statistics need at least one batch')
    forward = forward or _forward_inputs
    momenta = [m.momentum for m in norms]
    count = 0
    with training_mode(model, True):
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        try:
            for batch in itertools.chain([first], iterator):
                forward(model, batch)
                count += 1
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
    return count


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put ``model`` in train (``True``) or eval mode for a block, then give every submodule its own flag back."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in modes:
            module.training = flag

"""Rewind points: snapshots of a module's full state and of optimizer state, restored in place, and where such copies
live (``OFFLOAD``: in host memory, pinned when CUDA is available, or on the training device). Pure torch."""
from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from composer_imp.functional.masks import apply_masks
from composer_imp.functional.shards import local, local_state, sharded_like

__all__ = ['OFFLOAD', 'snapshot', 'rewind', 'snapshot_optimizer', 'rewind_optimizer', 'stored_copy', 'move_module_']

#: Where IMP keeps the copies it needs only at level transitions: ``'cpu'`` (host memory, pinned when CUDA is
#: available, streamed to the device at a transition) or ``'device'`` (beside the model: no copies at transitions).
OFFLOAD = ('cpu', 'device')


def _pinned() -> bool:
    return torch.cuda.is_available()


def _stored_tensor(tensor: torch.Tensor, offload: str, device: torch.device | str | None) -> torch.Tensor:
    tensor = local(tensor.detach())  # a sharded tensor keeps this rank's shard
    if offload == 'device':
        return tensor.to(device=device, copy=True)
    # One copy straight into (pinned) host memory: no transient copy on the device.
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=_pinned()).copy_(tensor)


def stored_copy(obj: Any, offload: str, device: torch.device | str | None = None) -> Any:
    """A copy of ``obj`` (a tensor, or dicts/lists/tuples holding tensors and plain values) whose tensors live where
    ``offload`` says (``OFFLOAD``; ``'device'``: on ``device``, default each tensor's own); never aliased with
    ``obj``'s tensors. Of a sharded (``DTensor``) tensor, this rank's shard is copied (``shards.local``)."""
    if offload not in OFFLOAD:
        raise ValueError(f'offload: {offload!r} is not allowed; use one of {OFFLOAD}')
    if isinstance(obj, torch.Tensor):
        return _stored_tensor(obj, offload, device)
    if isinstance(obj, Mapping):
        return {k: stored_copy(v, offload, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(stored_copy(v, offload, device) for v in obj)
    return copy.deepcopy(obj)


@torch.no_grad()
def move_module_(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to(device)`` in place; on the host, its parameters and buffers go to pinned memory when CUDA is
    available, so moving it back to the device at the next use is a fast copy."""
    module.to(device)
    if torch.device(device).type == 'cpu' and _pinned():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if not tensor.is_pinned():
                tensor.data = tensor.data.pin_memory()
    return module


@torch.no_grad()
def snapshot(model: nn.Module, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A detached copy of ``model.state_dict()``: weights, biases, normalization parameters and running statistics.

    Cloned, never aliased: later training cannot change a snapshot (BERT-Tickets#19). Of sharded parameters, this
    rank's shards (``shards.local``).
    """
    return {name: t.detach().to(device=device, copy=True) for name, t in local_state(model).items()}


@torch.no_grad()
def rewind(model: nn.Module, rewind_point: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None) -> None:
    """Copy ``rewind_point`` into ``model`` in place, then prune it with ``masks``.

    In place (``copy_``) so that optimizers, DDP and anything else holding the parameters keep working. A tied tensor
    (one tensor under several ``state_dict`` keys) is copied once; its entries must be equal. Of sharded parameters,
    ``rewind_point`` and ``masks`` hold this rank's shards (``shards.local``).
    Raises ``ValueError`` when the keys or shapes do not fit the model.
    """
    state = local_state(model)
    if set(state) != set(rewind_point):
        missing, extra = sorted(set(state) - set(rewind_point)), sorted(set(rewind_point) - set(state))
        raise ValueError(f'rewind point: keys do not match the model (missing {missing}, unexpected {extra})')
    first_key = {}
    for name, target in state.items():
        source = rewind_point[name]
        if source.shape != target.shape:
            raise ValueError(
                f'rewind point[{name!r}]: shape {tuple(source.shape)} does not match the model {tuple(target.shape)}')
        tied_to = first_key.setdefault(id(target), name)
        if tied_to == name:
            target.copy_(source)
        elif not torch.equal(source, rewind_point[tied_to]):
            # copying both would silently leave whichever came last
            raise ValueError(f'rewind point[{name!r}]: differs from {tied_to!r}, which is the same tensor in the model')
    if masks is not None:
        apply_masks(model, masks)


def snapshot_optimizer(optimizer: torch.optim.Optimizer, offload: str = 'device') -> dict[str, Any]:
    """A deep copy of ``optimizer.state_dict()`` (momentum buffers, Adam moments, learning rates), its tensors where
    ``offload`` says (``OFFLOAD``); ``load_state_dict`` moves them back beside their parameters."""
    return stored_copy(optimizer.state_dict(), offload)


@torch.no_grad()
def rewind_optimizer(optimizer: torch.optim.Optimizer, optimizer_snapshot: Mapping[str, Any] | None,
                     masks_by_param: Mapping[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Restore ``optimizer_snapshot`` in place, or clear the optimizer state when it is ``None``.

    ``masks_by_param`` (parameter -> bool mask) zeroes the restored per-weight state of pruned weights, so momentum
    saved before pruning cannot push them (it would be undone at the next mask, but it would be wasted work).
    A sharded parameter's state was snapshotted as this rank's shard; it is restored as a ``DTensor`` laid out as
    the parameter, and its mask is this rank's shard.
    """
    if optimizer_snapshot is None:
        optimizer.state.clear()
        return
    optimizer.load_state_dict(copy.deepcopy(dict(optimizer_snapshot)))
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor) and local(value) is value and value.shape == local(param).shape:
                param_state[key] = sharded_like(value, param)  # unchanged unless the parameter is sharded
    for param, mask in (masks_by_param or {}).items():
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and local(value).shape == mask.shape:
                local(value).masked_fill_(~mask, 0)

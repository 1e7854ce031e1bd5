"""Local views of a model whose parameters may be sharded (FSDP2's ``fully_shard``: ``DTensor`` parameters). Pure torch.

IMP's masks, rewind points and stored states are *local*: for a ``DTensor`` parameter they hold this rank's shard
(``to_local()``, a view of the parameter's own storage), for a plain tensor the tensor itself. Every function of the
functional core that reads or writes a model goes through :func:`local_state` / :func:`local_parameters`, so on one
device or under DDP nothing changes, and under FSDP2 the same code works shard by shard without gathering a weight.

Why not keep DTensor masks and let DTensor dispatch do the work: a reduction of a sharded DTensor converted to a Python
number (``int(mask.sum())``, ``bool(mask.all())``) silently gives the *local* value, and several ops IMP needs
(``count_nonzero``, ``masked_fill_``) have no sharding rule. Local tensors with explicit all-reduces
(:func:`global_sum`) make every cross-rank number visible in the code.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

__all__ = ['local', 'reshard', 'is_sharded', 'local_parameters', 'local_state', 'global_sum', 'full_tensor',
           'full_state', 'sharded_like']


def local(tensor: Any) -> Any:
    """This rank's part of ``tensor``: its local shard for a ``DTensor`` (sharing its storage), else ``tensor``."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def reshard(module: nn.Module) -> nn.Module:
    """Put every FSDP2 unit of ``module`` back in its sharded state; returns ``module``. FSDP2 keeps the *root* unit's
    parameters gathered after a forward pass that no backward follows (evaluation), and while they are, its
    ``named_parameters()`` are whole plain tensors. A no-op for a module without FSDP2."""
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    return module


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP2 units or ``DTensor`` parameters (sharded by FSDP2 or tensor parallelism)."""
    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        isinstance(p, DTensor) for p in module.parameters())


def local_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """``named_parameters()`` as local views (see :func:`local`), after :func:`reshard`."""
    return {name: local(p) for name, p in reshard(module).named_parameters()}


def local_state(module: nn.Module) -> dict[str, Any]:
    """``state_dict(keep_vars=True)`` as local views, after :func:`reshard`: writing into them writes into the
    module."""
    return {name: local(t) for name, t in reshard(module).state_dict(keep_vars=True).items()}


def global_sum(counts: list[int], sharded: bool, group=None) -> list[int]:
    """The element-wise sum of ``counts`` over all ranks when ``sharded`` (one all-reduce), else ``counts``."""
    if not sharded or not torch_dist.is_available() or not torch_dist.is_initialized():
        return list(counts)
    total = torch.tensor(counts, dtype=torch.int64)
    torch_dist.all_reduce(total, group=group)
    return total.tolist()


def sharded_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (this rank's part of a tensor sharded as ``like``) as a ``DTensor`` with ``like``'s layout; a plain
    tensor when ``like`` is plain."""
    if not isinstance(like, DTensor):
        return tensor
    return DTensor.from_local(tensor.to(like.device_mesh.device_type), like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride(), run_check=False)


def full_tensor(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose local part is ``tensor``, sharded as ``like`` (collective on ``like``'s mesh), on the
    CPU; ``tensor`` itself on the CPU when ``like`` is plain. Bool tensors travel as uint8."""
    if not isinstance(like, DTensor):
        return tensor.detach().cpu()
    dtype = tensor.dtype
    carried = tensor.to(torch.uint8) if dtype == torch.bool else tensor
    return sharded_like(carried.detach(), like).full_tensor().cpu().to(dtype)


def full_state(tensors: Mapping[str, torch.Tensor], model_state: Mapping[str, Any],
               keep: bool = True) -> dict[str, torch.Tensor] | None:
    """:func:`full_tensor` of every entry of ``tensors`` (local parts), laid out as ``model_state``'s entries, one at a
    time (collective: every rank calls it); ``keep=False`` (the ranks that do not write them) drops each whole tensor
    at once and returns ``None``."""
    whole = {}
    for name, tensor in tensors.items():
        gathered = full_tensor(tensor, model_state[name])
        if keep:
            whole[name] = gathered
    return whole if keep else None

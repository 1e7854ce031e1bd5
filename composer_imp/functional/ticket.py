"""Tickets on disk: the folder layout IMP writes, and ``load_ticket`` to restore one. Pure torch.

Layout of an IMP folder::

    rewind_point.pt          full state_dict at the rewind step k (shared by every level)
    levels.jsonl             one JSON line of metrics per trained level (rejected attempts included)
    level_<L>/mask.pt        {'level', 'density', 'masks'}: the mask level L was trained under
    level_<L>/trained.pt     state_dict of level L's trained network

A *ticket* is (mask of level L, rewind point): training it from step k reproduces level L.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from composer_imp.functional.masks import apply_masks, density
from composer_imp.functional.rewind import rewind

__all__ = ['REWIND_POINT_FILE', 'LEVELS_FILE', 'level_dir', 'save_level', 'save_rewind_point', 'load_ticket']

REWIND_POINT_FILE = 'rewind_point.pt'
LEVELS_FILE = 'levels.jsonl'


def level_dir(folder: str, level: int) -> str:
    return os.path.join(folder, f'level_{level}')


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu() for name, t in tensors.items()}


def save_rewind_point(folder: str, rewind_point: dict[str, torch.Tensor], rewind_batch: int) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, REWIND_POINT_FILE)
    torch.save({'rewind_batch': rewind_batch, 'state_dict': _cpu(rewind_point)}, path)
    return path


def save_level(folder: str, level: int, masks: dict[str, torch.Tensor], trained_state: dict[str, torch.Tensor]) -> str:
    path = level_dir(folder, level)
    os.makedirs(path, exist_ok=True)
    torch.save({'level': level, 'density': density(masks), 'masks': _cpu(masks)}, os.path.join(path, 'mask.pt'))
    torch.save(_cpu(trained_state), os.path.join(path, 'trained.pt'))
    return path


def load_ticket(path: str, model: nn.Module | None = None) -> dict[str, Any]:
    """Load the ticket of a level folder (``.../level_<L>``) and, if ``model`` is given, rewind it to the ticket.

    Returns ``{'level', 'density', 'masks', 'rewind_point', 'rewind_batch'}``. The model gets the rewind point with the
    mask applied (pruned weights exactly 0). Raises ``ValueError`` naming the file when it is missing or does not fit.
    """
    mask_path = os.path.join(path, 'mask.pt')
    rewind_path = os.path.join(os.path.dirname(os.path.normpath(path)), REWIND_POINT_FILE)
    for required in (mask_path, rewind_path):
        if not os.path.isfile(required):
            raise ValueError(f'path: {required} does not exist; pass a level folder (.../imp/level_<L>) written by IMP')
    mask_file = torch.load(mask_path, map_location='cpu', weights_only=True)
    rewind_file = torch.load(rewind_path, map_location='cpu', weights_only=True)
    ticket = {
        'level': mask_file['level'],
        'density': mask_file['density'],
        'masks': mask_file['masks'],
        'rewind_point': rewind_file['state_dict'],
        'rewind_batch': rewind_file['rewind_batch'],
    }
    if model is not None:
        params = dict(model.named_parameters())
        for name, mask in ticket['masks'].items():
            if name not in params or params[name].shape != mask.shape:
                raise ValueError(f'{mask_path}: mask {name!r} {tuple(mask.shape)} does not fit the model '
                                 f'({tuple(params[name].shape) if name in params else "no such parameter"})')
        rewind(model, ticket['rewind_point'])
        apply_masks(model, {n: m.to(params[n].device) for n, m in ticket['masks'].items()})
    return ticket

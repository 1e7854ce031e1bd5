"""Non-finite values end an IMP run: the checks IMP runs, and the error they raise.

A level whose loss or weights became NaN or inf has no ticket: magnitudes of NaN have no order (a mask computed from
them is arbitrary), and a barrier through NaN weights is undefined (an arg-max error of NaN logits is a finite number
that means nothing). Ending the run loudly, naming the level and the step, is the only honest outcome; the files of
levels that finished before stay as they are.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import torch

__all__ = ['NonFiniteError', 'non_finite_losses', 'non_finite_tensors', 'non_finite_message']


class NonFiniteError(FloatingPointError):
    """The training loss or the weights of an IMP level became NaN or inf; the run stops (see the method card)."""


def non_finite_losses(total_loss_dict: Optional[Mapping[str, Any]]) -> dict[str, float]:
    """The non-finite entries of Composer's ``state.total_loss_dict``, which holds Python floats at ``BATCH_END``
    (the Trainer already synced them to log them), so the check costs no device synchronisation."""
    bad = {}
    for name, value in (total_loss_dict or {}).items():
        value = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(value):
            bad[name] = value
    return bad


def non_finite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating tensors of a state_dict holding NaN or inf: one ``isfinite`` pass each, one host sync."""
    floats = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t).all().cpu() for t in floats.values()]).tolist()
    return [name for name, ok in zip(floats, finite) if not ok]


def non_finite_message(what: str, level: int, step: int, plan: Mapping[str, Any], folder: Optional[str]) -> str:
    """One line: what is not finite, where (level, level-local step), what happens and what to do."""
    first = 1 if level == 0 else plan['rewind_batch'] + 1
    kept = (f'the files of levels 0..{level - 1} in {folder} stay' if level > 0 and folder else
            'no level had finished, so no ticket was written')
    return (f'IMP: {what} at level {level}, step {step} (this level trains steps {first}..{plan["schedule_batches"]} '
            f'of the schedule); a level trained on NaN/inf has no ticket, so the run stops instead of computing masks '
            f'or barriers from it ({kept}). Lower the learning rate, add warmup or gradient clipping '
            "(algorithms: {gradient_clipping: ...}), or check the data and the model's loss")

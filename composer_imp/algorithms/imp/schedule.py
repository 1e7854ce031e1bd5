"""Level-relative learning-rate schedules.

Every IMP level replays the dense schedule from the rewind step k to T. Composer schedulers are stateless functions of
``state.timestamp``, ``state.max_duration`` and ``state.dataloader_len``, so each compiled scheduler is handed a view in
which time is the level's local time (k at a pruned level's first batch) and ``max_duration`` is the user's one-level
duration T -- which also keeps ``'dur'`` units meaning fractions of T. Native PyTorch schedulers keep their own step
counter; IMP restores their ``state_dict`` (and the learning rates) as they were at step k.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from composer.core import State, Time, Timestamp
from torch.optim.lr_scheduler import LambdaLR

__all__ = ['LevelView', 'make_level_relative']


class LevelView:
    """What a Composer scheduler reads from ``State``, in the current level's local time."""

    def __init__(self, timestamp: Timestamp, max_duration: Time, dataloader_len: Time | None):
        self.timestamp = timestamp
        self.max_duration = max_duration
        self.dataloader_len = dataloader_len

    def get_elapsed_duration(self) -> Time[float]:
        return self.timestamp.get(self.max_duration.unit) / self.max_duration


def make_level_relative(state: State, view: Callable[[], LevelView]) -> int:
    """Point every compiled Composer scheduler of ``state`` at ``view()``; returns how many were rewired (idempotent)."""
    rewired = 0
    for scheduler in state.schedulers:
        if not isinstance(scheduler, LambdaLR):
            continue
        for index, fn in enumerate(scheduler.lr_lambdas):
            if getattr(fn, 'imp_level_relative', False):
                rewired += 1
                continue
            cells = _closure(fn)
            if fn.__qualname__ != 'compile_composer_scheduler.<locals>.scheduler_fn' or 'scheduler' not in cells:
                continue
            scheduler.lr_lambdas[index] = _level_relative_fn(cells['scheduler'], cells['ssr'], view)
            rewired += 1
    return rewired


def _closure(fn: Any) -> dict[str, Any]:
    code, closure = getattr(fn, '__code__', None), getattr(fn, '__closure__', None)
    if code is None or closure is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, closure)}


def _level_relative_fn(composer_scheduler: Callable, ssr: float, view: Callable[[], LevelView]) -> Callable[[int], float]:
    takes_ssr = len(inspect.signature(composer_scheduler).parameters) > 1

    # A plain function, not a callable object: LambdaLR.state_dict() would pickle an object's __dict__.
    def level_relative_fn(epoch: int) -> float:
        del epoch
        return composer_scheduler(view(), ssr) if takes_ssr else composer_scheduler(view())

    level_relative_fn.imp_level_relative = True  # type: ignore[attr-defined]
    return level_relative_fn

"""``LevelTable``: print one row per IMP level as the levels finish (rank 0), above Composer's progress bar, and a
plain progress line within each level (level, density, step in the level, the level's ETA)."""
from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from composer_imp.report.tables import console_header, console_row, level_rows

__all__ = ['LevelTable']


class LevelTable(Callback):
    """Prints the per-level table (level, density, test accuracy, matching, barrier, ...) one row per finished level.

    Rows appear after IMP's level transition and its level-end hooks (the LMC evaluator's barrier included), so they
    hold everything ``levels.jsonl`` holds. ``matching_tolerance`` is used only when no LMC evaluator records
    ``imp/matching``. Written with ``tqdm.write`` so that Composer's progress bar stays intact.

    Within a level it prints a plain progress line (no carriage return: readable in a redirected log, and the only
    sign of life with ``progress_bar=false``) every ``progress_every_seconds`` seconds of wall time or every
    ``progress_every_steps`` steps, whichever comes first (``None`` switches a trigger off)::

        [imp] level 3/10  density 51.20%  step 120/434 of the level (27.6%)  level ETA 0:00:11

    Steps count from the level's start: IMP replays every pruned level from the rewind step k, so the step shown is
    ``batch - k`` of ``T - k`` (level 0: ``batch`` of ``T``); the ETA extrapolates this level's own step rate.
    """

    imp_rewind = False  # what it printed carries across levels; IMP must not replay it with the run

    def __init__(self, matching_tolerance: Optional[float] = None, stream: Optional[TextIO] = None,
                 progress_every_seconds: Optional[float] = 30.0, progress_every_steps: Optional[int] = None):
        if progress_every_seconds is not None and progress_every_seconds <= 0:
            raise ValueError(f'LevelTable: progress_every_seconds must be positive or None, got '
                             f'{progress_every_seconds}')
        if progress_every_steps is not None and int(progress_every_steps) <= 0:
            raise ValueError(f'LevelTable: progress_every_steps must be a positive integer or None, got '
                             f'{progress_every_steps}')
        self.matching_tolerance = matching_tolerance
        self.stream = stream
        self.progress_every_seconds = progress_every_seconds
        self.progress_every_steps = None if progress_every_steps is None else int(progress_every_steps)
        self._printed = 0
        self._level_key: Optional[tuple[int, int]] = None  # (level, trainings finished): a retried level is new
        self._first: tuple[int, float] = (0, 0.0)  # (step in level, time) when the level was first seen
        self._last: tuple[int, float] = (0, 0.0)  # (step in level, time) of the last progress line

    def fit_start(self, state: State, logger: Logger) -> None:
        self._printed = 0  # after a resume, the levels finished before are printed again
        self._level_key = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.progress_every_seconds is None and self.progress_every_steps is None:
            return
        imp = self._imp(state)
        if imp is None or dist.get_global_rank() != 0 or imp.schedule_batches is None:
            return
        line = self.progress_line(state, imp)
        if line is not None:
            self._write([line])

    def progress_line(self, state: State, imp: Any, now: Optional[float] = None) -> Optional[str]:
        """The progress line due at this step, or ``None`` (not due yet, or the level has just started)."""
        now = time.monotonic() if now is None else now
        start = 0 if imp.level == 0 or imp.rewind_batch is None else int(imp.rewind_batch)
        total = max(0, int(imp.schedule_batches) - start)
        step = min(max(0, int(state.timestamp.batch) - start), total)
        key = (imp.level, len(imp.history))
        if key != self._level_key:
            self._level_key, self._first, self._last = key, (step, now), (step, now)
            return None
        due = ((self.progress_every_steps is not None and step - self._last[0] >= self.progress_every_steps) or
               (self.progress_every_seconds is not None and now - self._last[1] >= self.progress_every_seconds))
        if not due or step <= self._last[0]:
            return None
        self._last = (step, now)
        done, elapsed = step - self._first[0], now - self._first[1]
        eta = '?' if done <= 0 or elapsed <= 0 else _clock((total - step) * elapsed / done)
        levels = getattr(imp, 'levels', None)
        level = f'{imp.level}/{levels}' if levels is not None else str(imp.level)
        share = f' ({100 * step / total:.1f}%)' if total else ''
        return (f'[imp] level {level}  density {100 * imp.density:.2f}%  step {step}/{total} of the level{share}  '
                f'level ETA {eta}')

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._print_new(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._print_new(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._print_new(state)

    def state_dict(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def _imp(state: State) -> Any:
        from composer_imp.algorithms.imp import IMP

        return next((a for a in state.algorithms if isinstance(a, IMP)), None)

    def _print_new(self, state: State) -> None:
        imp = self._imp(state)
        if imp is None or dist.get_global_rank() != 0:
            return
        history = imp.history
        if len(history) <= self._printed:
            return
        rows = level_rows(history, self.matching_tolerance)
        lines = [console_header()] if self._printed == 0 else []
        lines += [console_row(row) for row in rows[self._printed:]]
        self._printed = len(history)
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        stream = self.stream or sys.stdout
        try:
            from tqdm.auto import tqdm

            for line in lines:
                tqdm.write(line, file=stream)
        except ImportError:  # pragma: no cover - tqdm comes with Composer
            print('\n'.join(lines), file=stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'

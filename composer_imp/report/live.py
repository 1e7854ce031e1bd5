"""``LevelTable``: print one row per IMP level as the levels finish (rank 0), above Composer's progress bar."""
from __future__ import annotations

import sys
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
    """

    imp_rewind = False  # what it printed carries across levels; IMP must not replay it with the run

    def __init__(self, matching_tolerance: Optional[float] = None, stream: Optional[TextIO] = None):
        self.matching_tolerance = matching_tolerance
        self.stream = stream
        self._printed = 0

    def fit_start(self, state: State, logger: Logger) -> None:
        self._printed = 0  # after a resume, the levels finished before are printed again

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._print_new(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._print_new(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._print_new(state)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def _print_new(self, state: State) -> None:
        from composer_imp.algorithms.imp import IMP

        imp = next((a for a in state.algorithms if isinstance(a, IMP)), None)
        if imp is None or dist.get_global_rank() != 0:
            return
        history = imp.history
        if len(history) <= self._printed:
            return
        rows = level_rows(history, self.matching_tolerance)
        lines = [console_header()] if self._printed == 0 else []
        lines += [console_row(row) for row in rows[self._printed:]]
        self._printed = len(history)
        stream = self.stream or sys.stdout
        try:
            from tqdm.auto import tqdm

            for line in lines:
                tqdm.write(line, file=stream)
        except ImportError:  # pragma: no cover - tqdm comes with Composer
            print('\n'.join(lines), file=stream, flush=True)

"""Per-level and per-layer tables from IMP's level records (``levels.jsonl`` / ``IMP.history``).

One row per trained level, rejected attempts of the adaptive step included. Units: density and accuracy as fractions
in the records, shown in percent; error barriers are absolute errors in the records, shown in percentage points (pp),
barriers on another value (the LMC evaluator's ``lmc/metric``, e.g. the loss) in that value's units.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from composer_imp.functional.barrier import is_matching

__all__ = ['DEFAULT_MATCHING_TOLERANCE', 'accuracy_key', 'level_rows', 'wilson_interval', 'resolution_note', 'markdown_level_table', 'console_header',
           'console_row', 'layer_density_table', 'is_adaptive', 'LEVEL_COLUMNS']

# The LMC evaluator's default: within 0.2 percentage points of the dense error (Frankle et al. 2020).
DEFAULT_MATCHING_TOLERANCE = 0.002

LEVEL_COLUMNS = ['level', 'density', 'test acc', 'vs dense', 'matching', 'barrier', 'connected', 'pruned by', 'steps',
                 'seconds', 'GFLOPs', 'status']


def accuracy_key(records: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """The eval metric reported as test accuracy: ``<label>/MulticlassAccuracy`` when present, else the first key
    naming an accuracy, else the first eval metric."""
    keys: list[str] = []
    for record in records:
        keys += [k for k in (record.get('eval') or {}) if k not in keys]
    for test in (lambda k: k.endswith('/MulticlassAccuracy'), lambda k: 'accuracy' in k.lower(), lambda k: True):
        found = [k for k in keys if test(k)]
        if found:
            return found[0]
    return None


def is_adaptive(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the run's sparsity step chose fractions itself (the adaptive step records a reason and a verdict)."""
    return any('reason' in (r.get('step') or {}) or 'verify' in r for r in records)


def _finite(value: Any) -> Optional[float]:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for z = 1.96) of a proportion ``p`` measured on ``n`` samples."""
    if n <= 0:
        raise ValueError(f'wilson_interval: n must be positive, got {n}')
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def resolution_note(n: int, accuracy: float, tolerance: Optional[float] = None) -> str:
    """What an evaluation set of ``n`` samples can resolve at ``accuracy``: the step, the standard error, the 95%
    half-width of one accuracy and the smallest difference between two levels it resolves (unpaired, 95%)."""
    se = math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n)
    diff = 1.96 * math.sqrt(2) * se
    text = (f'Test accuracy is measured on n = {n:,} samples: it moves in steps of {100 / n:.2g} pp, one level\'s '
            f'accuracy has a standard error of ±{100 * se:.1f} pp at an accuracy of {100 * accuracy:.3g}% (95% interval ±{196 * se:.1f}'
            f' pp, shown in brackets), and two levels differing by less than about {100 * diff:.1f} pp are not '
            f'resolved by this evaluation set (unpaired 95%; the shared test samples make the paired limit '
            f'somewhat smaller).')
    if tolerance is not None and tolerance < diff:
        text += (f' The matching tolerance ε = {100 * tolerance:g} pp is below that: a matching verdict near the '
                 f'edge of the band is within the noise.')
    return text


def level_rows(records: Sequence[Mapping[str, Any]], matching_tolerance: Optional[float] = None,
               eval_samples: Optional[int] = None) -> list[dict]:
    """One dict per record: level, density, accuracy, its 95% Wilson interval (``accuracy_ci``, when the number of
    eval samples is known: the record's ``eval_samples``, else ``eval_samples``), delta to dense, matching, barrier,
    connected, fraction, steps, seconds, flops, accepted, status. ``matching`` is the LMC evaluator's ``imp/matching``
    when recorded, else accuracy >= dense accuracy - ``matching_tolerance`` (default 0.002)."""
    tolerance = DEFAULT_MATCHING_TOLERANCE if matching_tolerance is None else matching_tolerance
    key = accuracy_key(records)
    dense = next((r for r in records if r.get('level') == 0), None)
    dense_acc = _finite((dense or {}).get('eval', {}).get(key)) if key else None
    rows = []
    for record in records:
        acc = _finite((record.get('eval') or {}).get(key)) if key else None
        level = int(record.get('level', 0))
        matching = record.get('imp/matching')
        # Recorded but not finite (NaN on the path or in the level's own value): undefined, shown as such.
        barrier_undefined = 'lmc/barrier' in record and _finite(record.get('lmc/barrier')) is None
        matching_undefined = 'imp/matching' in record and matching is None
        if matching is None and not matching_undefined and level > 0 and acc is not None and dense_acc is not None:
            matching = is_matching(1.0 - acc, 1.0 - dense_acc, tolerance)
        accepted = bool(record.get('accepted', True))
        step = record.get('step') or {}
        verify = record.get('verify') or {}
        if not accepted:
            status = 'rejected (back-off)'
        elif verify.get('outcome') == 'failed_at_p_min':
            status = ('accepted (end of matching range)' if record.get('adaptive/matching_lost') else
                      'accepted (failed verification at the smallest step)')
        else:
            status = 'accepted'
        if record.get('stopped_early'):
            status += ', stopped early'
        n = record.get('eval_samples', eval_samples)
        n = int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n > 0 else None
        rows.append({
            'level': level,
            'density': _finite(record.get('density')),
            'accuracy': acc,
            'eval_samples': n,
            'accuracy_ci': None if acc is None or n is None or not 0 <= acc <= 1 else wilson_interval(acc, n),
            'delta': None if acc is None or dense_acc is None or level == 0 else acc - dense_acc,
            'matching': None if level == 0 else matching,
            'barrier': _finite(record.get('lmc/barrier')),
            'barrier_metric': record.get('lmc/metric', 'error'),
            'connected': record.get('lmc/connected'),
            'barrier_undefined': barrier_undefined,
            'matching_undefined': matching_undefined and level > 0,
            'fraction': _finite(step.get('fraction')),
            'reason': step.get('reason'),
            'steps': record.get('steps'),
            'seconds': _finite(record.get('seconds')),
            'flops': _finite(record.get('flops')),
            'accepted': accepted,
            'final': bool(record.get('final')),
            'status': status,
        })
    return rows


def _pct(value: Optional[float], digits: int = 2) -> str:
    return '—' if value is None else f'{100 * value:.{digits}f}%'


def _pp(value: Optional[float]) -> str:
    return '—' if value is None else f'{100 * value:+.2f} pp'


def _yes(value: Any) -> str:
    return '—' if value is None else ('yes' if value else 'no')


def _cells(row: Mapping[str, Any], with_ci: bool = False) -> list[str]:
    undefined = row.get('barrier_undefined', False)
    if undefined:
        barrier = 'undefined'
    elif row['barrier'] is None:
        barrier = '—'
    elif row.get('barrier_metric', 'error') == 'error':
        barrier = f'{100 * row["barrier"]:.2f} pp'
    else:  # a loss (nats) or another value, in its own units
        barrier = f'{row["barrier"]:.3g} {row["barrier_metric"]}'
    fraction = '—' if row['fraction'] is None else f'{100 * row["fraction"]:.1f}%'
    if row['fraction'] is not None and row.get('reason'):
        fraction += f' ({row["reason"]})'
    accuracy = _pct(row['accuracy'])
    if with_ci and row.get('accuracy_ci') is not None:
        low, high = row['accuracy_ci']
        accuracy += f' [{100 * low:.1f}, {100 * high:.1f}]'
    return [
        str(row['level']),
        _pct(row['density']),
        accuracy,
        _pp(row['delta']),
        'undefined' if row.get('matching_undefined') else _yes(row['matching']),
        barrier,
        'undefined' if undefined else _yes(row['connected']),
        fraction,
        '—' if row['steps'] is None else str(row['steps']),
        '—' if row['seconds'] is None else f'{row["seconds"]:.1f}',
        '—' if row['flops'] is None else f'{row["flops"] / 1e9:.3g}',
        row['status'],
    ]


def markdown_level_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The level table in Markdown; the test accuracy carries its 95% interval ``[low, high]`` (percent) when the
    rows know the number of eval samples."""
    columns = list(LEVEL_COLUMNS)
    if any(row.get('accuracy_ci') is not None for row in rows):
        columns[columns.index('test acc')] = 'test acc [95% CI]'
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for row in rows:
        cells = _cells(row, with_ci=True)
        if not row['accepted']:
            cells = [f'~~{c}~~' if c not in ('—', '') and i < len(cells) - 1 else c for i, c in enumerate(cells)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Rows of formatted cells (for ``Logger.log_table``), in the order of :data:`LEVEL_COLUMNS`."""
    return [_cells(row) for row in rows]


_WIDTHS = [5, 8, 8, 10, 8, 9, 9, 10, 7, 8, 8, 0]


def console_header() -> str:
    return '  '.join(c.rjust(w) if w else c for c, w in zip(LEVEL_COLUMNS, _WIDTHS))


def console_row(row: Mapping[str, Any]) -> str:
    cells = _cells(row)
    cells[7] = cells[7].split(' ')[0]  # the reason goes to the status column in the console
    status = row['status'] + (f', {row["reason"]}' if row.get('reason') else '')
    cells[-1] = status
    return '  '.join(c.rjust(w) if w else c for c, w in zip(cells, _WIDTHS))


def layer_density_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per prunable layer, one column per accepted level (measured density of that layer)."""
    accepted = [r for r in records if r.get('accepted', True) and r.get('layer_density')]
    if not accepted:
        return '_No per-layer densities recorded._'
    layers: list[str] = []
    for record in accepted:
        layers += [name for name in record['layer_density'] if name not in layers]
    header = ['layer'] + [f'L{r["level"]}' for r in accepted]
    lines = ['| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * len(accepted)]
    for name in layers:
        cells = [f'`{name}`'] + [_pct(_finite(r['layer_density'].get(name)), 1) for r in accepted]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('| **all prunable** | ' + ' | '.join(_pct(_finite(r.get('density')), 1) for r in accepted) + ' |')
    return '\n'.join(lines)

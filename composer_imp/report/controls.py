"""The report's section "Does the mask carry the information?": each level's ticket beside its control branches
(``composer-imp branch``: ``level_<L>/branch_*.json``), the successive-solution and rewind-point barriers from the
level records, the perturbation barrier, matching, and the paper's claim (LMC <=> matching) checked per level.

Row L reads level L's record: ``lmc/barrier`` is the barrier between the solutions of levels L-1 and L,
``lmc/rewind_barrier`` (when recorded) the barrier between the pruned rewind points m_{L-1} * theta_k and
m_L * theta_k; the branch columns are the branches of level L's ticket.
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from composer_imp.report.tables import accuracy_key

__all__ = ['load_branches', 'branch_accuracies', 'plot_series', 'claim_line', 'section', 'CLAIM_DENSITY']

CLAIM_DENSITY = 0.5  # the paper's claim is about "higher sparsities": the levels below 50% density

_LABELS = {'random_prune': 'random prune', 'reinit': 'reinit', 'shuffle': 'shuffle'}  # rewind: one label per k'


def load_branches(imp_folder: str, run_dir: str) -> list[dict[str, Any]]:
    """Every branch result written into the run's level folders, with its ``file`` relative to ``run_dir``
    (unreadable files are left out)."""
    results = []
    for path in sorted(glob.glob(os.path.join(glob.escape(imp_folder), 'level_*', 'branch_*.json'))):
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(result, Mapping) and {'kind', 'level', 'seed'} <= set(result):
            results.append({**result, 'file': os.path.relpath(path, run_dir)})
    return results


def _label(result: Mapping[str, Any]) -> str:
    if result['kind'] == 'rewind':
        return f"rewind to {result.get('rewind_to')}ba"
    return _LABELS.get(result['kind'], result['kind'])


def _spread(values: Sequence[float]) -> Optional[dict[str, float]]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {'mean': sum(values) / len(values), 'low': min(values), 'high': max(values), 'n': len(values)}


def branch_accuracies(branches: Sequence[Mapping[str, Any]], key: Optional[str]) -> dict[int, dict[str, dict]]:
    """``{level: {label: {'mean', 'low', 'high', 'n'}}}``: the accuracy ``key`` of each level's branches over seeds
    (``perturbed``: the perturbed copies)."""
    grouped: dict[int, dict[str, list[float]]] = {}
    for result in branches:
        label = 'perturbed' if result['kind'] == 'perturb' else _label(result)
        value = (result.get('eval') or {}).get(key) if key else None
        grouped.setdefault(int(result['level']), {}).setdefault(label, []).append(value)
    return {level: {label: s for label, values in labels.items() if (s := _spread(values)) is not None}
            for level, labels in grouped.items()}


def _perturbation_barriers(branches: Sequence[Mapping[str, Any]]) -> dict[int, dict]:
    """``{level: {'mean', 'low', 'high', 'n', 'metric'}}`` of the perturb branches' max − mean barriers."""
    grouped: dict[int, list[float]] = {}
    metrics: dict[int, str] = {}
    for result in branches:
        if result['kind'] == 'perturb':
            grouped.setdefault(int(result['level']), []).append(result.get('barrier_max_minus_mean'))
            metrics[int(result['level'])] = result.get('metric', 'error')
    return {level: {**s, 'metric': metrics[level]} for level, values in grouped.items()
            if (s := _spread(values)) is not None}


def plot_series(branches: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """``{label: [(density, mean, low, high), ...]}`` of the control branches' accuracies, for
    :func:`composer_imp.report.plots.accuracy_vs_density`."""
    densities = {int(r['level']): float(r['density']) for r in branches if r.get('density') is not None}
    series: dict[str, list] = {}
    for level, labels in sorted(branch_accuracies(branches, accuracy_key(records)).items()):
        for label, s in labels.items():
            if label != 'perturbed' and level in densities:
                series.setdefault(label, []).append((densities[level], s['mean'], s['low'], s['high']))
    return series


def _lmc(row: Mapping[str, Any], threshold: float) -> Optional[bool]:
    if row.get('barrier_metric', 'error') != 'error':
        return None
    if row.get('connected') is not None:
        return bool(row['connected'])
    return None if row.get('barrier') is None else row['barrier'] <= threshold


def claim_line(rows: Sequence[Mapping[str, Any]], threshold: float) -> str:
    """The paper's claim checked on this run: at the levels below 50% density with both a successive-level error
    barrier and a matching verdict, is "barrier <= threshold" the same as "matching"?"""
    checked = [r for r in rows if r['accepted'] and r['level'] > 0 and r['density'] is not None and
               r['density'] < CLAIM_DENSITY and r['matching'] is not None and _lmc(r, threshold) is not None]
    below = f'{100 * CLAIM_DENSITY:g}% density'
    if not checked:
        return (f'LMC ⇔ matching: not checked; no level below {below} has both a successive-level error barrier and '
                'a matching verdict.')
    held = [r for r in checked if _lmc(r, threshold) == bool(r['matching'])]
    failed = [str(r['level']) for r in checked if r not in held]
    return (f'**LMC ⇔ matching held at {len(held)} of {len(checked)} levels below {below}** (LMC: successive-level '
            f'barrier ≤ {100 * threshold:g} pp)' + (f'; it failed at level{"s" if len(failed) > 1 else ""} '
                                                    f'{", ".join(failed)}.' if failed else '.'))


def _accuracy(s: Optional[Mapping[str, float]]) -> str:
    if s is None:
        return '—'
    if s['n'] == 1:
        return f'{100 * s["mean"]:.2f}%'
    return f'{100 * s["mean"]:.2f}% [{100 * s["low"]:.2f}, {100 * s["high"]:.2f}] ({s["n"]})'


def _barrier(value: Any, metric: str = 'error') -> str:
    """A barrier in its units: an error in pp, another value (a loss) as it is."""
    if value is None or isinstance(value, bool):
        return '—'
    try:
        value = float(value)
    except (TypeError, ValueError):
        return '—'
    if not math.isfinite(value):
        return 'undefined'
    return f'{100 * value:.2f} pp' if metric == 'error' else f'{value:.3g} {metric}'


def section(rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
            branches: Sequence[Mapping[str, Any]], threshold: float) -> list[str]:
    """The Markdown lines of the section (empty when the run has no pruned level)."""
    accepted = [r for r in rows if r['accepted']]
    if not any(r['level'] > 0 for r in accepted):
        return []
    by_level = {int(r.get('level', 0)): r for r in records if r.get('accepted', True)}
    accuracies = branch_accuracies(branches, accuracy_key(records))
    perturbation = _perturbation_barriers(branches)
    present = {label for level in accuracies.values() for label in level} - {'perturbed'}
    labels = ['random prune', 'reinit'] + sorted(present - {'random prune', 'reinit'})  # the field's two always shown
    columns = (['level', 'density', 'ticket acc'] + [f'{label} acc' for label in labels] +
               ['solution barrier L−1→L', 'rewind-point barrier L−1→L', 'perturbation barrier', 'matching'])
    lines = ['## Does the mask carry the information?', '',
             'Each level\'s ticket beside its controls (`composer-imp branch`), trained k → T like the level: '
             '**random prune** (a random mask with the ticket\'s per-layer counts), **reinit** (the mask on a fresh '
             'initialisation), **shuffle** (each layer\'s mask permuted), **rewind to k′** (the mask on the weights '
             'of another step). Branch accuracies are the mean over seeds [lowest, highest] (seeds). **solution '
             'barrier**: between the trained levels L−1 and L (linear convention); **rewind-point barrier**: between '
             'the pruned rewind points m_{L−1} ⊙ θ_k and m_L ⊙ θ_k (the LMC evaluator\'s `rewind_barrier: true`; '
             'the train-loss barrier in brackets when measured); **perturbation barrier**: between the level\'s '
             'ticket trained from m_L ⊙ θ_k and from a perturbed copy (norm ‖m_L ⊙ θ_k − m_{L+1} ⊙ θ_k‖, on the '
             'mask), max − mean, mean over seeds [range]. — : not measured.', '',
             '| ' + ' | '.join(columns) + ' |', '|---|' + '---:|' * (len(columns) - 2) + '---|']
    for row in accepted:
        level = row['level']
        record = by_level.get(level, {})
        cells = [str(level), '—' if row['density'] is None else f'{100 * row["density"]:.3g}%',
                 '—' if row['accuracy'] is None else f'{100 * row["accuracy"]:.2f}%']
        cells += [_accuracy(accuracies.get(level, {}).get(label)) for label in labels]
        s = perturbation.get(level)
        metric = row.get('barrier_metric', 'error')
        rewind_point = _barrier(record.get('lmc/rewind_barrier'), metric)
        if record.get('lmc/train/rewind_barrier/loss') is not None:
            rewind_point += f' (train {_barrier(record["lmc/train/rewind_barrier/loss"], "loss")})'
        cells += [
            _barrier(record.get('lmc/barrier'), metric),
            rewind_point,
            '—' if s is None else (_barrier(s['mean'], s['metric']) + ('' if s['n'] == 1 else
                                   f' [{_barrier(s["low"], s["metric"])}, {_barrier(s["high"], s["metric"])}]')),
            '—' if level == 0 or row['matching'] is None else ('yes' if row['matching'] else 'no'),
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', claim_line(rows, threshold), '']
    if branches:
        lines += ['Branch files: ' + ', '.join(f'`{b["file"]}`' for b in branches) + '.', '']
    else:
        lines += ['_No control branches yet: `composer-imp branch RUN_DIR --level L --kind random_prune --seeds 1 2` '
                  '(kinds: random_prune, reinit, shuffle, rewind --rewind-to 0ba, perturb)._', '']
    return lines

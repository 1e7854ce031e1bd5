"""The report's "Maximal pruning ratio" section: the theory's p* (science.md §8) beside the projection check's largest
admissible fractions and the fraction the step used, against density. Reads the ``step`` decisions the adaptive step
writes into ``levels.jsonl`` with ``criterion='hessian'`` or ``hessian_analysis=True``."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from composer_imp.report.plots import _legend_outside, _percent_axis, _save, plt

__all__ = ['hessian_section', 'maximal_pruning_ratio_plot', 'PLOT_FILE']

PLOT_FILE = 'maximal_pruning_ratio.png'


def _points(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One point per step with a Hessian analysis: the parent's density and every fraction (None when unmeasured)."""
    points = []
    for record in records:
        step = record.get('step') or {}
        hessian = step.get('hessian')
        if not hessian:
            continue
        checks = {pruning: step.get(name) for pruning, name in (('magnitude', 'projection'),
                                                                ('random', 'projection_random'))}
        points.append({
            'level': record['level'], 'accepted': record.get('accepted', True),
            'parent_density': step.get('parent_density'), 'lambda_max': hessian['top_eigenvalues'][0],
            'theory_magnitude': hessian['p_star']['magnitude'], 'theory_random': hessian['p_star']['random'],
            'lower_magnitude': hessian['p_star_lower']['magnitude'],
            **{f'admissible_{p}': c['fraction'] if c and c['admissible'] else None for p, c in checks.items()},
            'used': step.get('fraction'),
        })
    return points


_SERIES = (('theory_magnitude', 'p* theory, magnitude R(p)', '-o', 'tab:blue'),
           ('theory_random', 'p* theory, random R(p)', '-s', 'tab:orange'),
           ('admissible_magnitude', 'projection check, magnitude', '--^', 'tab:blue'),
           ('admissible_random', 'projection check, random', '--v', 'tab:orange'),
           ('used', 'fraction used', ':D', 'black'))


def maximal_pruning_ratio_plot(records: Sequence[Mapping[str, Any]], path: str) -> Optional[str]:
    """p* (theory, magnitude and random), the empirical largest admissible fractions and the fraction used, against
    the density of the level they prune; ``None`` when no step recorded a Hessian analysis."""
    points = [p for p in _points(records) if p['parent_density']]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, label, style, color in _SERIES:
        shown = [(p['parent_density'], p[key]) for p in points if p[key] is not None]
        if shown:
            ax.plot(*zip(*shown), style, color=color, ms=4, label=label)
    ax.set_xscale('log')
    ax.invert_xaxis()  # sparser to the right, as in the accuracy plot
    _percent_axis(ax.xaxis)
    _percent_axis(ax.yaxis)
    ax.set_xlabel('density of the level being pruned')
    ax.set_ylabel('fraction of its remaining weights')
    ax.set_title('Maximal pruning ratio per level')
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def _pct(value: Optional[float]) -> str:
    return '—' if value is None else f'{100 * value:.1f}%'


def hessian_section(records: Sequence[Mapping[str, Any]], plot_dir: str, plots_name: str = 'plots') -> list[str]:
    """Markdown lines of the section (with its plot written into ``plot_dir``); none when no step has a Hessian."""
    points = _points(records)
    if not points:
        return []
    lines = ['## Maximal pruning ratio', '',
             'Per step: the top eigenvalue of the probe loss\'s Hessian on the live weights, the theory\'s maximal '
             'pruning ratio p* (Gaussian width of the ε-sublevel set vs the codimension of the pruned subspace; '
             'spectrum by stochastic Lanczos quadrature; "lower": the bulk capped at the last converged top '
             'eigenvalue), and the projection check\'s largest admissible fraction (the pruned network itself within '
             'ε of the loss; — when not even the smallest step was). The theory asks only that the pruned subspace '
             'meets the sublevel set, so it is expected at or above the projection check.', '',
             '| level | pruned from density | λ_max | p* magnitude | p* random | p* magnitude (lower) | '
             'admissible magnitude | admissible random | used |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for p in points:
        level = str(p['level']) if p['accepted'] else f'~~{p["level"]}~~'
        lines.append(f'| {level} | {_pct(p["parent_density"])} | {p["lambda_max"]:.4g} | '
                     f'{_pct(p["theory_magnitude"])} | {_pct(p["theory_random"])} | {_pct(p["lower_magnitude"])} | '
                     f'{_pct(p["admissible_magnitude"])} | {_pct(p["admissible_random"])} | {_pct(p["used"])} |')
    lines.append('')
    plot = maximal_pruning_ratio_plot(records, os.path.join(plot_dir, PLOT_FILE))
    if plot:
        lines += [f'![maximal pruning ratio]({plots_name}/{PLOT_FILE})', '',
                  'Solid: the theory\'s p*; dashed: the projection check\'s largest admissible fraction; dotted: the '
                  'fraction the step pruned (blue: magnitude pruning, orange: random pruning).', '']
    return lines

"""The report's PNG plots (matplotlib, Agg backend: no display needed). Each function writes one file and returns its
path, or ``None`` when the run holds no data for it."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import matplotlib

matplotlib.use('Agg', force=False)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

__all__ = ['accuracy_vs_density', 'barrier_per_level', 'interpolation_paths', 'adaptive_fractions',
           'instability_curve', 'PLOT_FILES']

PLOT_FILES = {
    'accuracy': 'accuracy_vs_density.png',
    'barrier': 'barrier_per_level.png',
    'paths': 'interpolation_paths.png',
    'fraction': 'adaptive_fraction.png',
}

_DPI = 110


def _save(fig: Any, path: str) -> str:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, bbox_inches='tight')  # 'tight' keeps a legend placed outside the axes
    plt.close(fig)
    return path


def _percent_axis(axis: Any) -> None:
    axis.set_major_formatter(FuncFormatter(lambda v, _: f'{100 * v:g}%'))


def _legend_outside(ax: Any, *args: Any, **kwargs: Any) -> Any:
    """The legend to the right of the axes, where it cannot cover a curve or a bar."""
    kwargs.setdefault('fontsize', 8)
    return ax.legend(*args, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def path_values(metric: str, values: Sequence[float]) -> tuple[list[float], str]:
    """A path's curve of ``metric`` (the LMC evaluator's headline value) and its axis label: errors in percent."""
    if metric == 'error':
        return [100 * v for v in values], 'test error (%)'
    return list(values), f'test {metric}'


def accuracy_vs_density(rows: Sequence[Mapping[str, Any]], path: str, tolerance: float,
                        title: str = '', branches: Optional[Mapping[str, Sequence[tuple]]] = None) -> Optional[str]:
    """Test accuracy against density (log axis, sparser to the right) with the dense level-0 band
    [dense - tolerance, dense]: a level inside or above it is matching. ``branches``: control branches to mark,
    ``{label: [(density, mean accuracy, lowest, highest), ...]}`` (:func:`composer_imp.report.controls.plot_series`)."""
    points = [r for r in rows if r['density'] is not None and r['accuracy'] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = next((r for r in points if r['level'] == 0), None)
    if dense is not None:
        ax.axhspan(dense['accuracy'] - tolerance, dense['accuracy'], color='tab:gray', alpha=0.25,
                   label=f'dense (level 0) − ε, ε = {100 * tolerance:g} pp')
        ax.axhline(dense['accuracy'], color='tab:gray', lw=1)
    accepted = [r for r in points if r['accepted']]
    ax.plot([r['density'] for r in accepted], [r['accuracy'] for r in accepted], '-', color='tab:blue', lw=1.5,
            zorder=2)
    sized = [r for r in accepted if r.get('accuracy_ci') is not None]
    if sized:  # the 95% interval of each accuracy (Wilson, from the number of eval samples)
        ax.errorbar([r['density'] for r in sized], [r['accuracy'] for r in sized],
                    yerr=[[r['accuracy'] - r['accuracy_ci'][0] for r in sized],
                          [r['accuracy_ci'][1] - r['accuracy'] for r in sized]],
                    fmt='none', ecolor='tab:blue', alpha=0.5, capsize=3, lw=1, zorder=2,
                    label=f'95% interval (n = {sized[0]["eval_samples"]:,})')
    for matching, style, label in ((True, dict(mfc='tab:blue'), 'matching'),
                                   (False, dict(mfc='white'), 'not matching')):
        chosen = [r for r in accepted if r['level'] > 0 and bool(r['matching']) == matching]
        if chosen:
            ax.plot([r['density'] for r in chosen], [r['accuracy'] for r in chosen], 'o', mec='tab:blue', ms=7,
                    label=label, zorder=3, **style)
    if dense is not None:
        ax.plot([dense['density']], [dense['accuracy']], 's', color='black', ms=7, label='dense', zorder=3)
    rejected = [r for r in points if not r['accepted']]
    if rejected:
        ax.plot([r['density'] for r in rejected], [r['accuracy'] for r in rejected], 'x', color='tab:red', ms=8,
                label='rejected attempt', zorder=3)
    for index, ((label, marks), marker) in enumerate(zip((branches or {}).items(), 'v^D<>Ph*')):
        shift = 1.0 - 0.015 * (index + 1)  # side by side at the ticket's density, not on top of each other
        ax.errorbar([shift * m[0] for m in marks], [m[1] for m in marks], yerr=[[m[1] - m[2] for m in marks],
                    [m[3] - m[1] for m in marks]], fmt=marker, ms=6, capsize=2, lw=1, label=label, zorder=3)
    ax.set_xscale('log')
    ax.invert_xaxis()
    densities = sorted({r['density'] for r in points}, reverse=True)
    ax.set_xticks(densities if len(densities) <= 12 else densities[::max(1, len(densities) // 10)])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{100 * v:.3g}%'))
    ax.tick_params(axis='x', labelrotation=45)
    _percent_axis(ax.yaxis)
    ax.set_xlabel('density (weights remaining, log scale)')
    ax.set_ylabel('test accuracy')
    ax.set_title(title or 'Test accuracy vs density')
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def barrier_per_level(rows: Sequence[Mapping[str, Any]], path: str, threshold: Optional[float] = None) -> Optional[str]:
    """The linear-interpolation barrier between level L-1 and level L, per level; matching levels filled. Error
    barriers in percentage points, barriers on another value (``barrier_metric``, e.g. the loss) in its units."""
    points = [r for r in rows if r['barrier'] is not None]
    if not points:
        return None
    metric = points[0].get('barrier_metric', 'error')
    scale, unit = (100, 'pp') if metric == 'error' else (1, metric)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 + 0.62 * len(points)), 4.0))  # room for each bar's two-line label
    labels = [f'L{r["level"]}\n{100 * r["density"]:.3g}%' + ('\n(rej.)' if not r['accepted'] else '')
              for r in points]
    x = list(range(len(points)))
    colors = ['tab:green' if r['matching'] else 'tab:red' if r['matching'] is not None else 'tab:gray'
              for r in points]
    heights = [scale * r['barrier'] for r in points]
    bars = ax.bar(x, heights, color=colors, edgecolor='black', lw=0.5)
    for bar, row in zip(bars, points):
        if not row['accepted']:
            bar.set_hatch('//')
            bar.set_alpha(0.5)
    if threshold is not None:
        ax.axhline(scale * threshold, color='black', ls='--', lw=1,
                   label=f'connected threshold {scale * threshold:g} {unit}')
    # A zero (or nearly zero) barrier is a bar of no height, which would hide its colour: mark it on the axis.
    top = max([abs(h) for h in heights] + ([scale * threshold] if threshold is not None else []) + [1e-12])
    flat = [i for i, h in enumerate(heights) if abs(h) < 0.02 * top]
    if flat:
        ax.scatter([x[i] for i in flat], [0.0] * len(flat), s=60, marker='o', c=[colors[i] for i in flat],
                   edgecolors='black', linewidths=0.8, zorder=4, clip_on=False)
        ax.set_ylim(bottom=min(ax.get_ylim()[0], -0.04 * top))
    shown = [(c, n) for c, n in (('tab:green', 'matching'), ('tab:red', 'not matching'),
                                 ('tab:gray', 'matching unknown')) if c in colors]
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c, _ in shown]
    names = [n for _, n in shown]
    if flat:
        handles.append(plt.Line2D([], [], ls='', marker='o', mfc='white', mec='black'))
        names.append(f'barrier ≈ 0 {unit} (no bar)')
    extra, extra_names = ax.get_legend_handles_labels()
    _legend_outside(ax, handles + extra, names + extra_names)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(f'{metric} barrier, level L−1 → L ({unit})')
    ax.set_title(f'Successive-level {metric} barrier')
    ax.grid(alpha=0.3, axis='y')
    return _save(fig, path)


def interpolation_paths(records: Sequence[Mapping[str, Any]], path: str) -> Optional[str]:
    """The headline value (test error by default) along the straight line from level L-1's trained network (α = 0)
    to level L's (α = 1)."""
    curves = [r for r in records if isinstance(r.get('lmc/curve'), Mapping) and r['lmc/curve'].get('alphas')]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap('viridis')
    ylabel = ''
    for index, record in enumerate(curves):
        curve = record['lmc/curve']
        ys, ylabel = path_values(record.get('lmc/metric', 'error'), curve[record.get('lmc/metric', 'error')])
        color = cmap(index / max(1, len(curves) - 1))
        style = '-' if record.get('accepted', True) else ':'
        label = f'L{record["level"] - 1}→L{record["level"]} ({100 * float(record["density"]):.3g}%)'
        if not record.get('accepted', True):
            label += ' rejected'
        ax.plot(curve['alphas'], ys, style, marker='.', color=color, label=label)
    ax.set_xlabel('α (0: level L−1 solution, 1: level L solution)')
    ax.set_ylabel(ylabel)
    ax.set_title('Along the linear path between successive levels')
    ax.grid(alpha=0.3)
    _legend_outside(ax, fontsize=7, ncol=2 if len(curves) > 12 else 1)
    return _save(fig, path)


def adaptive_fractions(rows: Sequence[Mapping[str, Any]], path: str, p_min: Optional[float] = None) -> Optional[str]:
    """The fraction of remaining weights each level was pruned by, as chosen by the adaptive step."""
    points = [r for r in rows if r['level'] > 0 and r['fraction'] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = list(range(len(points)))
    colors = ['tab:blue' if r['accepted'] else 'tab:red' for r in points]
    bars = ax.bar(x, [r['fraction'] for r in points], color=colors, edgecolor='black', lw=0.5)
    for bar, row in zip(bars, points):
        if not row['accepted']:
            bar.set_hatch('//')
    if p_min is not None:
        ax.axhline(p_min, color='black', ls='--', lw=1, label=f'fixed step {100 * p_min:g}%')
    ax.set_xticks(x)
    ax.set_xticklabels([f'L{r["level"]}' + ('\nrej.' if not r['accepted'] else '') for r in points], fontsize=7)
    _percent_axis(ax.yaxis)
    ax.set_ylabel('pruned (fraction of remaining weights)')
    rejected = any(not r['accepted'] for r in points)
    ax.set_title('Adaptive step: chosen fraction per level' + (' (red: rejected)' if rejected else ''))
    ax.grid(alpha=0.3, axis='y')
    if p_min is not None:
        _legend_outside(ax)
    return _save(fig, path)


def instability_curve(result: Mapping[str, Any], path: str) -> Optional[str]:
    """The headline value (test error by default) along the path between the two children of an instability
    analysis."""
    if not result.get('alphas'):
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ys, ylabel = path_values(result['metric'], result['values'][result['metric']])
    alphas = list(result['alphas'])
    ax.plot(alphas, ys, '-o', ms=3, label='along the path')
    # The verdict (stable or not) uses the max-minus-mean barrier, the convention for exchangeable endpoints (two
    # SGD-noise copies; Frankle et al. 2020); the linear barrier (above the chord) is quoted beside it.
    ax.plot([alphas[0], alphas[-1]], [ys[0], ys[-1]], ':', color='tab:gray', lw=1, label='chord (linear barrier)')
    ax.axhline((ys[0] + ys[-1]) / 2, color='tab:orange', ls='--', lw=1, label='mean of the endpoints (max − mean)')
    seeds = result.get('seeds', ['?', '?'])
    ax.set_xlabel(f'α (0: child seed {seeds[0]}, 1: child seed {seeds[1]})')
    ax.set_ylabel(ylabel)
    unit = 'pp' if result['metric'] == 'error' else result['metric']
    scale = 100 if result['metric'] == 'error' else 1

    def fmt(value: Any) -> str:
        return 'undefined' if value is None or value != value else f'{scale * value:.2f} {unit}'

    stable = result.get('stable')
    verdict = '' if stable is None else (', stable' if stable else ', not stable')
    ax.set_title(f'Instability, level {result.get("level")}: barrier (max − mean) '
                 f'{fmt(result.get("barrier_max_minus_mean"))}{verdict}\nlinear barrier (above the chord) '
                 f'{fmt(result.get("barrier_linear"))}', fontsize=9)
    ax.grid(alpha=0.3)
    _legend_outside(ax, fontsize=7)
    return _save(fig, path)

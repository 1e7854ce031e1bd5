"""``build_report(run_dir)``: report.md, report.json and PNG plots from a run folder, complete or interrupted.

Reads only files: ``recipe.yaml`` and ``run.json`` (written by ``composer-imp run``; both optional), IMP's
``levels.jsonl`` (``<run_dir>/imp`` or the recipe's ``algorithms.imp.folder``) and any
``level_<L>/instability_seeds_<a>_<b>.json`` written by ``composer-imp instability`` and ``level_<L>/branch_*.json``
written by ``composer-imp branch``.
"""
from __future__ import annotations

import glob
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import yaml

from composer_imp.functional.ticket import LEVELS_FILE, verify_run
from composer_imp.report import controls, hessian, plots, structured
from composer_imp.report.tables import (
    DEFAULT_MATCHING_TOLERANCE,
    LEVEL_COLUMNS,
    accuracy_key,
    is_adaptive,
    layer_density_table,
    level_rows,
    markdown_level_table,
    resolution_note,
    table_rows,
)

__all__ = ['build_report', 'load_run', 'log_report', 'REPORT_FILE', 'PLOTS_DIR', 'RECIPE_FILE', 'RUN_INFO_FILE']

REPORT_FILE = 'report.md'
REPORT_JSON = 'report.json'
PLOTS_DIR = 'plots'
RECIPE_FILE = 'recipe.yaml'
RUN_INFO_FILE = 'run.json'
DEFAULT_BARRIER_THRESHOLD = 0.02  # the LMC evaluator's default: 2 percentage points



_FLOPS_METHODS = {
    'torch-pruning': "counted per layer by torch-pruning's count_ops_and_params",
    'torch-flop-counter': "counted by torch.utils.flop_counter (matrix multiplies and convolutions): torch-pruning "
                          'could not count this model',
    'parameter-count': 'estimated from parameter counts (one MAC per weight and token): neither torch-pruning nor '
                       "torch's FLOP counter could count this model",
}


def _flops_method(records: list[dict]) -> str:
    methods = {r.get('flops_method') for r in records} - {None}
    return '; '.join(_FLOPS_METHODS.get(m, m) for m in sorted(methods)) or 'not counted'

def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def imp_folder(run_dir: str, recipe: Optional[Mapping[str, Any]]) -> str:
    """Where the run's IMP wrote its files: the recipe's ``algorithms.imp.folder`` (relative to the run folder),
    else ``<run_dir>/imp``, else the first folder under the run holding a ``levels.jsonl``."""
    folder = ((recipe or {}).get('algorithms') or {}).get('imp') or {}
    folder = folder.get('folder') if isinstance(folder, Mapping) else None
    candidates = [] if folder is None else [folder if os.path.isabs(folder) else os.path.join(run_dir, folder)]
    candidates.append(os.path.join(run_dir, 'imp'))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, LEVELS_FILE)):
            return candidate
    found = sorted(glob.glob(os.path.join(run_dir, '**', LEVELS_FILE), recursive=True))
    return os.path.dirname(found[0]) if found else candidates[0]


def load_run(run_dir: str) -> dict[str, Any]:
    """Everything the report reads from ``run_dir``: recipe, run info, IMP folder, level records, instability
    results. Raises ``ValueError`` when ``run_dir`` is not a folder."""
    if not os.path.isdir(run_dir):
        raise ValueError(f'run_dir: {run_dir} is not a folder; give the save_folder of a composer-imp run')
    recipe = None
    recipe_path = os.path.join(run_dir, RECIPE_FILE)
    if os.path.isfile(recipe_path):
        try:
            with open(recipe_path) as f:
                recipe = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            recipe = None
    folder = imp_folder(run_dir, recipe)
    # Checksummed lines and per-level manifests (composer_imp.functional.ticket); this import brings torch in.

    checked = verify_run(folder)
    records = checked['records']
    instability = []
    for path in sorted(glob.glob(os.path.join(folder, 'level_*', 'instability_seeds_*.json'))):
        result = _read_json(path)
        if isinstance(result, Mapping):
            instability.append({**result, 'file': os.path.relpath(path, run_dir)})
    return {'run_dir': run_dir, 'recipe': recipe or {}, 'info': _read_json(os.path.join(run_dir, RUN_INFO_FILE)) or {},
            'imp_folder': folder, 'records': records, 'instability': instability,
            'artefacts': {k: checked[k] for k in ('problems', 'damaged_levels', 'missing_levels')}}


# Test-split sizes of the named data sets (composer_imp.data), for the accuracy's confidence interval when the level
# records do not carry their evaluation sample count (``eval_samples``).
_EVAL_SET_SIZES = {'mnist-5k': 1000, 'cifar10': 10000, 'cifar100': 10000, 'imagenet': 50000}


def _eval_samples(recipe: Mapping[str, Any]) -> Optional[int]:
    """The number of test samples behind each level's accuracy, from the recipe's ``eval_loader`` when it names a
    data set of known size without a setting that could shrink it; ``None`` when unknown."""
    loader = recipe.get('eval_loader')
    if not isinstance(loader, Mapping) or loader.get('name') not in _EVAL_SET_SIZES:
        return None
    if loader.get('split', 'test') != 'test' or any(word in str(key) for key in loader
                                                     for word in ('subset', 'samples', 'limit', 'fraction')):
        return None
    return _EVAL_SET_SIZES[loader['name']]


def _settings(recipe: Mapping[str, Any]) -> dict[str, Any]:
    callbacks = recipe.get('callbacks') or {}
    algorithms = recipe.get('algorithms') or {}
    lmc = callbacks.get('lmc_evaluator') if isinstance(callbacks.get('lmc_evaluator'), Mapping) else {}
    imp = algorithms.get('imp') if isinstance(algorithms.get('imp'), Mapping) else {}
    step = algorithms.get('adaptive_sparsity_step')
    step = step if isinstance(step, Mapping) else ({} if 'adaptive_sparsity_step' in algorithms else None)
    return {
        'tolerance': float(lmc.get('matching_tolerance', DEFAULT_MATCHING_TOLERANCE)),
        'threshold': float(lmc.get('threshold', DEFAULT_BARRIER_THRESHOLD)),
        'levels': imp.get('levels'),
        'target_density': imp.get('target_density'),
        'prune_fraction': imp.get('prune_fraction', 0.2),
        'p_min': None if step is None else float(step.get('p_min', 0.2)),
        'has_imp': 'imp' in algorithms,
    }


def _status(run: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> tuple[str, bool]:
    """(one sentence, complete?)."""
    info_status = run['info'].get('status')
    accepted = [r for r in rows if r['accepted']]
    if settings['levels'] is not None:
        planned = int(settings['levels']) + 1
        complete = len(accepted) >= planned
        done = f'{len(accepted)} of {planned} planned levels'
    elif settings['target_density'] is not None:
        target = float(settings['target_density'])
        last = accepted[-1]['density'] if accepted else None
        complete = last is not None and last <= target * (1 + 1e-6)
        done = (f'{len(accepted)} levels, density {100 * last:.3g}% ' if last is not None else '0 levels ') + \
               f'(target {100 * target:.3g}%)'
    else:
        complete = info_status == 'complete'
        done = f'{len(accepted)} levels'
    # IMP marks the run's last level (``final``): a run outside the CLI (llm-foundry's train.py) has no run.json.
    complete = complete or any(r.get('final') for r in rows)
    if complete:
        return f'complete: {done}.', True
    if info_status == 'running':
        return f'interrupted or still running: {done} finished.', False
    return f'interrupted ({info_status or "stopped"}): {done} finished.', False


def _totals(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    from composer_imp.algorithms.adaptive_sparsity import compute_totals

    return compute_totals(records)


def _fixed_equivalent(rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
                      p_min: float) -> Optional[str]:
    """How a fixed ``p_min`` schedule compares with an adaptive run at the same final density."""
    accepted = [r for r in rows if r['accepted'] and r['density']]
    pruned = [r for r in records if r.get('level', 0) > 0]
    if len(accepted) < 2 or not pruned:
        return None
    final = accepted[-1]['density']
    levels = math.ceil(math.log(final) / math.log(1.0 - p_min) - 1e-9)
    level_steps = int(pruned[0].get('steps', 0))
    dense_steps = int(next((r.get('steps', 0) for r in records if r.get('level') == 0), 0))
    fixed_steps = dense_steps + levels * level_steps
    run_steps = sum(int(r.get('steps', 0)) for r in records)
    saving = 1.0 - run_steps / fixed_steps if fixed_steps else 0.0
    return (f'A fixed {100 * p_min:g}% step needs {levels} pruned levels to reach {100 * final:.3g}% density '
            f'({levels + 1} trainings, {fixed_steps} steps); this run trained {len(records)} times '
            f'({sum(1 for r in rows if not r["accepted"])} rejected) in {run_steps} steps: '
            f'{abs(100 * saving):.1f}% {"fewer" if saving >= 0 else "more"} training steps.')


def _barrier_pp(value: Any) -> str:
    """An error barrier in pp; a nan one (a non-finite value on the path) is undefined, not a number."""
    return f'{100 * value:.2f} pp' if value is not None and math.isfinite(value) else 'undefined'


def _stable(value: Any) -> str:
    return 'undefined' if value is None else ('yes' if value else 'no')


def _fmt_seconds(seconds: float) -> str:
    return f'{seconds:.1f} s' if seconds < 120 else f'{seconds / 60:.1f} min'


def build_report(run_dir: str) -> str:
    """Write ``report.md``, ``report.json`` and ``plots/*.png`` into ``run_dir``; returns the path of report.md.

    Works on an interrupted run (whatever ``levels.jsonl`` holds, even nothing). Plots: ``accuracy_vs_density.png``
    (whenever a level finished), ``barrier_per_level.png`` and ``interpolation_paths.png`` (when the LMC evaluator
    ran), ``adaptive_fraction.png`` (when the adaptive step chose the fractions), ``instability_level_<L>.png`` (per
    instability analysis). Raises ``ValueError`` when ``run_dir`` is not a folder.
    """
    run = load_run(run_dir)
    recipe, records = run['recipe'], run['records']
    settings = _settings(recipe)
    rows = level_rows(records, settings['tolerance'], _eval_samples(recipe))
    status, _ = _status(run, rows, settings)
    plot_dir = os.path.join(run_dir, PLOTS_DIR)
    for old in glob.glob(os.path.join(plot_dir, '*.png')):  # a rebuilt report shows only what the data supports now
        os.remove(old)
    name = recipe.get('run_name') or os.path.basename(os.path.normpath(run_dir))
    made: dict[str, Optional[str]] = {}
    branches = controls.load_branches(run['imp_folder'], run_dir)
    if rows:
        made['accuracy'] = plots.accuracy_vs_density(rows, os.path.join(plot_dir, plots.PLOT_FILES['accuracy']),
                                                     settings['tolerance'], title=f'{name}: test accuracy vs density',
                                                     branches=controls.plot_series(branches, records))
        made['barrier'] = plots.barrier_per_level(rows, os.path.join(plot_dir, plots.PLOT_FILES['barrier']),
                                                  settings['threshold'])
        made['paths'] = plots.interpolation_paths(records, os.path.join(plot_dir, plots.PLOT_FILES['paths']))
        if is_adaptive(records):
            made['fraction'] = plots.adaptive_fractions(rows, os.path.join(plot_dir, plots.PLOT_FILES['fraction']),
                                                        settings['p_min'])
    for result in run['instability']:
        seeds = '_'.join(str(s) for s in result.get('seeds', []))
        made[f'instability {result.get("level")} {seeds}'] = plots.instability_curve(
            result, os.path.join(plot_dir, f'instability_level_{result.get("level")}_seeds_{seeds}.png'))

    lines = [f'# IMP run report: {name}', '']
    lines += [f'- **Status:** {status}']
    model = (recipe.get('model') or {}).get('name')
    data = (recipe.get('train_loader') or {}).get('name')
    imp_cfg = (recipe.get('algorithms') or {}).get('imp') or {}
    if model:
        step = ('adaptive step' if settings['p_min'] is not None else
                f'{100 * float(settings["prune_fraction"]):g}% of the remaining weights per level')
        lines.append(f'- **Setting:** {model} on {data}; one level trains T = {recipe.get("max_duration")} from the '
                     f'rewind point {imp_cfg.get("rewind_to", "0ba")}; {step}; seed {recipe.get("seed")}.')
    info = run['info']
    if info:
        env = ', '.join(f'{k} {v}' for k, v in (info.get('versions') or {}).items())
        lines.append(f'- **Hardware:** {info.get("hardware", "unknown")}; world size {info.get("world_size", 1)}; '
                     f'{env}.')
        if info.get('wall_seconds') is not None:
            lines.append(f'- **Wall time:** {_fmt_seconds(float(info["wall_seconds"]))} (from the recipe to the report).')
    lines.append(f'- **Files:** recipe `{RECIPE_FILE}`, IMP folder `{os.path.relpath(run["imp_folder"], run_dir)}/` '
                 f'(masks, trained weights, rewind point, `{LEVELS_FILE}`), plots `{PLOTS_DIR}/`.')
    artefacts = run['artefacts']
    if artefacts['problems']:
        parts = [f'{len(artefacts["problems"])} problem{"s" if len(artefacts["problems"]) > 1 else ""}']
        if artefacts['damaged_levels']:
            parts.append(f'damaged level{"s" if len(artefacts["damaged_levels"]) > 1 else ""} '
                         f'{", ".join(map(str, artefacts["damaged_levels"]))}')
        if artefacts['missing_levels']:
            parts.append(f'missing level folder{"s" if len(artefacts["missing_levels"]) > 1 else ""} '
                         f'{", ".join(map(str, artefacts["missing_levels"]))}')
        lines.append(f'- **Artefacts: DAMAGED** — {"; ".join(parts)} (see "Damaged or missing artefacts").')
    lines.append('')
    if artefacts['problems']:
        lines += ['## Damaged or missing artefacts', '']
        lines += [f'- {problem}' for problem in artefacts['problems']]
        lines += ['', 'A damaged line of `levels.jsonl` is left out of the tables below; a level whose files are '
                  'damaged or missing is marked in the levels table.', '']

    lines += ['## Levels', '']
    if not rows:
        lines += ['_No level has finished yet._' if settings['has_imp'] or not recipe else
                  '_This run has no IMP levels._', '']
    else:
        key = accuracy_key(records)
        bad = {level: 'damaged' for level in artefacts['damaged_levels']}
        bad.update({level: 'missing' for level in artefacts['missing_levels']})
        lines += [markdown_level_table([{**r, 'level': f'{r["level"]} ({bad[r["level"]]})'}
                                        if r['accepted'] and r['level'] in bad else r for r in rows]), '']
        lines.append(f'Test accuracy is `{key}` of the eval data. **matching**: error at most the dense (level 0) '
                     f'error + ε = {100 * settings["tolerance"]:g} pp. **barrier**: largest rise of test error above '
                     f'the straight line between the endpoint errors along the linear path from level L−1 to level L '
                     f'(absolute, pp); **connected**: barrier ≤ {100 * settings["threshold"]:g} pp. **pruned by**: '
                     f'fraction of the parent level\'s remaining weights pruned to make this level. FLOPs count '
                     f'training at each level\'s density (6 per MAC and sample; MACs {_flops_method(records)}). '
                     f'Rejected attempts of the adaptive step are struck through.')
        lines.append('')
        sized = [r for r in rows if r.get('eval_samples') and r['accuracy'] is not None]
        if sized:
            reference = next((r for r in sized if r['level'] == 0), sized[0])
            lines.append(resolution_note(reference['eval_samples'], reference['accuracy'], settings['tolerance']))
        else:
            lines.append('The number of evaluation samples is not recorded for this run\'s eval data, so the report '
                         'cannot give a confidence interval for the test accuracy.')
        lines.append('')
        matching = [r for r in rows if r['accepted'] and r['level'] > 0 and r['matching']]
        if matching:
            best = min(matching, key=lambda r: r['density'])
            lines.append(f'**Sparsest matching level: {best["level"]} at {100 * best["density"]:.3g}% density** '
                         f'(test accuracy {100 * best["accuracy"]:.2f}%, {100 * best["delta"]:+.2f} pp vs dense).')
        elif any(r['level'] > 0 for r in rows):
            lines.append('**No pruned level is matching.**')
        lost = next((r for r in rows if r['accepted'] and r['level'] > 0 and r['matching'] is False), None)
        if lost is not None:
            lines.append(f'First non-matching level: {lost["level"]} at {100 * lost["density"]:.3g}% density.')
        lines.append('')

        totals = _totals(records)
        lines += ['## Compute', '']
        lines.append('| trainings | accepted | rejected | steps | samples | training seconds | training GFLOPs | '
                     'check samples | check GFLOPs | check seconds |')
        lines.append('|' + '---:|' * 10)
        lines.append(f'| {totals["levels"]} | {totals["accepted"]} | {totals["rejected"]} | {totals["steps"]} | '
                     f'{totals["samples"]} | {totals["seconds"]:.1f} | {totals["flops"] / 1e9:.4g} | '
                     f'{totals["check_samples"]} | {totals["check_flops"] / 1e9:.4g} | '
                     f'{totals["check_seconds"]:.1f} |')
        lines.append('')
        lines.append('Checks are the adaptive step\'s forward passes (projection probes, validation, barriers); the LMC '
                     'evaluator\'s passes are in the level seconds.')
        if settings['p_min'] is not None:
            comparison = _fixed_equivalent(rows, records, settings['p_min'])
            if comparison:
                lines += ['', comparison]
        lines.append('')

        lines += ['## Per-layer density', '', layer_density_table(records), '']

    lines += ['## Plots', '']
    any_rejected = any(not r['accepted'] for r in rows)
    captions = {
        'accuracy': 'Test accuracy vs density (log axis, sparser to the right). Grey band: dense accuracy − ε; filled '
                    'circles are matching levels, hollow ones not' + (', red crosses rejected attempts.'
                                                                     if any_rejected else '.'),
        'barrier': 'Error barrier between successive levels (green: the level is matching, red: not; dashed: the '
                   'connected threshold; a circle on the axis: a barrier of 0, no bar' +
                   ('; hatched: rejected attempts).' if any_rejected else ').'),
        'paths': 'Test error along the linear path from each level L−1 (α = 0) to level L (α = 1).',
        'fraction': 'Fraction of the remaining weights pruned per level, as chosen by the adaptive step (' +
                    ('red: rejected attempts; ' if any_rejected else '') + 'dashed: the fixed step).',
    }
    shown = False
    for key, caption in captions.items():
        if made.get(key):
            lines += [f'![{key}]({PLOTS_DIR}/{os.path.basename(made[key])})', '', caption, '']
            shown = True
    missing = [k for k in ('barrier', 'paths') if rows and not made.get(k)]
    if missing:
        lines += ['_No successive-level barriers: add `callbacks: {lmc_evaluator: {}}` to the recipe to measure '
                  'them._', '']
    if not shown and not missing:
        lines += ['_No plots yet._', '']

    if run['instability']:
        lines += ['## Instability analysis', '']
        lines.append('Two copies of a level\'s ticket trained from its rewind point with different data order and '
                     'augmentation (seeds); barrier = max error on the path − mean of the endpoint errors '
                     '(Frankle et al. 2020); stable if ≤ the threshold.')
        lines += ['', '| level | density | seeds | barrier (max − mean) | barrier (linear) | threshold | stable | '
                  'endpoint errors | file |', '|---|---:|---|---:|---:|---:|---|---|---|']
        for result in run['instability']:
            curve, _ = plots.path_values(result['metric'], result['values'][result['metric']])
            ends = ', '.join(f'{v:.2f}' + ('%' if result['metric'] == 'error' else '') for v in (curve[0], curve[-1]))
            density = result.get('density')
            lines.append(f'| {result.get("level")} | {"—" if density is None else f"{100 * density:.3g}%"} | '
                         f'{", ".join(str(s) for s in result.get("seeds", []))} | '
                         f'{_barrier_pp(result["barrier_max_minus_mean"])} | {_barrier_pp(result["barrier_linear"])} | '
                         f'{100 * result["threshold"]:g} pp | {_stable(result.get("stable"))} | {ends} | '
                         f'`{result["file"]}` |')
        lines.append('')
        for key, path in made.items():
            if key.startswith('instability') and path:
                lines += [f'![{key}]({PLOTS_DIR}/{os.path.basename(path)})', '']

    lines += controls.section(rows, records, branches, settings['threshold'])
    lines += structured.section(run, plot_dir)
    lines += hessian.hessian_section(records, plot_dir, PLOTS_DIR)
    report_path = os.path.join(run_dir, REPORT_FILE)
    with open(report_path, 'w') as f:
        f.write('\n'.join(lines).rstrip() + '\n')
    summary = {
        'status': status,
        'columns': LEVEL_COLUMNS,
        'levels': rows,
        'artefacts': run['artefacts'],
        'totals': _totals(records) if records else None,
        'plots': {k: os.path.relpath(v, run_dir) for k, v in made.items() if v},
        'instability': [{k: v for k, v in r.items() if k not in ('alphas', 'values')}
                        for r in run['instability']],
        'branches': [{k: v for k, v in r.items() if k not in ('alphas', 'values')} for r in branches],
    }
    with open(os.path.join(run_dir, REPORT_JSON), 'w') as f:
        json.dump(summary, f, indent=1, default=str)
    return report_path


def log_report(logger: Any, records: Sequence[Mapping[str, Any]], matching_tolerance: Optional[float] = None) -> None:
    """Send the per-level table (``imp/levels``) and the compute totals (``imp/total/...``) to a Composer ``Logger``
    (every configured destination: TensorBoard, W&B, MLflow, ...)."""
    rows = level_rows(records, matching_tolerance)
    if not rows:
        return
    try:
        logger.log_table(columns=LEVEL_COLUMNS, rows=table_rows(rows), name='imp/levels')
    except ImportError as error:  # e.g. InMemoryLogger needs pandas for tables; the scalars below still go out
        warnings.warn(f'log_report: a logger could not log the level table ({error})')
    totals = _totals(records)
    logger.log_metrics({f'imp/total/{k}': float(v) for k, v in totals.items()})
    matching = [r for r in rows if r['accepted'] and r['level'] > 0 and r['matching']]
    if matching:
        logger.log_metrics({'imp/sparsest_matching_density': float(min(r['density'] for r in matching))})


"""The report's "Exported tickets" section: per level, the physically smaller network's parameters, MACs and measured
CPU latency beside its accuracy, and a plot of accuracy against latency.

Built from the run folder's files: ``recipe.yaml`` (model and eval loader), ``imp/level_<L>/mask.pt`` and
``trained.pt``. Each level's trained network under its masks is exported (``composer_imp.export_ticket``) and timed on
one eval batch of at most ``LATENCY_BATCH`` samples, beside the dense network of level 0, in one process.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from composer_imp.export import cpu_latency, export_ticket, network_cost
from composer_imp.functional import density
from composer_imp.functional.flops import first_tensor
from composer_imp.functional.structured import example_batch
from composer_imp.functional.ticket import load_ticket
from composer_imp.report.plots import _save
from composer_imp.report.tables import level_rows

__all__ = ['LATENCY_BATCH', 'export_level', 'exported_rows', 'section', 'accuracy_vs_latency']

LATENCY_BATCH = 128
PLOT_FILE = 'accuracy_vs_latency.png'
TRACE_SAMPLES = 2


def _structure(recipe: Mapping[str, Any]) -> str:
    imp = (recipe.get('algorithms') or {}).get('imp') or {}
    return imp.get('structure', 'weights') if isinstance(imp, Mapping) else 'weights'


def _eval_batch(recipe: Mapping[str, Any]) -> Any:
    from composer_imp.recipes import build_loader

    spec = recipe.get('eval_loader') or recipe.get('train_loader')
    if not isinstance(spec, Mapping):
        raise ValueError('recipe: has no eval_loader (or train_loader) to take example inputs from')
    return example_batch(next(iter(build_loader(spec, split='test'))), LATENCY_BATCH)


def export_level(folder: str, level: int, recipe: Mapping[str, Any], batch: Any = None) -> dict[str, Any]:
    """Level ``level``'s trained network (``folder`` is the run's IMP folder) under its masks, and its export.

    Returns ``{'model', 'exported', 'masks', 'example_inputs' (the traced ones), 'batch'}``; ``batch`` (an eval batch)
    is read from the recipe's eval loader unless given. Raises ``ValueError`` when the level's files are missing or do
    not fit the model, before anything is exported.
    """
    from composer_imp.recipes import build_model_from_recipe

    level_dir = os.path.join(folder, f'level_{level}')
    trained_path = os.path.join(level_dir, 'trained.pt')
    if not os.path.isfile(trained_path):
        raise ValueError(f'--level: {level} has no trained network ({trained_path} is missing)')
    masks = load_ticket(level_dir)['masks']
    model = build_model_from_recipe(recipe)
    try:
        model.load_state_dict(torch.load(trained_path, map_location='cpu', weights_only=True))
    except RuntimeError as error:
        raise ValueError(f'{trained_path}: does not fit the recipe\'s model ({str(error).splitlines()[0][:200]})'
                         ) from None
    batch = _eval_batch(recipe) if batch is None else batch
    example_inputs = (example_batch(batch, TRACE_SAMPLES),)
    model.eval()
    exported = export_ticket(model, masks, example_inputs)
    return {'model': model, 'exported': exported.eval(), 'masks': masks, 'example_inputs': example_inputs,
            'batch': batch}


def exported_rows(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per accepted level with saved files: level, density, accuracy, params, MACs and latency (seconds per
    eval batch) of the exported network, and the same for the dense network (level 0's)."""
    recipe, folder = run['recipe'], run['imp_folder']
    accuracy = {row['level']: row['accuracy'] for row in level_rows(run['records']) if row['accepted']}
    levels = sorted(level for level in accuracy if os.path.isfile(os.path.join(folder, f'level_{level}', 'mask.pt')))
    rows, batch = [], None
    for level in levels:
        result = export_level(folder, level, recipe, batch)
        batch = result['batch']
        inputs = (batch,)
        cost = network_cost(result['exported'], result['example_inputs'])
        rows.append({'level': level, 'density': density(result['masks']), 'accuracy': accuracy[level],
                     'params': cost['params'], 'macs': cost['macs'],
                     'latency': cpu_latency(result['exported'], inputs, repeats=5, warmup=1),
                     'batch_size': int(first_tensor(batch).shape[0])})
    return rows


def accuracy_vs_latency(rows: Sequence[Mapping[str, Any]], path: str, title: str = '') -> Optional[str]:
    """Test accuracy against the exported network's measured CPU latency, one point per level (labelled L)."""
    import matplotlib.pyplot as plt

    points = [r for r in rows if r['accuracy'] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    latency_ms = [1000 * r['latency'] for r in points]
    ax.plot(latency_ms, [100 * r['accuracy'] for r in points], 'o-')
    for r, x in zip(points, latency_ms):
        ax.annotate(f"L{r['level']}", (x, 100 * r['accuracy']), textcoords='offset points', xytext=(4, 4))
    ax.set_xlabel(f"CPU latency per batch of {points[0]['batch_size']} (ms)")
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(title or 'accuracy vs measured latency of the exported tickets')
    ax.grid(alpha=0.3)
    return _save(fig, path)


def section(run: Mapping[str, Any], plot_dir: str) -> list[str]:
    """The report lines (and the plot) for a run with ``structure: channels``; none for other runs."""
    if _structure(run['recipe']) != 'channels' or not run['records']:
        return []
    lines = ['## Exported tickets', '']
    try:
        rows = exported_rows(run)
    except (ValueError, RuntimeError) as error:
        return lines + [f'_Could not export the levels: {" ".join(str(error).split())}_', '']
    if not rows:
        return lines + ['_No level with saved files yet._', '']
    dense = rows[0]
    lines += [f'Each level\'s trained network with its pruned channel groups removed (`composer-imp export`), timed on '
              f'the CPU ({torch.get_num_threads()} threads) on one eval batch of {dense["batch_size"]}; ratios are to '
              f'level {dense["level"]}.', '',
              '| level | density | accuracy | parameters | MACs per sample | latency | params ratio | MACs ratio | '
              'latency ratio |', '|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        accuracy = '—' if r['accuracy'] is None else f'{100 * r["accuracy"]:.2f}%'
        lines.append(f'| {r["level"]} | {100 * r["density"]:.3g}% | {accuracy} | {r["params"]:,.0f} | '
                     f'{r["macs"]:,.0f} | {1000 * r["latency"]:.2f} ms | {r["params"] / dense["params"]:.3f} | '
                     f'{r["macs"] / dense["macs"]:.3f} | {r["latency"] / dense["latency"]:.3f} |')
    lines.append('')
    plot = accuracy_vs_latency(rows, os.path.join(plot_dir, PLOT_FILE))
    if plot:
        lines += [f'![latency]({os.path.basename(plot_dir)}/{os.path.basename(plot)})', '',
                  'Test accuracy against the measured CPU latency of the exported network, one point per level.', '']
    return lines

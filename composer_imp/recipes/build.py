"""Building a Composer ``Trainer`` from a validated recipe.

The run folder (``save_folder``) receives everything the run writes: ``checkpoints/`` (Composer), ``imp/`` (IMP's
masks, trained weights, rewind point and ``levels.jsonl``), the file logger's ``logs/``, TensorBoard's
``tensorboard/``; the CLI adds ``recipe.yaml`` and the report. Relative paths in ``algorithms.imp.folder``,
``callbacks.checkpoint_saver.folder``, ``loggers.file.filename`` and ``loggers.tensorboard.log_dir`` are relative to
the run folder.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

from composer_imp.recipes.registry import REGISTRIES
from composer_imp.recipes.schema import SECTIONS, TOP_LEVEL_KEYS, RecipeError, load_recipe, signature_parameters

__all__ = ['build_trainer', 'repair_checkpoint_folder', 'build_loader', 'build_model_from_recipe', 'child_recipe', 'resolve_run', 'run_folder',
           'DEFAULT_SEED', 'DEFAULT_RUNS_DIR']

DEFAULT_SEED = 17
DEFAULT_RUNS_DIR = 'runs'

# Entries that configure the IMP run itself; an instability child trains one ticket without them.
IMP_ONLY = {'algorithms': ('imp', 'adaptive_sparsity_step'),
            'callbacks': ('lmc_evaluator', 'level_table', 'checkpoint_saver')}

_WRAPPED = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, ImportError, AssertionError)


@contextlib.contextmanager
def _at(path: str, kwargs: Optional[Iterable[str]] = None) -> Iterator[None]:
    """Turn an exception raised while building ``path`` into a one-line RecipeError naming it.

    Errors of this project's classes start with the argument they are about (``'prune_fraction: 1.5 is not
    allowed; ...'``); such an argument is folded into the path (``algorithms.imp.prune_fraction``).
    """
    try:
        yield
    except RecipeError:
        raise
    except _WRAPPED as error:
        raise _recipe_error(path, error, kwargs) from error


def _recipe_error(path: str, error: BaseException, kwargs: Optional[Iterable[str]] = None) -> RecipeError:
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    message = message.strip() or error.__class__.__name__
    match = re.match(r'^([A-Za-z_][\w.]*): (.*)$', message, re.S)
    if match and kwargs is not None and match.group(1) in set(kwargs):
        return RecipeError(f'{path}.{match.group(1)}', match.group(2))
    if isinstance(error, (TypeError, ImportError)) and not message.startswith(error.__class__.__name__):
        message = f'{error.__class__.__name__}: {message}'
    return RecipeError(path, message)


# ---------------------------------------------------------------------------------------------------- run folder
def _default_run_name(stem: str) -> str:
    name = f'{stem}-{time.strftime("%Y%m%d-%H%M%S")}'
    from composer.utils import dist

    if dist.get_world_size() > 1:  # every rank must name the same folder: rank 0 decides
        names = [name]
        dist.broadcast_object_list(names, src=0)
        name = names[0]
    return name


def resolve_run(recipe: dict, stem: str = 'run') -> dict:
    """Fill in ``run_name`` (``<stem>-<YYYYmmdd-HHMMSS>``), ``save_folder`` (``runs/<run_name>``) and ``seed``
    (17) when the recipe leaves them out; returns a new dict. Under DDP, rank 0's run name is used by every rank
    (the process group is initialised here)."""
    recipe = copy.deepcopy(recipe)
    if recipe.get('seed') is None:
        recipe['seed'] = DEFAULT_SEED
    if not recipe.get('run_name'):
        from composer.utils import dist

        if dist.get_world_size() > 1:
            dist.initialize_dist(recipe.get('device'), float(recipe.get('dist_timeout', 300.0)))
        recipe['run_name'] = _default_run_name(stem)
    if not recipe.get('save_folder'):
        recipe['save_folder'] = os.path.join(DEFAULT_RUNS_DIR, recipe['run_name'])
    return recipe


def run_folder(recipe: Mapping[str, Any]) -> str:
    return os.path.expandvars(os.path.expanduser(recipe['save_folder']))


def _in_run(run: str, path: Optional[str], default: str) -> str:
    path = default if path is None else os.path.expandvars(os.path.expanduser(path))
    return path if os.path.isabs(path) else os.path.join(run, path)


# ---------------------------------------------------------------------------------------------------- pieces
def build_loader(spec: Mapping[str, Any], *, split: str, seed: int = 0, path: str = 'loader') -> Any:
    """A DataLoader from a loader spec (``{name, batch_size, split, root, shuffle, drop_last, num_workers, augment,
    shuffle_seed, skip, limit, ...data set keywords}``); ``split`` and ``seed`` are the defaults for ``split`` and
    ``shuffle_seed``. ``skip``/``limit`` select samples ``[skip, skip + limit)`` of the split (map-style data)."""
    from composer_imp.data import build_dataloader, build_dataset, collate_image_label

    spec = dict(spec)
    name = spec.pop('name')
    split = spec.pop('split', split)
    skip, limit = spec.pop('skip', 0), spec.pop('limit', None)
    spec.setdefault('shuffle_seed', seed)
    if spec.get('root') is not None:
        spec['root'] = os.path.expandvars(os.path.expanduser(spec['root']))
    with _at(path, spec):
        if not skip and limit is None:
            loader = build_dataloader(name, split, **spec)
        else:
            import torch.utils.data
            from composer.utils import dist

            shuffle = spec.pop('shuffle', split == 'train')
            drop_last = spec.pop('drop_last', split == 'train')
            batch_size, num_workers = spec.pop('batch_size'), spec.pop('num_workers', 0)
            shuffle_seed = spec.pop('shuffle_seed')
            dataset = build_dataset(name, split, **spec)
            stop = len(dataset) if limit is None else min(len(dataset), skip + limit)
            if stop <= skip:
                raise RecipeError(f'{path}.skip', f'{skip} leaves no samples of the {len(dataset)} in {name} {split}')
            dataset = torch.utils.data.Subset(dataset, range(skip, stop))
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                sampler=dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=shuffle_seed),
                collate_fn=collate_image_label, persistent_workers=num_workers > 0)
    try:
        empty = len(loader) == 0
    except TypeError:  # an IterableDataset (streaming) has no length before it starts
        empty = False
    if empty:
        raise RecipeError(f'{path}.batch_size', f'{spec.get("batch_size")} is more than the samples per rank, so the '
                          'loader yields no batch; use a smaller batch_size or drop_last: false')
    return loader


def num_classes_of(loader_spec: Mapping[str, Any]) -> Optional[int]:
    from composer_imp.data import NUM_CLASSES

    name = loader_spec.get('name')
    if name == 'streaming':
        name = loader_spec.get('dataset', 'cifar10')
    return NUM_CLASSES.get(name)


def build_model_from_recipe(recipe: Mapping[str, Any]) -> Any:
    """The recipe's model as a ComposerModel; ``num_classes`` defaults to the train data set's class count."""
    from composer.models import ComposerClassifier, ComposerModel

    from composer_imp.models import build_model

    spec = dict(recipe['model'])
    name = spec.pop('name')
    if spec.get('num_classes') is None:
        spec['num_classes'] = num_classes_of(recipe['train_loader'])
    with _at('model', spec):
        if name in REGISTRIES['models']:
            model = REGISTRIES['models'].get(name)(**spec)
            if not isinstance(model, ComposerModel):
                model = ComposerClassifier(model, num_classes=spec.get('num_classes'))
            return model
        return build_model(name, **spec)


def _kwargs(recipe: Mapping[str, Any], path: str, kwargs: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Copy kwargs; loader specs given to ``*_dataloader`` arguments become DataLoaders."""
    built = {}
    for key, value in (kwargs or {}).items():
        if key.endswith('dataloader') and isinstance(value, Mapping):
            value = build_loader(value, split='train', seed=recipe['seed'], path=f'{path}.{key}')
        built[key] = copy.deepcopy(value)
    return built


def _construct(path: str, cls: Any, kwargs: Mapping[str, Any]) -> Any:
    names, _, _ = signature_parameters(cls)
    with _at(path, names):
        return cls(**kwargs)


def _section(recipe: Mapping[str, Any], section: str) -> dict[str, Any]:
    return dict(recipe.get(section) or {})


# Arguments that name a path: relative to the run folder, with a default inside it. (section, name) -> (arg, default)
RUN_PATHS = {
    ('algorithms', 'imp'): ('folder', 'imp'),
    ('callbacks', 'checkpoint_saver'): ('folder', 'checkpoints'),
    ('loggers', 'file'): ('filename', os.path.join('logs', 'rank{rank}.txt')),
    ('loggers', 'tensorboard'): ('log_dir', 'tensorboard'),
}


def _build_section(recipe: Mapping[str, Any], section: str, run: str, skip: tuple[str, ...] = (),
                   extra: Optional[Mapping[str, Mapping[str, Any]]] = None) -> list[Any]:
    """Construct every ``{name: kwargs}`` entry of ``algorithms``, ``callbacks`` or ``loggers`` from its registry."""
    built = []
    for name, kwargs in _section(recipe, section).items():
        if name in skip:
            continue
        path = f'{section}.{name}'
        kwargs = _kwargs(recipe, path, kwargs)
        if (section, name) in RUN_PATHS:
            argument, default = RUN_PATHS[section, name]
            kwargs[argument] = _in_run(run, kwargs.get(argument), default)
        kwargs.update((extra or {}).get(name, {}))
        built.append(_construct(path, REGISTRIES[section].get(name), kwargs))
    return built


def _build_algorithms(recipe: Mapping[str, Any], run: str) -> list[Any]:
    """Composer algorithms and IMP; ``adaptive_sparsity_step`` is not an algorithm but IMP's ``sparsity_step``."""
    entries = _section(recipe, 'algorithms')
    extra = {}
    if 'adaptive_sparsity_step' in entries:
        path = 'algorithms.adaptive_sparsity_step'
        extra['imp'] = {'sparsity_step': _construct(path, REGISTRIES['algorithms'].get('adaptive_sparsity_step'),
                                                    _kwargs(recipe, path, entries['adaptive_sparsity_step']))}
    return _build_section(recipe, 'algorithms', run, skip=('adaptive_sparsity_step',), extra=extra)


def _build_schedulers(recipe: Mapping[str, Any]) -> list[Any]:
    if recipe.get('scheduler') is not None:
        specs = [('scheduler', recipe['scheduler'])]
    else:
        specs = [(f'schedulers.{i}', spec) for i, spec in enumerate(recipe.get('schedulers') or [])]
    schedulers = []
    for path, spec in specs:
        kwargs = {k: v for k, v in spec.items() if k != 'name'}
        schedulers.append(_construct(path, REGISTRIES['schedulers'].get(spec['name']), kwargs))
    return schedulers


def _trainer_error_path(recipe: Mapping[str, Any], error: BaseException) -> RecipeError:
    """Name the recipe key an error raised inside ``Trainer.__init__`` is about (IMP and its step check their
    arguments there, at ``AFTER_LOAD``)."""
    message = str(error)
    match = re.match(r'^([A-Za-z_][\w.]*): ', message)
    if match:
        token = match.group(1)
        if token in TOP_LEVEL_KEYS:
            return RecipeError(token, message[len(token) + 2:])
        for section in SECTIONS:
            for name in _section(recipe, section):
                try:
                    names, _, _ = signature_parameters(REGISTRIES[section].get(name))
                except Exception:  # pragma: no cover - validated already
                    continue
                if token in names:
                    return RecipeError(f'{section}.{name}.{token}', message[len(token) + 2:])
    return RecipeError('recipe', message)


# ---------------------------------------------------------------------------------------------------- trainer
def checkpoint_files_to_load(recipe: Mapping[str, Any], save_folder: Optional[str]) -> list[tuple[str, str]]:
    """The local checkpoint files Composer's Trainer would load for ``recipe``, as ``(recipe key, path)``: autoresume's
    ``latest-rank{rank}.pt`` in ``save_folder`` (rank 0's, which Composer broadcasts, and this rank's) if it exists,
    and a local ``load_path``. A remote ``load_path`` (``s3://...``) is not listed: Composer downloads it itself."""
    from composer.utils import dist
    from composer.utils.file_helpers import format_name_with_dist

    files = []
    if recipe.get('autoresume') and save_folder is not None:
        folder = format_name_with_dist(save_folder, recipe['run_name'])
        for rank in sorted({0, dist.get_global_rank()}):
            latest = os.path.join(folder, f'latest-rank{rank}.pt')  # Composer's default save_latest_filename
            if os.path.exists(latest):
                files.append(('autoresume', latest))
    load_path = recipe.get('load_path')
    if load_path and '://' not in load_path:
        load_path = os.path.expandvars(os.path.expanduser(load_path))
        if os.path.exists(load_path):
            files.append(('load_path', load_path))
    return files


SET_ASIDE = 'set_aside'
# Composer's default save_filename 'ep{epoch}-ba{batch}-rank{rank}.pt', with IMP's level prefix ('level<L>-' for a
# pruned level, 'level<L>.<n>-' for the n-th redo of a level; level 0 has none).
_CHECKPOINT_NAME = re.compile(r'^(?:level(?P<level>\d+)(?:\.(?P<attempt>\d+))?-)?'
                              r'ep(?P<epoch>\d+)-ba(?P<batch>\d+)-rank(?P<rank>\d+)\.pt$')
_TEMP_SUFFIXES = ('.tmp', '.part', '.partial', '.incomplete')


def _checkpoint_order(name: str) -> Optional[tuple[int, int, int, int]]:
    """The order of a checkpoint file by its name: (level, attempt, epoch, batch); ``None`` for other names. A pruned
    level's counters replay from the rewind step, so the level and attempt come first."""
    match = _CHECKPOINT_NAME.match(name)
    if match is None:
        return None
    return (int(match['level'] or 0), int(match['attempt'] or 0), int(match['epoch']), int(match['batch']))


def _unreadable(path: str) -> Optional[str]:
    """Why ``torch.load(weights_only=True)`` cannot read the checkpoint at ``path`` (empty, truncated, not a
    checkpoint), or ``None`` if it reads, or if it is refused only for the globals it holds: such a file is complete,
    and :func:`check_checkpoints_to_load` refuses it rather than moving it."""
    import torch

    from composer_imp.safe_load import CHECKPOINT_GLOBALS

    if os.path.getsize(path) == 0:
        return 'it is empty'
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # noqa: BLE001 - classified below
        from composer_imp.safe_load import _allowed_names

        with contextlib.suppress(Exception):
            if set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(_allowed_names()):
                return None  # complete but unsafe: refused by check_checkpoints_to_load, not repaired
        reason = ' '.join(str(error).split())[:200]
        return f'torch.load(weights_only=True) cannot read it ({type(error).__name__}: {reason})'
    return None


def _set_aside(folder: str, name: str, why: str) -> None:
    import warnings

    aside = os.path.join(folder, SET_ASIDE)
    os.makedirs(aside, exist_ok=True)
    target, n = os.path.join(aside, name), 0
    while os.path.lexists(target):
        n += 1
        target = os.path.join(aside, f'{name}.{n}')
    os.replace(os.path.join(folder, name), target)
    warnings.warn(f'checkpoints: moved {os.path.join(folder, name)} to {target}: {why}', stacklevel=3)


def repair_checkpoint_folder(folder: str) -> list[tuple[str, str]]:
    """Make a checkpoint folder that a killed run left behind resumable; returns ``(file name, reason)`` per file moved.

    For every rank's ``latest-rank{r}.pt``: the checkpoint to resume is the one it points to if that file reads with
    ``torch.load(weights_only=True)``; else (missing, dangling, or pointing to a partial file) the newest checkpoint
    that reads, and the symlink is re-pointed to it. Files that cannot be the resume point are moved into
    ``<folder>/set_aside/`` (never deleted), one warning line each: temporary files of a write in progress,
    unreadable checkpoints (empty, truncated) met while looking for the resume point, and every checkpoint ordered
    after the resume point (the ones Composer's ``ensure_folder_has_no_conflicting_files`` refuses with
    ``FileExistsError``, and later levels' files a replay would meet again). Checkpoints are ordered by name, level
    first, then attempt, then epoch and batch (:func:`_checkpoint_order`), not by mtime, which a copy of the folder
    resets. Files before the resume point are not opened. Runs on rank 0 only; other ranks wait at a barrier.
    """
    from composer.utils import dist

    moved: list[tuple[str, str]] = []
    if dist.get_global_rank() == 0 and os.path.isdir(folder):
        names = sorted(os.listdir(folder))
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(_TEMP_SUFFIXES) and os.path.isfile(path) and not os.path.islink(path):
                _set_aside(folder, name, 'a temporary file of an unfinished write')
                moved.append((name, 'temporary'))
        by_rank: dict[int, list[tuple[tuple[int, int, int, int], str]]] = {}
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            order = _checkpoint_order(name)
            if order is not None and os.path.isfile(path) and not os.path.islink(path):
                by_rank.setdefault(int(_CHECKPOINT_NAME.match(name)['rank']), []).append((order, name))
        for rank, files in sorted(by_rank.items()):
            files.sort()
            latest = os.path.join(folder, f'latest-rank{rank}.pt')
            resume: Optional[str] = None
            if os.path.islink(latest) and os.path.isfile(latest):
                target = os.path.realpath(latest)
                if os.path.dirname(target) == os.path.realpath(folder) and \
                        _checkpoint_order(os.path.basename(target)) is not None:
                    why = _unreadable(target)
                    if why is None:
                        resume = os.path.basename(target)
                    else:
                        _set_aside(folder, os.path.basename(target), f'{why}; latest-rank{rank}.pt pointed to it')
                        moved.append((os.path.basename(target), 'unreadable'))
                        files = [f for f in files if f[1] != os.path.basename(target)]
                else:
                    continue  # a latest file this repair does not understand: left to Composer
            elif os.path.lexists(latest) and not os.path.islink(latest):
                continue  # a regular file named latest-rank{r}.pt: not Composer's symlink, left alone
            if resume is None:  # missing, dangling or unreadable latest: the newest checkpoint that reads
                for _, name in reversed(files):
                    why = _unreadable(os.path.join(folder, name))
                    if why is None:
                        resume = name
                        break
                    _set_aside(folder, name, why)
                    moved.append((name, 'unreadable'))
                if resume is None:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.remove(latest)
                os.symlink(resume, latest)  # relative, as Composer makes it
                import warnings
                warnings.warn(f'checkpoints: latest-rank{rank}.pt in {folder} now points to {resume}, the newest '
                              'checkpoint that reads', stacklevel=2)
            point = _checkpoint_order(resume)
            for order, name in files:
                if order > point and os.path.exists(os.path.join(folder, name)):
                    _set_aside(folder, name, f'it is newer than {resume}, the checkpoint the run resumes from, and '
                                             'would conflict with its future checkpoints')
                    moved.append((name, 'newer'))
    if dist.get_world_size() > 1:
        dist.barrier()
    return moved


def check_checkpoints_to_load(recipe: Mapping[str, Any], save_folder: Optional[str]) -> None:
    """Refuse (:class:`RecipeError`, one line naming the key, the file and the offending global) any checkpoint of
    :func:`checkpoint_files_to_load` that ``torch.load(weights_only=True)`` with
    :data:`composer_imp.safe_load.CHECKPOINT_GLOBALS` cannot read, before Composer (which unpickles with
    ``weights_only=False``) touches it."""
    from composer_imp.safe_load import UnsafeFileError, check_checkpoint

    for key, path in checkpoint_files_to_load(recipe, save_folder):
        try:
            check_checkpoint(path, what='the checkpoint' if key == 'load_path' else 'the latest checkpoint')
        except UnsafeFileError as error:
            raise RecipeError(key, str(error)) from None


def build_trainer(recipe: Any, *, overrides: Sequence[str] = (), model: Any = None, callbacks: Sequence[Any] = (),
                  loggers: Sequence[Any] = ()) -> Any:
    """A Composer ``Trainer`` for a recipe (a path, a mapping, or :func:`load_recipe`'s result), not yet fitted.

    Builds, in this order: data loaders, model (unless ``model`` is given: a ComposerModel to train instead),
    optimizer, schedulers, algorithms (``adaptive_sparsity_step`` becomes ``IMP``'s ``sparsity_step``; IMP's folder
    defaults to ``<save_folder>/imp``), callbacks and loggers, then the Trainer. ``callbacks`` and ``loggers`` are
    added to the recipe's own. The run folder is ``save_folder`` (default ``runs/<run_name>``); checkpoints go to
    ``<save_folder>/checkpoints`` unless ``checkpoints: false``. Raises :class:`RecipeError` (one line naming the
    key) for anything the recipe gets wrong, before the Trainer exists whenever possible. A checkpoint it would load
    (autoresume's latest one, a local ``load_path``) is first checked with ``torch.load(weights_only=True)``
    (:func:`check_checkpoints_to_load`): one that holds anything but tensors and plain data is refused, unloaded.
    With ``autoresume``, a checkpoint folder a killed run left behind is repaired first
    (:func:`repair_checkpoint_folder`: partial and conflicting files set aside, ``latest`` re-pointed).
    """
    from composer import Trainer
    from composer.utils import reproducibility
    from composer.utils.file_helpers import format_name_with_dist

    recipe = resolve_run(load_recipe(recipe, overrides))
    run = run_folder(recipe)
    own_saver = 'checkpoint_saver' in _section(recipe, 'callbacks')
    save = recipe.get('checkpoints', True) and not own_saver
    if save and recipe.get('autoresume'):
        from composer.utils import dist

        if dist.get_world_size() > 1:
            dist.initialize_dist(recipe.get('device'), float(recipe.get('dist_timeout', 300.0)))
        repair_checkpoint_folder(format_name_with_dist(os.path.join(run, 'checkpoints'), recipe['run_name']))
    check_checkpoints_to_load(recipe, os.path.join(run, 'checkpoints') if save else None)
    seed = int(recipe['seed'])
    reproducibility.seed_all(seed)  # model init and anything else drawn before the Trainer seeds itself

    train_loader = build_loader(recipe['train_loader'], split='train', seed=seed, path='train_loader')
    eval_loader = None
    if recipe.get('eval_loader') is not None:
        eval_loader = build_loader(recipe['eval_loader'], split='test', seed=seed, path='eval_loader')
    if model is None:
        model = build_model_from_recipe(recipe)
    optimizer_spec = dict(recipe['optimizer'])
    optimizer_cls = REGISTRIES['optimizers'].get(optimizer_spec.pop('name'))
    names, _, _ = signature_parameters(optimizer_cls, skip_first=True)
    with _at('optimizer', names):
        optimizer = optimizer_cls(model.parameters(), **optimizer_spec)
    schedulers = _build_schedulers(recipe)
    algorithms = _build_algorithms(recipe, run)
    all_callbacks = [*_build_section(recipe, 'callbacks', run), *callbacks]
    all_loggers = [*_build_section(recipe, 'loggers', run), *loggers]

    has_progress_logger = 'progress_bar' in _section(recipe, 'loggers')
    kwargs: dict[str, Any] = dict(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        max_duration=recipe['max_duration'],
        optimizers=optimizer,
        schedulers=schedulers,
        algorithms=algorithms,
        callbacks=all_callbacks,
        loggers=all_loggers,
        run_name=recipe['run_name'],
        seed=seed,
        progress_bar=recipe.get('progress_bar', True) and not has_progress_logger,
        save_folder=os.path.join(run, 'checkpoints') if save else None,
    )
    passthrough = ('precision', 'device', 'device_train_microbatch_size', 'eval_interval', 'eval_subset_num_batches',
                   'train_subset_num_batches', 'log_to_console', 'console_log_interval', 'python_log_level',
                   'dist_timeout', 'deterministic_mode', 'autoresume', 'load_path', 'load_weights_only')
    kwargs.update({key: recipe[key] for key in passthrough if recipe.get(key) is not None})
    if save:
        kwargs.update({key: recipe[key] for key in ('save_interval', 'save_num_checkpoints_to_keep', 'save_overwrite')
                       if recipe.get(key) is not None})
    if recipe.get('fsdp') is not None:
        from composer.utils.parallelism import FSDP2Config
        kwargs['parallelism_config'] = {'fsdp': FSDP2Config(**recipe['fsdp'])}
    try:
        return Trainer(**kwargs)
    except RecipeError:
        raise
    except _WRAPPED as error:
        raise _trainer_error_path(recipe, error) from error


def child_recipe(recipe: Mapping[str, Any], seed: int, name: str) -> dict:
    """The recipe of one instability child: the same training without IMP, the LMC evaluator, checkpoints or file
    outputs; seed ``seed`` for the Trainer and the data order."""
    child = copy.deepcopy(dict(recipe))
    for section, names in IMP_ONLY.items():
        entries = {k: v for k, v in (child.get(section) or {}).items() if k not in names}
        child[section] = entries
    child['loggers'] = {}
    child['seed'] = int(seed)
    child['train_loader'] = {**child['train_loader'], 'shuffle_seed': int(seed)}
    child['run_name'] = name
    child['checkpoints'] = False
    for key in ('autoresume', 'load_path'):
        child.pop(key, None)
    return child

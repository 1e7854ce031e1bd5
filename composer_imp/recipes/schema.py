"""Reading and checking a recipe: YAML -> dotted overrides -> validated plain dict. Nothing is built or written here.

Every problem raises :class:`RecipeError` (a ``ValueError``) with one line naming the key path and what is allowed,
e.g. ``optimizer.name: 'sgdd' is unknown; allowed: adam, adamw, ...``.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import yaml

from composer_imp.recipes.registry import REGISTRIES

__all__ = ['RecipeError', 'load_recipe', 'read_recipe', 'apply_overrides', 'TOP_LEVEL_KEYS', 'LOADER_KEYS', 'SECTIONS']


class RecipeError(ValueError):
    """A recipe problem, as one line: ``<key.path>: <what is wrong>; <what is allowed>``."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = ' '.join(str(message).split())  # one line, whatever the wrapped exception printed
        super().__init__(f'{path}: {self.message}' if path else self.message)


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python objects) that also reads ``1e-3`` as a float, as YAML 1.2 does: PyYAML's
    YAML 1.1 rules make it the string ``'1e-3'``, a classic learning-rate trap. A key given twice in one mapping is
    refused (PyYAML keeps the last one silently), naming the key and both lines; ``<<`` merge keys still override."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == 'tag:yaml.org,2002:merge':
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeConstructor refuses it below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f'duplicate key {key!r} (first given at line {first + 1}); give each key once',
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$'),
    list('-+0123456789'))


def safe_load(stream: Any) -> Any:
    """``yaml.safe_load`` with :class:`RecipeLoader`."""
    return yaml.load(stream, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


# ---------------------------------------------------------------------------------------------------- value checks
def _describe(value: Any) -> str:
    return f'{value!r} ({type(value).__name__})'


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(path: str, ok: bool, value: Any, expected: str) -> None:
    if not ok:
        raise RecipeError(path, f'expected {expected}, got {_describe(value)}')


def _time(path: str, value: Any, units: str = "'ep', 'ba', 'sp', 'dur' or 'sec'", positive: bool = False) -> None:
    """A Composer time string (``'160ep'``, ``'500ba'``) or an int (epochs), >= 0 (> 0 if ``positive``)."""
    allowed = f"a Composer time string {'> 0 ' if positive else ''}such as '10ep' or '500ba' ({units})"
    if _is_int(value) and (value >= 1 or (value == 0 and not positive)):
        return
    _check(path, isinstance(value, str), value, allowed + (', or an integer >= 1 (epochs)' if positive else ''))
    from composer.core import Time

    try:
        time = Time.from_timestring(value)
    except (ValueError, TypeError, RuntimeError) as error:
        raise RecipeError(path, f"{value!r} is not a Composer time string ({error}); use e.g. '10ep' or '500ba'")
    if time.value < 0 or (positive and time.value == 0):
        raise RecipeError(path, f"{value!r} is not allowed; use {allowed}")


def _unknown(path: str, keys: Iterable[str], allowed: Iterable[str], what: str = 'key') -> None:
    allowed = sorted(allowed)
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f' (did you mean {close[0]!r}?)' if close else ''
            where = f'{path}.{key}' if path else str(key)
            raise RecipeError(where, f'unknown {what}{hint}; allowed: {", ".join(allowed)}')


def _mapping(path: str, value: Any, what: str = 'a mapping') -> dict:
    _check(path, isinstance(value, Mapping), value, what)
    for key in value:
        _check(f'{path}.{key}' if path else str(key), isinstance(key, str), key, 'a string key')
    return dict(value)


# ---------------------------------------------------------------------------------------------------- schema
# Top-level keys: name -> (check, help). ``check(path, value)`` raises RecipeError.
def _opt(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    def optional(path: str, value: Any) -> None:
        if value is not None:
            check(path, value)

    return optional


def _of(test: Callable[[Any], bool], expected: str) -> Callable[[str, Any], None]:
    return lambda path, value: _check(path, test(value), value, expected)


_STR = _of(lambda v: isinstance(v, str) and v != '', 'a non-empty string')
_INT = _of(lambda v: _is_int(v) and v >= 0, 'an integer >= 0')
_POS_INT = _of(lambda v: _is_int(v) and v >= 1, 'an integer >= 1')
_BOOL = _of(lambda v: isinstance(v, bool), 'true or false')
_NUMBER = _of(lambda v: _is_number(v) and v > 0, 'a positive number')

PRECISIONS = ('fp32', 'amp_fp16', 'amp_bf16', 'amp_fp8')
DEVICES = ('cpu', 'gpu', 'mps', 'tpu', 'neuron')


def _choice(options: Iterable[str]) -> Callable[[str, Any], None]:
    options = tuple(options)
    return lambda path, value: _check(path, value in options, value, f'one of {", ".join(options)}')


def _microbatch(path: str, value: Any) -> None:
    _check(path, value == 'auto' or (_is_int(value) and value >= 1) or (_is_number(value) and value > 0), value,
           "'auto' or a number of samples per microbatch")


def _interval(path: str, value: Any) -> None:
    _time(path, value, positive=True)


# Composer's FSDP2Config attributes a recipe can set (its device_mesh is built by Composer from the world size).
FSDP_KEYS: dict[str, tuple[Callable[[str, Any], None], str]] = {
    'reshard_after_forward': (_BOOL, 'free the gathered weights after each forward (default true)'),
    'state_dict_type': (_choice(('sharded', 'full')), "checkpoints sharded per rank (default) or whole on rank 0"),
    'mixed_precision': (_choice(('DEFAULT', 'PURE', 'FULL')), "FSDP2's mixed precision policy"),
    'activation_checkpointing': (_BOOL, 'recompute activations in backward'),
    'activation_cpu_offload': (_BOOL, 'keep activations in host memory'),
    'load_monolith_rank0_only': (_BOOL, 'load a full checkpoint on rank 0 only'),
    'verbose': (_BOOL, 'log the sharded model'),
}


def _fsdp(path: str, value: Any) -> None:
    """``fsdp: {}`` (FSDP2 with Composer's defaults) or a mapping of ``FSDP_KEYS``."""
    value = _mapping(path, value, "a mapping of FSDP2 settings ({} for the defaults)")
    _unknown(path, value, FSDP_KEYS)
    for key, item in value.items():
        FSDP_KEYS[key][0](f'{path}.{key}', item)


TOP_LEVEL_KEYS: dict[str, tuple[Callable[[str, Any], None], str]] = {
    'model': (lambda p, v: None, "{name, num_classes, ...model kwargs}"),  # checked by _check_model
    'train_loader': (lambda p, v: None, '{name, batch_size, ...} (see LOADER_KEYS)'),
    'eval_loader': (lambda p, v: None, '{name, batch_size, ...} (split defaults to test)'),
    'optimizer': (lambda p, v: None, '{name, lr, ...optimizer kwargs}'),
    'scheduler': (lambda p, v: None, '{name, ...scheduler kwargs}'),
    'schedulers': (lambda p, v: None, 'a list of {name, ...}'),
    'algorithms': (lambda p, v: None, '{registry name: kwargs}'),
    'callbacks': (lambda p, v: None, '{registry name: kwargs}'),
    'loggers': (lambda p, v: None, '{registry name: kwargs}'),
    'max_duration': (lambda p, v: _time(p, v, positive=True), "one IMP level's training T, e.g. '160ep' or '62400ba'"),
    'seed': (_INT, 'random seed (model init, data order, augmentation)'),
    'run_name': (_opt(_STR), 'the run name (default: recipe file name + time)'),
    'save_folder': (_opt(_STR), 'the run folder (default runs/<run_name>)'),
    'checkpoints': (_BOOL, 'write Composer checkpoints into <save_folder>/checkpoints (default true)'),
    'save_interval': (_interval, "checkpoint interval, e.g. '1ep'"),
    'save_num_checkpoints_to_keep': (_of(lambda v: _is_int(v) and v >= -1, 'an integer >= -1'),
                                     'checkpoints kept (-1: all)'),
    'save_overwrite': (_BOOL, 'overwrite existing checkpoints'),
    'autoresume': (_BOOL, 'resume from the latest checkpoint in the run folder (needs run_name)'),
    'load_path': (_opt(_STR), 'a checkpoint to start from'),
    'load_weights_only': (_BOOL, 'load only the model weights from load_path'),
    'precision': (_opt(_choice(PRECISIONS)), 'numerical precision (CPU: fp32)'),
    'device': (_opt(_choice(DEVICES)), 'device (default: gpu if available, else cpu)'),
    'fsdp': (_fsdp, "shard weights with Composer's FSDP2 (launch with composer -n N): {} or FSDP2Config settings"),
    'device_train_microbatch_size': (_opt(_microbatch), "samples per microbatch or 'auto'"),
    'eval_interval': (_interval, "evaluation interval, e.g. '1ep' or 1 (epochs)"),
    'eval_subset_num_batches': (_of(lambda v: _is_int(v) and (v >= 1 or v == -1), 'an integer >= 1 or -1'),
                                'evaluation batches per evaluation (-1: all)'),
    'train_subset_num_batches': (_of(lambda v: _is_int(v) and (v >= 1 or v == -1), 'an integer >= 1 or -1'),
                                 'training batches per epoch (-1: all)'),
    'progress_bar': (_BOOL, "Composer's progress bar (default true)"),
    'log_to_console': (_BOOL, 'log metrics to the console'),
    'console_log_interval': (_interval, "console log interval, e.g. '1ep'"),
    'python_log_level': (_opt(_choice(('debug', 'info', 'warning', 'error', 'critical'))), 'Python logging level'),
    'dist_timeout': (_NUMBER, 'seconds to wait for the other ranks'),
    'deterministic_mode': (_BOOL, 'deterministic kernels (slower)'),
}

REQUIRED_KEYS = ('model', 'train_loader', 'optimizer', 'max_duration')
SECTIONS = ('algorithms', 'callbacks', 'loggers')

# Keys of a loader spec (train_loader, eval_loader, or any ``*_dataloader`` kwarg of an algorithm or callback).
LOADER_KEYS: dict[str, tuple[Callable[[str, Any], None], str]] = {
    'name': (_STR, 'data set name'),
    'split': (_choice(('train', 'test')), 'train or test'),
    'batch_size': (_POS_INT, 'samples per device per step'),
    'root': (_opt(_STR), 'data folder (default $COMPOSER_IMP_DATA or ./data)'),
    'shuffle': (_BOOL, 'shuffle (default: split == train)'),
    'drop_last': (_BOOL, 'drop the last partial batch (default: split == train)'),
    'num_workers': (_INT, 'DataLoader worker processes'),
    'augment': (_BOOL, 'train-time augmentation (default: split == train)'),
    'shuffle_seed': (_INT, 'seed of the data order (default: the recipe seed)'),
    'skip': (_INT, 'leave out the first this-many samples of the split (carves a validation set)'),
    'limit': (_POS_INT, 'use at most this many samples (after skip)'),
}


# ---------------------------------------------------------------------------------------------------- overrides
def _parse_override(text: str) -> tuple[bool, list[str], Any]:
    if not isinstance(text, str):
        raise RecipeError('overrides', f'expected key.path=value strings, got {_describe(text)}')
    if text.startswith('~'):
        keys = text[1:].split('.')
        if not all(keys):
            raise RecipeError('overrides', f'{text!r} is malformed; use ~key.path to delete a key')
        return True, keys, None
    key, sep, raw = text.partition('=')
    keys = key.strip().split('.')
    if not sep or not all(keys):
        raise RecipeError('overrides', f'{text!r} is malformed; use key.path=value (value in YAML), or ~key.path')
    try:
        value = safe_load(raw) if raw.strip() else ''
    except yaml.YAMLError as error:
        raise RecipeError('.'.join(keys), f'override value {raw!r} is not valid YAML ({error.__class__.__name__})')
    return False, keys, value


def apply_overrides(recipe: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` (value parsed as YAML; missing mappings are created; a list element by index,
    ``schedulers.0.gamma=0.2``) and ``~key.path`` (delete) to a copy of ``recipe``."""
    recipe = copy.deepcopy(recipe)
    for text in overrides:
        delete, keys, value = _parse_override(text)
        node: Any = recipe
        for depth, key in enumerate(keys[:-1]):
            where = '.'.join(keys[:depth + 1])
            if isinstance(node, list):
                node = _list_item(node, key, where)
            elif isinstance(node, dict):
                if node.get(key) is None and not delete:
                    node[key] = {}
                if key not in node:
                    raise RecipeError(where, f'cannot delete {".".join(keys)}: {where} is not in the recipe')
                node = node[key]
            else:
                raise RecipeError(where, f'is {_describe(node)}, not a mapping, so {".".join(keys)} cannot be set')
        last, where = keys[-1], '.'.join(keys)
        if isinstance(node, list):
            index = _list_index(node, last, where)
            if delete:
                node.pop(index)
            else:
                node[index] = value
        elif isinstance(node, dict):
            if delete:
                if last not in node:
                    raise RecipeError(where, 'cannot delete it: it is not in the recipe')
                del node[last]
            else:
                node[last] = value
        else:
            raise RecipeError('.'.join(keys[:-1]), f'is {_describe(node)}, not a mapping, so {where} cannot be set')
    return recipe


def _list_index(node: list, key: str, where: str) -> int:
    if not key.lstrip('-').isdigit() or not -len(node) <= int(key) < len(node):
        raise RecipeError(where, f'{key!r} is not an index of this list of {len(node)} item(s)')
    return int(key)


def _list_item(node: list, key: str, where: str) -> Any:
    return node[_list_index(node, key, where)]


# ---------------------------------------------------------------------------------------------------- loading
def _read(path_or_dict: Union[str, os.PathLike, Mapping]) -> tuple[dict, Optional[str]]:
    if isinstance(path_or_dict, Mapping):
        return copy.deepcopy(dict(path_or_dict)), None
    try:  # an omegaconf DictConfig (llm-foundry style), only if omegaconf is installed
        from omegaconf import DictConfig, OmegaConf

        if isinstance(path_or_dict, DictConfig):
            return OmegaConf.to_container(path_or_dict, resolve=True), None  # type: ignore[return-value]
    except ImportError:
        pass
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise RecipeError('recipe', f'expected a YAML file path or a mapping, got {_describe(path_or_dict)}')
    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
        raise RecipeError('recipe', f'{path} does not exist or is not a file; give the path of a recipe YAML file')
    try:
        with open(path) as f:
            data = safe_load(f)
    except yaml.YAMLError as error:
        mark = getattr(error, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(error, 'problem', None) or str(error) or error.__class__.__name__
        raise RecipeError('recipe', f'{path} is not valid YAML{where}: {problem}')
    except UnicodeDecodeError as error:
        raise RecipeError('recipe', f'{path} is not a text YAML file (byte {error.object[error.start]:#04x} at '
                          f'offset {error.start} is not UTF-8); give the path of a recipe YAML file')
    except OSError as error:
        raise RecipeError('recipe', f'{path} cannot be read ({error.strerror})')
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError('recipe', f'{path} must hold a mapping of recipe keys, not {type(data).__name__}')
    return dict(data), path


def load_recipe(path_or_dict: Union[str, os.PathLike, Mapping], overrides: Iterable[str] = ()) -> dict:
    """Read a recipe (a YAML file with ``yaml.safe_load``, or a mapping), apply dotted ``overrides``, validate it.

    Returns the recipe as a plain dict (a new object; the input is not modified), ready for
    :func:`~composer_imp.recipes.build_trainer`. Raises :class:`RecipeError` for a missing or invalid file, an unknown
    key, a value of the wrong type, an unknown registry name or argument, or a file or folder the recipe names that
    does not exist. Validation imports the named classes but builds nothing and writes nothing.
    """
    recipe = read_recipe(path_or_dict, overrides)
    validate(recipe)
    return recipe


def read_recipe(path_or_dict: Union[str, os.PathLike, Mapping], overrides: Iterable[str] = ()) -> dict:
    """The light half of :func:`load_recipe`: read the file (it exists, is UTF-8 text, parses as YAML without
    duplicate keys, holds a mapping) and apply ``overrides``; imports neither Composer nor torch."""
    recipe, _ = _read(path_or_dict)
    return apply_overrides(recipe, list(overrides))


def validate(recipe: dict) -> None:
    """Raise :class:`RecipeError` for the first problem of ``recipe`` (see :func:`load_recipe`)."""
    _mapping('', recipe, 'a mapping of recipe keys')
    _unknown('', recipe, TOP_LEVEL_KEYS)
    for key in REQUIRED_KEYS:
        if recipe.get(key) is None:
            raise RecipeError(key, f'is required: {TOP_LEVEL_KEYS[key][1]}')
    for key, value in recipe.items():
        TOP_LEVEL_KEYS[key][0](key, value)
    if 'scheduler' in recipe and 'schedulers' in recipe:
        raise RecipeError('schedulers', 'give either scheduler (one) or schedulers (a list), not both')
    _check_model('model', recipe['model'])
    check_loader('train_loader', recipe['train_loader'])
    if recipe.get('eval_loader') is not None:
        check_loader('eval_loader', recipe['eval_loader'])
    _check_num_classes(recipe)
    _check_named('optimizer', recipe['optimizer'], 'optimizers', skip_first=True)
    if recipe.get('scheduler') is not None:
        _check_named('scheduler', recipe['scheduler'], 'schedulers')
    if recipe.get('schedulers') is not None:
        _check('schedulers', isinstance(recipe['schedulers'], list), recipe['schedulers'], 'a list of {name, ...}')
        for index, spec in enumerate(recipe['schedulers']):
            _check_named(f'schedulers.{index}', spec, 'schedulers')
    for section in SECTIONS:
        if recipe.get(section) is not None:
            _check_section(section, recipe[section])
    algorithms = recipe.get('algorithms') or {}
    if 'adaptive_sparsity_step' in algorithms and 'imp' not in algorithms:
        raise RecipeError('algorithms.adaptive_sparsity_step', 'is the sparsity step of IMP; add algorithms.imp '
                          '(with target_density) too')
    if 'sparsity_step' in (algorithms.get('imp') or {}):
        raise RecipeError('algorithms.imp.sparsity_step', 'is set by algorithms.adaptive_sparsity_step in a recipe; '
                          'move its kwargs there')
    if 'lmc_evaluator' in (recipe.get('callbacks') or {}) and recipe.get('eval_loader') is None:
        raise RecipeError('callbacks.lmc_evaluator', 'measures barriers on the eval data; add eval_loader')
    if recipe.get('autoresume') and not recipe.get('run_name'):
        raise RecipeError('autoresume', 'needs run_name, so that a restarted run finds its run folder')
    load_path = recipe.get('load_path')
    if load_path and '://' not in load_path and not os.path.exists(os.path.expanduser(load_path)):
        raise RecipeError('load_path', f'{load_path} does not exist; give an existing checkpoint file')


def _check_model(path: str, spec: Any) -> None:
    spec = _mapping(path, spec, '{name, ...model kwargs}')
    if spec.get('name') is None:
        raise RecipeError(f'{path}.name', 'is required: a model name')
    name = spec['name']
    _STR(f'{path}.name', name)
    _opt(_POS_INT)(f'{path}.num_classes', spec.get('num_classes'))
    kwargs = {k: v for k, v in spec.items() if k != 'name'}
    from composer_imp.models import MODELS, TORCHVISION_PREFIX

    if name in REGISTRIES['models']:
        _check_kwargs(path, _load(f'{path}.name', 'models', name), kwargs)
    elif name in MODELS:
        _check_kwargs(path, MODELS[name], kwargs)
    elif not name.startswith(TORCHVISION_PREFIX):
        allowed = sorted({*MODELS, *REGISTRIES['models'].names()})
        raise RecipeError(f'{path}.name', f'{name!r} is unknown; allowed: {", ".join(allowed)}, or '
                          f'{TORCHVISION_PREFIX}<torchvision model name>')


def _check_num_classes(recipe: dict) -> None:
    """``model.num_classes`` must cover the labels of the data sets (else fit() fails on the first batch)."""
    given = recipe['model'].get('num_classes')
    if given is None:
        return
    from composer_imp.data import NUM_CLASSES

    for key in ('train_loader', 'eval_loader'):
        spec = recipe.get(key) or {}
        name = spec.get('dataset', 'cifar10') if spec.get('name') == 'streaming' else spec.get('name')
        classes = NUM_CLASSES.get(name)
        if classes is not None and given < classes:
            raise RecipeError('model.num_classes', f'{given} is fewer than the {classes} classes of {name} ({key}); '
                              f'use {classes} or more, or leave it out (default: the data set\'s class count)')


def check_loader(path: str, spec: Any) -> None:
    """Check a loader spec (see :data:`LOADER_KEYS`; data-set keywords such as ``remote``, ``dataset`` too)."""
    spec = _mapping(path, spec, '{name, batch_size, ...}')
    from composer_imp.data import DATASETS

    for key in ('name', 'batch_size'):
        if spec.get(key) is None:
            raise RecipeError(f'{path}.{key}', f'is required: {LOADER_KEYS[key][1]}')
    name = spec['name']
    _STR(f'{path}.name', name)
    if name not in DATASETS:
        raise RecipeError(f'{path}.name', f'{name!r} is unknown; allowed: {", ".join(sorted(DATASETS))}')
    extra = [p for p in inspect.signature(DATASETS[name]).parameters if p not in ('split', 'root', 'augment')]
    extra = [p for p in extra if p not in ('shuffle', 'batch_size', 'shuffle_seed')]  # set by the loader keys
    _unknown(path, spec, [*LOADER_KEYS, *extra])
    for key, value in spec.items():
        if key in LOADER_KEYS:
            LOADER_KEYS[key][0](f'{path}.{key}', value)
    if name == 'streaming' and ('skip' in spec or 'limit' in spec):
        raise RecipeError(f'{path}.{"skip" if "skip" in spec else "limit"}', 'is not supported by streaming data '
                          '(write a smaller MDS copy with composer-imp convert instead)')
    root = spec.get('root')
    if root is not None and not spec.get('remote') and not os.path.exists(os.path.expandvars(os.path.expanduser(root))):
        raise RecipeError(f'{path}.root', f'{root} does not exist; give the folder holding the {name} data')


def _check_named(path: str, spec: Any, kind: str, skip_first: bool = False) -> None:
    spec = _mapping(path, spec, '{name, ...kwargs}')
    if spec.get('name') is None:
        raise RecipeError(f'{path}.name', f'is required; allowed: {", ".join(REGISTRIES[kind].names())}')
    name = spec['name']
    _check(f'{path}.name', isinstance(name, str), name, 'a name')
    target = _load(f'{path}.name', kind, name)
    _check_kwargs(path, target, {k: v for k, v in spec.items() if k != 'name'}, skip_first=skip_first)


def _check_section(section: str, entries: Any) -> None:
    entries = _mapping(section, entries, '{registry name: kwargs}')
    for name, kwargs in entries.items():
        path = f'{section}.{name}'
        target = _load(path, section, name, what=section[:-1])
        kwargs = {} if kwargs is None else _mapping(path, kwargs, 'a mapping of keyword arguments (or null)')
        _check_kwargs(path, target, kwargs)
        for key, value in kwargs.items():
            if key.endswith('dataloader') and isinstance(value, Mapping):
                check_loader(f'{path}.{key}', value)


def _load(path: str, kind: str, name: str, what: str = 'name') -> Callable[..., Any]:
    registry = REGISTRIES[kind]
    if name not in registry:
        close = difflib.get_close_matches(name, registry.names(), n=1)
        hint = f' (did you mean {close[0]!r}?)' if close else ''
        if path.endswith('.name'):
            raise RecipeError(path, f'{name!r} is unknown{hint}; allowed: {", ".join(registry.names())}')
        raise RecipeError(path, f'unknown {what}{hint}; allowed: {", ".join(registry.names())}')
    try:
        return registry.get(name)
    except Exception as error:  # an entry point or optional class that cannot be imported
        raise RecipeError(path, f'cannot be loaded ({error.__class__.__name__}: {error})')


def signature_parameters(target: Callable[..., Any], skip_first: bool = False) -> tuple[list[str], list[str], bool]:
    """(accepted keyword names, required names, takes **kwargs) of a class or function."""
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return [], [], True
    if skip_first and parameters:
        parameters = parameters[1:]
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in parameters
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is inspect.Parameter.empty]
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters)
    return names, required, var_keyword


def _check_kwargs(path: str, target: Callable[..., Any], kwargs: Mapping[str, Any], skip_first: bool = False) -> None:
    names, required, var_keyword = signature_parameters(target, skip_first)
    if not var_keyword:
        _unknown(path, kwargs, names, 'argument')
    missing = [name for name in required if name not in kwargs and name not in ('num_classes',)]
    if missing:
        raise RecipeError(f'{path}.{missing[0]}', f'is required (arguments: {", ".join(names)})')
    defaults = _defaults(target)
    for key, value in kwargs.items():
        # The type of a keyword's default says what it takes: a flag takes true/false, a number takes a number. The
        # constructors check the rest (a string where a float goes would otherwise fail deep inside, or not at all).
        default = defaults.get(key, inspect.Parameter.empty)
        if value is None or default is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, bool):
            _check(f'{path}.{key}', isinstance(value, bool), value, 'true or false')
        elif _is_number(default):
            _check(f'{path}.{key}', _is_number(value), value, 'a number')


def _defaults(target: Callable[..., Any]) -> dict[str, Any]:
    try:
        return {p.name: p.default for p in inspect.signature(target).parameters.values()}
    except (TypeError, ValueError):
        return {}

"""Level replay: every pruned level re-lives steps k..T of level 0, as seen by every component of the run.

IMP restores, at each level start, the whole run as it was at the rewind step k: the Trainer's timestamp, the state of
every other algorithm and callback, which parameters are trainable and in which optimizer group, and the position of
the train dataloader. So anything that reads time (schedulers, stoppers, LayerFreezing, ProgressiveResizing, SWA,
``'dur'`` strings) and anything that keeps state (EMA averages, best values, frozen layers) replays level 0 from k
without knowing about IMP. What must stay monotonic across levels is kept so explicitly: logger steps (shifted by the
batches of the levels before) and checkpoint file names (prefixed with the level).

Component state is captured as a pickle in which every object that belongs to the run itself (the State, the model and
its modules, parameters and buffers, optimizers, schedulers, dataloaders, other components) is a reference, so that a
restore rebinds a component to the live run instead of to copies. The same bytes go into IMP's checkpointed state and
are resolved against the resumed run's objects.
"""
from __future__ import annotations

import io
import pickle
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from torch import nn

from composer_imp.evaluation import unwrap_model

__all__ = [
    'NOT_REWOUND',
    'ComponentSnapshot',
    'rewound_components',
    'capture_layout',
    'restore_layout',
    'inner_optimizers',
    'shift_logger_steps',
    'prefix_checkpoint_names',
    'DataloaderReplay',
]

#: Set ``imp_rewind = False`` on a callback or algorithm whose state must carry across levels (a logger-like record).
NOT_REWOUND = 'imp_rewind'

_ALLOWED_MODULE_PREFIXES = ('torch', 'composer', 'composer_imp', 'collections', 'numpy', 'datetime', 'transformers',
                            'torchmetrics', 'llmfoundry', 'streaming', 'weakref', '_weakrefset', 'enum', 'omegaconf',
                            'PIL', 'torchvision')
_VALUE_TYPES = (str, bytes, int, float, bool, tuple)
_SAFE_BUILTINS = {'set', 'frozenset', 'slice', 'range', 'complex', 'bytearray', 'dict', 'list', 'tuple', 'object', 'int',
                  'float', 'bool', 'str', 'bytes'}
# Modules whose functions fetch, load or compile code or pickles: never called from a component snapshot.
_LOADER_MODULES = ('torch.hub', 'torch.serialization', 'torch.package', 'torch.jit', 'torch.utils.cpp_extension',
                   'torch._inductor', 'torch._dynamo', 'torch.distributed', 'torch.multiprocessing', 'composer.utils',
                   'composer.cli', 'composer.loggers', 'transformers.pipelines', 'transformers.dynamic_module_utils',
                   'transformers.utils.hub', 'llmfoundry.command_utils', 'llmfoundry.cli', 'streaming.base.storage')
_SAFE_FUNCTIONS = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                   ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar')}


def rewound_components(state: State, imp: Any) -> list[Any]:
    """The algorithms and callbacks whose state IMP rewinds: all but IMP, logger destinations, checkpoint savers (their
    records must stay monotonic) and components that set ``imp_rewind = False``."""
    from composer.callbacks import CheckpointSaver

    components = [a for a in state.algorithms if a is not imp] + list(state.callbacks)
    return [
        c for c in components if not isinstance(c, (LoggerDestination, CheckpointSaver)) and
        getattr(c, NOT_REWOUND, True) and hasattr(c, '__dict__')
    ]


def _live_objects(state: State) -> dict[tuple, Any]:
    """Every object of the run a component may refer to, under a key that is stable across a resume."""
    model = unwrap_model(state)
    live: dict[tuple, Any] = {('state',): state, ('model',): state.model, ('unwrapped_model',): model}
    for name, module in model.named_modules():
        live[('module', name)] = module
    for name, param in model.named_parameters(remove_duplicate=False):
        live[('parameter', name)] = param
    for name, buffer in model.named_buffers(remove_duplicate=False):
        live[('buffer', name)] = buffer
    for index, optimizer in enumerate(state.optimizers):
        for depth, inner in enumerate(inner_optimizers(optimizer)):
            live[('optimizer', index, depth)] = inner
            for group_index, group in enumerate(inner.param_groups):
                live[('param_group', index, depth, group_index)] = group
    for index, scheduler in enumerate(state.schedulers):
        live[('scheduler', index)] = scheduler
    for index, algorithm in enumerate(state.algorithms):
        live[('algorithm', index)] = algorithm
    for index, callback in enumerate(state.callbacks):
        live[('callback', index)] = callback
    for index, evaluator in enumerate(state.evaluators or []):
        live[('evaluator', index)] = evaluator
        live[('eval_dataloader', index)] = evaluator.dataloader
        live[('eval_loader', index)] = evaluator.dataloader.dataloader
        live[('eval_dataset', index)] = getattr(evaluator.dataloader.dataloader, 'dataset', None)
    live[('train_dataset',)] = getattr(state.train_dataloader, 'dataset', None)
    # Only objects that live as long as the run: a key must name the same object at capture and at restore (a
    # dict of latest metric values does not; its values are captured by value).
    for label, metrics in (state.eval_metrics or {}).items():
        for name, metric in metrics.items():
            live[('eval_metric', label, name)] = metric
    for name, metric in (state.train_metrics or {}).items():
        live[('train_metric', name)] = metric
    live[('device',)] = state.device
    live[('scaler',)] = state.scaler
    live[('train_dataloader',)] = state.train_dataloader
    # None and interned values are no run object: as references they would capture every None, 0 or '' by identity.
    return {key: obj for key, obj in live.items() if obj is not None and not isinstance(obj, _VALUE_TYPES)}


class _Pickler(pickle.Pickler):
    """Run objects become references; tensors go, cloned, into a side list (saved by torch, loaded with
    ``weights_only=True``), so the pickle itself holds only plain data and classes."""

    def __init__(self, file: io.BytesIO, keys_by_id: dict[int, tuple]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.keys_by_id = keys_by_id
        self.tensors: list[torch.Tensor] = []
        self._tensor_index: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Optional[tuple]:
        key = self.keys_by_id.get(id(obj))
        if key is not None:
            return key
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self._tensor_index:
                self._tensor_index[id(obj)] = len(self.tensors)
                self.tensors.append(obj.detach().clone())
            return ('tensor', self._tensor_index[id(obj)], isinstance(obj, nn.Parameter), bool(obj.requires_grad))
        return None

    def reducer_override(self, obj: Any) -> Any:
        # Weak containers (which datasets an augmentation already wrapped) hold run objects: keep them by reference.
        if isinstance(obj, weakref.WeakSet):
            return weakref.WeakSet, (list(obj),)
        if isinstance(obj, (weakref.WeakKeyDictionary, weakref.WeakValueDictionary)):
            return type(obj), (dict(obj.items()),)
        return NotImplemented


class _Unpickler(pickle.Unpickler):
    """Resolves run references to the live objects and tensors to copies of the saved ones, and looks up classes and
    functions only in known libraries and the components' own modules, never in modules that fetch, load or compile
    code or pickles (``os.system``, ``torch.load``, ``torch.hub``, Composer's checkpoint loader are refused). A
    narrowing, not a sandbox: the Composer checkpoint that carries these bytes is itself unpickled by Composer 0.32.1
    without restriction."""

    def __init__(self, file: io.BytesIO, live: dict[tuple, Any], tensors: list[torch.Tensor],
                 component_modules: set[str], device: Any):
        super().__init__(file)
        self.live, self.tensors, self.component_modules, self.device = live, tensors, component_modules, device

    def persistent_load(self, key: Any) -> Any:
        key = tuple(key)
        if key and key[0] == 'tensor':
            _, index, is_parameter, requires_grad = key
            tensor = self.device.tensor_to_device(self.tensors[index].clone())
            return nn.Parameter(tensor, requires_grad=requires_grad) if is_parameter else tensor
        if key not in self.live:
            raise pickle.UnpicklingError(f'IMP: rewound component state refers to {key}, which this run does not have')
        return self.live[key]

    def find_class(self, module: str, name: str) -> Any:
        known = module in self.component_modules or any(module == p or module.startswith(p + '.')
                                                         for p in _ALLOWED_MODULE_PREFIXES)
        if module == 'builtins':
            if name == 'getattr':
                return _public_getattr  # how pickle stores a bound method (a model's ``loss``)
            known = name in _SAFE_BUILTINS
        loader = any(module == m or module.startswith(m + '.') for m in _LOADER_MODULES) or 'load' in name.lower()
        found = super().find_class(module, name) if known and not loader else None
        function_ok = (module, name) in _SAFE_FUNCTIONS or isinstance(found, types.BuiltinFunctionType) or isinstance(
            found, types.FunctionType)  # a model's loss function, a metric's sync function
        if found is not None and (isinstance(found, (type, torch.dtype)) or function_ok):
            return found
        raise pickle.UnpicklingError(f'IMP: rewound component state holds {module}.{name}, which is not loaded')


def _public_getattr(obj: Any, name: str) -> Any:
    """``getattr`` for unpickling: public attributes only, never a module (no path to ``__globals__`` or ``os``)."""
    if not isinstance(name, str) or name.startswith('_') or isinstance(obj, types.ModuleType):
        raise pickle.UnpicklingError(f'IMP: rewound component state asks for attribute {name!r} of {type(obj)}')
    value = getattr(obj, name)
    if isinstance(value, types.ModuleType):
        raise pickle.UnpicklingError(f'IMP: rewound component state asks for module {name!r}')
    return value


class ComponentSnapshot:
    """The instance state of the rewound components at the rewind step: a pickle with references to the live run, and
    the tensors it holds (cloned at the rewind step).

    Components are matched by class and position among the components of that class, so a component added on
    resume (a new logger-like callback) is left as it is and one that is gone is ignored, each with a warning.
    """

    def __init__(self, data: bytes, tensors: list[torch.Tensor]):
        self.data, self.tensors = data, tensors

    @classmethod
    def capture(cls, state: State, components: list[Any]) -> 'ComponentSnapshot':
        live = _live_objects(state)
        keys_by_id = {id(obj): key for key, obj in live.items()}
        buffer = io.BytesIO()
        pickler = _Pickler(buffer, keys_by_id)
        try:
            pickler.dump({key: dict(vars(c)) for key, c in _keyed(components).items()})
        except Exception as error:
            culprit = next((c for c in components if not _picklable(c, keys_by_id)), None)
            raise _refusal(culprit, error) from error
        return cls(buffer.getvalue(), pickler.tensors)

    def load(self, state: State, components: list[Any],
             live: Optional[dict[tuple, Any]] = None) -> dict[str, dict[str, Any]]:
        """The components' instance states by component key, bound to the live run's objects."""
        modules = {type(c).__module__ for c in components}
        live = _live_objects(state) if live is None else live
        return _Unpickler(io.BytesIO(self.data), live, self.tensors, modules, state.device).load()

    def check_loadable(self, state: State, components: list[Any]) -> None:
        """Raise the construction-time refusal when a component's captured state could not be restored."""
        try:
            self.load(state, components)
        except pickle.UnpicklingError as error:
            culprit = next((c for c in components if not _restorable(state, c)), None)
            raise _refusal(culprit, error) from error

    def restore(self, state: State, components: list[Any], masks: dict[str, torch.Tensor]) -> None:
        live_objects = _live_objects(state)
        states = self.load(state, components, live_objects)
        live = {id(obj) for obj in live_objects.values()}
        keyed = _keyed(components)
        for key in sorted(set(states) ^ set(keyed)):
            warnings.warn(f'IMP: {key.split("#")[0]} ' + ('was not in the run at the rewind step; it is not rewound'
                                                          if key in keyed else 'is no longer in the run'))
        for key, component in keyed.items():
            if key in states:
                vars(component).clear()
                vars(component).update(states[key])
                mask_weight_copies(states[key], masks, live)

    def state_dict(self) -> dict[str, Any]:
        return {'data': torch.frombuffer(bytearray(self.data), dtype=torch.uint8), 'tensors': list(self.tensors)}

    @classmethod
    def from_state_dict(cls, stored: dict[str, Any]) -> 'ComponentSnapshot':
        return cls(stored['data'].cpu().numpy().tobytes(), list(stored['tensors']))


def _refusal(component: Any, error: BaseException) -> ValueError:
    name = type(component).__name__ if component is not None else 'a component'
    return ValueError(f'{name}: IMP cannot rewind its state at each level ({type(error).__name__}: {error}); set '
                      f'{name}.{NOT_REWOUND} = False if it keeps no per-level state, or remove it')


def _keyed(components: list[Any]) -> dict[str, Any]:
    keyed: dict[str, Any] = {}
    for component in components:
        name = f'{type(component).__module__}.{type(component).__qualname__}'
        index = sum(k.split('#')[0] == name for k in keyed)
        keyed[f'{name}#{index}'] = component
    return keyed


def _restorable(state: State, component: Any) -> bool:
    try:
        ComponentSnapshot.capture(state, [component]).load(state, [component])
        return True
    except (pickle.UnpicklingError, ValueError):
        return False


def _picklable(component: Any, keys_by_id: dict[int, tuple]) -> bool:
    try:
        _Pickler(io.BytesIO(), keys_by_id).dump(dict(vars(component)))
        return True
    except Exception:
        return False


@torch.no_grad()
def mask_weight_copies(instance_state: Any, masks: dict[str, torch.Tensor], live: set[int]) -> None:
    """Zero the pruned entries of a component's own copies of prunable weights (EMA averages, SWA's averaged model):
    a tensor is such a copy when its key in a dict, or its parameter name inside a module, equals a masked
    parameter's name or ends with ``'.' + name``, and its shape matches. Objects of the run itself (``live`` ids: the
    model, IMP, other components a component refers to) are not the component's copies and are left alone."""
    pruned = {name: mask for name, mask in masks.items() if not bool(mask.all())}
    if not pruned:
        return

    def mask_for(key: str, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        for name, mask in pruned.items():
            if (key == name or key.endswith('.' + name)) and tuple(tensor.shape) == tuple(mask.shape):
                return mask
        return None

    seen: set[int] = set(live)

    def visit(value: Any, depth: int) -> None:
        if id(value) in seen or depth > 4:
            return
        seen.add(id(value))
        if isinstance(value, nn.Module):
            for key, tensor in value.named_parameters(remove_duplicate=False):
                mask = mask_for(key, tensor)
                if mask is not None:
                    tensor.mul_(mask.to(device=tensor.device, dtype=tensor.dtype))
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and isinstance(item, torch.Tensor):
                    mask = mask_for(key, item)
                    if mask is not None:
                        item.mul_(mask.to(device=item.device, dtype=item.dtype))
                else:
                    visit(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth + 1)
        elif hasattr(value, '__dict__') and not isinstance(value, (torch.Tensor, type)):
            visit(vars(value), depth + 1)

    visit(instance_state, 0)


# ---------------------------------------------------------------------------------------------------- trainable layout
def inner_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """``optimizer`` and the optimizers it wraps (SAM's ``base_optimizer``), outermost first."""
    found = [optimizer]
    for value in vars(optimizer).values():
        if isinstance(value, torch.optim.Optimizer) and value not in found:
            found.extend(inner_optimizers(value))
    return found


def capture_layout(model: nn.Module, optimizers: tuple) -> dict[str, Any]:
    """Which parameters are trainable and which optimizer group holds which parameters, by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        'requires_grad': {n: bool(p.requires_grad) for n, p in model.named_parameters()},
        'groups': [[[names[id(p)] for p in group['params'] if id(p) in names] for group in optimizer.param_groups]
                   for optimizer in optimizers],
    }


def restore_layout(model: nn.Module, optimizers: tuple, layout: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    for name, requires_grad in layout['requires_grad'].items():
        params[name].requires_grad_(requires_grad)
    for optimizer, groups in zip(optimizers, layout['groups']):
        for group, names in zip(optimizer.param_groups, groups):
            group['params'] = [params[n] for n in names]


# ---------------------------------------------------------------------------------------------------- monotonic records
def shift_logger_steps(logger: Logger, offset: Callable[[], int]) -> None:
    """Logger destinations receive ``step + offset()``: steps stay monotonic while the run's time replays."""
    for destination in logger.destinations:
        for method in ('log_metrics', 'log_images', 'log_table'):
            original = getattr(type(destination), method, None)
            if original is None or getattr(getattr(destination, method), 'imp_shifted', False):
                continue
            setattr(destination, method, _shifted(destination, original, offset))


def _shifted(destination: Any, method: Callable, offset: Callable[[], int]) -> Callable:
    import inspect

    step_position = list(inspect.signature(method).parameters).index('step') - 1  # without self

    def shifted(*args: Any, **kwargs: Any) -> Any:
        if 'step' in kwargs:
            if kwargs['step'] is not None:
                kwargs['step'] = int(kwargs['step']) + offset()
        elif len(args) > step_position and args[step_position] is not None:
            args = (*args[:step_position], int(args[step_position]) + offset(), *args[step_position + 1:])
        return method(destination, *args, **kwargs)

    shifted.imp_shifted = True  # type: ignore[attr-defined]
    return shifted


def prefix_checkpoint_names(state: State, originals: dict[int, tuple], prefix: str) -> None:
    """Every ``CheckpointSaver`` writes ``<prefix><its file name>``: the timestamp in a checkpoint's name replays with
    each level, the prefix (the level) keeps names unique and Composer's conflict check confined to one level."""
    from composer.callbacks import CheckpointSaver

    for saver in (c for c in state.callbacks if isinstance(c, CheckpointSaver)):
        paths = [p for p in (saver.filename, saver.remote_file_name) if p is not None]
        original = originals.setdefault(id(saver), tuple(p.filename for p in paths))
        for path, filename in zip(paths, original):
            head, _, tail = filename.rpartition('/')
            path.filename = f'{head}/{prefix}{tail}' if head else f'{prefix}{tail}'
    if state.fsdp_config is not None:
        _prefix_sharded_folders(state.fsdp_config, prefix)


_PREFIXED_CONFIGS: dict[type, type] = {}


def _prefix_sharded_folders(config: Any, prefix: str) -> None:
    """A sharded checkpoint (FSDP, ``state_dict_type='sharded'``) is a folder named by the FSDP config's
    ``sharded_ckpt_prefix_dir``, not by the saver's file name; ``FSDP2Config`` makes it a constant
    (``'ep{epoch}-ba{batch}'``), so each level would overwrite the folders of the levels before it. The config's class
    is swapped for a subclass whose folder name carries the level prefix (nothing else about the config changes)."""
    if not isinstance(getattr(type(config), 'sharded_ckpt_prefix_dir', None), property):
        return  # FSDP1's FSDPConfig, which IMP refuses at INIT
    base = type(config).__mro__[1] if getattr(type(config), '_imp_prefixed', False) else type(config)
    if base not in _PREFIXED_CONFIGS:
        original = base.sharded_ckpt_prefix_dir

        def sharded_ckpt_prefix_dir(self) -> str:
            return self.__dict__.get('_imp_checkpoint_prefix', '') + original.fget(self)

        _PREFIXED_CONFIGS[base] = type(base.__name__, (base,), {
            '_imp_prefixed': True, 'sharded_ckpt_prefix_dir': property(sharded_ckpt_prefix_dir),
            '__module__': base.__module__, '__qualname__': base.__qualname__})
    config.__class__ = _PREFIXED_CONFIGS[base]
    config.__dict__['_imp_checkpoint_prefix'] = prefix


# ---------------------------------------------------------------------------------------------------- data replay
class DataloaderReplay:
    """Restarts the train dataloader at the rewind step's position when a level ends in the middle of an epoch.

    Composer iterates one pass of the loader per epoch; a level ending mid-epoch leaves that pass mid-way. ``restart``
    makes the live pass continue from the start of the rewind step's epoch, fast-forwarded by its batches in that epoch
    (the batches level 0 trained there when the sampler is seeded per epoch), so the level's epoch ends fall where
    level 0's did. The loader's class is swapped for a subclass whose ``__iter__`` honours the request; nothing else
    about the loader changes. A level that ends on an epoch boundary needs none of this: Composer's own resumption
    logic skips to the rewound ``batch_in_epoch`` when it starts the next pass.
    """

    def __init__(self, loader: Any):
        self.loader = loader
        self.supported = _make_restartable(loader)

    def restart(self, epoch: int, batch_in_epoch: int, composer_skips: bool) -> None:
        """Continue the live pass at ``batch_in_epoch`` of ``epoch``; ``composer_skips``: Composer's resumption logic
        is on for this loader (``spin_dataloaders``, its default, and no dataset-side resumption)."""
        self.loader._imp_restart = (epoch, batch_in_epoch, composer_skips)


_RESTARTABLE: dict[type, type] = {}


def _make_restartable(loader: Any) -> bool:
    cls = type(loader)
    if getattr(cls, '_imp_restartable', False):
        return True
    if cls.__module__ == 'builtins' or not hasattr(cls, '__iter__'):
        return False
    if cls not in _RESTARTABLE:
        _RESTARTABLE[cls] = type(cls.__name__, (cls,), {
            '__iter__': _restartable_iter,
            '_imp_restartable': True,
            '_imp_base_iter': cls.__iter__,
            '__module__': cls.__module__,
            '__qualname__': cls.__qualname__,
        })
    try:
        loader.__class__ = _RESTARTABLE[cls]
    except TypeError:
        return False
    return True


def _restartable_iter(self: Any) -> Iterator[Any]:
    """One pass of the loader that can be restarted mid-way; ends after ``_imp_epoch_len`` batches of its epoch.

    Composer skips every batch whose index in the pass is below ``timestamp.batch_in_epoch`` (its resumption logic,
    which counts the batches of the pass, not of the epoch), so after a restart to position k' this pass skips only
    what Composer will not: min(k', batches already yielded in the pass).
    """
    base = type(self)._imp_base_iter
    iterator = base(self)
    position = yielded = 0
    while True:
        request = self.__dict__.pop('_imp_restart', None)
        if request is not None:
            epoch, target, composer_skips = request
            del iterator
            sampler = getattr(self, 'sampler', None)
            if hasattr(sampler, 'set_epoch'):
                sampler.set_epoch(epoch)
            iterator = base(self)
            position = min(target, yielded) if composer_skips else target
            try:
                for _ in range(position):
                    next(iterator)
            except StopIteration:
                warnings.warn('IMP: the train dataloader ended while fast-forwarding to the rewind step')
                return
        epoch_len = self.__dict__.get('_imp_epoch_len')
        if epoch_len is not None and position >= epoch_len:
            return
        try:
            batch = next(iterator)
        except StopIteration:
            return
        position += 1
        yielded += 1
        yield batch

"""Registries: the names a recipe may use, mapped to classes, extensible through entry points.

Each registry maps a recipe name (``imp``, ``lr_monitor``, ``sgd``, ...) to a class or factory. Built-in entries are
``'module:attribute'`` strings, imported only when a recipe uses them (Composer's optional loggers import their own
optional packages). Other packages add names in two ways:

- an entry point in the group ``composer_imp.<registry>`` (``composer_imp.algorithms``, ``composer_imp.callbacks``,
  ``composer_imp.loggers``, ``composer_imp.optimizers``, ``composer_imp.schedulers``, ``composer_imp.models``), e.g. in
  ``pyproject.toml``::

      [project.entry-points."composer_imp.callbacks"]
      my_monitor = "my_package.callbacks:MyMonitor"

- at run time: ``composer_imp.recipes.REGISTRIES['callbacks'].register('my_monitor', MyMonitor)``.

Names registered at run time win over entry points, which win over the built-ins.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any, Union

__all__ = ['Registry', 'REGISTRIES', 'ENTRY_POINT_PREFIX']

ENTRY_POINT_PREFIX = 'composer_imp.'

Entry = Union[str, Callable[..., Any]]


class Registry:
    """Recipe name -> class (or factory) of one kind, e.g. ``algorithms``."""

    def __init__(self, kind: str, builtins: dict[str, Entry], description: str):
        self.kind = kind
        self.group = ENTRY_POINT_PREFIX + kind
        self.description = description
        self._builtins = dict(builtins)
        self._registered: dict[str, Entry] = {}

    def register(self, name: str, obj: Entry) -> None:
        """Add (or replace) ``name``; ``obj`` is a class, a factory, or a ``'module:attribute'`` string."""
        self._registered[name] = obj

    def unregister(self, name: str) -> None:
        """Remove a name added with :meth:`register` (built-ins and entry points stay)."""
        self._registered.pop(name, None)

    def _entry_points(self) -> dict[str, Any]:
        return {ep.name: ep for ep in metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted({*self._builtins, *self._entry_points(), *self._registered})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._registered or name in self._builtins or
                                          name in self._entry_points())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Callable[..., Any]:
        """The class or factory registered as ``name``; ``KeyError`` if unknown, ``ImportError`` if it cannot load."""
        if name in self._registered:
            return _resolve(self._registered[name])
        entry_points = self._entry_points()
        if name in entry_points:
            return entry_points[name].load()
        if name in self._builtins:
            return _resolve(self._builtins[name])
        raise KeyError(name)


def _resolve(entry: Entry) -> Callable[..., Any]:
    if isinstance(entry, str):
        module, _, attribute = entry.partition(':')
        return getattr(importlib.import_module(module), attribute)
    return entry


_C = 'composer.algorithms:'
ALGORITHMS: dict[str, Entry] = {
    'imp': 'composer_imp.algorithms.imp:IMP',
    # Not an Algorithm of its own: it becomes IMP's ``sparsity_step`` (see composer_imp.recipes.build).
    'adaptive_sparsity_step': 'composer_imp.algorithms.adaptive_sparsity:AdaptiveSparsityStep',
    'alibi': _C + 'Alibi',
    'augmix': _C + 'AugMix',
    'blurpool': _C + 'BlurPool',
    'channels_last': _C + 'ChannelsLast',
    'colout': _C + 'ColOut',
    'cutmix': _C + 'CutMix',
    'cutout': _C + 'CutOut',
    'ema': _C + 'EMA',
    'factorize': _C + 'Factorize',
    'gated_linear_units': _C + 'GatedLinearUnits',
    'ghost_batchnorm': _C + 'GhostBatchNorm',
    'gradient_clipping': _C + 'GradientClipping',
    'gyro_dropout': _C + 'GyroDropout',
    'label_smoothing': _C + 'LabelSmoothing',
    'layer_freezing': _C + 'LayerFreezing',
    'low_precision_groupnorm': _C + 'LowPrecisionGroupNorm',
    'low_precision_layernorm': _C + 'LowPrecisionLayerNorm',
    'mixup': _C + 'MixUp',
    'progressive_resizing': _C + 'ProgressiveResizing',
    'randaugment': _C + 'RandAugment',
    'sam': _C + 'SAM',
    'selective_backprop': _C + 'SelectiveBackprop',
    'seq_length_warmup': _C + 'SeqLengthWarmup',
    'squeeze_excite': _C + 'SqueezeExcite',
    'stochastic_depth': _C + 'StochasticDepth',
    'swa': _C + 'SWA',
    'weight_standardization': _C + 'WeightStandardization',
}

_CB = 'composer.callbacks:'
CALLBACKS: dict[str, Entry] = {
    'lmc_evaluator': 'composer_imp.callbacks.lmc_evaluator:LMCEvaluator',
    'level_table': 'composer_imp.report.live:LevelTable',
    'activation_monitor': _CB + 'ActivationMonitor',
    'checkpoint_saver': _CB + 'CheckpointSaver',
    'early_stopper': _CB + 'EarlyStopper',
    'image_visualizer': _CB + 'ImageVisualizer',
    'lr_monitor': _CB + 'LRMonitor',
    'memory_monitor': _CB + 'MemoryMonitor',
    'nan_monitor': _CB + 'NaNMonitor',
    'optimizer_monitor': _CB + 'OptimizerMonitor',
    'runtime_estimator': _CB + 'RuntimeEstimator',
    'speed_monitor': _CB + 'SpeedMonitor',
    'system_metrics_monitor': _CB + 'SystemMetricsMonitor',
    'threshold_stopper': _CB + 'ThresholdStopper',
}

_L = 'composer.loggers:'
LOGGERS: dict[str, Entry] = {
    'comet_ml': _L + 'CometMLLogger',
    'console': _L + 'ConsoleLogger',
    'file': _L + 'FileLogger',
    'inmemory': _L + 'InMemoryLogger',
    'mlflow': _L + 'MLFlowLogger',
    'neptune': _L + 'NeptuneLogger',
    'progress_bar': _L + 'ProgressBarLogger',
    'remote_uploader_downloader': _L + 'RemoteUploaderDownloader',
    'tensorboard': _L + 'TensorboardLogger',
    'wandb': _L + 'WandBLogger',
}

OPTIMIZERS: dict[str, Entry] = {
    'sgd': 'torch.optim:SGD',
    'adam': 'torch.optim:Adam',
    'adamw': 'torch.optim:AdamW',
    'rmsprop': 'torch.optim:RMSprop',
    'decoupled_sgdw': 'composer.optim:DecoupledSGDW',
    'decoupled_adamw': 'composer.optim:DecoupledAdamW',
}

_S = 'composer.optim:'
SCHEDULERS: dict[str, Entry] = {  # Composer's schedulers only: IMP replays them level by level from the rewind step
    'constant': _S + 'ConstantScheduler',
    'constant_with_warmup': _S + 'ConstantWithWarmupScheduler',
    'cosine_decay': _S + 'CosineAnnealingScheduler',
    'cosine_decay_with_warmup': _S + 'CosineAnnealingWithWarmupScheduler',
    'cosine_warm_restarts': _S + 'CosineAnnealingWarmRestartsScheduler',
    'exponential': _S + 'ExponentialScheduler',
    'linear_decay': _S + 'LinearScheduler',
    'linear_decay_with_warmup': _S + 'LinearWithWarmupScheduler',
    'multistep': _S + 'MultiStepScheduler',
    'multistep_with_warmup': _S + 'MultiStepWithWarmupScheduler',
    'polynomial': _S + 'PolynomialScheduler',
    'polynomial_with_warmup': _S + 'PolynomialWithWarmupScheduler',
    'step': _S + 'StepScheduler',
}

REGISTRIES: dict[str, Registry] = {
    'algorithms': Registry('algorithms', ALGORITHMS, 'Composer Algorithm classes (kwargs -> constructor)'),
    'callbacks': Registry('callbacks', CALLBACKS, 'Composer Callback classes'),
    'loggers': Registry('loggers', LOGGERS, 'Composer LoggerDestination classes'),
    'optimizers': Registry('optimizers', OPTIMIZERS, 'torch.optim.Optimizer classes (params are passed first)'),
    'schedulers': Registry('schedulers', SCHEDULERS, 'Composer ComposerScheduler classes'),
    # Built-in models live in composer_imp.models (build_model); entries here are factories
    # (num_classes=..., **kwargs) -> nn.Module or ComposerModel.
    'models': Registry('models', {}, 'model factories (num_classes=..., **kwargs) -> nn.Module or ComposerModel'),
}

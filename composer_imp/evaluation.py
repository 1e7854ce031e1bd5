"""Evaluating a model inside a running Trainer, from an algorithm or a callback (which hold no Trainer reference).

Shared by IMP (a level's own evaluation when the Trainer's eval did not run at the level's end), the LMC evaluator and
the adaptive sparsity step. Mirrors ``Trainer._eval_loop``: the evaluators' dataloaders and batch transforms, the
Trainer's device and precision context, deep copies of the eval metrics (so the Trainer's own metric objects are never
touched), torchmetrics' cross-rank sync in ``compute()``. The global RNG is forked, because iterating a DataLoader draws
from it and would otherwise change the training run's data order.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional

import torch
from composer.core import DataSpec, State
from composer.core.precision import get_precision_context
from composer.utils import dist, model_eval_mode
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

__all__ = ['unwrap_model', 'evaluate', 'preserve_rng', 'seeded_rng', 'eval_metric_values', 'DeviceBatches',
           'sum_over_ranks', 'without_persistent_workers']


def unwrap_model(state: State) -> torch.nn.Module:
    """The user's model: ``state.model`` without its DDP wrapper (never by stripping a ``module.`` prefix)."""
    model = state.model
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def preserve_rng(state: State) -> Iterator[None]:
    """Run a block without consuming the training run's CPU and accelerator random streams."""
    device = state.device._device if hasattr(state.device, '_device') else torch.device('cpu')
    devices = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def seeded_rng(state: State) -> Iterator[None]:
    """``preserve_rng`` plus a fixed seed: every call sees the same shuffled batches and augmentation draws."""
    with preserve_rng(state):
        torch.manual_seed(state.seed)
        yield


class DeviceBatches:
    """Re-iterable batches on the run's device, inside its precision context, at most ``limit`` of them.

    ``batches`` is any iterable of batches, or a ``DataSpec`` whose batch and microbatch transforms are applied.
    """

    def __init__(self, state: State, batches: Iterable[Any] | DataSpec, limit: Optional[int] = None):
        self.state, self.limit = state, limit
        self.spec = batches if isinstance(batches, DataSpec) else None
        self.batches = batches.dataloader if isinstance(batches, DataSpec) else batches

    def __iter__(self) -> Iterator[Any]:
        batches = self.batches if self.limit is None or self.limit < 0 else itertools.islice(self.batches, self.limit)
        with get_precision_context(self.state.precision, self.state.precision_config):
            for batch in batches:
                if self.spec is not None:
                    batch = self.spec.batch_transforms(batch)
                batch = self.state.device.batch_to_device(batch)
                yield batch if self.spec is None else self.spec.microbatch_transforms(batch)


def sum_over_ranks(state: State) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``reduce`` for ``composer_imp.functional`` counters: the sum over all ranks, on the run's device."""

    def reduce(totals: torch.Tensor) -> torch.Tensor:
        totals = state.device.tensor_to_device(totals)
        dist.all_reduce(totals, reduce_operation='SUM')
        return totals

    return reduce


def without_persistent_workers(loader: Any) -> Any:
    """A loader that can be iterated beside the training run: a second ``iter()`` of a persistent-workers loader would
    reset the run's own iterator, so such a loader is mirrored without workers."""
    if isinstance(loader, DataLoader) and loader.persistent_workers:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
                          num_workers=0, pin_memory=loader.pin_memory)
    return loader


def eval_metric_values(state: State) -> dict[str, float]:
    """The Trainer's latest computed eval metrics as ``{'<label>/<metric>': value}`` (torchmetrics caches ``compute``)."""
    values = {}
    for label, metrics in (state.eval_metrics or {}).items():
        for name, metric in metrics.items():
            if getattr(metric, '_computed', None) is not None:
                values[f'{label}/{name}'] = float(metric.compute())
    return values


@torch.no_grad()
def evaluate(state: State, model: torch.nn.Module | None = None) -> dict[str, float]:
    """Evaluate ``model`` (default: the trained model) on every evaluator of the run.

    Returns ``{'<label>/<metric>': value}``, identical on every rank. ``model`` must be a ComposerModel with the same
    metrics as the run's model (a probe copy of it, typically).
    """
    model = unwrap_model(state) if model is None else model
    results: dict[str, float] = {}
    with preserve_rng(state), model_eval_mode(model):
        for evaluator in state.evaluators:
            metrics = {name: copy.deepcopy(m) for name, m in state.eval_metrics[evaluator.label].items()}
            for metric in metrics.values():
                metric.reset()
                state.device.module_to_device(metric)
            for batch in DeviceBatches(state, evaluator.dataloader, evaluator.subset_num_batches):
                outputs = model.eval_forward(batch)
                for metric in metrics.values():
                    model.update_metric(batch, outputs, metric)
            for name, metric in metrics.items():
                results[f'{evaluator.label}/{name}'] = float(metric.compute())
    return results

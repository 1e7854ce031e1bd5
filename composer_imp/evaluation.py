"""The one evaluation core: a model scored inside a running Trainer, from an algorithm or a callback.

Used by IMP's level records, the LMC evaluator, the adaptive sparsity step (projection check and verification) and
instability analysis; none of them has a Trainer reference. Like ``Trainer._eval_loop`` it evaluates through the
model's own Composer interface: ``eval_forward`` and ``update_metric`` on deep copies of the eval metrics
(``state.eval_metrics[label]`` for an evaluator, ``model.get_metrics(is_train=False)`` for other data, so the
Trainer's metric objects are never touched), ``compute()`` with torchmetrics' cross-rank sync, and, when the loss is
asked for, ``forward`` + ``loss`` first (``eval_forward`` then reuses those outputs). Batches are whatever the loader
yields (tuples, dicts, any ``Mapping`` such as ``transformers.BatchEncoding``): the DataSpec's batch transforms,
microbatches of the evaluator's (or the training) microbatch size, the run's device and precision context, the
microbatch transforms; the sample a ``DistributedSampler`` pads onto a rank's last batch is dropped, as Composer's
eval loop drops it. The global RNGs are forked and every DataLoader's own generators restored, because iterating a
loader draws from them and would otherwise change the training run.

*Values.* A barrier, a projection check or a matching test is computed on a value that is always lower-is-better,
named as the user names it (see :func:`resolve_value`): ``'error'`` (1 - the model's accuracy metric),
``'loss'`` (the model's own loss), ``'perplexity'``, ``'cross_entropy'``, or any eval metric by name.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import torch
from composer.core import DataSpec, Evaluator, State
from composer.core.precision import get_precision_context
from composer.utils import dist, ensure_tuple, model_eval_mode
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchmetrics import Metric

from composer_imp.functional.shards import reshard

__all__ = ['unwrap_model', 'evaluate', 'preserve_rng', 'seeded_rng', 'preserve_loader_generators', 'DeviceBatches',
           'sum_over_ranks', 'without_persistent_workers', 'Value', 'resolve_value', 'resolve_values',
           'check_metric_name', 'Scorer', 'samples_in_batch', 'find_evaluator', 'evaluator_batches', 'train_batches',
           'trainer_eval_round', 'level_eval_metrics', 'total_loss', 'LOSS', 'METRIC_ALIASES', 'LANGUAGE_METRICS']


def unwrap_model(state: State) -> torch.nn.Module:
    """The user's model: ``state.model`` without its DDP wrapper (never by stripping a ``module.`` prefix), with its
    FSDP2 units sharded (``shards.reshard``: after an evaluation pass FSDP2 leaves the root unit's weights gathered)."""
    model = state.model
    return reshard(model.module if isinstance(model, DistributedDataParallel) else model)


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


@contextlib.contextmanager
def preserve_loader_generators(loader: Any) -> Iterator[None]:
    """Iterate ``loader`` in a block without advancing the generators it draws from: a DataLoader's own
    ``generator`` (its base seed per ``iter()``, and a ``shuffle=True`` permutation) and its samplers'."""
    found = [getattr(loader, 'generator', None), getattr(getattr(loader, 'sampler', None), 'generator', None)]
    batch_sampler = getattr(loader, 'batch_sampler', None)
    found += [getattr(batch_sampler, 'generator', None), getattr(getattr(batch_sampler, 'sampler', None), 'generator',
                                                                 None)]
    generators = list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for generator, generator_state in zip(generators, states):
            generator.set_state(generator_state)


def _pads_this_ranks_last_batch(loader: Any) -> bool:
    """Whether a ``DistributedSampler`` repeated a sample at the end of this rank's shard (``drop_last=False``)."""
    if not isinstance(loader, DataLoader) or loader.drop_last:
        return False
    sampler = next((s for s in (loader.batch_sampler, loader.sampler) if isinstance(s, DistributedSampler)), None)
    if sampler is None:
        return False
    try:
        padding = sampler.num_replicas * sampler.num_samples - len(sampler.dataset)
    except TypeError:  # a dataset without a length: nothing to compare with
        return False
    return sampler.rank >= sampler.num_replicas - padding  # the last `padding` ranks each got one repeat


# Composer's handling of a plain iterable of batches: identity transforms, default split and sample count.
_DEFAULT_SPEC = DataSpec(())


def samples_in_batch(batch: Any) -> int:
    """A batch's sample count by Composer's default rule (a tensor, a sequence of tensors, any Mapping)."""
    return int(_DEFAULT_SPEC.get_num_samples_in_batch(batch))


class DeviceBatches:
    """Re-iterable microbatches on the run's device, inside its precision context, made as ``Trainer._eval_loop``
    makes them.

    ``data`` is any iterable of batches, or a ``DataSpec`` whose batch transforms, ``split_batch``, sample count and
    microbatch transforms are used (Composer's defaults otherwise). At most ``limit`` batches (``None`` or negative:
    all); a batch larger than ``microbatch_size`` is split. On a full pass, the padding sample a ``DistributedSampler``
    put on this rank's last batch is dropped. Iterating never advances the loader's own generators.
    """

    def __init__(self, state: State, data: Iterable[Any] | DataSpec, limit: Optional[int] = None,
                 microbatch_size: Optional[int] = None):
        self.state, self.microbatch_size = state, microbatch_size
        self.limit = None if limit is None or limit < 0 else limit
        self.spec = data if isinstance(data, DataSpec) else _DEFAULT_SPEC
        self.batches = data.dataloader if isinstance(data, DataSpec) else data

    def num_samples(self, batch: Any) -> int:
        return int(self.spec.get_num_samples_in_batch(batch))

    def __iter__(self) -> Iterator[Any]:
        padded_index = -1
        if _pads_this_ranks_last_batch(self.batches) and (self.limit is None or self.limit >= len(self.batches)):
            padded_index = len(self.batches) - 1
        with preserve_loader_generators(self.batches), get_precision_context(self.state.precision,
                                                                            self.state.precision_config):
            for index, batch in enumerate(itertools.islice(self.batches, self.limit)):
                microbatches = self._split(self.spec.batch_transforms(batch))
                if index == padded_index:
                    microbatches = self._without_last_sample(microbatches)
                for microbatch in microbatches:
                    yield self.spec.microbatch_transforms(self.state.device.batch_to_device(microbatch))

    def _split(self, batch: Any) -> Sequence[Any]:
        if isinstance(self.microbatch_size, int) and self.num_samples(batch) > self.microbatch_size:
            return list(self.spec.split_batch(batch, self.microbatch_size))
        return [batch]

    def _without_last_sample(self, microbatches: Sequence[Any]) -> list[Any]:
        *kept, last = microbatches
        size = self.num_samples(last)
        return kept if size <= 1 else [*kept, self.spec.split_batch(last, size - 1)[0]]


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


# ---------------------------------------------------------------------------------------------- values
LOSS = 'loss'
# alias -> what the name of the eval metric it reads contains
METRIC_ALIASES = {'error': 'Accuracy', 'perplexity': 'Perplexity', 'cross_entropy': 'CrossEntropy'}
# A model with one of these eval metrics is a language model: its default headline is the loss (composer.metrics.nlp,
# HuggingFaceModel, llm-foundry).
LANGUAGE_METRICS = ('LanguageCrossEntropy', 'LanguagePerplexity', 'MaskedAccuracy', 'TokenAccuracy')
_LOWER_IS_BETTER_NAMES = ('CrossEntropy', 'Perplexity', 'Loss', 'Error')


class Value(NamedTuple):
    """A lower-is-better number read from one evaluation pass: ``name`` is its key in results and records, ``metric``
    the eval metric it comes from (``None``: the model's loss), ``complement`` whether it is 1 - that metric."""

    name: str
    metric: Optional[str] = None
    complement: bool = False

    def read(self, metric_values: Mapping[str, float], loss: Optional[float]) -> float:
        if self.metric is None:
            return float(loss)
        return 1.0 - metric_values[self.metric] if self.complement else metric_values[self.metric]


def _higher_is_better(name: str, metric: Metric, argument: str) -> bool:
    declared = getattr(metric, 'higher_is_better', None)
    if declared is not None:
        return bool(declared)
    if 'Accuracy' in name:
        return True
    if any(part in name for part in _LOWER_IS_BETTER_NAMES):
        return False
    raise ValueError(f'{argument}: cannot tell whether a higher {name} is better (its higher_is_better is None); set '
                     f'{type(metric).__name__}.higher_is_better, or use one of {[LOSS, *METRIC_ALIASES]}')


def resolve_value(name: str, metrics: Mapping[str, Metric], argument: str = 'metric') -> Value:
    """The value a user names, among the model's eval ``metrics`` (keyed by name, as in ``state.eval_metrics``).

    ``'loss'``: the model's own ``loss(forward(batch), batch)``, sample-weighted. ``'error'``: 1 - the first metric
    whose name contains ``Accuracy`` (MulticlassAccuracy, MaskedAccuracy, TokenAccuracy, ...). ``'perplexity'``,
    ``'cross_entropy'``: the first metric whose name contains ``Perplexity`` / ``CrossEntropy``. Any other name is an
    eval metric: kept as it is when lower is better; when higher is better (torchmetrics' ``higher_is_better``, else
    a name containing ``Accuracy``) it becomes 1 - value, named ``'error'`` for an accuracy and ``'1-<name>'``
    otherwise, so that every barrier measures how much *worse* the path gets. Errors name ``argument``.
    """
    if name == LOSS:
        return Value(LOSS)
    if name in METRIC_ALIASES:
        part = METRIC_ALIASES[name]
        found = [metric_name for metric_name in metrics if part in metric_name]
        if not found:
            raise ValueError(f"{argument}: {name!r} needs an eval metric whose name contains {part!r}; the model's eval "
                             f'metrics are {sorted(metrics)}')
        return Value(name, found[0], complement=name == 'error')
    if name not in metrics:
        raise ValueError(f'{argument}: {name!r} is not allowed; use {LOSS!r}, one of {sorted(METRIC_ALIASES)} or an eval '
                         f'metric of the model: {sorted(metrics)}')
    if not _higher_is_better(name, metrics[name], argument):
        return Value(name, name)
    return Value('error' if 'Accuracy' in name else f'1-{name}', name, complement=True)


def resolve_values(metrics: Mapping[str, Metric], headline: Optional[str] = None,
                   argument: str = 'metric') -> list[Value]:
    """``headline`` (default: ``'loss'`` for a language model, else ``'error'``) first, then the error and the loss
    beside it, as far as the model's eval ``metrics`` provide them."""
    if not any('Accuracy' in name for name in metrics):
        defaults = [LOSS]
    elif any(name in LANGUAGE_METRICS for name in metrics):
        defaults = [LOSS, 'error']
    else:
        defaults = ['error', LOSS]
    values: list[Value] = []
    for name in ([headline] if headline is not None else []) + defaults:
        value = resolve_value(name, metrics, argument)
        if value.name not in [v.name for v in values]:
            values.append(value)
    return values


def check_metric_name(name: Any, argument: str = 'metric') -> None:
    """Raise ``ValueError`` unless ``name`` can name a value (the model's metrics are checked when the run starts)."""
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"{argument}: {name!r} is not allowed; use None, {LOSS!r}, one of {sorted(METRIC_ALIASES)} or "
                         "an eval metric's name")


# ---------------------------------------------------------------------------------------------- one pass
class _Pass(NamedTuple):
    metrics: dict[str, float]
    loss: Optional[float]
    samples: int
    correct: Optional[torch.Tensor]  # this rank's per-sample arg-max correctness, when the outputs are class scores


def _fresh(batch: Any) -> Any:
    """A private copy of a Mapping batch: HuggingFaceModel.eval_forward pops ``labels`` and shifts them in place, which
    would corrupt re-iterated batches (cached, split into views, or a list)."""
    if isinstance(batch, Mapping):
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _targets(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return batch.get('labels')
    return batch[1] if isinstance(batch, Sequence) and len(batch) > 1 else None


def _sample_correct(outputs: Any, targets: Any) -> Optional[torch.Tensor]:
    if (isinstance(outputs, torch.Tensor) and outputs.ndim == 2 and isinstance(targets, torch.Tensor) and
            not targets.is_floating_point() and targets.shape == outputs.shape[:1]):
        return (outputs.argmax(dim=1) == targets).cpu()
    return None


def total_loss(loss: Any) -> torch.Tensor:
    """The scalar the Trainer backpropagates: ``loss['total']``, else the sum of the means of the losses."""
    if isinstance(loss, Mapping) and 'total' in loss:
        return loss['total'].mean()
    return sum(part.mean() for part in ensure_tuple(loss))


def _evaluation_pass(state: State, model: torch.nn.Module, batches: DeviceBatches, metrics: Mapping[str, Metric],
                     with_loss: bool, per_sample: bool = False) -> _Pass:
    for metric in metrics.values():
        metric.reset()
        state.device.module_to_device(metric)
    losses, samples, correct = [], 0, []
    for batch in batches:
        size = batches.num_samples(batch)
        batch = _fresh(batch)
        targets = _targets(batch) if per_sample else None
        if with_loss:
            outputs = model(batch)
            losses.append(total_loss(model.loss(outputs, batch)).detach().double() * size)
            outputs = model.eval_forward(batch, outputs)
        else:
            outputs = model.eval_forward(batch)
        for metric in metrics.values():
            model.update_metric(batch, outputs, metric)
        if per_sample:
            correct.append(_sample_correct(outputs, targets))
        samples += size
    totals = torch.tensor([float(samples), 0.0], dtype=torch.float64)
    if losses:
        totals[1] = torch.stack(losses).sum().cpu()
    totals = sum_over_ranks(state)(totals).cpu()
    if float(totals[0]) == 0:
        # Every rank gets here (the counts were summed), so no rank is left waiting in a metric's sync.
        raise ValueError('dataloader: yielded no samples; evaluation needs a non-empty, re-iterable dataloader')
    values = {name: float(metric.compute()) for name, metric in metrics.items()}
    known = correct and all(c is not None for c in correct)
    return _Pass(values, float(totals[1] / totals[0]) if with_loss else None, int(totals[0]),
                 torch.cat(correct) if known else None)


class Scorer:
    """``scorer(model) -> {value name: value}``: one evaluation pass of ``model`` over ``batches``, the same on every
    rank, with the training run's RNGs untouched and a fixed seed inside (every call sees the same batches).

    ``metrics`` are the eval metrics the ``values`` read (deep-copied once). After a call, ``samples`` is the pass's
    sample count over all ranks and, with ``per_sample=True``, ``correct`` this rank's per-sample arg-max correctness
    (``None`` unless the model's eval outputs are class scores with class-index targets).
    """

    def __init__(self, state: State, batches: DeviceBatches, metrics: Mapping[str, Metric], values: Sequence[Value],
                 per_sample: bool = False):
        self.state, self.batches, self.values, self.per_sample = state, batches, list(values), per_sample
        self.metrics = {v.metric: copy.deepcopy(metrics[v.metric]) for v in self.values if v.metric is not None}
        self.with_loss = any(v.metric is None for v in self.values)
        self.samples = 0
        self.correct: Optional[torch.Tensor] = None

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        with model_eval_mode(model), seeded_rng(self.state):
            result = _evaluation_pass(self.state, model, self.batches, self.metrics, self.with_loss, self.per_sample)
        self.samples, self.correct = result.samples, result.correct
        return {value.name: value.read(result.metrics, result.loss) for value in self.values}


def find_evaluator(state: State, label: Optional[str] = None, argument: str = 'eval_label') -> Evaluator:
    """The run's evaluator ``label`` (default: its first); ``ValueError`` naming ``argument`` if there is none."""
    evaluators = list(state.evaluators or [])
    if not evaluators:
        raise ValueError(f'{argument}: the run has no evaluator; pass eval_dataloader to the Trainer')
    if label is None:
        return evaluators[0]
    for evaluator in evaluators:
        if evaluator.label == label:
            return evaluator
    raise ValueError(f'{argument}: {label!r} is not an evaluator of this run; labels are {[e.label for e in evaluators]}')


def evaluator_batches(state: State, evaluator: Evaluator) -> DeviceBatches:
    """An evaluator's batches as the Trainer evaluates them: its subset size and eval microbatch size."""
    return DeviceBatches(state, evaluator.dataloader, evaluator.subset_num_batches,
                         evaluator.device_eval_microbatch_size)


def train_batches(state: State, data: Iterable[Any] | DataSpec, limit: Optional[int] = None) -> DeviceBatches:
    """Batches of training data (a probe, a validation split, BatchNorm batches) in the training microbatch size."""
    return DeviceBatches(state, data, limit, state.device_train_microbatch_size)


@torch.no_grad()
def evaluate(state: State, model: torch.nn.Module | None = None,
             evaluators: Optional[Iterable[Evaluator]] = None) -> dict[str, float]:
    """Every eval metric of ``model`` (default: the trained model) on the run's evaluators (default: all of them).

    Returns ``{'<label>/<metric>': value}``, identical on every rank. ``model`` must be a ComposerModel with the same
    metrics as the run's model (a probe copy of it, typically).
    """
    model = unwrap_model(state) if model is None else model
    results: dict[str, float] = {}
    with preserve_rng(state), model_eval_mode(model):
        for evaluator in state.evaluators if evaluators is None else evaluators:
            metrics = {name: copy.deepcopy(m) for name, m in state.eval_metrics[evaluator.label].items()}
            computed = _evaluation_pass(state, model, evaluator_batches(state, evaluator), metrics, with_loss=False)
            results.update({f'{evaluator.label}/{name}': value for name, value in computed.metrics.items()})
    return results


# ---------------------------------------------------------------------------------------------- the Trainer's eval
def trainer_eval_round(state: State, previous: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """At ``EVAL_AFTER_ALL``: per evaluator label, the Trainer's latest computed metrics and whether this round of
    evaluation computed them (``fresh``).

    torchmetrics caches ``compute()``, so an evaluator whose ``eval_interval`` skipped this step still holds the values
    of an earlier step; the cached result objects are the same objects as in ``previous`` (the last round's answer)
    exactly when its metrics were not recomputed since.
    """
    current: dict[str, dict[str, Any]] = {}
    for label, metrics in (state.eval_metrics or {}).items():
        computed = [getattr(metric, '_computed', None) for metric in metrics.values()]
        if not metrics or any(c is None for c in computed):
            continue
        before = previous.get(label)
        fresh = before is None or any(now is not then for now, then in zip(computed, before['computed']))
        current[label] = {'computed': computed, 'fresh': fresh,
                          'values': {f'{label}/{name}': float(m.compute()) for name, m in metrics.items()}}
    return current


def level_eval_metrics(state: State, this_step: Mapping[str, Any]) -> dict[str, float]:
    """Every evaluator's metrics of the trained model at this step: the Trainer's where it evaluated at this step
    (``this_step`` is :func:`trainer_eval_round`'s answer of this step, or empty), the core's for every other one."""
    values: dict[str, float] = {}
    missing = []
    for evaluator in state.evaluators or []:
        cached = this_step.get(evaluator.label)
        if cached is not None and cached['fresh']:
            values.update(cached['values'])
        else:
            missing.append(evaluator)
    if missing:
        values.update(evaluate(state, evaluators=missing))
    return values

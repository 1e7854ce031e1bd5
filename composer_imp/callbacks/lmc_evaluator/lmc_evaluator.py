"""LMCEvaluator: error barriers between the trained networks of successive IMP levels, inside the IMP run.

A thin adapter: the path, the barrier conventions and the matching rule live in ``composer_imp.functional``; this file
only supplies Composer-side evaluation (the run's eval data, device, precision context, DDP all-reduce) to
:func:`~composer_imp.functional.error_curve`.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer.core import Callback, DataSpec, State
from composer.core.data_spec import ensure_data_spec
from composer.loggers import Logger
from composer.utils import dist, model_eval_mode
from torch import nn

from composer_imp.algorithms.imp import IMP
from composer_imp.evaluation import (
    DeviceBatches,
    seeded_rng,
    sum_over_ranks,
    unwrap_model,
    without_persistent_workers,
)
from composer_imp.functional import alpha_grid, error_curve, is_matching, recompute_batchnorm
from composer_imp.functional.barrier import BN_MODES, error_and_loss

__all__ = ['LMCEvaluator']


class LMCEvaluator(Callback):
    """Linear mode connectivity between successive IMP levels: error barriers, ``connected`` and ``matching``.

    At the end of every pruned level L (through ``IMP.add_level_end_hook``), evaluates the straight line from the
    trained network of the parent level to that of level L over the whole state_dict, and returns to IMP, which logs
    the scalars and writes everything into the level's line of ``levels.jsonl``:

    - ``lmc/barrier``: ``barrier_linear`` (absolute error), the convention for successive levels;
    - ``lmc/barrier_max_minus_mean``: Frankle et al. 2020's convention;
    - ``lmc/connected``: ``lmc/barrier <= threshold``;
    - ``imp/matching``: the level's error <= the dense (level-0) error + ``matching_tolerance``;
    - ``lmc/error``: the level's own error (every level, level 0 included);
    - ``lmc/curve``: ``{'alphas', 'errors', 'losses'}``; with ``train_subset_batches`` also ``lmc/train/...``.

    Args:
        alphas: interpolation grid: ``None`` (11 evenly spaced points), a number of evenly spaced points, or values in
            [0, 1] including 0 and 1.
        threshold: largest ``lmc/barrier`` (absolute error, 0.02 = 2 percentage points) still called connected.
        matching_tolerance: absolute error above the dense error still called matching (0.002 = 0.2 points,
            Frankle et al. 2020's "within 0.2 percentage points").
        bn: ``'interpolate'`` (interpolated running statistics, as the paper's prototype) or ``'recompute'``
            (re-estimate them at every point on ``bn_batches`` training batches, averaged over ranks).
        bn_batches: training batches per BatchNorm re-estimation.
        train_subset_batches: if set, also the barrier on the first this-many batches of the training data.
        eval_label: the evaluator to measure on (default: the run's first evaluator).
        train_dataloader: training batches for ``bn='recompute'`` and ``train_subset_batches`` (a DataLoader or
            DataSpec); default the run's train dataloader, without its DataSpec's batch transforms (State does not hold
            them): pass it explicitly when those transforms matter, or for a streaming dataset.

    Batches are ``(inputs, targets)`` with class-index targets; errors count arg-max mistakes on
    ``model.eval_forward(batch)`` and losses are cross-entropy. Without ``IMP`` in the run the callback does nothing
    (warns); use :meth:`barrier` or :func:`composer_imp.functional.error_barrier` for any two state dicts.
    """

    def __init__(
        self,
        alphas: Union[int, Sequence[float], None] = None,
        threshold: float = 0.02,
        matching_tolerance: float = 0.002,
        bn: str = 'interpolate',
        bn_batches: int = 16,
        train_subset_batches: Optional[int] = None,
        eval_label: Optional[str] = None,
        train_dataloader: Union[DataSpec, Iterable, None] = None,
    ):
        self.alphas = alpha_grid(alphas)
        if bn not in BN_MODES:
            raise ValueError(f'bn: {bn!r} is not allowed; use one of {BN_MODES}')
        if threshold < 0:
            raise ValueError(f'threshold: {threshold} is not allowed; use an absolute error >= 0 (0.02 = 2 points)')
        if matching_tolerance < 0:
            raise ValueError(f'matching_tolerance: {matching_tolerance} is not allowed; use an absolute error >= 0')
        if bn_batches < 1:
            raise ValueError(f'bn_batches: {bn_batches} is not allowed; use at least 1 batch')
        if train_subset_batches is not None and train_subset_batches < 1:
            raise ValueError(f'train_subset_batches: {train_subset_batches} is not allowed; use None or >= 1 batch')
        self.threshold = threshold
        self.matching_tolerance = matching_tolerance
        self.bn = bn
        self.bn_batches = bn_batches
        self.train_subset_batches = train_subset_batches
        self.eval_label = eval_label
        self.train_dataloader = train_dataloader
        self.dense_error: Optional[float] = None  # level 0's error on the eval data; checkpointed
        self._imp: Optional[IMP] = None
        self._probe: Optional[nn.Module] = None

    # ------------------------------------------------------------------ Composer plumbing
    def fit_start(self, state: State, logger: Logger) -> None:
        imps = [algorithm for algorithm in state.algorithms if isinstance(algorithm, IMP)]
        if not imps:
            warnings.warn('LMCEvaluator: no IMP algorithm in this run, so there are no successive levels to compare; '
                          'use LMCEvaluator.barrier() or composer_imp.functional.error_barrier for other pairs')
            return
        self._eval_spec(state)  # fail now, not at the end of level 0
        if self.bn == 'recompute' or self.train_subset_batches:
            self._train_spec(state)
        self._imp = imps[0]
        self._imp.add_level_end_hook(self._level_end, needs_previous_level=True)

    def state_dict(self) -> dict[str, Any]:
        return {'dense_error': self.dense_error}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense_error = state.get('dense_error')

    # ------------------------------------------------------------------ the level-end hook
    def _level_end(self, state: State, logger: Logger, record: Mapping[str, Any]) -> dict[str, Any]:
        model = unwrap_model(state)
        parent = self._imp.previous_level_state if self._imp is not None else None
        result: dict[str, Any] = {}
        if parent is not None and record['level'] > 0:
            current = model.state_dict()
            curve = self.barrier(state, parent, current)
            result.update(self._report('lmc/', curve))
            result['lmc/connected'] = curve['barrier_linear'] <= self.threshold
            # At alpha = 1 the probe holds exactly the level's weights; with recomputed BN statistics it does not.
            error = curve['errors'][-1] if self.bn == 'interpolate' else self._error(state, model)
            if self.train_subset_batches:
                result.update(self._report('lmc/train/', self.barrier(state, parent, current, on_train_subset=True)))
        else:
            error = self._error(state, model)
        if record['level'] == 0:
            self.dense_error = error
        result['lmc/error'] = error
        if record['level'] > 0 and self.dense_error is not None:
            result['imp/matching'] = is_matching(error, self.dense_error, self.matching_tolerance)
        return result

    @staticmethod
    def _report(prefix: str, curve: Mapping[str, Any]) -> dict[str, Any]:
        return {
            f'{prefix}barrier': curve['barrier_linear'],
            f'{prefix}barrier_max_minus_mean': curve['barrier_max_minus_mean'],
            f'{prefix}curve': {key: list(curve[key]) for key in ('alphas', 'errors', 'losses')},
        }

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def barrier(self, state: State, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                on_train_subset: bool = False) -> dict[str, Any]:
        """Error and loss along the line from ``state_a`` to ``state_b`` (state dicts of the run's unwrapped model).

        Evaluated on the eval data (or the train subset) with this callback's grid and BatchNorm mode, identical on
        every rank. Returns ``error_barrier``'s mapping. The run's own model, data order and RNG are left untouched.
        """
        if self._probe is None:
            self._probe = copy.deepcopy(unwrap_model(state))  # one probe for the whole run, rewritten at every point
        if on_train_subset:
            spec, limit = self._train_spec(state), self.train_subset_batches
        else:
            evaluator = self._eval_spec(state)
            spec, limit = evaluator.dataloader, evaluator.subset_num_batches
        recalibrate = self._recompute_batchnorm(state) if self.bn == 'recompute' else None
        return error_curve(self._probe, state_a, state_b, self.alphas, self._scorer(state, spec, limit), recalibrate)

    @torch.no_grad()
    def _error(self, state: State, model: nn.Module) -> float:
        evaluator = self._eval_spec(state)
        return self._scorer(state, evaluator.dataloader, evaluator.subset_num_batches)(model)[0]

    def _scorer(self, state: State, spec: DataSpec, limit: Optional[int]) -> Callable[[nn.Module], tuple[float, float]]:
        reduce, batches = sum_over_ranks(state), DeviceBatches(state, spec, limit)

        def score(model: nn.Module) -> tuple[float, float]:
            with model_eval_mode(model), seeded_rng(state):
                return error_and_loss(((model.eval_forward(batch), batch[1]) for batch in batches), reduce=reduce)

        return score

    def _recompute_batchnorm(self, state: State) -> Callable[[nn.Module], None]:
        batches = DeviceBatches(state, self._train_spec(state), self.bn_batches)

        def recalibrate(model: nn.Module) -> None:
            with seeded_rng(state):
                recompute_batchnorm(model, batches, forward=lambda m, batch: m(batch))  # a ComposerModel takes it all
            # The probe is not wrapped in DDP: average the ranks' estimates (each a mean over the same batch count).
            world = dist.get_world_size()
            if world > 1:
                for norm in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
                    for buffer in (norm.running_mean, norm.running_var):
                        if buffer is not None:
                            dist.all_reduce(buffer, reduce_operation='SUM')
                            buffer.div_(world)

        return recalibrate

    def _eval_spec(self, state: State):
        evaluators = list(state.evaluators or [])
        if not evaluators:
            raise ValueError('LMCEvaluator: the run has no evaluator; pass eval_dataloader to the Trainer')
        if self.eval_label is None:
            return evaluators[0]
        for evaluator in evaluators:
            if evaluator.label == self.eval_label:
                return evaluator
        raise ValueError(f'eval_label: {self.eval_label!r} is not an evaluator of this run; '
                         f'labels are {[e.label for e in evaluators]}')

    def _train_spec(self, state: State) -> DataSpec:
        if self.train_dataloader is not None:
            return ensure_data_spec(self.train_dataloader)
        loader = state.train_dataloader
        if loader is None:
            raise ValueError("train_dataloader: bn='recompute' and train_subset_batches need training batches; the "
                             'run has no train dataloader, pass one to LMCEvaluator')
        loader = without_persistent_workers(loader)
        return ensure_data_spec(loader)

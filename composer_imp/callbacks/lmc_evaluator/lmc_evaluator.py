"""LMCEvaluator: barriers between the trained networks of successive IMP levels, inside the IMP run.

A thin adapter: the path, the barrier conventions and the matching rule live in ``composer_imp.functional``, the
scoring of a ComposerModel on the run's data in ``composer_imp.evaluation``; this file wires them to IMP's level ends.
It finds IMP among the run's algorithms by its level-end hook (duck typing), so callbacks never import algorithms.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer.core import Callback, DataSpec, State
from composer.core.data_spec import ensure_data_spec
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from composer_imp.evaluation import (
    Scorer,
    Value,
    check_metric_name,
    evaluator_batches,
    find_evaluator,
    resolve_values,
    seeded_rng,
    train_batches,
    unwrap_model,
    without_persistent_workers,
)
from composer_imp.functional import alpha_grid, apply_masks, is_matching, metric_curve, recompute_batchnorm
from composer_imp.functional.barrier import BN_MODES
from composer_imp.functional.rewind import move_module_, rewind, snapshot, stored_copy
from composer_imp.functional.shards import is_sharded

__all__ = ['LMCEvaluator']


class LMCEvaluator(Callback):
    """Linear mode connectivity between successive IMP levels: barriers, ``connected`` and ``matching``.

    At the end of every pruned level L (through IMP's ``add_level_end_hook``), evaluates the straight line from the
    trained network of the parent level to that of level L over the whole state_dict, and returns to IMP, which logs
    the scalars and writes everything into the level's line of ``levels.jsonl``. The barrier is measured on a
    lower-is-better *value* (``metric``, the headline) with the error and the loss beside it:

    - ``lmc/metric``: the headline value's name (``'error'``, ``'loss'``, ...);
    - ``lmc/barrier``: its ``barrier_linear``, the convention for successive levels (absolute: 0.02 = 2 points of
      error, or nats of loss); ``lmc/barrier_max_minus_mean``: Frankle et al. 2020's convention;
    - ``lmc/barrier/<value>``, ``lmc/barrier_max_minus_mean/<value>``: the same for every value measured;
    - ``lmc/connected``: ``lmc/barrier <= threshold``; ``None`` (undefined) when the barrier is ``nan``;
    - ``imp/matching``: the level's headline value <= the dense (level-0) one + ``matching_tolerance``; ``None`` when
      either value is not finite;
    - ``lmc/<value>``: the level's own values (every level, level 0 included);
    - ``lmc/curve``: ``{'alphas', <value>: [...], ...}``; with ``train_subset_batches`` also ``lmc/train/...``.

    Args:
        alphas: interpolation grid: ``None`` (11 evenly spaced points), a number of evenly spaced points, or values in
            [0, 1] including 0 and 1.
        threshold: largest ``lmc/barrier`` still called connected, in the headline's units (0.02 = 2 points of error).
        matching_tolerance: how much above the dense value the level's still counts as matching, in the headline's
            units (0.002 = 0.2 points of error, Frankle et al. 2020's "within 0.2 percentage points").
        bn: ``'interpolate'`` (interpolated running statistics, as the paper's prototype) or ``'recompute'``
            (re-estimate them at every point on ``bn_batches`` training batches, averaged over ranks).
        bn_batches: training batches per BatchNorm re-estimation.
        train_subset_batches: if set, also the barrier on the first this-many batches of the training data.
        eval_label: the evaluator to measure on (default: the run's first evaluator).
        train_dataloader: training batches for ``bn='recompute'`` and ``train_subset_batches`` (a DataLoader or
            DataSpec); default the run's train dataloader, without its DataSpec's batch transforms (State does not hold
            them): pass it explicitly when those transforms matter, or for a streaming dataset.
        metric: the headline value: ``'error'`` (1 - the model's accuracy metric), ``'loss'`` (the model's own loss),
            ``'perplexity'``, ``'cross_entropy'``, or an eval metric's name (higher-is-better ones are measured as
            1 - value). Default ``None``: ``'loss'`` for a language model (an eval metric such as
            ``LanguageCrossEntropy``, ``MaskedAccuracy`` or ``TokenAccuracy``), else ``'error'``.
        rewind_barrier: also the barrier between the *pruned rewind points* of the parent level and of level L,
            m_parent ⊙ w_k and m_L ⊙ w_k (the paper prototype's rewind-point barrier), in level L's line:
            ``lmc/rewind_barrier``, ``lmc/rewind_barrier_max_minus_mean``, ``.../<value>``, ``lmc/rewind_curve``;
            with ``train_subset_batches`` also ``lmc/train/rewind_barrier/loss`` (the train-loss barrier) and the
            rest under ``lmc/train/``. Off by default: one more path per level (and a second one on the train subset).

    Evaluation goes through the model's own ``forward``/``loss``/``eval_forward``/``update_metric`` with the
    evaluator's metrics, on any batch type (see ``composer_imp.evaluation``). Without IMP in the run the callback does
    nothing (warns); use :meth:`barrier` or :func:`composer_imp.functional.error_barrier` for any two state dicts.
    """

    # A record across levels (the dense value, the probe): IMP's level replay must not rewind it to step k.
    imp_rewind = False

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
        metric: Optional[str] = None,
        rewind_barrier: bool = False,
    ):
        self.alphas = alpha_grid(alphas)
        check_metric_name(metric)
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
        self.metric = metric
        self.rewind_barrier = bool(rewind_barrier)
        self.dense_value: Optional[float] = None  # level 0's headline value on the eval data; checkpointed
        self._imp: Any = None
        self._probe: Optional[nn.Module] = None
        self._values: Optional[list[Value]] = None

    # ------------------------------------------------------------------ Composer plumbing
    def fit_start(self, state: State, logger: Logger) -> None:
        imps = [algorithm for algorithm in state.algorithms if callable(getattr(algorithm, 'add_level_end_hook', None))]
        if not imps:
            warnings.warn('LMCEvaluator: no IMP algorithm in this run, so there are no successive levels to compare; '
                          'use LMCEvaluator.barrier() or composer_imp.functional.error_barrier for other pairs')
            return
        self._resolved_values(state)  # fail now, not at the end of level 0
        if self.bn == 'recompute' or self.train_subset_batches:
            self._train_spec(state)
        self._imp = imps[0]
        self._imp.add_level_end_hook(self._level_end, needs_previous_level=True)

    def state_dict(self) -> dict[str, Any]:
        return {'dense_value': self.dense_value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense_value = state.get('dense_value')

    # ------------------------------------------------------------------ the level-end hook
    def _level_end(self, state: State, logger: Logger, record: Mapping[str, Any]) -> dict[str, Any]:
        model = unwrap_model(state)
        parent = self._imp.previous_level_state if self._imp is not None else None
        headline = self._resolved_values(state)[0].name
        result: dict[str, Any] = {'lmc/metric': headline}
        # Under FSDP2 the path is walked on the training model itself (see barrier): its trained state is copied once
        # (where IMP keeps its transition-only copies), as the path's endpoint and what the model is given back.
        trained = (stored_copy(model.state_dict(), getattr(self._imp, 'offload', 'cpu'))
                   if is_sharded(model) and record['level'] > 0 else None)
        if parent is not None and record['level'] > 0:
            current = model.state_dict() if trained is None else trained
            curve = self._barrier(state, parent, current, trained=trained)
            result.update(self._report('lmc/', curve))
            # A NaN barrier (a non-finite value on the path) is undefined: neither connected nor not.
            result['lmc/connected'] = (None if math.isnan(result['lmc/barrier']) else
                                       result['lmc/barrier'] <= self.threshold)
            # At alpha = 1 the probe holds exactly the level's weights; with recomputed BN statistics it does not.
            own = ({name: values[-1] for name, values in curve['values'].items()} if self.bn == 'interpolate' else
                   self._scorer(state)(model))
            if self.train_subset_batches:
                result.update(self._report('lmc/train/', self._barrier(state, parent, current, True, trained)))
        else:
            own = self._scorer(state)(model)
        if self.rewind_barrier and record['level'] > 0 and self._imp.parent_masks is not None:
            result.update(self._rewind_point_barriers(state, trained))
        result.update({f'lmc/{name}': value for name, value in own.items()})
        if record['level'] == 0:
            self.dense_value = own[headline]
        if record['level'] > 0 and self.dense_value is not None:
            defined = math.isfinite(own[headline]) and math.isfinite(self.dense_value)
            result['imp/matching'] = (is_matching(own[headline], self.dense_value, self.matching_tolerance) if defined
                                      else None)
        return result

    def _rewind_point_barriers(self, state: State,
                               trained: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, Any]:
        """The path from the parent level's pruned rewind point to this level's, m_parent ⊙ w_k -> m_L ⊙ w_k."""
        ticket, device = self._imp.ticket(), next(unwrap_model(state).parameters()).device
        parent = {name: tensor.to(device) for name, tensor in ticket['rewind_point'].items()}
        level = {name: tensor.clone() for name, tensor in parent.items()}
        apply_masks(parent, {name: mask.to(device) for name, mask in self._imp.parent_masks.items()})
        apply_masks(level, {name: mask.to(device) for name, mask in ticket['masks'].items()})
        report = self._report('lmc/', self._barrier(state, parent, level, trained=trained), 'rewind_barrier',
                              'rewind_curve')
        if self.train_subset_batches:
            report.update(self._report('lmc/train/', self._barrier(state, parent, level, True, trained),
                                       'rewind_barrier', 'rewind_curve'))
        return report

    @staticmethod
    def _report(prefix: str, curve: Mapping[str, Any], barrier: str = 'barrier',
                curve_key: str = 'curve') -> dict[str, Any]:
        headline = curve['metric']
        report: dict[str, Any] = {
            f'{prefix}{barrier}': curve['barrier_linear'][headline],
            f'{prefix}{barrier}_max_minus_mean': curve['barrier_max_minus_mean'][headline],
            f'{prefix}{curve_key}': {'alphas': list(curve['alphas']),
                                     **{n: list(v) for n, v in curve['values'].items()}},
        }
        for name in curve['values']:
            report[f'{prefix}{barrier}/{name}'] = curve['barrier_linear'][name]
            report[f'{prefix}{barrier}_max_minus_mean/{name}'] = curve['barrier_max_minus_mean'][name]
        return report

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def barrier(self, state: State, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                on_train_subset: bool = False) -> dict[str, Any]:
        """Every value along the line from ``state_a`` to ``state_b`` (state dicts of the run's unwrapped model).

        Evaluated on the eval data (or the train subset) with this callback's grid and BatchNorm mode, identical on
        every rank. Returns :func:`~composer_imp.functional.metric_curve`'s mapping (``alphas``, ``values``,
        ``barrier_linear``, ``barrier_max_minus_mean``, keyed by value) plus ``metric``, the headline value's name.
        The run's own model, data order and RNG are left untouched.

        Under FSDP2 (sharded parameters; the states hold this rank's shards) there is no probe: a copy of a sharded
        model is not a working model (its FSDP hooks and meshes are the original's), so the points are written into
        the training model's own shards, evaluated by all ranks together, and the model's state is put back exactly.
        """
        return self._barrier(state, state_a, state_b, on_train_subset)

    def _barrier(self, state: State, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                 on_train_subset: bool = False, trained: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, Any]:
        """:meth:`barrier`; under FSDP2, ``trained`` (this rank's shards of the model's state, if already copied) is
        what the model is given back."""
        model = unwrap_model(state)
        recalibrate = self._recompute_batchnorm(state) if self.bn == 'recompute' else None
        if is_sharded(model):
            trained = snapshot(model) if trained is None else trained
            try:
                curve = metric_curve(model, state_a, state_b, self.alphas, self._scorer(state, on_train_subset),
                                     recalibrate)
            finally:
                rewind(model, trained)
            return {'metric': self._resolved_values(state)[0].name, **curve}
        if self._probe is None:
            self._probe = copy.deepcopy(model)  # one probe for the whole run, rewritten at every point
        # The probe lives where IMP keeps its transition-only copies (IMP(offload=...), host memory by default).
        move_module_(self._probe, next(model.parameters()).device)
        try:
            curve = metric_curve(self._probe, state_a, state_b, self.alphas, self._scorer(state, on_train_subset),
                                 recalibrate)
        finally:
            if getattr(self._imp, 'offload', 'cpu') == 'cpu':
                move_module_(self._probe, 'cpu')
        return {'metric': self._resolved_values(state)[0].name, **curve}

    def _resolved_values(self, state: State) -> list[Value]:
        if self._values is None:
            evaluator = find_evaluator(state, self.eval_label)
            self._values = resolve_values(state.eval_metrics[evaluator.label], self.metric)
        return self._values

    def _scorer(self, state: State, on_train_subset: bool = False) -> Scorer:
        evaluator = find_evaluator(state, self.eval_label)
        batches = (train_batches(state, self._train_spec(state), self.train_subset_batches) if on_train_subset else
                   evaluator_batches(state, evaluator))
        return Scorer(state, batches, state.eval_metrics[evaluator.label], self._resolved_values(state))

    def _recompute_batchnorm(self, state: State) -> Callable[[nn.Module], None]:
        batches = train_batches(state, self._train_spec(state), self.bn_batches)

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

    def _train_spec(self, state: State) -> DataSpec:
        if self.train_dataloader is not None:
            return ensure_data_spec(self.train_dataloader)
        loader = state.train_dataloader
        if loader is None:
            raise ValueError("train_dataloader: bn='recompute' and train_subset_batches need training batches; the "
                             'run has no train dataloader, pass one to LMCEvaluator')
        loader = without_persistent_workers(loader)
        return ensure_data_spec(loader)

"""IMP: Iterative Magnitude Pruning with weight rewinding, every level inside one ``Trainer.fit()``.

Time is monotonic across levels (composer.md §6, variant B): level 0 trains batches [0, T); each pruned level trains
T - k batches from the rewind step k, its learning-rate schedule seeing local time (``schedule.py``). Level transitions
run at ``BATCH_CHECKPOINT``, or at ``EPOCH_CHECKPOINT`` when a level ends with an epoch, i.e. after the Trainer's
evaluation of the trained network and before ``CheckpointSaver`` writes, so every checkpoint is a valid resume point.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from composer.core import Algorithm, Event, State, Time, Timestamp, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.file_helpers import format_name_with_dist

from composer_imp.algorithms.imp.schedule import LevelView, make_level_relative
from composer_imp.algorithms.imp.sparsity_step import FixedStep, SparsityStep
from composer_imp.evaluation import eval_metric_values, evaluate, preserve_rng, unwrap_model
from composer_imp.functional import (
    alive_count,
    density,
    layer_densities,
    masks_at_density,
    prunable_weights,
    rewind,
    rewind_optimizer,
    snapshot,
    snapshot_optimizer,
)
from composer_imp.functional.flops import TRAIN_FLOPS_PER_MAC, layer_macs, sparse_macs
from composer_imp.functional.masks import SCOPES
from composer_imp.functional.ticket import LEVELS_FILE, level_dir, save_level, save_rewind_point

__all__ = ['IMP']

LevelEndHook = Callable[[State, Logger, dict], Optional[dict]]


class IMP(Algorithm):
    """Iterative Magnitude Pruning with weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    The Trainer's ``max_duration`` is one level's training, T. Level 0 trains densely for T; the full training state
    at ``rewind_to`` (step k) is the rewind point. After each level, ``prune_fraction`` of the remaining prunable weights
    are pruned by magnitude, the survivors are set back to the rewind point, and the next level trains from k to T.

    Args:
        levels: number of pruned levels after the dense level 0. Exactly one of ``levels`` and ``target_density``.
        target_density: stop after the first level whose density (over prunable weights) is <= this value.
        prune_fraction: fraction of the *remaining* prunable weights pruned after each level, in (0, 1).
        rewind_to: the rewind step k as a Composer time string: ``'500ba'``, ``'2ep'``, ``'0.05dur'`` (of T);
            ``'0ba'`` rewinds to initialization.
        scope: ``'global'`` ranks all prunable weights together; ``'layerwise'`` prunes each tensor by the fraction.
        ignore: fnmatch patterns of parameter names to leave dense (e.g. ``['fc.weight']``).
        rewind_optimizer: restore the optimizer state of step k at each rewind (default: fresh state, as open_lth).
        mask_gradients: zero the gradients of pruned weights before each optimizer step (weights are re-zeroed after
            every step regardless).
        folder: where the per-level masks, trained weights, rewind point and ``levels.jsonl`` go. Default: ``imp/``
            inside the ``CheckpointSaver``'s folder if the run saves checkpoints, else ``<run_name>/imp``.
        sparsity_step: a ``SparsityStep`` choosing each level's fraction (default ``FixedStep(prune_fraction)``).
    """

    def __init__(
        self,
        levels: Optional[int] = None,
        target_density: Optional[float] = None,
        prune_fraction: float = 0.2,
        rewind_to: str = '0ba',
        scope: str = 'global',
        ignore: Iterable[str] = (),
        rewind_optimizer: bool = False,
        mask_gradients: bool = True,
        folder: Optional[str] = None,
        sparsity_step: Optional[SparsityStep] = None,
    ):
        if (levels is None) == (target_density is None):
            raise ValueError('levels, target_density: give exactly one of them (a number of pruned levels, or the '
                             'density in (0, 1) at which to stop)')
        if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 0):
            raise ValueError(f'levels: {levels!r} is not allowed; use an integer >= 0')
        if target_density is not None and not 0.0 < target_density < 1.0:
            raise ValueError(f'target_density: {target_density} is not allowed; use a density in (0, 1)')
        if not 0.0 < prune_fraction < 1.0:
            raise ValueError(f'prune_fraction: {prune_fraction} is not allowed; use a fraction in (0, 1)')
        if scope not in SCOPES:
            raise ValueError(f'scope: {scope!r} is not allowed; use one of {SCOPES}')
        try:
            rewind_time = Time.from_timestring(rewind_to) if isinstance(rewind_to, str) else Time.from_input(rewind_to)
        except (ValueError, TypeError) as error:
            raise ValueError(f"rewind_to: {rewind_to!r} is not a Composer time string (e.g. '500ba', '2ep', '0.05dur')"
                             ) from error
        if rewind_time.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.DURATION) or rewind_time.value < 0:
            raise ValueError(f"rewind_to: {rewind_to!r} is not allowed; use a time >= 0 in 'ba', 'ep' or 'dur'")
        if isinstance(ignore, str):
            ignore = [ignore]
        self.levels = levels
        self.target_density = target_density
        self.prune_fraction = prune_fraction
        self.rewind_to = str(rewind_to)
        self.scope = scope
        self.ignore = list(ignore)
        self.rewind_optimizer = rewind_optimizer
        self.mask_gradients = mask_gradients
        self.folder = folder
        self.sparsity_step = sparsity_step if sparsity_step is not None else FixedStep(prune_fraction)
        self._rewind_time = rewind_time
        self.sparsity_step.check(self)
        self._hooks: list[LevelEndHook] = []
        self._keep_previous_level = self.sparsity_step.needs_previous_level

        # Checkpointed state (see state_dict); all counters are ints in batches/samples/tokens/seconds.
        self._plan: Optional[dict[str, Any]] = None  # schedule_duration (str T), schedule_batches, rewind_batch
        self._level = 0
        self._level_start: dict[str, float] = {'batch': 0, 'sample': 0, 'token': 0, 'seconds': 0.0}
        self._nominal_density = 1.0  # product of (1 - fraction) over accepted levels: exact counts, no drift
        self._masks: Optional[dict[str, torch.Tensor]] = None
        self._rewind_point: Optional[dict[str, torch.Tensor]] = None
        self._rewind_counters: dict[str, int] = {}
        self._rewind_lrs: list[list[float]] = []
        self._rewind_schedulers: list[dict[str, Any]] = []
        self._rewind_optimizers: Optional[list[dict[str, Any]]] = None
        self._previous_level_state: Optional[dict[str, torch.Tensor]] = None
        self._previous_masks: Optional[dict[str, torch.Tensor]] = None
        self._previous_nominal_density = 1.0
        self._history: list[dict[str, Any]] = []
        self._expected_max_duration: Optional[int] = None
        self._done = False
        self._macs: Optional[dict[str, Any]] = None  # dense MACs per sample: {'dense': float, 'weights': {name: float}}

        self._last_eval: tuple[int, dict[str, float]] = (-1, {})
        self._masked_params: Optional[tuple[list[torch.Tensor], list[torch.Tensor]]] = None
        self._resolved_folder: Optional[str] = None
        self._schedule_duration: Optional[Time] = None  # T as a Time, parsed once for the per-step scheduler view

    # ------------------------------------------------------------------ public, read-only
    @property
    def level(self) -> int:
        """The level being trained (0 = dense)."""
        return self._level

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name (as in the unwrapped model's ``named_parameters()``) -> bool mask, True = alive."""
        return dict(self._masks or {})

    @property
    def density(self) -> float:
        """Fraction of prunable weights alive in the current level."""
        return density(self._masks) if self._masks else 1.0

    @property
    def history(self) -> list[dict[str, Any]]:
        """One metrics record per trained level (rejected attempts included), as in ``levels.jsonl``."""
        return list(self._history)

    @property
    def previous_level_state(self) -> Optional[dict[str, torch.Tensor]]:
        """Trained state_dict of the last accepted level (the current level's parent), when a hook asked for it."""
        return self._previous_level_state

    @property
    def parent_masks(self) -> Optional[dict[str, torch.Tensor]]:
        """Masks of the last accepted level (what a rejected level is rolled back to)."""
        return self._previous_masks

    @property
    def rewind_batch(self) -> Optional[int]:
        return None if self._plan is None else self._plan['rewind_batch']

    @property
    def schedule_batches(self) -> Optional[int]:
        """T, one level's schedule length in batches."""
        return None if self._plan is None else self._plan['schedule_batches']

    def level_dir(self, level: int) -> Optional[str]:
        return None if self._resolved_folder is None else level_dir(self._resolved_folder, level)

    @property
    def folder_path(self) -> Optional[str]:
        return self._resolved_folder

    def ticket(self) -> dict[str, Any]:
        """The current level's ticket: its masks and the rewind point (CPU copies), with the schedule it trains."""
        if self._rewind_point is None:
            raise RuntimeError('IMP has no rewind point yet: it is captured at the rewind step of level 0')
        return {
            'level': self._level,
            'density': self.density,
            'masks': {n: m.cpu().clone() for n, m in self._masks.items()},
            'rewind_point': {n: t.cpu().clone() for n, t in self._rewind_point.items()},
            'rewind_batch': self._plan['rewind_batch'],
            'schedule_batches': self._plan['schedule_batches'],
        }

    def training_flops(self, samples: int, layer_density: Optional[dict[str, float]] = None) -> Optional[float]:
        """Estimated FLOPs of training ``samples`` examples at the current (or given) layer densities."""
        if not self._macs:
            return None
        density_by_layer = layer_densities(self._masks) if layer_density is None else layer_density
        return TRAIN_FLOPS_PER_MAC * samples * sparse_macs(self._macs['dense'], self._macs['weights'], density_by_layer)

    @property
    def dense_macs(self) -> Optional[dict[str, Any]]:
        """Dense multiply-accumulates per sample, total and per prunable layer (measured on the first batch)."""
        return self._macs

    def add_level_end_hook(self, hook: LevelEndHook, needs_previous_level: bool = False) -> None:
        """Call ``hook(state, logger, record)`` at the end of every level, before pruning and rewinding.

        The level's trained network is in ``state.model``; the returned dict is merged into the level's metrics line
        and its scalars are logged. ``needs_previous_level`` keeps ``previous_level_state`` available.
        """
        if hook not in self._hooks:
            self._hooks.append(hook)
        self._keep_previous_level |= needs_previous_level

    # ------------------------------------------------------------------ Composer plumbing
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_LOAD, Event.FIT_START, Event.AFTER_DATALOADER, Event.BATCH_START,
                         Event.AFTER_TRAIN_BATCH,
                         Event.BATCH_END, Event.EVAL_AFTER_ALL, Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._check_model(state)
        elif event == Event.AFTER_LOAD:
            self._check_model(state)
            self._start(state)
            self.sparsity_step.setup(state, self)
        elif event == Event.FIT_START:
            self._start(state)
            self._resolve_folder(state)
            if self._rewind_point is None and self._plan['rewind_batch'] == 0:
                self._capture_rewind_point(state)
        elif event == Event.AFTER_DATALOADER:
            if self._macs is None:
                self._count_macs(state)
        elif event == Event.BATCH_START:
            if not self._done and self._level_over(state):  # resumed from a checkpoint written before a transition
                self._end_level(state, logger)
        elif event == Event.AFTER_TRAIN_BATCH:
            if self.mask_gradients and self._level > 0:
                params, keep = self._keep_factors(state)
                grads = [p.grad for p in params]
                if params and all(g is not None for g in grads):
                    torch._foreach_mul_(grads, keep)
                else:
                    for grad, factor in zip(grads, keep):
                        if grad is not None:
                            grad.mul_(factor)
        elif event == Event.BATCH_END:
            if self._level > 0:
                params, keep = self._keep_factors(state)
                if params:
                    with torch.no_grad():
                        torch._foreach_mul_(params, keep)
            if self._rewind_point is None and int(state.timestamp.batch) == self._plan['rewind_batch']:
                self._capture_rewind_point(state)
        elif event == Event.EVAL_AFTER_ALL:
            self._last_eval = (int(state.timestamp.batch), eval_metric_values(state))
        elif event == Event.BATCH_CHECKPOINT:
            epoch_end_follows = (state.dataloader_len is not None and
                                 int(state.timestamp.batch_in_epoch) == int(state.dataloader_len))
            if not self._done and not epoch_end_follows and self._level_over(state):
                self._end_level(state, logger)
        elif event == Event.EPOCH_CHECKPOINT:
            if not self._done and self._level_over(state):
                self._end_level(state, logger)

    def state_dict(self) -> dict[str, Any]:
        return {
            'plan': self._plan,
            'level': self._level,
            'level_start': dict(self._level_start),
            'nominal_density': self._nominal_density,
            'masks': self._masks,
            'rewind_point': self._rewind_point,
            'rewind_counters': dict(self._rewind_counters),
            'rewind_lrs': self._rewind_lrs,
            'rewind_schedulers': self._rewind_schedulers,
            'rewind_optimizers': self._rewind_optimizers,
            'previous_level_state': self._previous_level_state,
            'previous_masks': self._previous_masks,
            'previous_nominal_density': self._previous_nominal_density,
            'history': self._history,
            'expected_max_duration': self._expected_max_duration,
            'done': self._done,
            'macs': self._macs,
            'sparsity_step': self.sparsity_step.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._plan = state['plan']
        self._level = state['level']
        self._level_start = state['level_start']
        self._nominal_density = state['nominal_density']
        self._masks = state['masks']
        self._rewind_point = state['rewind_point']
        self._rewind_counters = state['rewind_counters']
        self._rewind_lrs = state['rewind_lrs']
        self._rewind_schedulers = state['rewind_schedulers']
        self._rewind_optimizers = state['rewind_optimizers']
        self._previous_level_state = state['previous_level_state']
        self._previous_masks = state['previous_masks']
        self._previous_nominal_density = state['previous_nominal_density']
        self._history = state['history']
        self._expected_max_duration = state['expected_max_duration']
        self._done = state['done']
        self._macs = state['macs']
        self.sparsity_step.load_state_dict(state['sparsity_step'])
        self._masked_params = None

    # ------------------------------------------------------------------ set-up
    def _check_model(self, state: State) -> None:
        """Validate ``ignore`` and the prunable weights, and check stored masks against the model (INIT, AFTER_LOAD)."""
        model = unwrap_model(state)
        weights = prunable_weights(model, self.ignore)
        if self._masks is None:
            self._masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
            return
        if set(self._masks) != set(weights):
            raise ValueError(f'checkpoint: IMP masks are for parameters {sorted(self._masks)}, but the model prunes '
                             f'{sorted(weights)}; resume with the same model and IMP(ignore=...)')
        for name, w in weights.items():
            if self._masks[name].shape != w.shape:
                raise ValueError(f'checkpoint: IMP mask {name!r} has shape {tuple(self._masks[name].shape)}, the model '
                                 f'weight {tuple(w.shape)}; resume with the same model')
        device = next(iter(weights.values())).device
        self._masks = {n: m.to(device=device, dtype=torch.bool) for n, m in self._masks.items()}
        for attribute in ('_rewind_point', '_previous_level_state', '_previous_masks'):
            stored = getattr(self, attribute)
            if stored is not None:
                setattr(self, attribute, {n: t.to(device) for n, t in stored.items()})

    def _start(self, state: State) -> None:
        """Fix the level schedule (first start) or re-assert it (resume), and make the LR schedule level-relative."""
        if self._plan is None:
            if state.max_duration is None:
                return  # max_duration arrives with fit(); FIT_START calls again
            self._plan = self._make_plan(state)
            self._set_max_duration(state, self._plan['schedule_batches'] + self._remaining_levels() * self._level_len())
        elif self._expected_max_duration is not None:
            state.max_duration = Time(self._expected_max_duration, TimeUnit.BATCH)  # max_duration is not checkpointed
        make_level_relative(state, lambda: self._level_view(state))
        self._masked_params = None

    def _make_plan(self, state: State) -> dict[str, Any]:
        duration = Time.from_input(state.max_duration)
        if duration.unit == TimeUnit.BATCH:
            schedule_batches = int(duration.value)
        elif duration.unit == TimeUnit.EPOCH:
            if state.dataloader_len is None:
                raise ValueError('max_duration: IMP needs the train dataloader length to convert epochs to batches; '
                                 "give max_duration in 'ba' or use a dataloader with a length")
            schedule_batches = int(duration.value) * int(state.dataloader_len)
        else:
            raise ValueError(f"max_duration: {duration} is not allowed with IMP; give one level's duration in 'ep' or 'ba'")
        rewind = self._rewind_time
        if rewind.unit == TimeUnit.BATCH:
            rewind_batch = int(rewind.value)
        elif rewind.unit == TimeUnit.EPOCH:
            rewind_batch = int(rewind.value) * int(state.dataloader_len or 0)
        else:
            rewind_batch = int(round(float(rewind.value) * schedule_batches))
        if rewind_batch >= schedule_batches:
            raise ValueError(f'rewind_to: {self.rewind_to} ({rewind_batch} batches) is not allowed; it must come before '
                             f'the end of the level, max_duration = {duration} ({schedule_batches} batches)')
        return {'schedule_duration': str(duration), 'schedule_batches': schedule_batches, 'rewind_batch': rewind_batch}

    def _level_len(self) -> int:
        return self._plan['schedule_batches'] - self._plan['rewind_batch']

    def _remaining_levels(self) -> int:
        """Pruned levels still to train after the current one (an estimate in target-density mode)."""
        if self.levels is not None:
            return max(self.levels - self._level, 0)
        return self.sparsity_step.planned_levels(self._nominal_density, self.target_density)

    def _set_max_duration(self, state: State, batches: int) -> None:
        self._expected_max_duration = int(batches)
        state.max_duration = Time(int(batches), TimeUnit.BATCH)

    def _resolve_folder(self, state: State) -> None:
        if self._resolved_folder is not None:
            return
        if self.folder is not None:
            folder = format_name_with_dist(self.folder, state.run_name)
        else:
            from composer.callbacks import CheckpointSaver
            savers = [c for c in state.callbacks if isinstance(c, CheckpointSaver)]
            base = format_name_with_dist(savers[0].folder, state.run_name) if savers else state.run_name
            folder = os.path.join(base, 'imp')
        fresh_start = int(state.timestamp.batch) == 0 and not self._history
        if fresh_start and dist.get_global_rank() == 0 and os.path.isfile(os.path.join(folder, LEVELS_FILE)):
            raise ValueError(f'folder: {folder} already holds an IMP run ({LEVELS_FILE}); give IMP(folder=...) a new '
                             'folder, or resume that run with autoresume=True / load_path')
        self._resolved_folder = folder

    def _level_view(self, state: State) -> LevelView:
        """The current time as level 0 saw it at the same point of the schedule."""
        now = state.timestamp
        if self._level == 0:
            local = now
        else:
            batch = self._plan['rewind_batch'] + int(now.batch) - int(self._level_start['batch'])
            sample = self._rewind_counters.get('sample', 0) + int(now.sample) - int(self._level_start['sample'])
            token = self._rewind_counters.get('token', 0) + int(now.token) - int(self._level_start['token'])
            per_epoch = int(state.dataloader_len) if state.dataloader_len is not None else None
            local = Timestamp(
                epoch=batch // per_epoch if per_epoch else int(now.epoch),
                batch=batch,
                sample=sample,
                token=token,
                batch_in_epoch=batch % per_epoch if per_epoch else int(now.batch_in_epoch),
            )
        if self._schedule_duration is None:
            self._schedule_duration = Time.from_timestring(self._plan['schedule_duration'])
        return LevelView(local, self._schedule_duration, state.dataloader_len)

    def _count_macs(self, state: State) -> None:
        batch = state.batch
        first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values())) if isinstance(
            batch, dict) else batch
        model = unwrap_model(state)
        try:
            with preserve_rng(state):
                dense, per_weight = layer_macs(model, (state.device.batch_to_device(batch),), int(first.shape[0]),
                                               self._masks)
        except Exception as error:  # an exotic forward must not stop training; FLOPs are then reported as unknown
            warnings.warn(f'IMP: could not count MACs with torch-pruning ({type(error).__name__}: {error}); FLOPs will '
                          'not be reported')
            dense, per_weight = 0.0, {}
        self._macs = {'dense': dense, 'weights': per_weight} if dense else {}

    def _keep_factors(self, state: State) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The partly pruned parameters and their masks as 0/1 tensors of the parameter's dtype, built once per level,
        so that enforcing the masks is one fused multi-tensor multiply per step (pruned entries become exactly 0:
        their gradients are zeroed before the step, so no optimizer can move them by a non-finite amount)."""
        if self._masked_params is None:
            params = dict(unwrap_model(state).named_parameters())
            pruned = [name for name, mask in self._masks.items() if not mask.all()]
            self._masked_params = ([params[n] for n in pruned], [self._masks[n].to(params[n].dtype) for n in pruned])
        return self._masked_params

    # ------------------------------------------------------------------ rewind point
    def _capture_rewind_point(self, state: State) -> None:
        """Snapshot the full state at step k, identical on every rank (BN buffers may differ under DDP)."""
        rewind_point = snapshot(unwrap_model(state))
        for tensor in rewind_point.values():
            dist.broadcast(tensor, src=0)
        self._rewind_point = rewind_point
        self._rewind_counters = {'sample': int(state.timestamp.sample), 'token': int(state.timestamp.token)}
        self._rewind_lrs = [[float(group['lr']) for group in opt.param_groups] for opt in state.optimizers]
        self._rewind_schedulers = [_plain(s.state_dict()) for s in state.schedulers]
        if self.rewind_optimizer:
            self._rewind_optimizers = [_plain(snapshot_optimizer(opt)) for opt in state.optimizers]
        if self._resolved_folder is not None and dist.get_global_rank() == 0:
            save_rewind_point(self._resolved_folder, rewind_point, self._plan['rewind_batch'])

    # ------------------------------------------------------------------ level transitions
    def _level_over(self, state: State) -> bool:
        level_end = int(self._level_start['batch']) + (self._plan['schedule_batches'] if self._level == 0 else
                                                        self._level_len())
        stopped = Time.from_input(state.max_duration).value != self._expected_max_duration
        if stopped and self._rewind_point is None:
            warnings.warn(f'IMP: a request to stop training at batch {int(state.timestamp.batch)} came before the '
                          f"rewind step ({self._plan['rewind_batch']} batches) and was ignored: level 0 must reach it")
            self._set_max_duration(state, self._expected_max_duration)
            stopped = False
        return int(state.timestamp.batch) >= level_end or stopped

    def _end_level(self, state: State, logger: Logger) -> None:
        now = state.timestamp
        model = unwrap_model(state)
        level_end = int(self._level_start['batch']) + (self._plan['schedule_batches'] if self._level == 0 else
                                                        self._level_len())
        record: dict[str, Any] = {
            'level': self._level,
            'density': self.density,
            'nominal_density': self._nominal_density,
            'layer_density': layer_densities(self._masks),
            'eval': self._level_eval(state),
            'steps': int(now.batch) - int(self._level_start['batch']),
            'samples': int(now.sample) - int(self._level_start['sample']),
            'flops': self.training_flops(int(now.sample) - int(self._level_start['sample'])),
            'seconds': now.total_wct.total_seconds() - float(self._level_start['seconds']),
            'start_batch': int(self._level_start['batch']),
            'end_batch': int(now.batch),
            'stopped_early': int(now.batch) < level_end,
        }
        if self._level > 0:
            record['step'] = dict(self.sparsity_step.decision)
        for hook in self._hooks:
            record.update(hook(state, logger, record) or {})
        accepted = self._level == 0 or self.sparsity_step.accept(state, self, record, logger)
        record['accepted'] = bool(accepted)
        self._history.append(record)
        self._log_level(record, logger)
        self._write_level(record, model, accepted, logger)

        if accepted:
            if self._keep_previous_level:
                self._previous_level_state = snapshot(model)
            self._previous_masks = {n: m.clone() for n, m in self._masks.items()}
            self._previous_nominal_density = self._nominal_density
            if self._finished():
                self._done = True
                self._set_max_duration(state, int(now.batch))
                return
            next_level = self._level + 1
        else:
            rewind(model, self._previous_level_state, self._previous_masks)
            next_level = self._level

        fraction = self.sparsity_step.fraction(state, self, logger)
        self._nominal_density = self._previous_nominal_density * (1.0 - fraction)
        masks = masks_at_density(prunable_weights(model, self.ignore), self._nominal_density, self._previous_masks,
                                 self.scope)
        for name in masks:
            as_bytes = masks[name].to(torch.uint8)
            dist.broadcast(as_bytes, src=0)  # one mask for all ranks, whatever ties or kernels did
            masks[name] = as_bytes.bool()
        self._masks = masks
        self._masked_params = None
        self._rewind(state)
        self._level = next_level
        self._level_start = {'batch': int(now.batch), 'sample': int(now.sample), 'token': int(now.token),
                             'seconds': now.total_wct.total_seconds()}
        self._set_max_duration(state, int(now.batch) + (1 + self._remaining_levels()) * self._level_len())

    def _finished(self) -> bool:
        if self.sparsity_step.finished(self):
            return True
        if self.levels is not None:
            return self._level >= self.levels
        keep_at_target = round(self.target_density * sum(m.numel() for m in self._masks.values()))
        return alive_count(self._masks) <= keep_at_target

    def _rewind(self, state: State) -> None:
        """Weights and buffers to the rewind point under the new mask; optimizer, LR and schedulers as at step k."""
        model = unwrap_model(state)
        rewind(model, self._rewind_point, self._masks)
        params = dict(model.named_parameters())
        masks_by_param = {params[n]: m for n, m in self._masks.items()}
        for index, optimizer in enumerate(state.optimizers):
            rewind_optimizer(optimizer, self._rewind_optimizers[index] if self._rewind_optimizers else None,
                             masks_by_param)
            for group, lr in zip(optimizer.param_groups, self._rewind_lrs[index]):
                group['lr'] = lr
        for scheduler, scheduler_state in zip(state.schedulers, self._rewind_schedulers):
            scheduler.load_state_dict(copy.deepcopy(scheduler_state))

    def _level_eval(self, state: State) -> dict[str, float]:
        """The Trainer's evaluation of this level's trained network, or our own when none ran at this step."""
        batch, values = self._last_eval
        if batch == int(state.timestamp.batch) and values:
            return dict(values)
        return evaluate(state) if state.evaluators else {}

    def _log_level(self, record: dict[str, Any], logger: Logger) -> None:
        metrics = {'imp/level': record['level'], 'imp/density': record['density'], 'imp/steps': record['steps']}
        metrics.update({f'imp/density/{name}': value for name, value in record['layer_density'].items()})
        metrics.update({f'imp/eval/{name}': value for name, value in record['eval'].items()})
        metrics.update({k: v for k, v in record.items() if '/' in k and isinstance(v, (int, float, bool))})
        logger.log_metrics({k: float(v) for k, v in metrics.items()})

    def _write_level(self, record: dict[str, Any], model: torch.nn.Module, accepted: bool, logger: Logger) -> None:
        if dist.get_global_rank() != 0 or self._resolved_folder is None:
            return
        os.makedirs(self._resolved_folder, exist_ok=True)
        files = [os.path.join(self._resolved_folder, LEVELS_FILE)]
        if accepted:
            path = save_level(self._resolved_folder, record['level'], self._masks, model.state_dict())
            files += [os.path.join(path, 'mask.pt'), os.path.join(path, 'trained.pt')]
        with open(files[0], 'w') as f:  # rewritten from the checkpointed history, so a resumed run never duplicates
            f.writelines(json.dumps(r, default=float) + '\n' for r in self._history)
        root = os.path.dirname(os.path.normpath(self._resolved_folder))
        for file_path in files:
            logger.upload_file(remote_file_name=os.path.relpath(file_path, root), file_path=file_path, overwrite=True)


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively: checkpointed algorithm state holds only tensors, numbers, strings, lists, dicts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj

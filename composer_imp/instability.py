"""Instability analysis (Frankle et al. 2020): train a ticket twice with different SGD noise, measure the barrier.

An open_lth-style branch run from a saved ticket: both children start from the ticket's rewind point under its mask at
step k, train k -> T with the run's own schedule but different data order and augmentation randomness (the Trainer's
seed), and the barrier between the two trained networks is measured on the eval data, through the LMC evaluator's
scoring (``composer_imp.evaluation``), on any ComposerModel. A ticket is *stable* when ``barrier_max_minus_mean`` (the
convention for exchangeable endpoints) of the headline value is at most ``threshold``. :func:`train_ticket` (one
ticket trained k -> T) is shared with the control branches (:mod:`composer_imp.branches`).
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer import Trainer
from composer.core import Algorithm, Event, State, Time, Timestamp, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from composer_imp.algorithms.imp import IMP
from composer_imp.callbacks.lmc_evaluator import LMCEvaluator
from composer_imp.evaluation import unwrap_model
from composer_imp.functional import apply_masks, mask_gradients, rewind, snapshot
from composer_imp.functional.ticket import atomic_write

__all__ = ['instability_analysis', 'train_ticket', 'barrier_summary', 'below_threshold', 'check_ticket', 'write_result',
           'schedule_batches']

_COMPOSER_SCHEDULER = 'compile_composer_scheduler.<locals>.scheduler_fn'


class _TicketBranch(Algorithm):
    """Start the run at the rewind step k and keep the ticket's mask: pruned weights get no gradient and stay 0."""

    def __init__(self, masks: Mapping[str, torch.Tensor], rewind_batch: int):
        self.masks = dict(masks)
        self.rewind_batch = rewind_batch

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.FIT_START, Event.AFTER_TRAIN_BATCH, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = unwrap_model(state)
        if event == Event.FIT_START:
            device = next(model.parameters()).device
            self.masks = {name: mask.to(device) for name, mask in self.masks.items()}
            self._start_at_rewind_step(state)
        elif event == Event.AFTER_TRAIN_BATCH:
            mask_gradients(model, self.masks)
        else:
            apply_masks(model, self.masks)

    def _start_at_rewind_step(self, state: State) -> None:
        """Time k, so the schedule resumes where the ticket's level did and the data iterator skips to step k. The
        first batch trains with the learning rate the original run used at step k, its scheduler's value at k - 1."""
        per_epoch = int(state.dataloader_len) if state.dataloader_len is not None else None

        def at(batch: int) -> Timestamp:
            if per_epoch is None:
                return Timestamp(batch=batch, batch_in_epoch=batch)
            epoch = batch // per_epoch
            return Timestamp(epoch=epoch, epoch_in_iteration=epoch, batch=batch, batch_in_epoch=batch % per_epoch)

        if self.rewind_batch > 0:
            state.timestamp = at(self.rewind_batch - 1)
            for scheduler in state.schedulers:  # Composer schedulers read state.timestamp, not their step counter
                for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                              scheduler.lr_lambdas):
                    group['lr'] = base_lr * fn(scheduler.last_epoch)
        state.timestamp = at(self.rewind_batch)


def schedule_batches(trainer: Trainer) -> int:
    duration = Time.from_input(trainer.state.max_duration)
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH and trainer.state.dataloader_len is not None:
        return int(duration.value) * int(trainer.state.dataloader_len)
    raise ValueError(f"make_trainer: max_duration {duration} must be one level's duration T in 'ba' or 'ep'")


def _check_trainer(trainer: Trainer, ticket: Mapping[str, Any]) -> None:
    if any(isinstance(algorithm, IMP) for algorithm in trainer.state.algorithms):
        raise ValueError('make_trainer: the Trainer holds IMP; build it like the original run but without IMP (the '
                         'analysis trains one ticket, it does not prune)')
    for scheduler in trainer.state.schedulers:
        lambdas = getattr(scheduler, 'lr_lambdas', [])
        if not lambdas or any(getattr(fn, '__qualname__', '') != _COMPOSER_SCHEDULER for fn in lambdas):
            raise ValueError('make_trainer: only Composer schedulers (composer.optim, functions of time) can resume '
                             'at the rewind step; native PyTorch schedulers keep their own step counters')
    total = schedule_batches(trainer)
    if ticket.get('schedule_batches') is not None and ticket['schedule_batches'] != total:
        raise ValueError(f"make_trainer: max_duration is {total} batches, but the ticket's level trained for "
                         f"T = {ticket['schedule_batches']} batches; configure it like the original run")
    if ticket['rewind_batch'] >= total:
        raise ValueError(f"ticket: rewind step {ticket['rewind_batch']} is not before the end of training ({total})")
    if not trainer.state.evaluators:
        raise ValueError('make_trainer: the Trainer has no eval_dataloader to measure the barrier on')


def write_result(path: str, result: Mapping[str, Any]) -> str:
    """Write a JSON result atomically (nothing half-written under ``path`` if the process dies)."""
    return atomic_write(path, lambda f: f.write(json.dumps(result, indent=1).encode('utf-8')))


def check_ticket(ticket: Mapping[str, Any]) -> None:
    missing = [key for key in ('masks', 'rewind_point', 'rewind_batch', 'level') if key not in ticket]
    if missing:
        raise ValueError(f'ticket: missing {missing}; pass IMP.ticket() or composer_imp.load_ticket(level_folder)')


def train_ticket(make_trainer: Callable[[nn.Module, int], Trainer], ticket: Mapping[str, Any], seed: int,
                 model: nn.Module) -> Trainer:
    """Train a copy of ``model`` from ``ticket['rewind_point']`` under ``ticket['masks']``, step
    ``ticket['rewind_batch']`` (k) -> T, with the Trainer ``make_trainer(copy, seed)``; returns that Trainer, fitted
    and still open (the caller reads its state, then closes it). ``model`` is never modified."""
    child = copy.deepcopy(model)
    device = next(child.parameters()).device
    rewind(child, ticket['rewind_point'], {name: mask.to(device) for name, mask in ticket['masks'].items()})
    trainer = make_trainer(child, seed)
    try:
        _check_trainer(trainer, ticket)
    except ValueError:
        trainer.close()
        raise
    trainer.state.algorithms = [_TicketBranch(ticket['masks'], int(ticket['rewind_batch'])),
                                *trainer.state.algorithms]
    trainer.fit()
    return trainer


def barrier_summary(curve: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON fields of an :meth:`LMCEvaluator.barrier` curve: ``metric`` (the headline value's name),
    ``alphas``, ``values`` (each value's curve), ``barrier_linear`` and ``barrier_max_minus_mean`` (of the
    headline) and ``barriers`` (``{value: {'linear', 'max_minus_mean'}}``)."""
    headline = curve['metric']
    return {
        'metric': headline,
        'alphas': curve['alphas'],
        'values': curve['values'],
        'barrier_linear': curve['barrier_linear'][headline],
        'barrier_max_minus_mean': curve['barrier_max_minus_mean'][headline],
        'barriers': {name: {'linear': curve['barrier_linear'][name],
                            'max_minus_mean': curve['barrier_max_minus_mean'][name]} for name in curve['values']},
    }


def below_threshold(barrier: float, threshold: float) -> Optional[bool]:
    """Whether a barrier is at most ``threshold``; None for a nan barrier (a non-finite value on the path), which is
    undefined: neither below nor above."""
    return None if math.isnan(barrier) else barrier <= threshold


def instability_analysis(
    make_trainer: Callable[[nn.Module, int], Trainer],
    ticket: Mapping[str, Any],
    seeds: Sequence[int] = (1, 2),
    *,
    model: nn.Module,
    alphas: Union[int, Sequence[float], None] = 30,
    threshold: float = 0.02,
    bn: str = 'interpolate',
    bn_batches: int = 16,
    eval_label: Optional[str] = None,
    level_dir: Optional[str] = None,
    metric: Optional[str] = None,
) -> dict[str, Any]:
    """Train the ticket twice from its rewind point with different SGD noise and measure the barrier between them.

    Args:
        make_trainer: ``make_trainer(model, seed)`` -> an unfitted Trainer configured like the original run (optimizer,
            Composer LR schedule, ``max_duration`` = one level's T, train and eval data) but without ``IMP``, with
            ``seed=seed`` and, under DDP, a sampler seeded by ``seed`` too, so the data order differs between children.
            Give the children no shared ``save_folder`` and no ``autoresume``.
        ticket: ``IMP.ticket()`` or ``composer_imp.load_ticket(path)``: ``masks``, ``rewind_point``, ``rewind_batch``
            (k), ``level``, ``density``.
        seeds: the two children's seeds.
        model: a model of the run's architecture (a ComposerModel; a ticket holds no architecture); copied, never
            modified.
        alphas: interpolation grid (default 30 evenly spaced points, as Frankle et al. 2020).
        threshold: largest ``barrier_max_minus_mean`` of the headline value still called stable (0.02 = 2 points
            of error).
        bn, bn_batches, eval_label, metric: as :class:`~composer_imp.callbacks.LMCEvaluator` (``metric``: the headline
            value; default ``'error'``, or ``'loss'`` for a language model).
        level_dir: the analysed level's folder (``.../imp/level_<L>``); the result is written there as
            ``instability_seeds_<a>_<b>.json`` (rank 0), and nothing else is touched.

    Returns the JSON-able result (``level``, ``density``, ``seeds``, ``rewind_batch``, ``metric`` (the headline
    value's name), ``alphas``, ``values`` (each value's curve), ``barrier_linear`` and ``barrier_max_minus_mean`` (of
    the headline), ``barriers`` (``{value: {'linear', 'max_minus_mean'}}``), ``threshold``, ``stable``, ``bn``) plus
    ``children``: the two trained state dicts (CPU), which are not written.
    """
    seeds = [int(seed) for seed in seeds]
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ValueError(f'seeds: {seeds} is not allowed; give two different seeds')
    check_ticket(ticket)
    lmc = LMCEvaluator(alphas=alphas, threshold=threshold, bn=bn, bn_batches=bn_batches, eval_label=eval_label,
                       metric=metric)

    children, trainer = [], None
    for seed in seeds:
        if trainer is not None:
            trainer.close()
        trainer = train_ticket(make_trainer, ticket, seed, model)
        children.append(snapshot(unwrap_model(trainer.state)))
    try:
        curve = lmc.barrier(trainer.state, children[0], children[1])
    finally:
        trainer.close()

    summary = barrier_summary(curve)
    result = {
        'level': int(ticket['level']),
        'density': float(ticket['density']) if 'density' in ticket else None,
        'seeds': seeds,
        'rewind_batch': int(ticket['rewind_batch']),
        **summary,
        'threshold': threshold,
        'stable': below_threshold(summary['barrier_max_minus_mean'], threshold),
        'bn': bn,
    }
    if level_dir is not None and dist.get_global_rank() == 0:
        write_result(os.path.join(level_dir, f'instability_seeds_{seeds[0]}_{seeds[1]}.json'), result)
    result['children'] = [{name: t.cpu() for name, t in child.items()} for child in children]
    return result

"""Control branches of a ticket (open_lth's ``lottery/branch/``) and the perturbation-robustness experiment (§3.2).

Every branch starts from a finished level's ticket, changes one thing, and trains k -> T exactly like the level did
(:func:`composer_imp.instability.train_ticket`: the schedule resumed at the rewind step, the mask enforced):

==============  ===========================================================================================
``kind``        what the branch trains
==============  ===========================================================================================
random_prune    theta_k under a random mask with the ticket's alive count in every tensor (seeded)
shuffle         theta_k under the ticket's mask with each tensor's entries permuted (seeded)
reinit          the ticket's mask on a fresh initialisation: the model built again with the branch's seed
rewind          the ticket's mask on theta_{k'} from another rewind step k' (``rewind_to``), trained k' -> T
perturb         m_L * theta_k plus a random direction on supp(m_L) of norm ||m_L * theta_k - m_{L+1} * theta_k||,
                trained beside the unperturbed copy; the barrier between the two trained networks
==============  ===========================================================================================

A branch's seed is the Trainer's seed (data order, augmentation) and the seed of its random draw (mask, weights or
perturbation). For ``rewind``, theta_{k'} comes from the run itself: k' = k is the ticket's rewind point, k' = 0 the
model built with the run's seed, any other k' dense training 0 -> k' with the run's seed, data order and schedule
(k' batches more, once per call). ``perturb`` trains both copies with the same seed, so the perturbation is the only
difference between them.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from composer import Trainer
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from composer_imp.callbacks.lmc_evaluator import LMCEvaluator
from composer_imp.evaluation import evaluate, unwrap_model
from composer_imp.functional import density, snapshot
from composer_imp.functional.controls import (
    layer_alive_counts,
    perturb_on_support,
    pruned_rewind_distance,
    random_masks,
    shuffled_masks,
)
from composer_imp.functional.ticket import atomic_save
from composer_imp.instability import (
    barrier_summary,
    below_threshold,
    check_ticket,
    schedule_batches,
    train_ticket,
    write_result,
)

__all__ = ['KINDS', 'run_branch', 'branch_ticket', 'dense_rewind_point', 'branch_file']

KINDS = ('random_prune', 'reinit', 'shuffle', 'rewind', 'perturb')


def branch_file(kind: str, seed: int, rewind_to: Optional[int] = None) -> str:
    """The result's file name in the level folder, ``branch_<kind>_seed<S>.json`` (``rewind``:
    ``branch_rewind_<k'>ba_seed<S>.json``); a ``.pt`` of the same stem holds the branch's masks and trained state."""
    return f'branch_{kind}{"" if rewind_to is None else f"_{rewind_to}ba"}_seed{seed}.json'


class _CaptureAt(Algorithm):
    """Snapshot the model after ``batch`` batches, where IMP captures its rewind point, and stop training there."""

    def __init__(self, batch: int):
        self.batch = batch
        self.captured: Optional[dict[str, torch.Tensor]] = None

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BATCH_CHECKPOINT and self.captured is None

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            self.captured = snapshot(unwrap_model(state), device='cpu')
            state.stop_training()


def dense_rewind_point(make_trainer: Callable[[nn.Module, int], Trainer], model: nn.Module, seed: int,
                       batch: int) -> dict[str, torch.Tensor]:
    """theta_{batch}: train a copy of ``model`` (the run's initialisation) densely for ``batch`` batches with the
    Trainer ``make_trainer(copy, seed)`` (configured like the run: its schedule, data order and ``max_duration``),
    and return its state dict (CPU) at that step."""
    trainer = make_trainer(copy.deepcopy(model), seed)
    try:
        total = schedule_batches(trainer)
        if not 0 < batch < total:
            raise ValueError(f'rewind_to: {batch} batches is not allowed; give a step in [0, {total}) (T = {total})')
        capture = _CaptureAt(batch)
        trainer.state.algorithms = [*trainer.state.algorithms, capture]
        trainer.fit()
    finally:
        trainer.close()
    assert capture.captured is not None, 'the dense run stopped before the requested step'
    return capture.captured


def _rewind_batches(rewind_to: Union[int, str, None]) -> int:
    if rewind_to is None:
        raise ValueError("rewind_to: the rewind branch needs the other rewind step k', e.g. '0ba' or '200ba'")
    try:
        time = Time.from_input(rewind_to, TimeUnit.BATCH)
    except (ValueError, TypeError):
        time = None
    if time is None or time.unit != TimeUnit.BATCH or int(time.value) < 0:
        raise ValueError(f"rewind_to: {rewind_to!r} is not allowed; give a step >= 0 in batches, e.g. '0ba' or '200ba'")
    return int(time.value)


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f'seeds: {seeds} is not allowed; give one or more different seeds')
    return seeds


def branch_ticket(ticket: Mapping[str, Any], kind: str, seed: int, *,
                  build_model: Optional[Callable[[int], nn.Module]] = None,
                  perturbation_norm: Optional[float] = None) -> dict[str, Any]:
    """The ticket a branch trains (``masks``, ``rewind_point``, ``rewind_batch``), drawn with ``seed``: ``ticket``
    with a random or shuffled mask, a fresh initialisation ``build_model(seed)``, or a rewind point perturbed on the
    mask's support by ``perturbation_norm``. ``rewind`` returns ``ticket`` as given (already moved to k')."""
    if kind not in KINDS:
        raise ValueError(f'kind: {kind!r} is not allowed; use one of {", ".join(KINDS)}')
    generator = torch.Generator().manual_seed(int(seed))
    masks = {name: mask.cpu() for name, mask in ticket['masks'].items()}
    branch = dict(ticket)
    if kind == 'random_prune':
        branch['masks'] = random_masks(masks, generator)
    elif kind == 'shuffle':
        branch['masks'] = shuffled_masks(masks, generator)
    elif kind == 'reinit':
        if build_model is None:
            raise ValueError('build_model: the reinit branch needs build_model(seed) -> a fresh model of the run')
        branch['rewind_point'] = snapshot(build_model(int(seed)), device='cpu')
        if all(torch.equal(branch['rewind_point'][n], ticket['rewind_point'][n]) for n in masks):
            raise ValueError(f"build_model: seed {seed} rebuilds the ticket's own weights; give another seed")
    elif kind == 'perturb':
        if perturbation_norm is None:
            raise ValueError('perturbation_norm: the perturb branch needs the norm of its perturbation')
        branch['rewind_point'] = perturb_on_support(ticket['rewind_point'], masks, perturbation_norm, generator)
    return branch


def run_branch(
    make_trainer: Callable[[nn.Module, int], Trainer],
    ticket: Mapping[str, Any],
    kind: str,
    seeds: Sequence[int] = (1,),
    *,
    model: nn.Module,
    build_model: Optional[Callable[[int], nn.Module]] = None,
    run_seed: Optional[int] = None,
    rewind_to: Union[int, str, None] = None,
    next_masks: Optional[Mapping[str, torch.Tensor]] = None,
    alphas: Union[int, Sequence[float], None] = 30,
    threshold: float = 0.02,
    bn: str = 'interpolate',
    bn_batches: int = 16,
    eval_label: Optional[str] = None,
    metric: Optional[str] = None,
    level_dir: Optional[str] = None,
) -> list[dict[str, Any]]:
    """Train one control branch of ``ticket`` per seed and measure it on the run's eval data.

    Args:
        make_trainer, model: as :func:`~composer_imp.instability.instability_analysis` (a Trainer like the run's,
            without IMP; a model of the run's architecture, copied, never modified).
        ticket: ``composer_imp.load_ticket(level_folder)`` or ``IMP.ticket()``.
        kind: one of :data:`KINDS` (see the module docstring).
        seeds: one branch per seed (different seeds).
        build_model: ``build_model(seed)`` -> a freshly initialised model of the run's architecture, the way the run
            built its own. Needed by ``reinit`` and by ``rewind``.
        run_seed: the run's seed (``rewind``: theta_0 is ``build_model(run_seed)``; dense training to k' uses it).
        rewind_to: ``rewind``'s step k' in batches (``'200ba'`` or an int).
        next_masks: ``perturb``: the masks of level L+1 (they set the perturbation's norm).
        alphas, threshold, bn, bn_batches, eval_label, metric: the barrier of ``perturb``, as
            :class:`~composer_imp.callbacks.LMCEvaluator` (headline ``barrier_max_minus_mean``, as instability).
        level_dir: the ticket's level folder; each seed's result goes there as :func:`branch_file` (JSON) and its
            masks and trained state beside it as a ``.pt`` of the same stem (rank 0, atomic writes).

    Returns one JSON-able result per seed: ``kind``, ``seed``, ``level``, ``density``, ``layer_alive`` (alive weights
    per tensor), ``rewind_batch`` (the step training started from), ``eval`` (``{'<label>/<metric>': value}``, the
    names of the level records' ``eval``); ``rewind``: ``rewind_to`` (k'); ``perturb``: ``perturbation_norm``,
    ``eval_unperturbed``, the barrier fields of instability, ``threshold`` and ``connected``.
    """
    if kind not in KINDS:
        raise ValueError(f'kind: {kind!r} is not allowed; use one of {", ".join(KINDS)}')
    seeds = _check_seeds(seeds)
    check_ticket(ticket)
    masks = {name: mask.cpu() for name, mask in ticket['masks'].items()}
    start = dict(ticket)
    if kind == 'rewind':
        if build_model is None:
            raise ValueError('build_model: the rewind branch needs build_model(seed) -> a fresh model of the run')
        k = _rewind_batches(rewind_to)
        if k == int(ticket['rewind_batch']):
            theta = ticket['rewind_point']
        elif run_seed is None:
            raise ValueError("run_seed: the rewind branch needs the run's seed to rebuild theta_k'")
        elif k == 0:
            theta = snapshot(build_model(int(run_seed)), device='cpu')
        else:
            theta = dense_rewind_point(make_trainer, build_model(int(run_seed)), int(run_seed), k)
        start.update(rewind_point=theta, rewind_batch=k)
    norm = None
    if kind == 'perturb':
        if next_masks is None:
            raise ValueError("next_masks: the perturb branch needs level L+1's masks (the perturbation's norm)")
        norm = pruned_rewind_distance(ticket['rewind_point'], masks, {n: m.cpu() for n, m in next_masks.items()})
    lmc = LMCEvaluator(alphas=alphas, threshold=threshold, bn=bn, bn_batches=bn_batches, eval_label=eval_label,
                       metric=metric) if kind == 'perturb' else None

    # Every seed's draw first: a bad one fails before anything is trained or written.
    drawn = [branch_ticket(start, kind, seed, build_model=build_model, perturbation_norm=norm) for seed in seeds]
    results = []
    for seed, branch in zip(seeds, drawn):
        result = {'kind': kind, 'seed': seed, 'level': int(ticket['level']), 'density': density(branch['masks']),
                  'layer_alive': layer_alive_counts(branch['masks']), 'rewind_batch': int(branch['rewind_batch'])}
        if kind == 'rewind':
            result['rewind_to'] = int(branch['rewind_batch'])
        saved: dict[str, Any] = {'masks': {n: m.cpu() for n, m in branch['masks'].items()}}
        if kind == 'perturb':
            reference = train_ticket(make_trainer, ticket, seed, model)
            result['eval_unperturbed'] = evaluate(reference.state)
            unperturbed = snapshot(unwrap_model(reference.state), device='cpu')
            reference.close()
        trainer = train_ticket(make_trainer, branch, seed, model)
        try:
            result['eval'] = evaluate(trainer.state)
            saved['trained'] = snapshot(unwrap_model(trainer.state), device='cpu')
            if kind == 'perturb':
                summary = barrier_summary(lmc.barrier(trainer.state, unperturbed, saved['trained']))
                result.update(perturbation_norm=norm, **summary, threshold=threshold,
                              connected=below_threshold(summary['barrier_max_minus_mean'], threshold), bn=bn)
        finally:
            trainer.close()
        if level_dir is not None and dist.get_global_rank() == 0:
            path = os.path.join(level_dir, branch_file(kind, seed, result.get('rewind_to')))
            atomic_save(saved, os.path.splitext(path)[0] + '.pt')
            write_result(path, result)
        results.append(result)
    return results

"""AdaptiveSparsityStep: choose each IMP level's pruning fraction by a projection check, verify it, back off.

This is the project's own heuristic (science.md §9), built on findings of Paul et al. (ICLR 2023): the fraction a
trained solution tolerates in one step is set by the flatness of the landscape around it, and at higher sparsity
successive IMP levels are linearly connected iff they are matching. The method card (README.md next to this file)
explains the algorithm, the defaults and their measurement.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from composer.core import State
from composer.loggers import Logger
from composer.utils import dist, model_eval_mode
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from composer_imp.algorithms.imp.sparsity_step import SparsityStep
from composer_imp.evaluation import (
    Scorer,
    total_loss,
    check_metric_name,
    evaluator_batches,
    find_evaluator,
    preserve_loader_generators,
    preserve_rng,
    resolve_value,
    resolve_values,
    samples_in_batch,
    sum_over_ranks,
    train_batches,
    unwrap_model,
    without_persistent_workers,
)
from composer_imp.functional.barrier import alpha_grid, is_matching, metric_curve
from composer_imp.functional.flops import FORWARD_FLOPS_PER_MAC, sparse_macs
from composer_imp.functional.masks import alive_count, layer_densities, magnitude_masks
from composer_imp.functional.hessian import (
    PRUNINGS,
    flat_live_weights,
    hessian_vector_product,
    lanczos,
    max_pruning_ratio,
    max_random_prune_fraction,
    spectrum,
    support_operator,
)
from composer_imp.functional.projection import check_fraction_range, max_prune_fraction
from composer_imp.functional.rewind import move_module_

if TYPE_CHECKING:
    from composer_imp.algorithms.imp.imp import IMP

__all__ = ['AdaptiveSparsityStep', 'BACKOFF_ON', 'CRITERIA', 'PROJECTION_METRICS', 'max_prune_fraction',
           'compute_totals']

BACKOFF_ON = ('matching', 'barrier', 'either')
CRITERIA = ('projection', 'hessian')
PROJECTION_METRICS = ('error', 'loss')


class AdaptiveSparsityStep(SparsityStep):
    """Per-level pruning fractions for ``IMP(target_density=...)``: as large as the trained network tolerates.

    At the end of every accepted level L (trained network w_L, mask m_L):

    1. **Projection check.** Prune w_L by candidate fractions p of its alive weights *without retraining* and score
       each projection on a fixed train subset (the *probe*), in eval mode. The step is the largest p in
       [``p_min``, ``p_max``] whose probe ``projection_metric`` rises by at most ``projection_tolerance`` over w_L
       (bisection from p_max, or ``candidates`` refined by bisection); ``p_min`` when none does. It never prunes
       past ``target_density``, and goes straight to it when it would otherwise stop less than half a ``p_min`` step
       short (so the last step may exceed ``p_max`` by that much).
    2. **Verification.** After level L+1 has trained, it must be *matching* on ``val_dataloader``: its
       ``verify_metric`` (default: error) at most the dense (level-0) value + ``matching_tolerance`` (+ ``noise_z``
       paired standard errors for the error); with ``backoff_on`` of ``'barrier'`` or ``'either'`` also linearly
       connected to w_L on the same value. If not, IMP discards it, restores level L's mask
       and trained weights exactly, and level L+1 is trained again with half the step in log-density
       (``1 - sqrt(1 - p)``; the last of ``max_backoffs`` retries uses ``p_min``).
    3. **End of the matching range.** A level that fails at ``p_min`` is accepted (a fixed ``p_min`` step would have
       accepted it too); the next level takes a plain ``p_min`` step, and a second failure in a row ends the adaptive
       phase: from then on every step is ``p_min``, without projection checks.

    Args:
        p_min: smallest step and fallback, a fraction of the *remaining* prunable weights (the fixed-IMP 0.2).
        p_max: largest step tried. 0 < p_min < p_max < 1.
        projection_tolerance: admissible rise of the probe metric caused by the extra pruning: nats of the model's
            loss for ``'loss'``, absolute error (0.02 = 2 percentage points of train error) for ``'error'``.
        projection_metric: ``'loss'`` (the model's own loss) or ``'error'`` (1 - its accuracy metric).
        resolution: the bisection stops when the admissible interval is narrower than this (a fraction).
        candidates: ascending grid of fractions in [p_min, p_max] to try instead of starting from p_max.
        probe_samples: size of the probe (over all ranks). Default source: a fixed random subset of the train
            dataset, drawn with the run's seed (map-style datasets), else the first batches of the train dataloader.
        probe_dataloader: batches to take the probe from instead (first ``probe_samples`` samples, cached once);
            use it for an un-augmented copy of the training data or when the train DataSpec has batch transforms.
        val_dataloader: held-out *training* data on which verification measures matching (and barriers); the dense
            value is measured on it at the end of level 0. Without it, verification measures on the run's first
            evaluator: if that is the test split, test data steer the back-offs (a warning says so and the record
            names the split).
        verify_metric: what verification compares with the dense level: a value name as in ``LMCEvaluator(metric=)``
            (``'error'``, ``'loss'``, ``'perplexity'``, ``'cross_entropy'`` or an eval metric's name) measured on the
            verification data through the model's own metrics, or a callable ``model -> float`` (lower is better,
            the same on every rank) that measures it on its own data.
        backoff_on: which failed check triggers a back-off: ``'matching'``, ``'barrier'`` or ``'either'``.
        matching_tolerance: how far above the dense value a level still counts as matching, in ``verify_metric``'s
            units (0.01 = 1 point of error).
        barrier_tolerance: largest linear-interpolation barrier (same units) still called connected.
        noise_z: paired standard errors of (level error - dense error) added to ``matching_tolerance`` before a
            level counts as failed, so that validation noise alone rarely triggers a back-off (0: none). Needs
            per-sample predictions: used for ``verify_metric='error'`` on class-score outputs, else the margin is 0.
        alphas: interpolation points of the verification barrier (an int, or values including 0 and 1).
        max_backoffs: retries of one level before it is accepted at ``p_min`` (>= 1).
        max_levels: stop after this many accepted pruned levels even if ``target_density`` is not reached (a compute
            bound; the report then says the target was not reached). ``None``: no bound.
        criterion: how step 1 picks the fraction: ``'projection'`` (the check above) or ``'hessian'``, the theory's
            maximal pruning ratio p* for magnitude pruning (``composer_imp.functional.hessian``; science.md §8) from
            Lanczos on the probe loss's Hessian restricted to the live weights, with eps = ``projection_tolerance``
            (so ``projection_metric`` must be ``'loss'``), clipped to [``p_min``, ``p_max``].
        hessian_iterations: Lanczos iterations (Hessian-vector products over the probe) per Hessian analysis; the
            Lanczos basis holds that many float64 copies of the live weights on the device.
        hessian_analysis: at every check, run both criteria and the projection check for *random* pruning too, and
            record them all (``hessian/...``; the report's maximal-pruning-ratio plot); costs count as checks. Needs
            ``projection_metric='loss'``.

    Everything the step decides goes into ``levels.jsonl``: the level's ``step`` (fraction, reason, candidates with
    probe error/loss and delta, back-off count, check cost) and ``verify`` (metric, value, dense value, noise
    margin, barrier, outcome, cost), and the scalars ``adaptive/...`` into the logger. Identical on every rank: probe
    and validation totals are all-reduced and the chosen fraction and verdict are broadcast from rank 0.
    """

    needs_previous_level = True

    def __init__(
        self,
        p_min: float = 0.2,
        p_max: float = 0.8,
        projection_tolerance: float = 0.2,
        projection_metric: str = 'loss',
        resolution: float = 0.05,
        candidates: Optional[Sequence[float]] = None,
        probe_samples: int = 2048,
        probe_dataloader: Optional[Iterable[Any]] = None,
        val_dataloader: Optional[Iterable[Any]] = None,
        verify_metric: Union[str, Callable[[nn.Module], float]] = 'error',
        backoff_on: str = 'matching',
        matching_tolerance: float = 0.01,
        barrier_tolerance: float = 0.02,
        noise_z: float = 1.0,
        alphas: Any = 5,
        max_backoffs: int = 2,
        max_levels: Optional[int] = None,
        criterion: str = 'projection',
        hessian_iterations: int = 30,
        hessian_analysis: bool = False,
    ):
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f'criterion: {criterion!r} is not allowed; use one of {CRITERIA}')
        if criterion == 'hessian' and projection_metric != 'loss':
            raise ValueError("criterion: 'hessian' measures the loss's sublevel set; use projection_metric='loss' "
                             '(projection_tolerance is then its height eps, in nats)')
        if isinstance(hessian_iterations, bool) or not isinstance(hessian_iterations, int) or hessian_iterations < 2:
            raise ValueError(f'hessian_iterations: {hessian_iterations!r} is not allowed; use an integer >= 2')
        self.criterion = criterion
        self.hessian_iterations = hessian_iterations
        if hessian_analysis and projection_metric != 'loss':
            raise ValueError("hessian_analysis: the Hessian is the loss's; use projection_metric='loss' with it")
        self.hessian_analysis = bool(hessian_analysis)
        check_fraction_range(p_min, p_max, projection_tolerance, resolution,
                             None if candidates is None else list(candidates))
        if projection_metric not in PROJECTION_METRICS:
            raise ValueError(f'projection_metric: {projection_metric!r} is not allowed; use one of {PROJECTION_METRICS}')
        if not callable(verify_metric):
            check_metric_name(verify_metric, 'verify_metric')
        if isinstance(probe_samples, bool) or not isinstance(probe_samples, int) or probe_samples < 1:
            raise ValueError(f'probe_samples: {probe_samples!r} is not allowed; use a number of samples >= 1')
        if backoff_on not in BACKOFF_ON:
            raise ValueError(f'backoff_on: {backoff_on!r} is not allowed; use one of {BACKOFF_ON}')
        for name, value in (('matching_tolerance', matching_tolerance), ('barrier_tolerance', barrier_tolerance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0.0:
                raise ValueError(f'{name}: {value!r} is not allowed; use a positive absolute error (0.01 = 1 point)')
        if isinstance(noise_z, bool) or not isinstance(noise_z, (int, float)) or noise_z < 0:
            raise ValueError(f'noise_z: {noise_z!r} is not allowed; use a number of standard errors >= 0 (0: none)')
        if isinstance(max_backoffs, bool) or not isinstance(max_backoffs, int) or max_backoffs < 1:
            raise ValueError(f'max_backoffs: {max_backoffs!r} is not allowed; use an integer >= 1')
        if max_levels is not None and (isinstance(max_levels, bool) or not isinstance(max_levels, int) or
                                       max_levels < 1):
            raise ValueError(f'max_levels: {max_levels!r} is not allowed; use None or an integer >= 1')
        self.max_levels = max_levels
        self.alphas = alpha_grid(alphas)
        self.p_min = float(p_min)
        self.p_max = float(p_max)
        self.projection_tolerance = float(projection_tolerance)
        self.projection_metric = projection_metric
        self.resolution = float(resolution)
        self.candidates = None if candidates is None else [float(c) for c in candidates]
        self.probe_samples = probe_samples
        self.probe_dataloader = probe_dataloader
        self.val_dataloader = val_dataloader
        self.verify_metric = verify_metric
        self.backoff_on = backoff_on
        self.matching_tolerance = float(matching_tolerance)
        self.barrier_tolerance = float(barrier_tolerance)
        self.max_backoffs = max_backoffs
        self.noise_z = float(noise_z)

        # Checkpointed (state_dict): plain numbers, strings, dicts.
        self._fraction: Optional[float] = None  # the fraction the level now training was pruned by
        self._backoffs = 0  # back-offs of the level now training
        self._retry_fraction: Optional[float] = None  # set by a rejection, used by the next fraction() call
        self._floor_failures = 0  # consecutive levels that failed verification at p_min
        self._matching_lost = False  # two such failures in a row: the end of the matching range
        self._dense_value: Optional[float] = None  # level 0's verify_metric on the verification data
        self._dense_correct: Optional[list[Optional[torch.Tensor]]] = None  # per rank: level 0 right on each sample
        self._parent = {'alive': 0, 'total': 0, 'level': 0}  # the accepted level the current one was pruned from
        self._verified_on: Optional[str] = None

        self._probe: Optional[list[Any]] = None  # cached probe batches (CPU); rebuilt at setup, never checkpointed
        self._probe_model: Optional[nn.Module] = None
        self._projection: Optional[Scorer] = None  # scores the probe; built at setup
        self._verification: Optional[Callable[[nn.Module], dict[str, float]]] = None  # built at setup
        self._verified_value = ''  # the name of the verification value

    # ------------------------------------------------------------------ SparsityStep interface
    def check(self, imp: 'IMP') -> None:
        if imp.target_density is None:
            raise ValueError('target_density: AdaptiveSparsityStep chooses how far each level prunes and needs a '
                             'density to stop at; use IMP(target_density=..., sparsity_step=AdaptiveSparsityStep(...)) '
                             'instead of IMP(levels=...)')

    def setup(self, state: State, imp: 'IMP') -> None:
        if self.probe_dataloader is None and state.train_dataloader is None:
            raise ValueError('probe_dataloader: AdaptiveSparsityStep needs a train subset for its projection check, '
                             'and the Trainer has no train_dataloader yet; pass train_dataloader to the Trainer '
                             'constructor (not to fit()) or give AdaptiveSparsityStep(probe_dataloader=...)')
        self._verification = self._build_verification(state)
        with preserve_rng(state):
            self._probe = self._cache_probe(state)
        if not self._probe:
            raise ValueError('probe_dataloader: the train subset for the projection check is empty; give a dataloader '
                             'that yields at least one batch')
        metrics = unwrap_model(state).get_metrics(is_train=False)
        self._projection = Scorer(state, train_batches(state, self._probe), metrics,
                                  resolve_values(metrics, self.projection_metric, 'projection_metric'))

    def _build_verification(self, state: State) -> Callable[[nn.Module], dict[str, float]]:
        """``model -> {name: value}`` on the verification data, with ``samples`` and ``correct`` of the last call."""
        if callable(self.verify_metric):
            self._verified_on, self._verified_value = 'callable', 'value'
            return _CallableValue(state, self.verify_metric)
        if self.val_dataloader is not None:
            self._verified_on = 'val'
            batches, metrics = train_batches(state, self.val_dataloader), unwrap_model(state).get_metrics(is_train=False)
        else:
            if not state.evaluators:
                raise ValueError('val_dataloader: AdaptiveSparsityStep verifies each level on held-out data and has '
                                 'none, and the run has no evaluator; pass val_dataloader (a split carved from the '
                                 'training data) or a callable verify_metric')
            evaluator = find_evaluator(state)
            self._verified_on = f'eval:{evaluator.label}'
            warnings.warn(f'AdaptiveSparsityStep: no val_dataloader, so back-offs are decided on the evaluator '
                          f'{evaluator.label!r}. If that is the test split, test data choose the steps and the final '
                          'test accuracy is not an unbiased estimate; pass val_dataloader with held-out training data '
                          'instead.')
            batches, metrics = evaluator_batches(state, evaluator), state.eval_metrics[evaluator.label]
        value = resolve_value(self.verify_metric, metrics, 'verify_metric')
        self._verified_value = value.name
        return Scorer(state, batches, metrics, [value], per_sample=value.name == 'error')

    def fraction(self, state: State, imp: 'IMP', logger: Logger) -> float:
        start = time.perf_counter()
        cost = {'samples': 0, 'flops': 0.0}
        retry = self._retry_fraction is not None
        if not retry:  # the level that just ended was accepted: it is the parent of the next one
            self._parent = {'alive': alive_count(imp.masks), 'total': sum(m.numel() for m in imp.masks.values()),
                            'level': imp.level}
            self._backoffs = 0
        parent_density = self._parent['alive'] / self._parent['total']
        decision: dict[str, Any] = {'parent_level': self._parent['level'], 'parent_density': parent_density,
                                    'attempt': self._backoffs, 'projection': None}
        with preserve_rng(state):
            if imp.level == 0 and not retry:
                self._measure_dense(state, imp, cost)
                decision['dense_value'] = self._dense_value
            if retry:
                fraction, reason = self._retry_fraction, 'backoff'
            elif self._matching_lost:
                fraction, reason = self.p_min, 'matching_lost'
            elif self._floor_failures:
                fraction, reason = self.p_min, 'confirm_failure'  # one failure may be noise: a plain step decides
            else:
                fraction, reason = self._choose(state, imp, decision, cost)
        to_target = self._fraction_to_target(imp)
        # Never past the target; and when this step would stop short of it by less than half a p_min step (in
        # log-density), go all the way rather than spend a whole level on the remainder.
        snap = (1.0 - fraction) < (1.0 - to_target) * (1.0 - self.p_min) ** -0.5
        decision['to_target'] = fraction >= to_target or (snap and not retry)
        if decision['to_target']:
            fraction = to_target
        fraction = _broadcast_float(state, fraction)  # rank 0 decides; the inputs were all-reduced anyway
        self._fraction, self._retry_fraction = fraction, None
        cost['seconds'] = time.perf_counter() - start
        decision.update({'fraction': fraction, 'reason': reason, 'cost': cost})
        self.decision = decision
        metrics = {'adaptive/fraction': fraction, 'adaptive/attempt': self._backoffs,
                   'adaptive/check_samples': cost['samples'], 'adaptive/check_flops': cost['flops'],
                   'adaptive/check_seconds': cost['seconds']}
        metrics.update(_hessian_keys(decision))
        projection = decision['projection']
        if projection is not None:
            metrics['adaptive/projection_evaluations'] = projection['evaluations']
            deltas = {t['fraction']: t['delta'] for t in projection['tried']}
            if projection['fraction'] in deltas:
                metrics['adaptive/projection_delta'] = deltas[projection['fraction']]
        logger.log_metrics({k: float(v) for k, v in metrics.items()})
        self._park_probe_model(imp)
        return fraction

    def accept(self, state: State, imp: 'IMP', record: dict[str, Any], logger: Logger) -> bool:
        start = time.perf_counter()
        cost = {'samples': 0, 'flops': 0.0}
        verify: dict[str, Any] = {'on': self._verified_on, 'backoff_on': self.backoff_on}
        with preserve_rng(state):
            checks = self._verify(state, imp, verify, cost)
        verify.update(checks)
        wanted = {'matching': ['matching_up_to_noise'], 'barrier': ['connected'],
                  'either': ['matching_up_to_noise', 'connected']}[self.backoff_on]
        passed = all(bool(checks.get(name)) for name in wanted)
        passed = bool(_broadcast_float(state, float(passed)))
        fraction = self._fraction if self._fraction is not None else self.p_min
        at_floor = fraction <= self.p_min + 1e-12
        if passed:
            outcome, accepted = 'passed', True
            self._floor_failures = 0
        elif at_floor:
            # A fixed p_min step would have accepted this level too. Two such failures in a row mark the end of the
            # matching range: from then on every step is p_min, without projection checks.
            outcome, accepted = 'failed_at_p_min', True
            self._floor_failures += 1
            self._matching_lost = self._matching_lost or self._floor_failures >= 2
        else:
            outcome, accepted = 'backoff', False
            self._backoffs += 1
            shrunk = 1.0 - math.sqrt(1.0 - fraction)  # half the step in log-density
            self._retry_fraction = self.p_min if self._backoffs >= self.max_backoffs else max(self.p_min, shrunk)
            verify['retry_fraction'] = self._retry_fraction
        cost['seconds'] = time.perf_counter() - start
        verify.update({'outcome': outcome, 'fraction': fraction, 'backoffs': self._backoffs, 'cost': cost})
        record['verify'] = verify
        record.update({'adaptive/verified': passed, 'adaptive/backoff': not accepted,
                       'adaptive/matching_lost': self._matching_lost})
        record[f'adaptive/verify/{verify["metric"]}'] = verify['value']
        record.update(_hessian_keys(self.decision))
        if 'barrier' in verify:
            record['adaptive/barrier'] = verify['barrier']
        for name in ('matching', 'matching_up_to_noise', 'connected'):
            if checks.get(name) is not None:
                record[f'adaptive/{name}'] = bool(checks[name])
        self._park_probe_model(imp)
        return accepted

    def finished(self, imp: 'IMP') -> bool:
        return self.max_levels is not None and imp.level >= self.max_levels

    def state_dict(self) -> dict[str, Any]:
        return {
            'decision': self.decision,
            'fraction': self._fraction,
            'backoffs': self._backoffs,
            'retry_fraction': self._retry_fraction,
            'matching_lost': self._matching_lost,
            'floor_failures': self._floor_failures,
            'dense_value': self._dense_value,
            'dense_correct': self._dense_correct,
            'parent': dict(self._parent),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._fraction = state.get('fraction')
        self._backoffs = state.get('backoffs', 0)
        self._retry_fraction = state.get('retry_fraction')
        self._matching_lost = state.get('matching_lost', False)
        self._floor_failures = state.get('floor_failures', 0)
        self._dense_value = state.get('dense_value')
        self._dense_correct = state.get('dense_correct')
        self._parent = dict(state.get('parent', self._parent))

    # ------------------------------------------------------------------ the projection check
    def _project(self, state: State, imp: 'IMP', cost: dict[str, Any]) -> dict[str, Any]:
        probe = self._load_probe_model(state)
        masks = imp.masks
        result = max_prune_fraction(
            probe, masks, self._projection, p_min=self.p_min, p_max=self.p_max, tolerance=self.projection_tolerance,
            metric=self.projection_metric, resolution=self.resolution, candidates=self.candidates, scope=imp.scope)
        # Cost: one forward pass over the probe per evaluation, at the density of the network evaluated.
        self._add_cost(cost, imp, result['samples'], masks)
        weights = {n: p for n, p in probe.named_parameters() if n in masks}
        for entry in result['tried']:
            projected = magnitude_masks(weights, entry['fraction'], masks, imp.scope)
            self._add_cost(cost, imp, result['samples'], projected)
        result['tolerance'] = self.projection_tolerance
        return result

    def _choose(self, state: State, imp: 'IMP', decision: dict[str, Any], cost: dict[str, Any]) -> tuple[float, str]:
        """Step 1 by ``criterion``; with ``hessian_analysis`` every measurement, whichever decides."""
        if self.criterion == 'projection' or self.hessian_analysis:
            decision['projection'] = self._project(state, imp, cost)
        if self.hessian_analysis:
            decision['projection_random'] = self._project_random(state, imp, cost)
        if self.criterion == 'hessian' or self.hessian_analysis:
            decision['hessian'] = self._hessian(state, imp, cost)
        if self.criterion == 'hessian':
            return min(max(decision['hessian']['p_star']['magnitude'], self.p_min), self.p_max), 'hessian'
        projection = decision['projection']
        return projection['fraction'], 'projection' if projection['admissible'] else 'projection_inadmissible'

    def _project_random(self, state: State, imp: 'IMP', cost: dict[str, Any]) -> dict[str, Any]:
        """The projection check for random pruning: the empirical counterpart of the theory's random p*."""
        probe, masks = self._load_probe_model(state), imp.masks
        result = max_random_prune_fraction(
            probe, masks, self._projection, p_min=self.p_min, p_max=self.p_max, tolerance=self.projection_tolerance,
            metric=self.projection_metric, resolution=self.resolution, candidates=self.candidates,
            generator=torch.Generator().manual_seed(int(state.rank_zero_seed) + imp.level))
        for _ in range(1 + len(result['tried'])):  # costed at the level's density: the projections are sparser
            self._add_cost(cost, imp, self._projection.samples, masks)
        return result

    def _hessian(self, state: State, imp: 'IMP', cost: dict[str, Any]) -> dict[str, Any]:
        """Top eigenvalues of the probe loss's Hessian on the live weights and the theory's p* (science.md §8)."""
        start = time.perf_counter()
        probe, masks = self._load_probe_model(state), imp.masks
        params = dict(probe.named_parameters())
        weights = [params[name] for name in masks]
        alive = [masks[name].to(params[name].device) for name in masks]
        batches, reduce = train_batches(state, self._probe), sum_over_ranks(state)
        probe_samples = [0]  # over all ranks, counted by the first product

        def probe_hvp(vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            """H v of the mean per-sample loss over the probe on all ranks, the loss the projection check reads."""
            totals = [torch.zeros_like(w) for w in weights]
            samples = 0
            with model_eval_mode(probe), torch.enable_grad():
                for batch in batches:
                    size = batches.num_samples(batch)
                    products = hessian_vector_product(lambda: total_loss(probe.loss(probe(batch), batch)), weights,
                                                      vector, alive)
                    for total, product in zip(totals, products):
                        total.add_(product, alpha=size)
                    samples += size
            flat = reduce(torch.cat([t.flatten() for t in totals] + [totals[0].new_tensor([samples])]))
            probe_samples[0] = int(flat[-1])
            return [piece.view_as(w) / flat[-1] for piece, w in zip(flat[:-1].split([w.numel() for w in weights]),
                                                                     weights)]

        operator, dim = support_operator(probe_hvp, alive)
        generator = torch.Generator().manual_seed(int(state.rank_zero_seed) + imp.level)
        tridiagonal, _ = lanczos(operator, dim, self.hessian_iterations, generator, weights[0].device)
        top = max(1, min(10, tridiagonal.shape[0] // 3))  # the Ritz values trusted as converged eigenvalues
        live = flat_live_weights(weights, alive)
        result: dict[str, Any] = {
            'epsilon': self.projection_tolerance, 'iterations': int(tridiagonal.shape[0]), 'dim': dim,
            'top_eigenvalues': torch.linalg.eigvalsh(tridiagonal).flip(0)[:top].tolist()}
        for key, bulk in (('p_star', 'slq'), ('p_star_lower', 'capped')):
            values, counts = spectrum(tridiagonal, dim, bulk, k=top)
            limits = {pruning: max_pruning_ratio(values, counts, live, self.projection_tolerance, pruning)
                      for pruning in PRUNINGS}
            result[key] = {pruning: limit['fraction'] for pruning, limit in limits.items()}
            if bulk == 'slq':
                result['radius'] = {pruning: limit['radius'] for pruning, limit in limits.items()}
        # Each Hessian-vector product costs about four forward passes (forward, backward, double backward).
        self._add_cost(cost, imp, 4 * result['iterations'] * probe_samples[0], masks)
        result['seconds'] = time.perf_counter() - start
        return result

    def _fraction_to_target(self, imp: 'IMP') -> float:
        """The fraction of the parent's alive weights whose pruning lands exactly on ``target_density``."""
        keep = round(imp.target_density * self._parent['total'])
        if imp.scope == 'layerwise':  # per-tensor rounding may keep up to half a weight more per tensor
            keep -= len(imp.masks)
        alive = self._parent['alive']
        return 1.0 - max(keep, 0) / alive if alive else 0.0

    # ------------------------------------------------------------------ verification
    def _verify(self, state: State, imp: 'IMP', verify: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any]:
        model = unwrap_model(state)
        measure, name = self._verification, self._verified_value
        checks: dict[str, Any] = {}
        parent = imp.previous_level_state
        if self.backoff_on != 'matching' and parent is not None:
            probe = self._load_probe_model(state)
            curve = metric_curve(probe, parent, model.state_dict(), self.alphas, measure)  # alpha = 1 is scored last
            value = curve['values'][name][-1]
            # Interior points of the path live in the parent's (denser) subspace: cost them at its nonzeros.
            parent_support = {n: parent[n] != 0 for n in imp.masks}
            for alpha in curve['alphas']:
                self._add_cost(cost, imp, measure.samples, imp.masks if alpha == 1.0 else parent_support)
            verify.update({'barrier': curve['barrier_linear'][name],
                           'curve': {'alphas': curve['alphas'], name: curve['values'][name]}})
            checks['connected'] = curve['barrier_linear'][name] <= self.barrier_tolerance
        else:
            value = measure(model)[name]
            self._add_cost(cost, imp, measure.samples, imp.masks)
        if self._dense_value is None:
            raise RuntimeError('AdaptiveSparsityStep: no dense value; it is measured at the end of level 0')
        margin = self.noise_z * self._paired_standard_error(state, measure.correct)
        checks['matching'] = is_matching(value, self._dense_value, self.matching_tolerance)
        checks['matching_up_to_noise'] = is_matching(value, self._dense_value, self.matching_tolerance + margin)
        verify.update({'metric': name, 'value': value, 'dense_value': self._dense_value, 'samples': measure.samples,
                       'matching_tolerance': self.matching_tolerance, 'noise_margin': margin,
                       'barrier_tolerance': self.barrier_tolerance})
        return checks

    def _measure_dense(self, state: State, imp: 'IMP', cost: dict[str, Any]) -> None:
        """Level 0's verification value, and which samples it gets right (every rank's, for checkpoints)."""
        measure = self._verification
        self._dense_value = measure(unwrap_model(state))[self._verified_value]
        self._add_cost(cost, imp, measure.samples, imp.masks)
        gathered = dist.all_gather_object(measure.correct) if dist.get_world_size() > 1 else [measure.correct]
        self._dense_correct = [None if c is None else c.cpu() for c in gathered]

    def _paired_standard_error(self, state: State, correct: Optional[torch.Tensor]) -> float:
        """Standard error of (sparse - dense) validation error from the samples on which the two disagree (paired,
        as in McNemar's test); 0 when the per-sample results are unavailable or do not line up."""
        rank = dist.get_global_rank()
        dense = self._dense_correct[rank] if self._dense_correct and rank < len(self._dense_correct) else None
        aligned = dense is not None and correct is not None and dense.shape == correct.shape
        counts = torch.zeros(3, dtype=torch.float64)
        if aligned:
            counts = torch.tensor([float((dense & ~correct).sum()), float((~dense & correct).sum()), float(dense.numel())],
                                  dtype=torch.float64)
        flag = torch.tensor([0.0 if aligned else 1.0], dtype=torch.float64)
        reduce = sum_over_ranks(state)
        counts, flag = reduce(counts).cpu(), reduce(flag).cpu()
        worse, better, n = counts.tolist()
        if float(flag[0]) > 0 or n == 0:
            return 0.0
        diff = (worse - better) / n
        return math.sqrt(max((worse + better) / n - diff * diff, 0.0) / n)

    # ------------------------------------------------------------------ helpers
    def _load_probe_model(self, state: State) -> nn.Module:
        """A copy of the run's model holding the current trained weights (one copy for the whole run)."""
        model = unwrap_model(state)
        if self._probe_model is None:
            self._probe_model = copy.deepcopy(model)
        move_module_(self._probe_model, next(model.parameters()).device)
        with torch.no_grad():
            self._probe_model.load_state_dict(model.state_dict())
        return self._probe_model

    def _park_probe_model(self, imp: 'IMP') -> None:
        """Between checks the probe model lives where IMP keeps its transition-only copies (``IMP(offload=...)``)."""
        if self._probe_model is not None and imp.offload == 'cpu':
            move_module_(self._probe_model, 'cpu')

    def _add_cost(self, cost: dict[str, Any], imp: 'IMP', samples: int, masks: Mapping[str, torch.Tensor]) -> None:
        cost['samples'] += int(samples)
        macs = imp.dense_macs
        if macs:
            cost['flops'] += FORWARD_FLOPS_PER_MAC * samples * sparse_macs(macs['dense'], macs['weights'],
                                                                           layer_densities(masks))

    def _cache_probe(self, state: State) -> list[Any]:
        world, rank = dist.get_world_size(), dist.get_global_rank()
        per_rank = math.ceil(self.probe_samples / world)
        if self.probe_dataloader is not None:
            return _first_samples(self.probe_dataloader, per_rank)
        loader = state.train_dataloader
        dataset = getattr(loader, 'dataset', None)
        if isinstance(loader, DataLoader) and dataset is not None and not isinstance(dataset, IterableDataset):
            # A fixed random subset of the training set, drawn with the run's seed: the same on resume and in both
            # runs of a comparison, independent of the data order, and split over the ranks without overlap.
            generator = torch.Generator().manual_seed(int(state.rank_zero_seed))
            chosen = torch.randperm(len(dataset), generator=generator)[:self.probe_samples][rank::world].tolist()
            subset = DataLoader(Subset(dataset, chosen), batch_size=loader.batch_size or 256, shuffle=False,
                                collate_fn=loader.collate_fn, num_workers=0)
            return [batch for batch in subset]
        return _first_samples(without_persistent_workers(loader), per_rank)


class _CallableValue:
    """A user's ``verify_metric(model) -> float`` as an ``evaluate(model) -> {'value': v}``, in eval mode, without
    gradients and without touching the run's RNG; it counts no samples and has no per-sample results."""

    samples = 0
    correct = None

    def __init__(self, state: State, measure: Callable[[nn.Module], float]):
        self.state, self.measure = state, measure

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        with model_eval_mode(model), preserve_rng(self.state):
            return {'value': float(self.measure(model))}


def _first_samples(loader: Iterable[Any], samples: int) -> list[Any]:
    batches, count = [], 0
    with preserve_loader_generators(loader):
        for batch in loader:
            batches.append(batch)
            count += samples_in_batch(batch)
            if count >= samples:
                break
    return batches


def _hessian_keys(decision: Mapping[str, Any]) -> dict[str, Any]:
    """The step's maximal-pruning-ratio measurements as flat ``hessian/...`` scalars (none without a Hessian)."""
    hessian = decision.get('hessian')
    if not hessian:
        return {}
    keys = {'hessian/lambda_max': hessian['top_eigenvalues'][0], 'hessian/fraction_used': decision.get('fraction')}
    for pruning in PRUNINGS:
        keys[f'hessian/p_star/{pruning}'] = hessian['p_star'][pruning]
        keys[f'hessian/p_star_lower/{pruning}'] = hessian['p_star_lower'][pruning]
    for pruning, name in (('magnitude', 'projection'), ('random', 'projection_random')):
        check = decision.get(name)
        if check is not None:
            keys[f'hessian/admissible/{pruning}'] = check['fraction'] if check['admissible'] else None
    return {k: v for k, v in keys.items() if v is not None}


def _broadcast_float(state: State, value: float) -> float:
    if dist.get_world_size() == 1:
        return float(value)
    tensor = state.device.tensor_to_device(torch.tensor([float(value)], dtype=torch.float64))
    dist.broadcast(tensor, src=0)
    return float(tensor[0])


def compute_totals(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over an IMP run's level records (``imp.history`` or ``levels.jsonl``), rejected levels included.

    ``steps``, ``samples``, ``seconds``, ``flops``: training, summed over every trained level (Composer's clock counts
    the checks run at a level transition into the next level's seconds). ``check_samples``, ``check_flops``,
    ``check_seconds``: forward passes of the adaptive step (projection checks, validation, barriers), also summed.
    ``levels`` counts trainings, ``rejected`` the ones discarded by a back-off.
    """
    totals: dict[str, Any] = {'levels': len(history), 'accepted': 0, 'rejected': 0, 'steps': 0, 'samples': 0,
                              'seconds': 0.0, 'flops': 0.0, 'check_samples': 0, 'check_flops': 0.0,
                              'check_seconds': 0.0}
    for record in history:
        accepted = record.get('accepted', True)
        totals['accepted' if accepted else 'rejected'] += 1
        totals['steps'] += int(record.get('steps', 0))
        totals['samples'] += int(record.get('samples', 0))
        totals['seconds'] += float(record.get('seconds', 0.0))
        totals['flops'] += float(record.get('flops') or 0.0)
        for part in ('step', 'verify'):
            cost = (record.get(part) or {}).get('cost') or {}
            totals['check_samples'] += int(cost.get('samples', 0))
            totals['check_flops'] += float(cost.get('flops', 0.0))
            totals['check_seconds'] += float(cost.get('seconds', 0.0))
    return totals

"""IMP: Iterative Magnitude Pruning with weight rewinding, every level inside one ``Trainer.fit()``.

Every pruned level is a replay of level 0 from the rewind step k to T (``replay.py``): at a level start IMP puts the
whole run back to step k -- weights under the new mask, the Trainer's timestamp, optimizer and schedulers, the state of
every other algorithm and callback, the trainable layout and the train dataloader's position -- so every component
that reads time or keeps state behaves in level L exactly as it did from k to T in level 0. ``max_duration`` stays the
user's T. Logger steps and checkpoint names stay monotonic and unique. Level transitions run at ``BATCH_CHECKPOINT``,
or at ``EPOCH_CHECKPOINT`` when a level ends with an epoch, i.e. after the Trainer's evaluation of the trained network
and before ``CheckpointSaver`` writes, so every checkpoint is a valid resume point.
"""
from __future__ import annotations

import copy
import functools
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

from composer_imp.algorithms.imp.finite import NonFiniteError, non_finite_losses, non_finite_message, non_finite_tensors
from composer_imp.algorithms.imp.replay import (
    ComponentSnapshot,
    DataloaderReplay,
    capture_layout,
    inner_optimizers,
    prefix_checkpoint_names,
    restore_layout,
    rewound_components,
    shift_logger_steps,
)
from composer_imp.algorithms.imp.shard_files import file_shards, read_shard
from composer_imp.algorithms.imp.sparsity_step import FixedStep, SparsityStep
from composer_imp.evaluation import level_eval_metrics, preserve_rng, trainer_eval_round, unwrap_model
from composer_imp.functional import (
    coverage_warning,
    masks_at_density,
    prunable_weights,
    rewind,
    rewind_optimizer,
    snapshot,
    snapshot_optimizer,
)
from composer_imp.functional.distributed import sharded_masks_at_density
from composer_imp.functional.flops import TRAIN_FLOPS_PER_MAC, layer_macs, sparse_macs
from composer_imp.functional.masks import SCOPES
from composer_imp.functional.structured import (
    STRUCTURED_SCOPES,
    channel_groups,
    check_round_to,
    example_batch,
    structured_masks,
)
from composer_imp.functional.rewind import OFFLOAD, stored_copy
from composer_imp.functional.shards import full_state, global_sum, is_sharded, local
from composer_imp.functional.ticket import (
    LEVELS_FILE,
    MANIFEST_FILE,
    REWIND_OPTIMIZERS_FILE,
    REWIND_POINT_FILE,
    atomic_save,
    file_reference,
    level_dir,
    pack_masks,
    read_reference,
    save_level,
    save_rewind_point,
    unpack_masks,
    write_levels,
    write_manifest,
)

__all__ = ['IMP']

_EVENTS = (Event.INIT, Event.AFTER_LOAD, Event.FIT_START, Event.EPOCH_START, Event.BEFORE_DATALOADER,
           Event.AFTER_DATALOADER, Event.BATCH_START, Event.AFTER_BACKWARD, Event.BATCH_END, Event.EVAL_AFTER_ALL,
           Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT)

STRUCTURES = ('weights', 'channels')

LevelEndHook = Callable[[State, Logger, dict], Optional[dict]]

# The large copies IMP writes once into its folder and refers to from checkpoints: attribute -> what it holds.
_FILED = {'_rewind_point': 'rewind point', '_previous_level_state': "parent level's trained state",
          '_rewind_optimizers': 'optimizer state at the rewind step'}
# Under FSDP2 the masks differ by rank too, so they are filed per rank (``shard_files``) instead of checkpointed.
_MASKS_FILED = {'_masks': 'masks', '_previous_masks': "parent level's masks"}


class IMP(Algorithm):
    """Iterative Magnitude Pruning with weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

    The Trainer's ``max_duration`` is one level's training, T. Level 0 trains densely for T; the full training state
    at ``rewind_to`` (step k) is the rewind point. After each level, ``prune_fraction`` of the remaining prunable weights
    are pruned by magnitude, the survivors are set back to the rewind point, and the next level replays steps k to T:
    the Trainer's time, the other algorithms' and callbacks' state and the dataloader's position are those of step k.

    Args:
        levels: number of pruned levels after the dense level 0. Exactly one of ``levels`` and ``target_density``.
        target_density: stop after the first level whose density (over prunable weights) is <= this value.
        prune_fraction: fraction of the *remaining* prunable weights pruned after each level, in (0, 1).
        rewind_to: the rewind step k as a Composer time string: ``'500ba'``, ``'2ep'``, ``'0.05dur'`` (of T);
            ``'0ba'`` rewinds to initialization.
        scope: ``'global'`` ranks all prunable weights together; ``'layerwise'`` prunes each tensor by the fraction;
            ``'lamp'`` ranks layer-normalised scores globally (Lee et al. 2021), for layers of different init scale.
        ignore: fnmatch patterns of parameter names to leave dense (e.g. ``['fc.weight']``).
        embeddings: also prune embedding tables (``nn.Embedding``); dense by default.
        rewind_optimizer: restore the optimizer state of step k at each rewind (default: fresh state, as open_lth).
        mask_gradients: zero the gradients of pruned weights before each optimizer step (weights are re-zeroed after
            every step regardless).
        folder: where the per-level masks, trained weights, rewind point and ``levels.jsonl`` go. Default: ``imp/``
            inside the ``CheckpointSaver``'s folder if the run saves checkpoints, else ``<run_name>/imp``.
        sparsity_step: a ``SparsityStep`` choosing each level's fraction (default ``FixedStep(prune_fraction)``).
        structure: ``'weights'`` (default) prunes single weights; ``'channels'`` prunes torch-pruning's coupled
            channel groups whole (channels, attention heads; ``composer_imp.functional.structured``), so that
            ``export_ticket`` gives a physically smaller network. With ``'channels'``, ``prune_fraction`` (and the
            adaptive step's choice) is a fraction of the *remaining channels and heads*, ``scope`` is ``'global'`` or
            ``'layerwise'`` (per group), and the model is traced on the first batch, before any training step.
        round_to: with ``structure='channels'``, every channel group keeps a multiple of this many channels (rounded
            up, never reviving one; attention heads are not rounded), so the exported layers fit the kernels' vector
            widths (8 or 16). Default 1: no rounding.
        offload: where the copies needed only at level transitions live while a level trains -- the rewind point, the
            parent level's trained state and masks, the rewound components' and optimizers' state, and the LMC
            evaluator's and adaptive step's probe models: ``'cpu'`` (default: host memory, pinned when CUDA is
            available, streamed to the device at a transition) or ``'device'`` (beside the model).

    Under FSDP2 (``parallelism_config={'fsdp': FSDP2Config(...)}``) every rank keeps the masks, the rewind point and
    the parent level's state of its own shards (``composer_imp.functional.shards``), the global threshold is a
    distributed selection over the shards (``functional.distributed``), and the checkpoint refers to per-rank files
    (``shard_files``); ``masks``, ``ticket()`` and ``previous_level_state`` are then this rank's shards.
    """

    def __init__(
        self,
        levels: Optional[int] = None,
        target_density: Optional[float] = None,
        prune_fraction: float = 0.2,
        rewind_to: str = '0ba',
        scope: str = 'global',
        ignore: Iterable[str] = (),
        embeddings: bool = False,
        rewind_optimizer: bool = False,
        mask_gradients: bool = True,
        folder: Optional[str] = None,
        sparsity_step: Optional[SparsityStep] = None,
        offload: str = 'cpu',
        structure: str = 'weights',
        round_to: int = 1,
    ):
        if (levels is None) == (target_density is None):
            raise ValueError('levels, target_density: give exactly one of them (a number of pruned levels, or the '
                             'density in (0, 1) at which to stop)')
        if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 0):
            raise ValueError(f'levels: {levels!r} is not allowed; use an integer >= 0')
        if target_density is not None and (isinstance(target_density, bool) or
                                           not isinstance(target_density, (int, float)) or
                                           not 0.0 < target_density < 1.0):
            raise ValueError(f'target_density: {target_density!r} is not allowed; use a density (a number) in (0, 1)')
        if (isinstance(prune_fraction, bool) or not isinstance(prune_fraction, (int, float)) or
                not 0.0 < prune_fraction < 1.0):
            raise ValueError(f'prune_fraction: {prune_fraction!r} is not allowed; use a fraction (a number) in (0, 1)')
        if structure not in STRUCTURES:
            raise ValueError(f'structure: {structure!r} is not allowed; use one of {STRUCTURES}')
        if scope not in (SCOPES if structure == 'weights' else STRUCTURED_SCOPES):
            raise ValueError(f'scope: {scope!r} is not allowed with structure={structure!r}; use one of '
                             f'{SCOPES if structure == "weights" else STRUCTURED_SCOPES}')
        round_to = check_round_to(round_to)
        if round_to > 1 and structure != 'channels':
            raise ValueError(f"round_to: {round_to} applies to structure='channels' only; structure={structure!r} "
                             'prunes single weights')
        if offload not in OFFLOAD:
            raise ValueError(f'offload: {offload!r} is not allowed; use one of {OFFLOAD}')
        if not isinstance(rewind_to, (str, Time)):
            raise ValueError(f"rewind_to: {rewind_to!r} has no unit; give a Composer time string such as "
                             f"'{rewind_to}ba' or '{rewind_to}ep' (or '0.05dur')")
        try:
            rewind_time = Time.from_timestring(rewind_to) if isinstance(rewind_to, str) else Time.from_input(rewind_to)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(f"rewind_to: {rewind_to!r} is not a Composer time string (e.g. '500ba', '2ep', '0.05dur')"
                             ) from error
        if rewind_time.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH, TimeUnit.DURATION) or rewind_time.value < 0:
            raise ValueError(f"rewind_to: {rewind_to!r} is not allowed; use a time >= 0 in 'ba', 'ep' or 'dur'")
        if isinstance(ignore, str):
            ignore = [ignore]
        ignore = list(ignore) if isinstance(ignore, Iterable) else ignore
        if not isinstance(ignore, list) or not all(isinstance(name, str) for name in ignore):
            raise ValueError(f'ignore: {ignore!r} is not allowed; use a list of parameter or module names (strings, '
                             'fnmatch patterns), or one such string')
        self.levels = levels
        self.target_density = target_density
        self.prune_fraction = prune_fraction
        self.rewind_to = str(rewind_to)
        self.scope = scope
        self.ignore = list(ignore)
        self.embeddings = bool(embeddings)
        self.rewind_optimizer = rewind_optimizer
        self.mask_gradients = mask_gradients
        self.folder = folder
        self.offload = offload
        self.structure = structure
        self.round_to = round_to
        self._example_inputs: Optional[tuple] = None  # channels: a CPU slice of the first batch, to trace the model
        self.sparsity_step = sparsity_step if sparsity_step is not None else FixedStep(prune_fraction)
        self._rewind_time = rewind_time
        self.sparsity_step.check(self)
        self._hooks: list[LevelEndHook] = []
        self._keep_previous_level = self.sparsity_step.needs_previous_level

        # Checkpointed state (see state_dict); counters are ints.
        self._plan: Optional[dict[str, Any]] = None  # schedule_duration (str T), schedule_batches, rewind_batch
        self._level = 0
        self._attempt = 0  # how many times this level was started before (the adaptive step may redo a level)
        self._offsets = {'batch': 0, 'sample': 0, 'token': 0, 'epoch': 0}  # run-wide count = level-local + offset
        self._level_start_wct = 0.0
        self._nominal_density = 1.0  # product of (1 - fraction) over accepted levels: exact counts, no drift
        self._masks: Optional[dict[str, torch.Tensor]] = None
        self._rewind_point: Optional[dict[str, torch.Tensor]] = None
        self._rewind_run: Optional[dict[str, Any]] = None  # timestamps, LRs, schedulers, layout at step k
        self._rewind_components: Optional[ComponentSnapshot] = None
        self._rewind_optimizers: Optional[list[list[dict[str, Any]]]] = None
        self._previous_level_state: Optional[dict[str, torch.Tensor]] = None
        self._previous_masks: Optional[dict[str, torch.Tensor]] = None
        self._previous_nominal_density = 1.0
        self._history: list[dict[str, Any]] = []
        self._done = False
        self._macs: Optional[dict[str, Any]] = None  # dense MACs per sample: {'dense': float, 'weights': {name: float}}
        self._files: dict[str, Any] = {}  # attribute of _FILED -> file_reference of its copy (FSDP2: every rank's)
        self._sharded = False  # parameters are DTensors (FSDP2): IMP's tensors are this rank's shards
        self._counts: dict[str, tuple[int, int]] = {}  # name -> (alive, numel) over all ranks, at each mask change

        self._last_eval: tuple[Optional[Timestamp], dict[str, Any]] = (None, {})  # the step and its eval round
        # partly pruned parameters, their local views (FSDP2: this rank's shards) and masks; listed once per level
        self._masked_params: Optional[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = None
        self._unread_files: dict[str, dict[str, Any]] = {}  # references loaded from a checkpoint, read at AFTER_LOAD
        self._parent_on_device: Optional[dict[str, torch.Tensor]] = None  # during a level end only
        self._gradient_hooks: list[Any] = []
        self._resolved_folder: Optional[str] = None
        self._checkpoint_names: dict[int, tuple] = {}
        self._loader_replay: Optional[DataloaderReplay] = None
        self._pending_transition = False
        self._schedule_time: Optional[Time] = None
        self._pass_len: Optional[Time] = None

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
        """Fraction of prunable weights alive in the current level (over all ranks)."""
        total = sum(numel for _, numel in self._counts.values())
        return sum(alive for alive, _ in self._counts.values()) / total if total else 1.0

    def layer_densities(self) -> dict[str, float]:
        """Fraction alive of each prunable tensor (over all ranks)."""
        return {name: alive / numel if numel else 1.0 for name, (alive, numel) in self._counts.items()}

    def _count_masks(self) -> None:
        """Alive and total counts per tensor, after every change of the masks (an all-reduce under FSDP2, so that the
        counts read later need no collective)."""
        masks = list(self._masks.values())
        counts = global_sum([int(torch.count_nonzero(m)) for m in masks] + [m.numel() for m in masks], self._sharded)
        self._counts = {name: (int(alive), int(numel))
                        for name, alive, numel in zip(self._masks, counts[:len(masks)], counts[len(masks):])}

    @property
    def history(self) -> list[dict[str, Any]]:
        """One metrics record per trained level (rejected attempts included), as in ``levels.jsonl``."""
        return list(self._history)

    @property
    def previous_level_state(self) -> Optional[dict[str, torch.Tensor]]:
        """Trained state_dict of the last accepted level (the current level's parent), when a hook asked for it: on
        the training device during a level end (the hooks' time), else where ``offload`` keeps it."""
        return self._parent_on_device if self._parent_on_device is not None else self._previous_level_state

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

    def run_time(self, state: State) -> dict[str, int]:
        """Run-wide counts (``batch``, ``sample``, ``token``, ``epoch``) across all levels: ``state.timestamp`` replays
        each pruned level from the rewind step, these keep counting."""
        return {unit: offset + int(getattr(state.timestamp, unit)) for unit, offset in self._offsets.items()}

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
        density_by_layer = self.layer_densities() if layer_density is None else layer_density
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
        return event in _EVENTS

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            _refuse_parallelism(state, self)
            # First on every event (last on AFTER_* ones, which Composer runs in reverse): masks are enforced before
            # EMA averages, a transition sees the trained weights before EMA swaps its own in for a checkpoint.
            state.algorithms.remove(self)
            state.algorithms.insert(0, self)
        elif event == Event.AFTER_LOAD:
            self._setup_masks(state)  # after every INIT surgery (BlurPool, Factorize, ...) renamed its weights
            self._start(state, logger)
            self._allow_pending_transition(state)
            self.sparsity_step.setup(state, self)
        elif event == Event.FIT_START:
            self._start(state, logger)
            self._check_fit_duration(state)
            self._resolve_folder(state)
            if self._sharded and '_masks' not in self._files:
                self._file_masks()
            self._loader_replay = DataloaderReplay(state.train_dataloader) if self._restarts_loader(state) else None
            if self._loader_replay is not None:
                state.train_dataloader.__dict__['_imp_epoch_len'] = int(state.dataloader_len)
            self._install_gradient_masks(state)
            if self._rewind_point is None and self._plan['rewind_batch'] == 0:
                self._capture_rewind_point(state)
            self._lift_pass_budget(state)
        elif event == Event.EPOCH_START:
            self._lift_pass_budget(state)
        elif event == Event.BEFORE_DATALOADER:
            self._restore_pass_budget(state)
        elif event == Event.AFTER_DATALOADER:
            if self._macs is None:
                self._count_macs(state)
            if self.structure == 'channels' and self._example_inputs is None:
                self._example_inputs = (example_batch(state.batch),)
                with preserve_rng(state):  # at every (re)start: it must not move a resumed run's random streams
                    channel_groups(unwrap_model(state), self._example_inputs, self._masks)  # fails before any step
        elif event == Event.BATCH_START:
            if not self._done and self._level_over(state):  # resumed from a checkpoint written before a transition
                self._end_level(state, logger, mid_epoch=True)
        elif event == Event.AFTER_BACKWARD:
            if self._sharded and self.mask_gradients and self._level > 0:
                self._mask_sharded_gradients(state)
        elif event == Event.BATCH_END:
            self._check_finite(state, loss=True)
            if self._level > 0:
                _, views, masks = self._masked_pairs(state)
                if views:
                    with torch.no_grad():
                        torch._foreach_mul_(views, masks)
        elif event == Event.EVAL_AFTER_ALL:
            self._last_eval = (state.timestamp, trainer_eval_round(state, self._last_eval[1]))
        elif event == Event.BATCH_CHECKPOINT:
            epoch_end_follows = (state.dataloader_len is not None and
                                 int(state.timestamp.batch_in_epoch) >= int(state.dataloader_len))
            if not epoch_end_follows:
                self._checkpoint_event(state, logger, mid_epoch=True)
        elif event == Event.EPOCH_CHECKPOINT:
            self._checkpoint_event(state, logger, mid_epoch=False)
            self._lift_pass_budget(state)

    def _checkpoint_event(self, state: State, logger: Logger, mid_epoch: bool) -> None:
        """Capture the rewind point at step k, or end the level at T, at the same point of the event sequence."""
        if self._rewind_point is None and int(state.timestamp.batch) == self._plan['rewind_batch']:
            self._capture_rewind_point(state)
        if not self._done and self._level_over(state):
            self._end_level(state, logger, mid_epoch=mid_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            'plan': self._plan,
            'level': self._level,
            'attempt': self._attempt,
            'offsets': dict(self._offsets),
            'level_start_wct': self._level_start_wct,
            'nominal_density': self._nominal_density,
            'masks': None if self._masks is None or '_masks' in self._files else pack_masks(self._masks),
            'rewind_run': self._rewind_run,
            'rewind_components': None if self._rewind_components is None else self._rewind_components.state_dict(),
            'previous_masks': (None if self._previous_masks is None or '_previous_masks' in self._files else
                               pack_masks(self._previous_masks)),
            # A file IMP wrote is referred to; without one (ranks other than 0, before fit()) the tensors go along.
            **{attribute[1:]: None if attribute in self._files else getattr(self, attribute) for attribute in _FILED},
            'files': dict(self._files),
            'previous_nominal_density': self._previous_nominal_density,
            'history': self._history,
            'done': self._done,
            'macs': self._macs,
            'sparsity_step': self.sparsity_step.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._plan = state['plan']
        self._schedule_time = None
        self._level = state['level']
        self._attempt = state['attempt']
        self._offsets = dict(state['offsets'])
        self._level_start_wct = state['level_start_wct']
        self._nominal_density = state['nominal_density']
        self._masks = _masks_from_checkpoint(state['masks'])
        self._rewind_run = state['rewind_run']
        self._rewind_components = None if state['rewind_components'] is None else ComponentSnapshot.from_state_dict(
            state['rewind_components'])
        self._previous_masks = _masks_from_checkpoint(state['previous_masks'])
        self._files = {}
        self._unread_files = dict(state.get('files') or {})
        for attribute in _FILED:
            setattr(self, attribute, state[attribute[1:]])
        self._previous_nominal_density = state['previous_nominal_density']
        self._history = state['history']
        self._done = state['done']
        self._macs = state['macs']
        self.sparsity_step.load_state_dict(state['sparsity_step'])
        self._masked_params = None

    # ------------------------------------------------------------------ set-up
    def _setup_masks(self, state: State) -> None:
        """Build all-ones masks over the prunable weights, or check stored masks against the model (AFTER_LOAD)."""
        model = unwrap_model(state)
        self._sharded = is_sharded(model)
        weights = prunable_weights(model, self.ignore, embeddings=self.embeddings)
        if self._sharded:
            _check_shard_layout(weights)
        self._read_files(state)
        if self._masks is None:
            warning = coverage_warning(model, weights)
            if warning:
                warnings.warn(warning)
            if self._sharded and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                                     for m in model.modules()):
                warnings.warn('IMP under FSDP2: FSDP2 does not synchronise buffers, so each rank keeps its own '
                              "BatchNorm running statistics; IMP's rewind point and level files hold rank 0's, and a "
                              "sharded checkpoint keeps only rank 0's. Use SyncBatchNorm, a norm without running "
                              'statistics, or DDP for identical ranks')
            self._masks = {name: torch.ones_like(local(w), dtype=torch.bool) for name, w in weights.items()}
            self._count_masks()
            return
        weights = {name: local(w) for name, w in weights.items()}
        if set(self._masks) != set(weights):
            raise ValueError(f'checkpoint: IMP masks are for parameters {sorted(self._masks)}, but the model prunes '
                             f'{sorted(weights)}; resume with the same model and IMP(ignore=..., embeddings=...)')
        for name, w in weights.items():
            if self._masks[name].shape != w.shape:
                raise ValueError(f'checkpoint: IMP mask {name!r} has shape {tuple(self._masks[name].shape)}, the model '
                                 f'weight {tuple(w.shape)}' + (' on this rank' if self._sharded else '') +
                                 '; resume with the same model' + (' and world size' if self._sharded else ''))
        device = next(iter(weights.values())).device
        self._masks = {n: m.to(device=device, dtype=torch.bool) for n, m in self._masks.items()}
        self._count_masks()
        for attribute in (*_FILED, '_previous_masks'):
            stored = getattr(self, attribute)
            if stored is not None:
                setattr(self, attribute, self._stored(stored, device))
        if self._rewind_components is not None:
            self._rewind_components.tensors = self._stored(self._rewind_components.tensors, device)

    def _stored(self, tensors: Any, device: torch.device) -> Any:
        """A copy where ``offload`` keeps transition-only state: (pinned) host memory, or ``device``."""
        return stored_copy(tensors, self.offload, device)

    def _read_files(self, state: State) -> None:
        """Read the files a checkpoint refers to (rank 0 reads and checks them; the other ranks receive them, so a
        node without IMP's folder resumes too), and keep referring to them. Under FSDP2 each rank reads its own."""
        if not self._unread_files:
            return
        self._resolve_folder(state)
        sharded = {attribute: references for attribute, references in self._unread_files.items()
                   if isinstance(references, list)}
        for attribute, references in sharded.items():
            value, _ = read_shard(self._resolved_folder, references, {**_FILED, **_MASKS_FILED}[attribute])
            setattr(self, attribute, _masks_from_checkpoint(value) if attribute in _MASKS_FILED else value)
            self._files[attribute] = self._unread_files.pop(attribute)
        if not self._unread_files:
            return
        loaded: Any = None
        if dist.get_global_rank() == 0:
            try:
                loaded = {attribute: read_reference(self._resolved_folder, reference, _FILED[attribute])
                          for attribute, reference in self._unread_files.items()}
            except ValueError as error:
                loaded = str(error)
        if dist.get_world_size() > 1:
            box = [loaded]
            dist.broadcast_object_list(box, src=0)
            loaded = box[0]
        if isinstance(loaded, str):
            raise ValueError(loaded)
        references, self._unread_files = self._unread_files, {}
        for attribute, (value, folder) in loaded.items():
            setattr(self, attribute, value)
            if dist.get_global_rank() != 0:
                continue
            if folder == self._resolved_folder:
                self._files[attribute] = references[attribute]
            elif attribute == '_rewind_point':  # a checkpoint of another run folder (load_path): this folder's ticket
                save_rewind_point(self._resolved_folder, value, self._plan['rewind_batch'])
                self._files[attribute] = file_reference(self._resolved_folder, REWIND_POINT_FILE, 'state_dict')
            # else the tensors go into this run's checkpoints: its folder holds no copy

    def _start(self, state: State, logger: Logger) -> None:
        """Fix the level schedule (first start), and keep logger steps and checkpoint names monotonic across levels."""
        if self._plan is None:
            if state.max_duration is None:
                return  # max_duration arrives with fit(); FIT_START calls again
            self._plan = self._make_plan(state)
            if self._rewind_components is None:
                # Fail at construction, not at step k, for a component whose state cannot be rewound.
                components = rewound_components(state, self)
                ComponentSnapshot.capture(state, components).check_loadable(state, components)
        shift_logger_steps(logger, lambda: self._offsets['batch'])
        prefix_checkpoint_names(state, self._checkpoint_names, self._checkpoint_prefix())
        self._masked_params = None

    @property
    def _schedule(self) -> Time:
        """T, the user's one-level ``max_duration``, parsed once (it is read at every checkpoint event)."""
        if self._schedule_time is None:
            self._schedule_time = Time.from_timestring(self._plan['schedule_duration'])
        return self._schedule_time

    def _checkpoint_prefix(self) -> str:
        if self._level == 0:
            return ''
        return f'level{self._level}-' if self._attempt == 0 else f'level{self._level}.{self._attempt}-'

    def _allow_pending_transition(self, state: State) -> None:
        """A checkpoint written at the last batch of a level that ends with an epoch (Composer's end-of-training save
        at BATCH_CHECKPOINT) holds the level before IMP's transition at EPOCH_CHECKPOINT. Resumed from it, the run is at
        T, which ``fit()`` would call finished: one more batch of budget lets the loop reach that epoch's end, where
        the transition runs and puts ``max_duration`` back to T."""
        schedule = self._schedule if self._plan else None
        self._pending_transition = (schedule is not None and not self._done and
                                    int(state.timestamp.batch) >= self._plan['schedule_batches'])
        if self._pending_transition and schedule.unit == TimeUnit.BATCH:
            state.max_duration = Time(self._plan['schedule_batches'] + 1, TimeUnit.BATCH)

    def _check_fit_duration(self, state: State) -> None:
        schedule = self._schedule
        if not self._pending_transition and Time.from_input(state.max_duration) != schedule:
            raise ValueError(f'fit(duration=...): IMP runs every level inside one fit() with max_duration = one level '
                             f"({schedule}); the run's max_duration is now {state.max_duration}. Call fit() without "
                             'duration, and give the level length as max_duration')

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
            if state.dataloader_len is None:
                raise ValueError(f"rewind_to: {self.rewind_to} is in epochs, but the train dataloader has no length; "
                                 "give rewind_to in 'ba'")
            rewind_batch = int(rewind.value) * int(state.dataloader_len)
        else:
            rewind_batch = int(round(float(rewind.value) * schedule_batches))
        if rewind_batch >= schedule_batches:
            raise ValueError(f'rewind_to: {self.rewind_to} ({rewind_batch} batches) is not allowed; it must come before '
                             f'the end of the level, max_duration = {duration} ({schedule_batches} batches)')
        return {'schedule_duration': str(duration), 'schedule_batches': schedule_batches, 'rewind_batch': rewind_batch}

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

    # ------------------------------------------------------------------ data position
    def _restarts_loader(self, state: State) -> bool:
        """Levels that end mid-epoch restart the dataloader's pass at the rewind step (``replay.DataloaderReplay``)."""
        return state.dataloader_len is not None and self._plan['schedule_batches'] % int(state.dataloader_len) != 0

    def _lift_pass_budget(self, state: State) -> None:
        """Composer caps a pass at ``dataloader_len`` batches; a pass that restarts at the rewind step needs more. The
        restartable loader ends its epochs itself, so the cap is lifted while Composer starts a pass."""
        if self._loader_replay is not None and state.dataloader_len is not None and self._pass_len is None:
            self._pass_len = state.dataloader_len
            state._dataloader_len = Time(2**62, TimeUnit.BATCH)

    def _restore_pass_budget(self, state: State) -> None:
        if self._pass_len is not None:
            state._dataloader_len, self._pass_len = self._pass_len, None

    def _count_macs(self, state: State) -> None:
        """Dense MACs per sample on the first batch; a ComposerModel's forward takes the whole batch as one argument."""
        try:
            with preserve_rng(state):
                self._macs = layer_macs(unwrap_model(state), (state.device.batch_to_device(state.batch),), self._masks)
        except ValueError as error:  # a batch without tensors: FLOPs are then reported as unknown
            warnings.warn(f'IMP: could not count MACs ({error}); FLOPs will not be reported')
            self._macs = {}
            return
        if self._macs['method'] == 'torch-flop-counter':
            warnings.warn(f"IMP: {self._macs['fallback_reason']}; MACs are counted by torch.utils.flop_counter "
                          '(matrix multiplies and convolutions only)')
        elif self._macs['method'] != 'torch-pruning':
            warnings.warn(f"IMP: {self._macs['fallback_reason']}; FLOPs are estimated as one multiply-accumulate per "
                          'parameter and token')

    def _masked_pairs(self, state: State) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The partly pruned parameters, their local views and their bool masks, listed once per level (one host sync
        per mask, then none per step): enforcing the masks is one multi-tensor multiply of the views by the bool
        masks per step, promoted to the parameter's dtype inside the kernel, so no 0/1 copy of the masks in the
        parameter's dtype is kept (pruned entries become exactly 0: their gradients are zeroed before the step, so no
        optimizer can move them by a non-finite amount)."""
        if self._masked_params is None:
            params = dict(unwrap_model(state).named_parameters())
            pruned = [name for name, mask in self._masks.items() if not mask.all()]
            self._masked_params = ([params[n] for n in pruned], [local(params[n]) for n in pruned],
                                   [self._masks[n] for n in pruned])
        return self._masked_params

    def _install_gradient_masks(self, state: State) -> None:
        """Mask pruned weights' gradients inside backward, before any AFTER_* event: gradient clipping, SAM's second
        step and DDP's all-reduce all see masked gradients, whatever the order of ``algorithms=[...]``."""
        for handle in self._gradient_hooks:
            handle.remove()
        self._gradient_hooks = []
        # FSDP2 sets the sharded parameters' gradients itself after backward, past any tensor hook: AFTER_BACKWARD
        if self.mask_gradients and self._level > 0 and not self._sharded:
            params, _, masks = self._masked_pairs(state)
            for param, mask in zip(params, masks):
                self._gradient_hooks.append(param.register_hook(functools.partial(torch.mul, other=mask)))

    @torch.no_grad()
    def _mask_sharded_gradients(self, state: State) -> None:
        """Under FSDP2, zero the pruned weights' gradient shards after each microbatch's backward (the gradients are
        reduce-scattered by then; masking is linear, so accumulation over microbatches keeps the zeros)."""
        params, _, masks = self._masked_pairs(state)
        pairs = [(local(param.grad), mask) for param, mask in zip(params, masks) if param.grad is not None]
        if pairs:
            torch._foreach_mul_(*map(list, zip(*pairs)))

    # ------------------------------------------------------------------ non-finite values (finite.py)
    def _check_finite(self, state: State, loss: bool = False, tensors: Optional[dict[str, Any]] = None) -> None:
        """Raise ``NonFiniteError`` (a ``FloatingPointError``) naming the level and the level-local step if the
        training loss (``loss=True``: Composer's ``total_loss_dict``, floats already on the host, so no sync per step)
        or a floating tensor of ``tensors`` (one ``isfinite`` pass and one sync, at level ends and at step k) is not
        finite."""
        if loss:
            bad_losses = non_finite_losses(state.total_loss_dict)
            what = f'the training loss is not finite ({bad_losses})' if bad_losses else None
        else:
            bad_tensors = non_finite_tensors({name: local(t) for name, t in (tensors or {}).items()})
            if self._sharded:  # every rank raises, or none
                bad_tensors = sorted(set().union(*dist.all_gather_object(bad_tensors)))
            shown = bad_tensors[:5] + ([f'... {len(bad_tensors) - 5} more'] if len(bad_tensors) > 5 else [])
            what = f'weights or buffers hold NaN or inf ({shown})' if bad_tensors else None
        if what is not None:
            raise NonFiniteError(non_finite_message(what, self._level, int(state.timestamp.batch), self._plan,
                                                    self._resolved_folder))

    # ------------------------------------------------------------------ rewind point
    def _capture_rewind_point(self, state: State) -> None:
        """Snapshot the whole run at step k: weights and buffers (identical on every rank), time, optimizers and
        schedulers, the trainable layout and every other component's state."""
        model = unwrap_model(state)
        rewind_point = snapshot(model)
        model_state = model.state_dict()
        for name, tensor in rewind_point.items():
            if local(model_state[name]) is model_state[name]:  # not a shard: the same on every rank
                dist.broadcast(tensor, src=0)
        self._check_finite(state, tensors=rewind_point)
        device = self._device()
        self._rewind_point = self._stored(rewind_point, device)
        del rewind_point
        previous = state.previous_timestamp
        self._rewind_run = {
            'timestamp': _counters(state.timestamp),
            'previous_timestamp': None if previous is None else _counters(previous),
            'lrs': [[float(group['lr']) for group in opt.param_groups] for opt in state.optimizers],
            'schedulers': [_plain(s.state_dict()) for s in state.schedulers],
            'layout': capture_layout(model, state.optimizers),
        }
        self._rewind_components = ComponentSnapshot.capture(state, rewound_components(state, self))
        self._rewind_components.tensors = self._stored(self._rewind_components.tensors, device)
        if self.rewind_optimizer:
            self._rewind_optimizers = [[_plain(snapshot_optimizer(inner, self.offload))
                                        for inner in inner_optimizers(opt)] for opt in state.optimizers]
        if self._resolved_folder is not None and self._sharded:
            self._file_sharded_rewind_point(model)
        elif self._resolved_folder is not None and dist.get_global_rank() == 0:
            save_rewind_point(self._resolved_folder, self._rewind_point, self._plan['rewind_batch'])
            self._files['_rewind_point'] = file_reference(self._resolved_folder, REWIND_POINT_FILE, 'state_dict')
            if self._rewind_optimizers is not None:
                atomic_save(self._rewind_optimizers, os.path.join(self._resolved_folder, REWIND_OPTIMIZERS_FILE))
                self._files['_rewind_optimizers'] = file_reference(self._resolved_folder, REWIND_OPTIMIZERS_FILE)

    def _file_sharded_rewind_point(self, model: torch.nn.Module) -> None:
        """FSDP2: rank 0 writes the whole rewind point (the ticket's file, gathered one tensor at a time); every rank
        files its shards of it and of the optimizer state at step k for the checkpoints."""
        whole = full_state(self._rewind_point, model.state_dict(), keep=dist.get_global_rank() == 0)
        if whole is not None:
            save_rewind_point(self._resolved_folder, whole, self._plan['rewind_batch'])
        del whole
        self._files['_rewind_point'] = file_shards(self._resolved_folder, REWIND_POINT_FILE,
                                                   {'state_dict': self._rewind_point}, key='state_dict')
        if self._rewind_optimizers is not None:
            self._files['_rewind_optimizers'] = file_shards(self._resolved_folder, REWIND_OPTIMIZERS_FILE,
                                                            self._rewind_optimizers)

    def _file_masks(self, tag: str = '') -> None:
        """FSDP2: every rank files its shards of the masks (and the parent level's) at each change, for checkpoints.
        Each change gets its own file (``tag`` tells the last level's accepted state apart from its start), so the
        files earlier checkpoints refer to stay as they were."""
        if self._resolved_folder is None:
            return
        packed = {'masks': pack_masks(self._masks),
                  'previous_masks': None if self._previous_masks is None else pack_masks(self._previous_masks)}
        references = file_shards(self._resolved_folder, f'masks-level{self._level}.{self._attempt}{tag}.pt', packed)
        for attribute, key in (('_masks', 'masks'), ('_previous_masks', 'previous_masks')):
            self._files[attribute] = [dict(reference, key=key) for reference in references]

    def _device(self) -> torch.device:
        """The training device: where the masks (and the prunable weights) are."""
        return next(iter(self._masks.values())).device

    # ------------------------------------------------------------------ level transitions
    def _level_over(self, state: State) -> bool:
        schedule = self._schedule
        now_limit = Time.from_input(state.max_duration)
        stopped = (now_limit.value, now_limit.unit) != (schedule.value, schedule.unit)
        if stopped and self._rewind_point is None:
            warnings.warn(f'IMP: a request to stop training at batch {int(state.timestamp.batch)} came before the '
                          f"rewind step ({self._plan['rewind_batch']} batches) and was ignored: level 0 must reach it")
            state.max_duration = schedule
            stopped = False
        return int(state.timestamp.batch) >= self._plan['schedule_batches'] or stopped

    def _end_level(self, state: State, logger: Logger, mid_epoch: bool) -> None:
        now = state.timestamp
        model = unwrap_model(state)
        self._check_finite(state, tensors=model.state_dict())  # before any record, hook (barrier) or mask
        start = self._rewind_run['timestamp'] if self._level > 0 else {'batch': 0, 'sample': 0}
        samples = int(now.sample) - start['sample']
        record: dict[str, Any] = {
            'level': self._level,
            'density': self.density,
            'nominal_density': self._nominal_density,
            'layer_density': self.layer_densities(),
            'eval': self._level_eval(state),
            'steps': int(now.batch) - start['batch'],
            'samples': samples,
            'flops': self.training_flops(samples),
            'flops_method': (self._macs or {}).get('method'),
            'seconds': now.total_wct.total_seconds() - self._level_start_wct,
            'start_batch': self._offsets['batch'] + start['batch'],
            'end_batch': self._offsets['batch'] + int(now.batch),
            'stopped_early': int(now.batch) < self._plan['schedule_batches'],
        }
        if self._level > 0:
            record['step'] = dict(self.sparsity_step.decision)
        device = self._device()
        if self.offload == 'cpu' and self._previous_level_state is not None:  # one stream for all the hooks' reads
            self._parent_on_device = {n: t.to(device, non_blocking=True) for n, t in self._previous_level_state.items()}
        for hook in self._hooks:
            record.update(hook(state, logger, record) or {})
        accepted = self._level == 0 or self.sparsity_step.accept(state, self, record, logger)
        record['accepted'] = bool(accepted)
        record['final'] = bool(accepted) and self._finished()  # the run's last level: the report needs no recipe
        self._history.append(record)
        self._log_level(record, logger)
        self._write_level(record, model, accepted, logger)

        if accepted:
            self._parent_on_device = None
            if self._keep_previous_level:
                self._previous_level_state = self._stored(model.state_dict(), device)
                self._refer_to_trained_state(record['level'])
            self._previous_masks = self._stored(self._masks, device)
            self._previous_nominal_density = self._nominal_density
            if record['final']:
                self._done = True
                if self._sharded:
                    self._file_masks(tag='-accepted')
                if self._pending_transition:  # the resumed run's extra batch of budget must not be trained
                    state.max_duration = self._schedule
                return
            next_level, attempt = self._level + 1, 0
        else:
            rewind(model, self.previous_level_state, {n: m.to(device) for n, m in self._previous_masks.items()})
            self._parent_on_device = None
            next_level, attempt = self._level, self._attempt + 1

        fraction = self.sparsity_step.fraction(state, self, logger)
        self._nominal_density = self._previous_nominal_density * (1.0 - fraction)
        masks = self._next_masks(model, fraction)
        for name in masks if not self._sharded else ():
            as_bytes = masks[name].to(torch.uint8)
            dist.broadcast(as_bytes, src=0)  # one mask for all ranks, whatever ties or kernels did
            masks[name] = as_bytes.bool()
        self._masks = masks
        self._count_masks()
        self._masked_params = None
        self._level, self._attempt = next_level, attempt
        if self._sharded:
            self._file_masks()
        self._pending_transition = False
        self._level_start_wct = now.total_wct.total_seconds()
        self._rewind(state, logger, mid_epoch)

    def _refer_to_trained_state(self, level: int) -> None:
        """Checkpoints refer to the level's ``trained.pt`` (just written, equal to the parent state now kept) by the
        SHA-256 its manifest recorded; where rank 0 wrote no file, the tensors go into the checkpoint."""
        self._files.pop('_previous_level_state', None)
        if self._sharded and self._resolved_folder is not None:
            self._files['_previous_level_state'] = file_shards(self._resolved_folder, f'trained-level{level}.pt',
                                                               self._previous_level_state)
            return
        if dist.get_global_rank() != 0 or self._resolved_folder is None:
            return
        relative = os.path.relpath(os.path.join(level_dir(self._resolved_folder, level), 'trained.pt'),
                                   self._resolved_folder)
        with open(os.path.join(level_dir(self._resolved_folder, level), MANIFEST_FILE), encoding='utf-8') as f:
            sha256 = json.load(f)['files'][relative.replace(os.sep, '/')]['sha256']
        self._files['_previous_level_state'] = file_reference(self._resolved_folder, relative, sha256=sha256)

    def _next_masks(self, model: torch.nn.Module, fraction: float) -> dict[str, torch.Tensor]:
        """The next level's masks: the nominal density's count of weights, or ``fraction`` of the remaining channels."""
        if self.structure == 'channels':
            return structured_masks(model, self._example_inputs, fraction, self._previous_masks, self.scope,
                                    round_to=self.round_to)
        weights = prunable_weights(model, self.ignore, embeddings=self.embeddings)
        if not self._sharded:
            return masks_at_density(weights, self._nominal_density, self._previous_masks, self.scope)
        # FSDP2: the selection over every rank's shards, equal to masks_at_density over the whole tensors
        shards = {name: local(w) for name, w in weights.items()}
        if self.scope == 'global':
            return sharded_masks_at_density(shards, self._nominal_density, self._previous_masks, layout='tensor-major')
        return {name: sharded_masks_at_density({name: shard}, self._nominal_density,
                                               {name: self._previous_masks[name]}, layout='tensor-major')[name]
                for name, shard in shards.items()}

    def _finished(self) -> bool:
        if self.sparsity_step.finished(self):
            return True
        if self.levels is not None:
            return self._level >= self.levels
        sizes = [numel for _, numel in self._counts.values()]
        # Layerwise masks round per tensor, so their target count is the sum of per-tensor counts.
        keep_at_target = (sum(round(self.target_density * n) for n in sizes) if self.scope == 'layerwise' else
                          round(self.target_density * sum(sizes)))
        return sum(alive for alive, _ in self._counts.values()) <= keep_at_target

    def _rewind(self, state: State, logger: Logger, mid_epoch: bool) -> None:
        """The whole run back to step k under the new mask (``replay.py``)."""
        model = unwrap_model(state)
        run = self._rewind_run
        now = _counters(state.timestamp)
        for unit in self._offsets:
            self._offsets[unit] += now[unit] - run['timestamp'][unit]
        rewind(model, self._rewind_point, self._masks)
        restore_layout(model, state.optimizers, run['layout'])
        params = dict(model.named_parameters())
        masks_by_param = {params[n]: m for n, m in self._masks.items()}
        for index, optimizer in enumerate(state.optimizers):
            snapshots = self._rewind_optimizers[index] if self._rewind_optimizers else None
            for depth, inner in enumerate(inner_optimizers(optimizer)):
                rewind_optimizer(inner, snapshots[depth] if snapshots else None, masks_by_param)
            for group, lr in zip(optimizer.param_groups, run['lrs'][index]):
                group['lr'] = lr
        for scheduler, scheduler_state in zip(state.schedulers, run['schedulers']):
            scheduler.load_state_dict(copy.deepcopy(scheduler_state))
        self._rewind_components.restore(state, rewound_components(state, self), self._masks)
        state.timestamp = state.timestamp.copy(**run['timestamp'])
        previous = run['previous_timestamp']
        state.previous_timestamp = None if previous is None else state.timestamp.copy(**previous)
        state.max_duration = self._schedule
        if mid_epoch and self._loader_replay is not None:
            self._loader_replay.restart(int(state.timestamp.epoch), int(state.timestamp.batch_in_epoch),
                                        composer_skips='train' not in state.dataset_resumption)
        from composer.callbacks import CheckpointSaver
        for saver in (c for c in state.callbacks if isinstance(c, CheckpointSaver)):
            saver.last_checkpoint_batch = None  # its "already saved at this batch" guard reads replayed time
        prefix_checkpoint_names(state, self._checkpoint_names, self._checkpoint_prefix())
        self._install_gradient_masks(state)

    def _level_eval(self, state: State) -> dict[str, float]:
        """Every evaluator's metrics of this level's trained network: the Trainer's for the evaluators it ran at this
        step, our own evaluation for the others (never a value cached at an earlier step). The step is known by its
        Timestamp object: batch numbers repeat when levels replay the same steps."""
        timestamp, evaluated = self._last_eval
        return level_eval_metrics(state, evaluated if timestamp is state.timestamp else {})

    def _log_level(self, record: dict[str, Any], logger: Logger) -> None:
        metrics = {'imp/level': record['level'], 'imp/density': record['density'], 'imp/steps': record['steps']}
        metrics.update({f'imp/density/{name}': value for name, value in record['layer_density'].items()})
        metrics.update({f'imp/eval/{name}': value for name, value in record['eval'].items()})
        metrics.update({k: v for k, v in record.items() if '/' in k and isinstance(v, (int, float, bool))})
        logger.log_metrics({k: float(v) for k, v in metrics.items()})

    def _write_level(self, record: dict[str, Any], model: torch.nn.Module, accepted: bool, logger: Logger) -> None:
        if self._resolved_folder is None:
            return
        masks, trained = self._masks, model.state_dict()
        if self._sharded and accepted:  # the level's files hold whole tensors, gathered one at a time onto rank 0
            rank_zero = dist.get_global_rank() == 0
            masks = full_state(masks, dict(model.named_parameters()), keep=rank_zero)
            trained = full_state({name: local(t) for name, t in trained.items()}, trained, keep=rank_zero)
        if dist.get_global_rank() != 0:
            return
        os.makedirs(self._resolved_folder, exist_ok=True)
        files = [os.path.join(self._resolved_folder, LEVELS_FILE)]
        if accepted:  # every file atomically; the level's manifest last, after levels.jsonl holds its line
            path = save_level(self._resolved_folder, record['level'], masks, trained, manifest=False)
            files += [os.path.join(path, 'mask.pt'), os.path.join(path, 'trained.pt')]
        # Rewritten whole from the checkpointed history, so a resumed run never duplicates a line.
        write_levels(self._resolved_folder, self._history)
        if accepted:
            files.append(write_manifest(self._resolved_folder, record['level'], self.density, record,
                                        len(self._history) - 1))
        root = os.path.dirname(os.path.normpath(self._resolved_folder))
        for file_path in files:
            logger.upload_file(remote_file_name=os.path.relpath(file_path, root), file_path=file_path, overwrite=True)


_COUNTERS = ('iteration', 'epoch', 'batch', 'sample', 'token', 'epoch_in_iteration', 'token_in_iteration',
             'batch_in_epoch', 'sample_in_epoch', 'token_in_epoch')


def _refuse_parallelism(state: State, imp: IMP) -> None:
    """At Event.INIT, before Composer shards the model: IMP runs on one device, under DDP or under FSDP2; refuse the
    rest in one line."""
    from composer.utils.parallelism import FSDP2Config
    if getattr(state, 'tp_config', None) is not None:
        raise ValueError("parallelism_config: 'tp' (tensor parallelism) is not supported by IMP; use DDP "
                         "(parallelism_config=None) or FSDP2 (parallelism_config={'fsdp': FSDP2Config(...)})")
    config = state.fsdp_config
    if config is None:
        return
    if not isinstance(config, FSDP2Config):
        raise ValueError("parallelism_config: 'fsdp' with FSDP1 (FSDPConfig) is not supported by IMP, whose masks "
                         "follow each parameter's shard; use FSDP2: parallelism_config={'fsdp': FSDP2Config(...)} or "
                         'the environment variable FSDP_VERSION=2')
    # Each of these reads whole tensors: torch-pruning traces the unsharded model, LAMP sorts every tensor, the
    # adaptive step searches on probe copies of the whole network.
    unsupported = ([f'structure={imp.structure!r}'] if imp.structure != 'weights' else []) + \
        ([f'scope={imp.scope!r}'] if imp.scope == 'lamp' else []) + \
        ([f'sparsity_step={type(imp.sparsity_step).__name__}'] if not isinstance(imp.sparsity_step, FixedStep) else [])
    if unsupported:
        raise ValueError(f"parallelism_config: IMP under FSDP2 supports structure='weights', scope 'global' or "
                         f"'layerwise' and a fixed prune_fraction; {', '.join(unsupported)} needs DDP "
                         '(parallelism_config=None)')


def _check_shard_layout(weights: dict[str, torch.Tensor]) -> None:
    """FSDP2 with a 1-D mesh over all ranks and row shards: the layout the sharded threshold assumes."""
    from torch.distributed.tensor import DTensor, Shard
    for name, weight in weights.items():
        if not isinstance(weight, DTensor):
            continue
        mesh, placements = weight.device_mesh, tuple(weight.placements)
        if mesh.ndim != 1 or mesh.size() != dist.get_world_size() or placements != (Shard(0),):
            raise ValueError(f'parallelism_config: IMP under FSDP2 needs every weight sharded by rows over all '
                             f'{dist.get_world_size()} ranks (a 1-D mesh, Shard(0)); {name!r} is {placements} over a '
                             f'mesh of shape {tuple(mesh.shape)} (HSDP is not supported)')


def _masks_from_checkpoint(stored: Optional[dict[str, Any]]) -> Optional[dict[str, torch.Tensor]]:
    """Masks as checkpoints hold them: bit-packed (``pack_masks``), or bool tensors (checkpoints of earlier
    versions)."""
    if stored is None:
        return None
    return {name: mask if isinstance(mask, torch.Tensor) else unpack_masks({name: mask})[name]
            for name, mask in stored.items()}


def _counters(timestamp: Timestamp) -> dict[str, int]:
    return {name: int(getattr(timestamp, name)) for name in _COUNTERS}


def _plain(obj: Any) -> Any:
    """Tuples to lists, recursively: checkpointed algorithm state holds only tensors, numbers, strings, lists, dicts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj

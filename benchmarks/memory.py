"""Bytes IMP adds on the training device, and checkpoint sizes, against the plain Composer run (issue 13).

Models: torchvision ResNet-50 (built without weights, 64x64 synthetic images) and a GPT-2-small-sized model built from
``transformers.GPT2Config()`` (124M parameters, synthetic tokens), each trained a few steps with Adam: the plain run,
and IMP (one pruned level, rewind to step 1, ``offload='cpu'``, the default) with the LMC evaluator.

Device bytes by tensor-storage accounting (works on CPU, where host and device are one memory): every storage
reachable from IMP, the LMC evaluator and the gradient hooks IMP puts on the parameters, counted once, minus the
model's own parameters and buffers, minus the copies IMP's host path made (``stored_copy(..., 'cpu')``,
``move_module_(..., 'cpu')``: pinned host memory on a CUDA machine). Sampled at every step of the pruned level
("during a level", goal <= 1.25 B per prunable weight) and inside the transition while the LMC barrier evaluates (the
parent level's state and the probe model are then on the device). The transition's transient buffers inside
``masks_at_density`` (one float32 magnitude per prunable weight and the new masks) are not held by IMP and not counted.
Checkpoints: ``Trainer.save_checkpoint`` at the end of each run (goal: IMP's <= 1.1x the plain run's, plus one rewind
point on disk in IMP's folder).

FSDP2: the same two models, plain and with IMP, under Composer's FSDP2 on two gloo ranks
(``composer -n 2 benchmarks/memory.py --fsdp OUT.json``, which ``run()`` launches): bytes per prunable weight *of the
rank's shards*, counted on rank 0 as above (IMP's local views share the parameters' storage and are not counted), and
the sharded checkpoint folders' sizes (every rank's files), plus IMP's per-rank files on disk.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from typing import Any

import torch
from composer import Callback, Trainer
from composer.core import DataSpec, Evaluator, State
from composer.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from composer_imp import IMP
from composer_imp.callbacks import LMCEvaluator
from composer_imp.functional.shards import local

LEVEL_BATCHES, REWIND_BATCHES = 3, 1
_rewind = importlib.import_module('composer_imp.functional.rewind')
_lmc = importlib.import_module('composer_imp.callbacks.lmc_evaluator.lmc_evaluator')
_SKIPPED = (DataLoader, Dataset, State, Logger, DataSpec, Evaluator, types.FunctionType, types.ModuleType, type)


def storages(obj: Any, found: dict[int, int], seen: set[int]) -> None:
    """``found[data_ptr] = nbytes`` for every tensor storage reachable from ``obj`` (data loaders and the run's State,
    loggers and evaluators are not followed)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, nn.Module):
        for tensor in [*obj.parameters(), *obj.buffers()]:
            storages(tensor, found, seen)
    elif isinstance(obj, _SKIPPED):
        return
    elif isinstance(obj, dict):
        for key, value in obj.items():
            storages(key, found, seen)
            storages(value, found, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            storages(value, found, seen)
    elif isinstance(obj, functools.partial):
        storages((obj.args, obj.keywords), found, seen)
    elif isinstance(obj, types.MethodType):
        storages(obj.__self__, found, seen)
    elif hasattr(obj, '__dict__'):
        storages(vars(obj), found, seen)


class HostCopies:
    """Records, and keeps alive so that no address is reused, every storage IMP's host path creates: copies by
    ``stored_copy(..., 'cpu')``, and modules parked by ``move_module_(module, 'cpu')`` until they are moved to the
    model's device (a ``torch.device``) again. ``install`` patches the recording in; ``uninstall`` takes it out."""

    def __init__(self):
        self.copies: list[torch.Tensor] = []
        self.moved: list[torch.Tensor] = []  # every tensor of a moved module, kept alive
        self.parked: set[int] = set()  # storages of the modules now parked on the host
        self._originals = (_rewind._stored_tensor, _lmc.move_module_)

    def install(self) -> 'HostCopies':
        stored_tensor, move_module = self._originals

        def recording_stored_tensor(tensor, offload, device):
            copy = stored_tensor(tensor, offload, device)
            if offload == 'cpu':
                self.copies.append(copy)
            return copy

        def recording_move_module(module, device):
            module = move_module(module, device)
            tensors = [*module.parameters(), *module.buffers()]
            self.moved += tensors
            pointers = {t.untyped_storage().data_ptr() for t in tensors}
            self.parked = self.parked | pointers if device == 'cpu' else self.parked - pointers
            return module

        _rewind._stored_tensor, _lmc.move_module_ = recording_stored_tensor, recording_move_module
        return self

    def uninstall(self) -> None:
        _rewind._stored_tensor, _lmc.move_module_ = self._originals

    def device_bytes(self, state: State) -> int:
        """Bytes IMP (and the LMC evaluator) hold on the training device, beyond the model's own tensors. The parent
        state IMP puts on the device during a level end counts whole: on the CPU ``.to(device)`` returns the host copy
        itself, on CUDA it is a copy on the device."""
        imp = state.algorithms[0]
        found: dict[int, int] = {}
        storages([imp, [c for c in state.callbacks if isinstance(c, LMCEvaluator)],
                  [p._backward_hooks for p in state.model.parameters()]], found, set())
        streamed: dict[int, int] = {}
        storages(imp._parent_on_device, streamed, set())
        own = {local(t).untyped_storage().data_ptr() for t in state.model.state_dict(keep_vars=True).values()}
        host = ({t.untyped_storage().data_ptr() for t in self.copies} | self.parked) - set(streamed)
        return sum(n for ptr, n in found.items() if ptr not in own and ptr not in host)


class Probe(Callback):
    """Device bytes at every step of the pruned level, the peak inside the transition, the transition's seconds."""

    imp_rewind = False  # a record across levels

    def __init__(self, host: HostCopies):
        self.host, self.during_level, self.transition, self.transition_seconds = host, [], [], []

    def fit_start(self, state, logger):
        imp = state.algorithms[0]
        end_level = imp._end_level

        def timed_end_level(*args, **kwargs):
            start = time.perf_counter()
            end_level(*args, **kwargs)
            self.transition_seconds.append(time.perf_counter() - start)

        imp._end_level = timed_end_level

    def batch_end(self, state, logger):
        if state.algorithms[0].level > 0:
            self.during_level.append(self.host.device_bytes(state))


def _sampler(data):
    """Each rank's part of the synthetic data (Composer refuses loaders without one under several ranks)."""
    from composer.utils import dist

    return dist.get_sampler(data, shuffle=False)


def _resnet50():
    from composer.models import ComposerClassifier
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = ComposerClassifier(resnet50(weights=None, num_classes=10), num_classes=10)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g))
    return model, DataLoader(data, batch_size=4, sampler=_sampler(data)), DataLoader(data, batch_size=4,
                                                                             sampler=_sampler(data)), 4


def _gpt2():
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = HuggingFaceModel(GPT2LMHeadModel(GPT2Config()), use_logits=True, eval_metrics=[LanguageCrossEntropy()])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50257, (4, 32), generator=g)
    # labels cloned: Composer's eval shifts them in place
    batches = [{'input_ids': tokens[i:i + 2], 'labels': tokens[i:i + 2].clone()} for i in (0, 2)]
    return (model, DataLoader(batches, batch_size=None, sampler=_sampler(batches)),
            DataLoader(batches, batch_size=None, sampler=_sampler(batches)), 2)


def _size(path: str) -> int:
    """A file's size, or the total size of the files under a folder (a sharded checkpoint)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _fit(build, with_imp: bool, folder: str, fsdp: bool = False) -> dict[str, Any]:
    model, train, evaluation, batch_size = build()
    host = HostCopies().install()
    probe = Probe(host)
    lmc_curve = _lmc.metric_curve

    def sampled_curve(*args, **kwargs):  # the barrier's evaluation: parent and probe are on the device now
        probe.transition.append(host.device_bytes(trainer.state))
        return lmc_curve(*args, **kwargs)

    _lmc.metric_curve = sampled_curve
    try:
        algorithms = [IMP(levels=1, rewind_to=f'{REWIND_BATCHES}ba', folder=os.path.join(folder, 'imp'))]
        evaluator = Evaluator(label='eval', dataloader=evaluation, device_eval_microbatch_size=batch_size)
        trainer = Trainer(model=model, train_dataloader=train, eval_dataloader=evaluator,
                          max_duration=f'{LEVEL_BATCHES}ba', eval_interval=f'{LEVEL_BATCHES}ba',
                          optimizers=torch.optim.Adam(model.parameters(), lr=1e-4),
                          algorithms=algorithms if with_imp else [],
                          callbacks=[LMCEvaluator(alphas=2), probe] if with_imp else [], progress_bar=False,
                          device_train_microbatch_size=batch_size, device='cpu', seed=1, run_name='memory',
                          parallelism_config={'fsdp': _fsdp_config()} if fsdp else None)
        trainer.fit()
        saved = trainer.save_checkpoint(os.path.join(folder, 'checkpoint.pt'))
        # a sharded checkpoint is a folder of every rank's files (only ranks that wrote one get its name back)
        path = saved if not fsdp else os.path.dirname(next(p for p in _all_gathered(saved) if p))
        result = {'checkpoint_bytes': _size(path)}
        if with_imp:
            imp = trainer.state.algorithms[0]
            shards = os.path.join(folder, 'imp', 'shards')
            result.update(weights=sum(m.numel() for m in imp.masks.values()),
                          during_level=max(probe.during_level), transition=max(probe.transition),
                          transition_s=max(probe.transition_seconds),
                          rewind_point_bytes=os.path.getsize(os.path.join(folder, 'imp', 'rewind_point.pt')),
                          shard_file_bytes=_size(shards) if os.path.isdir(shards) else 0)
        trainer.close()
        return result
    finally:
        _lmc.metric_curve = lmc_curve
        host.uninstall()


def _fsdp_config():
    from composer.utils.parallelism import FSDP2Config

    return FSDP2Config()


def _all_gathered(value: Any) -> list:
    from composer.utils import dist

    return dist.all_gather_object(value)


def _measure(fsdp: bool, folder: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    prefix = 'fsdp2_' if fsdp else ''
    for name, build in (('resnet50', _resnet50), ('gpt2_small', _gpt2)):
        plain = _fit(build, False, os.path.join(folder, name, 'plain'), fsdp)
        imp = _fit(build, True, os.path.join(folder, name, 'imp'), fsdp)
        weights = imp['weights']
        results.update({
            f'{prefix}{name}_prunable_weights': weights,
            f'{prefix}{name}_device_bytes_per_weight_during_level': imp['during_level'] / weights,
            f'{prefix}{name}_device_bytes_per_weight_at_transition': imp['transition'] / weights,
            f'{prefix}{name}_transition_s': imp['transition_s'],
            f'{prefix}{name}_plain_checkpoint_bytes': plain['checkpoint_bytes'],
            f'{prefix}{name}_imp_checkpoint_bytes': imp['checkpoint_bytes'],
            f'{prefix}{name}_checkpoint_ratio': imp['checkpoint_bytes'] / plain['checkpoint_bytes'],
            f'{prefix}{name}_rewind_point_bytes': imp['rewind_point_bytes'],
        })
        if fsdp:
            results[f'{prefix}{name}_shard_file_bytes'] = imp['shard_file_bytes']
    return results


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        results = _measure(False, tmp)
        out = os.path.join(tmp, 'fsdp.json')
        launcher = os.path.join(os.path.dirname(sys.executable), 'composer')
        done = subprocess.run([launcher, '-n', '2', '--stdout', os.devnull, '--stderr', os.devnull, __file__,
                               '--fsdp', out], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f'memory.py --fsdp failed: {done.stderr[-2000:]}')
        with open(out) as f:
            results.update(json.load(f))
    return results


if __name__ == '__main__':
    if sys.argv[1:2] == ['--fsdp']:  # one rank of `composer -n 2 memory.py --fsdp OUT`
        from composer.utils import dist

        dist.initialize_dist('cpu')
        with tempfile.TemporaryDirectory() as local_tmp:
            folder = _all_gathered(local_tmp)[0]  # rank 0's folder: one run folder for both ranks
            measured = _measure(True, folder)
            if dist.get_global_rank() == 0:
                with open(sys.argv[2], 'w') as f:
                    json.dump(measured, f)
            dist.barrier()
    else:
        for key, value in run().items():
            print(f'{key}: {value:.4g}' if isinstance(value, float) else f'{key}: {value}')

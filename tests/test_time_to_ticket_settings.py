"""benchmarks/time_to_ticket.py: both sides of every setting get the same data, T, k, evaluation, init and target."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from composer_imp import AdaptiveSparsityStep
from composer_imp.algorithms.imp.sparsity_step import FixedStep

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'time_to_ticket.py')
_SPEC = importlib.util.spec_from_file_location('time_to_ticket', _PATH)
time_to_ticket = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(time_to_ticket)


def _first_batch(loader):
    return next(iter(loader))


@pytest.mark.parametrize('setting', sorted(time_to_ticket.SETTINGS))
def test_fixed_and_adaptive_runs_share_data_schedule_and_init(setting, tmp_path):
    recipe = time_to_ticket.SETTINGS[setting]
    fixed, fixed_imp = time_to_ticket.build('fixed', 1, str(tmp_path / 'fixed'), recipe)
    adaptive, adaptive_imp = time_to_ticket.build('adaptive', 1, str(tmp_path / 'adaptive'), recipe)
    try:
        assert fixed.state.max_duration == adaptive.state.max_duration == recipe['duration']
        assert fixed_imp.rewind_to == adaptive_imp.rewind_to == recipe['rewind_to']
        assert fixed_imp.target_density == adaptive_imp.target_density == recipe['target_density']
        assert type(fixed_imp.sparsity_step) is FixedStep
        assert fixed_imp.sparsity_step.prune_fraction == recipe['fixed_fraction']
        assert type(adaptive_imp.sparsity_step) is AdaptiveSparsityStep
        for loader in (lambda t: t.state.train_dataloader, lambda t: t.state.evaluators[0].dataloader.dataloader):
            (x_fixed, y_fixed), (x_adaptive, y_adaptive) = _first_batch(loader(fixed)), _first_batch(loader(adaptive))
            assert torch.equal(x_fixed, x_adaptive) and torch.equal(y_fixed, y_adaptive)
        assert len(fixed.state.train_dataloader.dataset) == len(adaptive.state.train_dataloader.dataset)
        fixed_weights, adaptive_weights = fixed.state.model.state_dict(), adaptive.state.model.state_dict()
        assert all(torch.equal(fixed_weights[name], adaptive_weights[name]) for name in fixed_weights)
        optimizers = fixed.state.optimizers[0], adaptive.state.optimizers[0]
        assert type(optimizers[0]) is type(optimizers[1])
        assert optimizers[0].param_groups[0]['lr'] == optimizers[1].param_groups[0]['lr'] == recipe['lr']
        # The step verifies on the held-out split, a part of neither the training nor the test data.
        splits = time_to_ticket.splits(recipe)
        rows = {name: {row.numpy().tobytes() for row in dataset.tensors[0].flatten(1)} for name, dataset in splits.items()}
        assert all(len(rows[name]) == len(splits[name]) for name in splits)  # no image twice within a split
        assert not rows['val'] & rows['train'] and not rows['val'] & rows['test'] and not rows['train'] & rows['test']
        x_val, _ = _first_batch(adaptive_imp.sparsity_step.val_dataloader)
        assert torch.equal(x_val, splits['val'].tensors[0][:len(x_val)])
        assert len(adaptive_imp.sparsity_step.val_dataloader.dataset) == recipe['val_samples']
    finally:
        fixed.close()
        adaptive.close()


"""LMCEvaluator(rewind_barrier=True): the barrier between successive pruned rewind points, m_{L-1} ⊙ w_k -> m_L ⊙ w_k,
in a real two-level IMP run on sklearn digits, recomputed by hand from the saved masks and rewind point."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from composer_imp import IMP, load_ticket
from composer_imp.callbacks import LMCEvaluator
from composer_imp.functional import error_barrier
from helpers import digits_tensors
from lmc_digits import build_model, make_trainer

TRAIN_BATCHES = 2
ALPHAS = 5


def train_subset() -> DataLoader:
    """Unshuffled training digits: the evaluator's train subset is then its first batches, reproducible by hand."""
    x, y = digits_tensors()
    return DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=False)


@pytest.fixture(scope='module')
def rewind_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('rewind_barrier')
    imp = IMP(levels=2, prune_fraction=0.5, rewind_to='4ba', folder=str(folder))
    lmc = LMCEvaluator(alphas=ALPHAS, rewind_barrier=True, train_subset_batches=TRAIN_BATCHES,
                       train_dataloader=train_subset())
    trainer = make_trainer(build_model(), seed=7, algorithms=[imp], callbacks=[lmc])
    trainer.fit()
    with open(os.path.join(folder, 'levels.jsonl')) as f:
        levels = [json.loads(line) for line in f]
    yield {'folder': folder, 'levels': levels, 'trainer': trainer, 'lmc': lmc}
    trainer.close()


def _pruned(rewind_point, masks):
    """m ⊙ w_k as a state dict of the plain network (the ComposerClassifier's ``module``)."""
    return {name[len('module.'):]: tensor * masks[name] if name in masks else tensor
            for name, tensor in rewind_point.items()}


def test_levels_file_holds_the_rewind_point_barrier_and_it_equals_a_hand_recomputation(rewind_run):
    levels, folder = rewind_run['levels'], rewind_run['folder']
    assert 'lmc/rewind_barrier' not in levels[0]  # level 0 has no parent
    x, y = digits_tensors()
    test = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=128)
    train = list(train_subset())[:TRAIN_BATCHES]
    network = build_model().module
    for level in (1, 2):
        record = levels[level]
        parent, ticket = load_ticket(os.path.join(folder, f'level_{level - 1}')), load_ticket(
            os.path.join(folder, f'level_{level}'))
        start, end = _pruned(ticket['rewind_point'], parent['masks']), _pruned(ticket['rewind_point'], ticket['masks'])
        assert not all(torch.equal(start[n], end[n]) for n in start)  # the level pruned something
        by_hand = error_barrier(network, start, end, test, alphas=ALPHAS)
        assert record['lmc/rewind_barrier'] == pytest.approx(by_hand['barrier_linear'], abs=1e-6)
        assert record['lmc/rewind_barrier/error'] == record['lmc/rewind_barrier']
        assert record['lmc/rewind_curve']['error'] == pytest.approx(by_hand['errors'], abs=1e-6)
        assert record['lmc/rewind_barrier_max_minus_mean'] == pytest.approx(by_hand['barrier_max_minus_mean'], abs=1e-6)
        on_train = error_barrier(network, start, end, train, alphas=ALPHAS)
        losses = [float(v) for v in on_train['losses']]
        assert record['lmc/train/rewind_curve']['loss'] == pytest.approx(losses, rel=1e-5)
        chord = [(1 - a) * losses[0] + a * losses[-1] for a in on_train['alphas']]
        assert record['lmc/train/rewind_barrier/loss'] == pytest.approx(max(v - c for v, c in zip(losses, chord)),
                                                                        abs=1e-5)
        # The successive-solution barrier is still there, beside it.
        assert 'lmc/barrier' in record


def test_identical_pruned_rewind_points_have_barrier_zero(rewind_run):
    lmc, state = rewind_run['lmc'], rewind_run['trainer'].state
    current = lmc._imp.ticket()

    class SameMaskTwice:  # a level whose mask equals its parent's
        parent_masks = current['masks']

        def ticket(self):
            return current

    lmc._imp, imp = SameMaskTwice(), lmc._imp
    try:
        report = lmc._rewind_point_barriers(state)
    finally:
        lmc._imp = imp
    for key in ('lmc/rewind_barrier', 'lmc/rewind_barrier/loss', 'lmc/train/rewind_barrier/loss'):
        assert report[key] == pytest.approx(0.0, abs=1e-15), key
    for curve in (report['lmc/rewind_curve'], report['lmc/train/rewind_curve']):
        assert len(set(curve['error'])) == 1 and len(set(curve['loss'])) == 1  # every point is the same network

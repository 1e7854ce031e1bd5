"""LMCEvaluator inside an IMP run, instability analysis, and DDP (small MLP with BatchNorm on sklearn digits)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from composer import Callback
from composer.loggers import InMemoryLogger

from composer_imp import IMP, load_ticket
from composer_imp.callbacks import LMCEvaluator
from composer_imp.functional import is_matching
from composer_imp.instability import instability_analysis
from lmc_digits import build_model, make_trainer
from test_ddp import launch

LEVELS = 2


def _imp_run(folder, callbacks=(), loggers=()):
    imp = IMP(levels=LEVELS, prune_fraction=0.5, rewind_to='4ba', folder=str(folder))
    trainer = make_trainer(build_model(), seed=7, algorithms=[imp], callbacks=callbacks, loggers=loggers)
    trainer.fit()
    final = {name: t.clone() for name, t in trainer.state.model.state_dict().items()}
    trainer.close()
    return imp, final


def _levels_file(folder):
    with open(os.path.join(folder, 'levels.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def imp_run(tmp_path_factory):
    """One IMP run with the callback; logged metrics and the run folder are inspected by several tests."""
    folder = tmp_path_factory.mktemp('imp_with_lmc')
    logger = InMemoryLogger()
    lmc = LMCEvaluator(threshold=0.02, matching_tolerance=0.01)
    imp, final = _imp_run(folder, callbacks=[lmc], loggers=[logger])
    return {'imp': imp, 'final': final, 'logged': logger.data, 'levels': _levels_file(folder), 'folder': folder,
            'lmc': lmc}


def test_imp_run_logs_successive_level_barriers_connected_and_matching(imp_run):
    logged = imp_run['logged']
    for key in ('lmc/barrier', 'lmc/barrier_max_minus_mean', 'lmc/connected', 'imp/matching'):
        assert len(logged[key]) == LEVELS, key  # one value per pruned level, none for the dense level 0
    levels = imp_run['levels']
    dense_error = levels[0]['lmc/error']
    for record in levels[1:]:
        assert record['lmc/connected'] == (record['lmc/barrier'] <= 0.02)
        assert record['imp/matching'] == is_matching(record['lmc/error'], dense_error, 0.01)
        assert record['lmc/barrier'] >= 0.0 and record['lmc/barrier_max_minus_mean'] >= 0.0
    assert [value for _, value in logged['lmc/barrier']] == [r['lmc/barrier'] for r in levels[1:]]


def test_level_metrics_lines_hold_the_curve_from_the_parent_level_to_the_level(imp_run):
    levels = imp_run['levels']
    assert 'lmc/curve' not in levels[0] and 'lmc/error' in levels[0]
    for parent, record in zip(levels, levels[1:]):
        curve = record['lmc/curve']
        assert curve['alphas'] == [i / 10 for i in range(11)]
        assert record['lmc/metric'] == 'error'  # a classifier's default headline, with the loss beside it
        assert len(curve['error']) == len(curve['loss']) == 11
        # With interpolated BatchNorm statistics the ends of the path are exactly the two trained networks.
        for name in ('error', 'loss'):
            assert curve[name][0] == pytest.approx(parent[f'lmc/{name}'], abs=1e-12)
            assert curve[name][-1] == pytest.approx(record[f'lmc/{name}'], abs=1e-12)
        assert record['lmc/barrier'] == record['lmc/barrier/error']


def test_callback_checkpoints_the_dense_value_for_resumption(imp_run):
    lmc = imp_run['lmc']
    assert lmc.state_dict() == {'dense_value': imp_run['levels'][0]['lmc/error']}
    resumed = LMCEvaluator()
    resumed.load_state_dict(lmc.state_dict())
    assert resumed.dense_value == lmc.dense_value


def test_imp_final_masks_and_weights_are_identical_with_and_without_the_callback(imp_run, tmp_path):
    # The heaviest callback settings: BatchNorm re-estimation and a train subset both iterate the training data.
    callback = LMCEvaluator(alphas=3, bn='recompute', bn_batches=2, train_subset_batches=2)
    with_lmc, final_with = _imp_run(tmp_path / 'with', callbacks=[callback])
    without, final_without = _imp_run(tmp_path / 'without')
    assert with_lmc.history[-1]['lmc/train/curve']['alphas'] == [0.0, 0.5, 1.0]
    assert set(with_lmc.masks) == set(without.masks)
    for name in without.masks:
        assert torch.equal(with_lmc.masks[name], without.masks[name]), name
    for name, tensor in final_without.items():
        assert torch.equal(final_with[name], tensor), name


def test_callback_without_imp_warns_and_does_nothing():
    trainer = make_trainer(build_model(), seed=1, callbacks=[LMCEvaluator()])
    with pytest.warns(UserWarning, match='no IMP algorithm'):
        trainer.fit(duration='2ba')
    trainer.close()


@pytest.mark.parametrize('kwargs, match', [
    ({'alphas': [0.2, 1.0]}, 'alphas'),
    ({'bn': 'reset'}, 'bn'),
    ({'threshold': -0.1}, 'threshold'),
    ({'bn_batches': 0}, 'bn_batches'),
])
def test_callback_rejects_bad_settings_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMCEvaluator(**kwargs)


class _LearningRates(Callback):

    def __init__(self):
        self.at_batch_start = []

    def batch_start(self, state, logger):
        self.at_batch_start.append((int(state.timestamp.batch), state.optimizers[0].param_groups[0]['lr']))


@pytest.fixture(scope='module')
def instability(imp_run):
    level_dir = os.path.join(imp_run['folder'], f'level_{LEVELS}')
    before = {name: os.path.getmtime(os.path.join(level_dir, name)) for name in os.listdir(level_dir)}
    ticket = load_ticket(level_dir)
    starts, rates = [], _LearningRates()

    def make_child(model, seed):
        starts.append({name: t.clone() for name, t in model.state_dict().items()})
        return make_trainer(model, seed, callbacks=[rates] if seed == 1 else [])

    result = instability_analysis(make_child, ticket, seeds=(1, 2), model=build_model(), alphas=5, level_dir=level_dir)
    return {'result': result, 'ticket': ticket, 'starts': starts, 'rates': rates, 'level_dir': level_dir,
            'files_before': before}


def test_instability_children_differ_share_the_rewind_point_and_keep_the_mask(instability):
    ticket, (child_a, child_b) = instability['ticket'], instability['result']['children']
    assert any(not torch.equal(child_a[name], child_b[name]) for name in child_a)
    start_a, start_b = instability['starts']
    for name, value in ticket['rewind_point'].items():
        mask = ticket['masks'].get(name)
        expected = value if mask is None else value * mask
        assert torch.equal(start_a[name], expected) and torch.equal(start_b[name], expected), name
    for name, mask in ticket['masks'].items():
        assert torch.all(child_a[name][~mask] == 0) and torch.all(child_b[name][~mask] == 0), name
        assert torch.any(child_a[name][mask] != start_a[name][mask]), name  # the alive weights trained


def test_instability_children_resume_the_schedule_at_the_rewind_step(instability):
    # Level 0 of the original run trains batch k with the cosine value at k - 1 (the scheduler steps after a batch).
    rates = instability['rates'].at_batch_start
    k, total = instability['ticket']['rewind_batch'], 20
    assert [batch for batch, _ in rates] == list(range(k, total))
    expected = [0.1 * (1 + torch.cos(torch.tensor(torch.pi * (b - 1) / total))).item() / 2 for b in range(k, total)]
    assert [lr for _, lr in rates] == pytest.approx(expected, rel=1e-6)


def test_instability_reports_frankle_barrier_and_writes_only_its_json_into_the_level_folder(instability):
    result, level_dir = instability['result'], instability['level_dir']
    assert result['stable'] == (result['barrier_max_minus_mean'] <= result['threshold'])
    assert result['alphas'] == [0.0, 0.25, 0.5, 0.75, 1.0] and result['level'] == LEVELS
    written = os.path.join(level_dir, 'instability_seeds_1_2.json')
    with open(written) as f:
        assert json.load(f) == {k: v for k, v in result.items() if k != 'children'}
    after = {name: os.path.getmtime(os.path.join(level_dir, name)) for name in os.listdir(level_dir)}
    assert set(after) - set(instability['files_before']) == {'instability_seeds_1_2.json'}
    assert all(after[name] == mtime for name, mtime in instability['files_before'].items())


def test_two_rank_ddp_run_reaches_the_same_verdict_on_both_ranks(tmp_path):
    launch('lmc_ddp_worker.py', str(tmp_path))  # composer -n 2, gloo on CPU
    ranks = []
    for rank in (0, 1):
        with open(tmp_path / f'rank{rank}.json') as f:
            ranks.append(json.load(f))
    assert ranks[0]['world_size'] == 2
    assert len(ranks[0]['levels']) == LEVELS + 1
    assert all('lmc/connected' in level and 'imp/matching' in level for level in ranks[0]['levels'][1:])
    assert ranks[0] == ranks[1]  # every number, hence every verdict

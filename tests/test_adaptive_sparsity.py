"""AdaptiveSparsityStep inside IMP runs on sklearn digits: step size follows flatness, back-off restores the parent
level exactly, compute accounting adds up, bad input fails before training, and ranks agree under DDP."""
from __future__ import annotations

import json
import os

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader, TensorDataset

from composer_imp import IMP, AdaptiveSparsityStep
from composer_imp.algorithms.adaptive_sparsity import compute_totals
from composer_imp.callbacks import LMCEvaluator
from composer_imp.evaluation import unwrap_model
from composer_imp.functional import masks_at_density, max_prune_fraction, search_fraction, snapshot
from helpers import digits_tensors, mlp

import test_ddp  # its launcher; imported as a module so pytest does not collect its test twice


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One torch thread: on a small shared CPU, two threads fighting over two cores make these runs several times
    slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader, DataLoader]:
    """1,100 training digits, 300 held-out training digits (validation), 397 test digits."""
    x, y = digits_tensors()
    train = TensorDataset(x[:1100], y[:1100])
    val, test = TensorDataset(x[1100:1400], y[1100:1400]), TensorDataset(x[1400:], y[1400:])
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True), DataLoader(val, batch_size=150),
            DataLoader(test, batch_size=397))


def run(folder, step: AdaptiveSparsityStep, model=None, target: float = 0.5, duration: str = '20ba', loggers=(),
        callbacks=(), train_dataloader='default') -> tuple[Trainer, IMP]:
    train, _, test = loaders()
    model = model or mlp()
    imp = IMP(target_density=target, folder=str(folder), sparsity_step=step)
    trainer = Trainer(model=model, train_dataloader=train if train_dataloader == 'default' else train_dataloader,
                      eval_dataloader=test, max_duration=duration,
                      optimizers=torch.optim.Adam(model.parameters(), lr=0.01), algorithms=[imp],
                      loggers=list(loggers), callbacks=list(callbacks), progress_bar=False, seed=7, device='cpu')
    trainer.fit()
    trainer.close()
    return trainer, imp


def levels_file(folder) -> list[dict]:
    with open(os.path.join(folder, 'levels.jsonl')) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- the projection check
def test_search_finds_the_largest_admissible_fraction_by_bisection_and_on_a_grid():
    delta = lambda p: max(0.0, p - 0.37)  # admissible up to 0.37 + tolerance
    bisection = search_fraction(delta, 0.2, 0.8, 0.01, resolution=0.01)
    assert 0.37 <= bisection['fraction'] <= 0.38 + 0.01 and bisection['admissible']
    assert [t['fraction'] for t in bisection['tried'][:2]] == [0.8, 0.2]  # p_max first: one pass when it is fine
    grid = search_fraction(delta, 0.2, 0.8, 0.01, candidates=[0.2, 0.3, 0.5, 0.8], resolution=0.01)
    assert 0.37 <= grid['fraction'] <= 0.39 and 0.8 not in [t['fraction'] for t in grid['tried']]
    assert search_fraction(lambda p: 0.0, 0.2, 0.8, 0.01)['tried'] == [{'fraction': 0.8, 'delta': 0.0}]
    nothing = search_fraction(lambda p: 1.0, 0.2, 0.8, 0.01)
    assert nothing['fraction'] == 0.2 and not nothing['admissible']


def test_functional_projection_check_leaves_the_model_bit_exact():
    model = mlp(hidden=16).module
    before = snapshot(model)
    x, y = digits_tensors()
    result = max_prune_fraction(model, None, [(x[:200], y[:200])], p_min=0.1, p_max=0.9, tolerance=0.05,
                                metric='loss')
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert 0.1 <= result['fraction'] <= 0.9 and result['samples'] == 200
    assert result['evaluations'] == 1 + len(result['tried'])


# ---------------------------------------------------------------------------------------------- flatness
def test_a_wider_flatter_network_gets_a_larger_step_than_a_narrow_one_on_the_same_data(tmp_path):
    chosen = {}
    for hidden in (256, 16):
        logger = InMemoryLogger()
        step = AdaptiveSparsityStep(p_min=0.05, p_max=0.65, projection_metric='loss', projection_tolerance=0.05,
                                    resolution=0.02, val_dataloader=loaders()[1])
        _, imp = run(tmp_path / str(hidden), step, model=mlp(hidden=hidden), loggers=[logger], target=0.3,
                     duration='100ba')
        first = imp.history[1]['step']
        assert first['reason'] in ('projection', 'projection_inadmissible')
        assert all({'fraction', 'delta', 'error', 'loss'} <= set(t) for t in first['projection']['tried'])
        chosen[hidden] = first['fraction']
        # every decision is in the level records and the logger
        assert [v for _, v in logger.data['adaptive/fraction']] == [r['step']['fraction'] for r in imp.history[1:]]
        assert all(r['verify']['outcome'] in ('passed', 'backoff', 'failed_at_p_min') for r in imp.history[1:])
        assert 'adaptive/verify/error' in logger.data and 'adaptive/verified' in logger.data
        assert levels_file(tmp_path / str(hidden))[1]['step']['fraction'] == first['fraction']
    assert chosen[256] > chosen[16] + 0.1, chosen


# ---------------------------------------------------------------------------------------------- back-off
class RecordingStep(AdaptiveSparsityStep):
    """Keeps the network state it is handed at every fraction() call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def fraction(self, state, imp, logger):
        self.calls.append({'level': imp.level, 'state': snapshot(unwrap_model(state))})
        return super().fraction(state, imp, logger)


@pytest.fixture(scope='module')
def backoff_run(tmp_path_factory):
    """Verification cannot pass: 'either' check with a barrier and a matching tolerance of 1e-9 and no noise margin,
    after a first step of half the weights of a tiny network."""
    folder = tmp_path_factory.mktemp('backoff') / 'imp'
    step = RecordingStep(p_min=0.2, p_max=0.9, projection_metric='loss', projection_tolerance=100.0,
                         backoff_on='either', matching_tolerance=1e-9, barrier_tolerance=1e-9, noise_z=0.0,
                         val_dataloader=loaders()[1])
    trainer, imp = run(folder, step, model=mlp(hidden=8), target=0.5)
    return {'trainer': trainer, 'imp': imp, 'step': step, 'folder': folder}


def test_failed_verification_backs_off_restores_the_parent_exactly_and_retries_smaller(backoff_run):
    imp, step, folder = backoff_run['imp'], backoff_run['step'], backoff_run['folder']
    history = imp.history
    rejected = history[1]
    assert rejected['level'] == 1 and not rejected['accepted'] and rejected['verify']['outcome'] == 'backoff'
    assert rejected['step']['fraction'] == pytest.approx(0.5)  # to the target in one step: p_max allowed it
    retry = history[2]
    assert retry['level'] == 1 and retry['step']['reason'] == 'backoff'
    assert retry['step']['fraction'] < rejected['step']['fraction']
    assert retry['density'] > rejected['density']

    # The call after the rejection sees level 0's trained network, bit for bit, as saved in level_0/trained.pt.
    parent = torch.load(folder / 'level_0' / 'trained.pt')
    after_rejection = step.calls[1]
    assert after_rejection['level'] == 1
    assert after_rejection['state'].keys() == parent.keys()
    assert all(torch.equal(after_rejection['state'][k], parent[k]) for k in parent)
    # ... and the retried level was pruned from level 0's mask and weights: its mask is exactly what magnitude
    # pruning of level_0/trained.pt under level_0/mask.pt gives at the retried fraction.
    parent_masks = torch.load(folder / 'level_0' / 'mask.pt')['masks']
    retried_masks = torch.load(folder / 'level_1' / 'mask.pt')['masks']
    accepted = next(r for r in history if r['level'] == 1 and r['accepted'])
    expected = masks_at_density({n: parent[n] for n in parent_masks}, 1.0 - accepted['step']['fraction'], parent_masks)
    assert all(torch.equal(retried_masks[n], expected[n]) for n in parent_masks)
    assert all(not (retried_masks[n] & ~parent_masks[n]).any() for n in parent_masks)
    # Only accepted levels are saved; the rejected attempt is in levels.jsonl with its verification.
    lines = levels_file(folder)
    assert [(l['level'], l['accepted']) for l in lines] == [(r['level'], r['accepted']) for r in history]


def test_a_failure_at_p_min_is_accepted_and_confirmed_with_a_plain_step(backoff_run):
    history = backoff_run['imp'].history
    retries = [r for r in history if r['level'] == 1]
    assert [r['step']['fraction'] for r in retries][-1] == pytest.approx(0.2)  # the last of max_backoffs=2 is p_min
    assert retries[-1]['accepted'] and retries[-1]['verify']['outcome'] in ('passed', 'failed_at_p_min')
    after = [r for r in history if r['level'] == 2]
    if retries[-1]['verify']['outcome'] == 'failed_at_p_min':
        assert after[0]['step']['reason'] in ('confirm_failure', 'matching_lost')
    assert history[-1]['density'] <= 0.5 and history[-1]['accepted']


def test_compute_accounting_totals_agree_with_the_trainer_counters(backoff_run):
    trainer, imp = backoff_run['trainer'], backoff_run['imp']
    totals = compute_totals(imp.history)
    assert totals['rejected'] >= 1 and totals['accepted'] + totals['rejected'] == len(imp.history)
    assert totals['steps'] == imp.run_time(trainer.state)['batch']
    assert totals['samples'] == imp.run_time(trainer.state)['sample']
    assert totals['flops'] > 0 and totals['check_samples'] > 0 and totals['check_flops'] > 0
    assert totals['seconds'] <= trainer.state.timestamp.total_wct.total_seconds() + 1e-6
    assert totals == compute_totals(levels_file(backoff_run['folder']))


def test_checkpointed_state_holds_only_plain_types_and_round_trips(backoff_run):
    state = backoff_run['step'].state_dict()

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    assert plain(state)
    assert state['dense_value'] is not None and state['decision'] == backoff_run['step'].decision
    fresh = AdaptiveSparsityStep()
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == state.keys()
    assert all(fresh.state_dict()[k] == v for k, v in state.items() if k != 'dense_correct')


# ---------------------------------------------------------------------------------------------- verification source
def test_without_validation_data_it_verifies_on_the_run_evaluator_and_says_so(tmp_path):
    step = AdaptiveSparsityStep(p_min=0.2, p_max=0.5)
    with pytest.warns(UserWarning, match='test split'):
        _, imp = run(tmp_path, step, callbacks=[LMCEvaluator(matching_tolerance=0.05)], target=0.6)
    pruned = imp.history[1:]
    assert pruned and all(r['steps'] == 20 for r in imp.history)
    assert all(r['verify']['on'] == 'eval:eval' and r['verify']['metric'] == 'error' for r in pruned)
    # One evaluation core: the step and the LMC evaluator measure the same error of the same network on that data.
    assert all(r['verify']['value'] == r['lmc/error'] for r in pruned)
    assert imp.history[1]['verify']['dense_value'] == imp.history[0]['lmc/error']


def test_verification_can_be_a_callable_measuring_the_network_itself(tmp_path):
    x, y = digits_tensors()
    calls = []

    def val_error(model):
        calls.append((model.training, torch.is_grad_enabled()))
        return float((model.module(x[1100:1400]).argmax(1) != y[1100:1400]).double().mean())

    step = AdaptiveSparsityStep(p_min=0.2, p_max=0.5, verify_metric=val_error, max_levels=2)
    _, imp = run(tmp_path, step, target=0.1)
    assert len(calls) == len(imp.history)  # the dense level, then one per trained level
    assert all(not training and not grad for training, grad in calls)  # eval mode, no gradients
    trained = mlp()
    for record in imp.history:
        if record['level'] > 0:
            assert record['verify']['on'] == 'callable' and record['verify']['metric'] == 'value'
        if record['accepted']:  # only accepted levels are saved
            trained.load_state_dict(torch.load(tmp_path / f'level_{record["level"]}' / 'trained.pt'))
            with torch.no_grad():
                measured = record['verify']['value'] if record['level'] else imp.history[1]['verify']['dense_value']
                assert measured == val_error(trained)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('kwargs, match', [
    ({'p_min': 0.5, 'p_max': 0.5}, 'p_min, p_max'),
    ({'p_min': 0.6, 'p_max': 0.4}, 'p_min, p_max'),
    ({'p_min': 0.0}, 'p_min'),
    ({'p_max': 1.0}, 'p_max'),
    ({'p_min': -0.1}, 'p_min'),
    ({'projection_tolerance': 0.0}, 'tolerance'),
    ({'projection_tolerance': -1.0}, 'tolerance'),
    ({'matching_tolerance': 0.0}, 'matching_tolerance'),
    ({'barrier_tolerance': -0.01}, 'barrier_tolerance'),
    ({'candidates': [0.1, 0.3]}, 'candidates'),
    ({'projection_metric': 'accuracy'}, 'projection_metric'),
    ({'backoff_on': 'loss'}, 'backoff_on'),
    ({'probe_samples': 0}, 'probe_samples'),
    ({'max_backoffs': 0}, 'max_backoffs'),
    ({'max_levels': 0}, 'max_levels'),
])
def test_bad_arguments_raise_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveSparsityStep(**kwargs)


def test_max_levels_bounds_the_run_before_the_target_density(tmp_path):
    _, val, _ = loaders()
    trainer, imp = run(tmp_path, AdaptiveSparsityStep(val_dataloader=val, max_levels=1), target=0.01)
    accepted = [r for r in imp.history if r['accepted']]
    assert [r['level'] for r in accepted] == [0, 1] and imp.density > 0.01
    assert imp.run_time(trainer.state)['batch'] == sum(r['steps'] for r in imp.history)


def test_imp_without_target_density_is_rejected():
    with pytest.raises(ValueError, match='target_density'):
        IMP(levels=3, sparsity_step=AdaptiveSparsityStep())


def _trainer(step, train_dataloader, callbacks=(), eval_dataloader='default'):
    model = mlp()
    imp = IMP(target_density=0.5, sparsity_step=step)
    eval_dataloader = loaders()[2] if eval_dataloader == 'default' else eval_dataloader
    return Trainer(model=model, train_dataloader=train_dataloader, eval_dataloader=eval_dataloader, max_duration='5ba',
                   optimizers=torch.optim.Adam(model.parameters()), algorithms=[imp], callbacks=list(callbacks),
                   progress_bar=False, device='cpu')


def test_no_train_subset_and_no_verification_data_raise_when_the_trainer_is_built():
    train, val, _ = loaders()
    with pytest.raises(ValueError, match='probe_dataloader'):
        _trainer(AdaptiveSparsityStep(val_dataloader=val), train_dataloader=None)  # would come with fit()
    with pytest.raises(ValueError, match='val_dataloader'):
        _trainer(AdaptiveSparsityStep(), train_dataloader=train, eval_dataloader=None)
    with pytest.raises(ValueError, match='verify_metric'):
        _trainer(AdaptiveSparsityStep(val_dataloader=val, verify_metric='BLEU'), train_dataloader=train)


# ---------------------------------------------------------------------------------------------- DDP
def without_seconds(decision):
    """A decision or verification record without its wall-clock seconds (the only per-rank quantity)."""
    if not isinstance(decision, dict):
        return decision
    return {k: without_seconds(v) for k, v in decision.items() if k != 'seconds'}


def test_two_rank_ddp_chooses_identical_fractions_on_both_ranks(tmp_path):
    test_ddp.launch('ddp_adaptive_script.py', str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt') for r in range(2))
    steps0, steps1 = ([without_seconds(r.get('step')) for r in rank['history']] for rank in (rank0, rank1))
    assert steps0 == steps1  # fractions, projection errors and losses, reasons: bit-identical
    fractions = [s['fraction'] for s in steps0[1:]]
    assert len(fractions) >= 2 and len(set(fractions)) >= 2, fractions
    verify0, verify1 = ([without_seconds(r['verify']) for r in rank['history'][1:]] for rank in (rank0, rank1))
    assert verify0 == verify1
    assert all(torch.equal(rank0['masks'][n], rank1['masks'][n]) for n in rank0['masks'])
    # the probe and the validation split are over both ranks: the step saw every sample once
    assert steps0[1]['projection']['samples'] == 512
    assert rank0['history'][1]['verify']['samples'] == 300


def test_a_killed_adaptive_run_resumes_to_the_same_decisions_masks_and_weights(tmp_path):
    from helpers import digits_loader
    from test_resume import FitStart, Kill

    def train(folder, kill=None):
        model = mlp()
        step = AdaptiveSparsityStep(val_dataloader=loaders()[1], matching_tolerance=0.01)
        trainer = Trainer(model=model, train_dataloader=digits_loader(n=1100), eval_dataloader=loaders()[2],
                          max_duration='20ba', optimizers=torch.optim.Adam(model.parameters(), lr=0.01),
                          algorithms=[IMP(target_density=0.2, rewind_to='2ba', folder=str(folder / 'imp'),
                                          sparsity_step=step)],
                          callbacks=[FitStart(), kill] if kill else [FitStart()], save_folder=str(folder / 'ckpt'),
                          save_interval='1ba',
                          run_name='adaptive', autoresume=True, progress_bar=False, seed=7, device='cpu')
        try:
            trainer.fit()
            imp = trainer.state.algorithms[0]
            decisions = [(r['level'], r['accepted'], r.get('step', {}).get('fraction')) for r in imp.history]
            return decisions, imp.masks, unwrap_model(trainer.state).state_dict()
        except KeyboardInterrupt:
            return None
        finally:
            trainer.close()

    reference = train(tmp_path / 'ref')
    assert len(reference[0]) >= 3
    assert train(tmp_path / 'run', Kill('batch_start', 1, 12)) is None  # mid-level 1 (it replays batches 2..20)
    resumed = train(tmp_path / 'run')
    assert FitStart.batch == 12  # it really resumed mid-level
    assert resumed[0] == reference[0]
    assert all(torch.equal(resumed[1][n], reference[1][n]) for n in reference[1])
    assert all(torch.equal(resumed[2][k], reference[2][k]) for k in reference[2])

"""Non-finite values (issue 10): a NaN loss or weight ends an IMP run with one clear error naming the level and the
level-local step; masks and barriers are never computed from NaN; finished levels' files stay; reports say
"undefined" instead of a number."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from composer import Callback, Trainer

from composer_imp import IMP, LMCEvaluator, NonFiniteError
from composer_imp.report.tables import level_rows, markdown_level_table
from helpers import digits_loader, mlp


class PlantNaN(Callback):
    """Writes NaN into one alive weight of the first layer at BATCH_END of a (level, level-local step)."""

    imp_rewind = False  # must not be replayed by IMP's level rewind

    def __init__(self, level: int, step: int):
        self.level, self.step, self.planted = level, step, False

    def batch_end(self, state, logger):
        imp = next(a for a in state.algorithms if type(a).__name__ == 'IMP')
        if (imp.level, int(state.timestamp.batch)) == (self.level, self.step):
            weight = state.model.module[0].weight
            with torch.no_grad():
                weight.view(-1)[int(weight.abs().argmax())] = float('nan')  # the largest weight: alive in any mask
            self.planted = True


def fit(tmp_path, lr=0.1, callbacks=()):
    model = mlp()
    trainer = Trainer(model=model, train_dataloader=digits_loader(), eval_dataloader=digits_loader('test'),
                      max_duration='6ba', optimizers=torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                      algorithms=[IMP(levels=2, rewind_to='2ba', folder=str(tmp_path / 'imp'))],
                      callbacks=list(callbacks), progress_bar=False, seed=7, device='cpu')
    try:
        trainer.fit()
    finally:
        trainer.close()


def assert_only_level_0_written(folder):
    records = [json.loads(line) for line in open(os.path.join(folder, 'levels.jsonl'))]
    assert [r['level'] for r in records] == [0]
    assert os.path.isfile(os.path.join(folder, 'rewind_point.pt'))
    assert not os.path.exists(os.path.join(folder, 'level_1'))
    mask = torch.load(os.path.join(folder, 'level_0', 'mask.pt'))
    trained = torch.load(os.path.join(folder, 'level_0', 'trained.pt'))
    assert mask['level'] == 0 and all(m.all() for m in mask['masks'].values()), 'level 0 is dense'
    assert all(torch.isfinite(t).all() for t in trained.values() if t.is_floating_point())


def test_a_nan_weight_mid_level_stops_the_run_at_the_next_loss_naming_level_1_and_its_step(tmp_path):
    plant = PlantNaN(level=1, step=4)  # level 1 replays steps 3..6; step 5's loss is the first NaN one
    with pytest.raises(NonFiniteError, match=r'the training loss is not finite .* at level 1, step 5 \(this level '
                                             r'trains steps 3\.\.6 .*Lower the learning rate') as error:
        fit(tmp_path, callbacks=[plant])
    assert plant.planted and isinstance(error.value, FloatingPointError)
    assert '\n' not in str(error.value)
    assert_only_level_0_written(str(tmp_path / 'imp'))


def test_a_nan_weight_at_the_last_step_stops_the_run_before_any_mask_or_barrier(tmp_path):
    """Planted after the last step's loss: the level-end check catches it before LMC's barrier (which read 0.0 and
    connected=True in the issue) and before the mask (which NaN would have ordered arbitrarily)."""
    with pytest.raises(NonFiniteError, match=r"weights or buffers hold NaN or inf \(\['module\.0\.weight'\]\) at "
                                             r'level 1, step 6'):
        fit(tmp_path, callbacks=[PlantNaN(level=1, step=6), LMCEvaluator(alphas=3)])
    assert_only_level_0_written(str(tmp_path / 'imp'))


def test_a_nan_weight_at_the_rewind_step_is_refused_before_it_becomes_the_rewind_point(tmp_path):
    with pytest.raises(NonFiniteError, match=r'at level 0, step 2 \(this level trains steps 1\.\.6'):
        fit(tmp_path, callbacks=[PlantNaN(level=0, step=2)])
    assert not os.path.exists(tmp_path / 'imp' / 'rewind_point.pt')


def test_a_diverging_learning_rate_stops_the_run_with_the_clear_error(tmp_path):
    with pytest.raises(NonFiniteError, match=r"the training loss is not finite \(\{'loss/train/total': (nan|inf)\}\) "
                                             r'at level 0, step \d.*Lower the learning rate'):
        fit(tmp_path, lr=1e8)
    assert not os.path.exists(tmp_path / 'imp' / 'level_0')


def test_the_lmc_evaluator_reports_connected_and_matching_as_undefined_for_a_nan_barrier(monkeypatch):
    import composer_imp.callbacks.lmc_evaluator.lmc_evaluator as module
    evaluator = LMCEvaluator(alphas=3)
    evaluator.dense_value = 0.1
    evaluator._imp = SimpleNamespace(previous_level_state={})
    model = torch.nn.Linear(1, 1)
    monkeypatch.setattr(module, 'unwrap_model', lambda state: model)
    monkeypatch.setattr(evaluator, '_resolved_values', lambda state: [SimpleNamespace(name='error')])
    nan = float('nan')
    for own, connected, matching in ((nan, None, None), (0.1, None, True)):
        curve = {'metric': 'error', 'alphas': [0.0, 0.5, 1.0], 'values': {'error': [nan, nan, own]},
                 'barrier_linear': {'error': nan}, 'barrier_max_minus_mean': {'error': nan}}
        monkeypatch.setattr(evaluator, '_barrier', lambda *args, curve=curve, **kw: curve)
        result = evaluator._level_end(None, None, {'level': 1})
        assert math.isnan(result['lmc/barrier'])
        assert result['lmc/connected'] is connected and result['imp/matching'] is matching


def test_the_report_shows_an_undefined_barrier_as_undefined_not_as_a_number_or_yes():
    records = [json.loads(json.dumps(r)) for r in (  # through JSON, as levels.jsonl: NaN -> NaN, None -> null
        {'level': 0, 'density': 1.0, 'eval': {'acc': 0.9}, 'lmc/error': 0.1},
        {'level': 1, 'density': 0.8, 'eval': {'acc': 0.9}, 'lmc/barrier': float('nan'), 'lmc/connected': None,
         'imp/matching': None},
        {'level': 2, 'density': 0.64, 'eval': {'acc': 0.9}, 'lmc/barrier': 0.0, 'lmc/connected': True,
         'imp/matching': True})]
    rows = level_rows(records)
    table = markdown_level_table(rows).splitlines()
    undefined_row, finite_row = table[3].split(' | '), table[4].split(' | ')
    assert undefined_row[4:7] == ['undefined', 'undefined', 'undefined'], undefined_row
    assert finite_row[4:7] == ['yes', '0.00 pp', 'yes'], finite_row

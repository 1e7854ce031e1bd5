"""IMP inside one Trainer.fit(): schedule, rewinding, masking, logging, files, stoppers and bad input."""
import json
import os

import pytest
import torch
from composer import Callback, Trainer
from composer.callbacks import ThresholdStopper
from composer.loggers import InMemoryLogger
from composer.optim import CosineAnnealingScheduler, LinearWithWarmupScheduler

from composer_imp import IMP, load_ticket
from helpers import digits_loader, mlp, small_cnn


class Recorder(Callback):
    """Records, per step of the whole run, the learning rate used and the weights the step starts from."""

    imp_rewind = False  # a record across levels, not state of the run that IMP replays

    def __init__(self):
        self.lr, self.start_weights, self.pruned_max, self.steps = {}, {}, [], 0

    def before_train_batch(self, state, logger):
        batch = self.steps
        self.lr[batch] = state.optimizers[0].param_groups[0]['lr']
        self.start_weights[batch] = {k: v.clone() for k, v in state.model.state_dict().items()}

    def batch_end(self, state, logger):
        self.steps += 1
        imp = next(a for a in state.algorithms if isinstance(a, IMP))
        params = dict(state.model.named_parameters())
        self.pruned_max.append(max(float(params[n][~m].abs().max()) if (~m).any() else 0.0
                                   for n, m in imp.masks.items()))


def run(tmp_path, imp=None, optimizer='sgd', duration='6ba', scheduler='cosine', model=None, callbacks=(), **trainer_kw):
    model = model or mlp()
    optimizers = {
        'sgd': lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        'adam': lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-4),
        'adamw': lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    }[optimizer](model.parameters())
    schedulers = {
        'cosine': [CosineAnnealingScheduler()],
        'warmup': [LinearWithWarmupScheduler(t_warmup='3ba')],
        'native': [torch.optim.lr_scheduler.StepLR(optimizers, step_size=2, gamma=0.5)],
        None: [],
    }[scheduler]
    imp = imp or IMP(levels=2, rewind_to='2ba', folder=str(tmp_path / 'imp'))
    recorder = Recorder()
    kw = dict(eval_dataloader=digits_loader('test'), progress_bar=False, seed=7, device='cpu')
    kw.update(trainer_kw)
    if scheduler == 'native':
        kw['step_schedulers_every_batch'] = True
    trainer = Trainer(model=model, train_dataloader=kw.pop('train_dataloader', digits_loader()), max_duration=duration,
                      optimizers=optimizers, schedulers=schedulers, algorithms=[imp],
                      callbacks=[recorder, *callbacks], **kw)
    trainer.fit()
    trainer.close()
    return trainer, imp, recorder


def test_levels_train_from_the_rewind_step_to_the_end_of_the_schedule(tmp_path):
    trainer, imp, rec = run(tmp_path)
    assert rec.steps == 6 + 4 + 4
    assert int(trainer.state.timestamp.batch) == 6, "the last level ends at the schedule's end, T"
    assert [r['steps'] for r in imp.history] == [6, 4, 4]
    assert imp.level == 2 and [r['level'] for r in imp.history] == [0, 1, 2]


@pytest.mark.parametrize('scheduler', ['cosine', 'warmup', 'native'])
def test_each_pruned_level_replays_the_learning_rate_schedule_from_the_rewind_step(tmp_path, scheduler):
    _, imp, rec = run(tmp_path, scheduler=scheduler, duration='8ba', imp=IMP(levels=2, rewind_to='3ba',
                                                                             folder=str(tmp_path / 'imp')))
    dense = [rec.lr[b] for b in range(8)]
    assert len(set(dense)) > 2, 'the schedule must actually change the LR for this test to mean anything'
    for start in (8, 13):
        assert [rec.lr[start + i] for i in range(5)] == dense[3:]


def test_each_level_starts_bit_exactly_at_mask_times_rewind_point(tmp_path):
    _, imp, rec = run(tmp_path, model=small_cnn(), train_dataloader=digits_loader(image=True),
                      eval_dataloader=digits_loader('test', image=True))
    point = torch.load(tmp_path / 'imp' / 'rewind_point.pt')['state_dict']
    assert all(torch.equal(rec.start_weights[2][k], v) for k, v in point.items())  # θ_k is the state after 2 steps
    for level, start in ((1, 6), (2, 10)):
        masks = torch.load(tmp_path / 'imp' / f'level_{level}' / 'mask.pt')['masks']
        for name, value in point.items():
            expected = value.masked_fill(~masks[name], 0) if name in masks else value
            assert torch.equal(rec.start_weights[start][name], expected), (level, name)
    assert any('running_mean' in k for k in point)  # BN statistics are part of the rewind point


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adamw'])
def test_pruned_weights_are_exactly_zero_after_every_optimizer_step(tmp_path, optimizer):
    _, imp, rec = run(tmp_path, optimizer=optimizer)
    assert rec.pruned_max[6:] == [0.0] * 8
    changed = [not torch.equal(rec.start_weights[b]['module.0.weight'], rec.start_weights[b + 1]['module.0.weight'])
               for b in range(6, 9)]
    assert all(changed), 'the alive weights must really train'


@pytest.mark.parametrize('scope', ['global', 'layerwise'])
def test_density_after_l_levels_is_geometric_and_masks_are_nested(tmp_path, scope):
    imp = IMP(levels=4, prune_fraction=0.3, scope=scope, folder=str(tmp_path / 'imp'))
    run(tmp_path, imp=imp, duration='3ba')
    numel = {n: m.numel() for n, m in imp.masks.items()}
    previous = None
    for level in range(5):
        masks = torch.load(tmp_path / 'imp' / f'level_{level}' / 'mask.pt')['masks']
        alive = sum(int(m.sum()) for m in masks.values())
        assert abs(alive - 0.7**level * sum(numel.values())) <= len(masks)
        if scope == 'layerwise':
            assert all(abs(int(m.sum()) - 0.7**level * numel[n]) <= 1 for n, m in masks.items())
        if previous is not None:
            assert all(not (masks[n] & ~previous[n]).any() for n in masks)
        previous = masks


def test_target_density_stops_after_the_first_level_at_or_below_it(tmp_path):
    imp = IMP(target_density=0.5, prune_fraction=0.2, folder=str(tmp_path / 'imp'))
    _, _, rec = run(tmp_path, imp=imp, duration='3ba')
    assert [round(r['density'], 2) for r in imp.history] == [1.0, 0.8, 0.64, 0.51, 0.41]
    assert rec.steps == 5 * 3


def test_level_metrics_files_and_logged_values(tmp_path):
    logger = InMemoryLogger()
    trainer, imp, _ = run(tmp_path, loggers=[logger], eval_interval='6ba')
    lines = [json.loads(l) for l in open(tmp_path / 'imp' / 'levels.jsonl')]
    assert [l['level'] for l in lines] == [0, 1, 2]
    for line in lines:
        assert {'density', 'layer_density', 'eval', 'steps', 'samples', 'seconds'} <= set(line)
        assert 'eval/MulticlassAccuracy' in line['eval']
    assert lines[1]['samples'] == 4 * 64
    for level in range(3):
        assert {'mask.pt', 'trained.pt'} <= set(os.listdir(tmp_path / 'imp' / f'level_{level}'))
    # InMemoryLogger keeps the run's timestamp, which replays per level: every level ends at T = 6
    assert [int(step.batch) for step, _ in logger.data['imp/density']] == [6, 6, 6]
    assert [(r['start_batch'], r['end_batch']) for r in lines] == [(0, 6), (6, 10), (10, 14)]
    assert [v for _, v in logger.data['imp/level']] == [0, 1, 2]
    assert any(k.startswith('imp/density/module.') for k in logger.data)
    # the level's evaluation saw the trained network, not the rewound one: it matches the saved trained weights
    trained = torch.load(tmp_path / 'imp' / 'level_2' / 'trained.pt')
    assert all(torch.equal(trained[k], v) for k, v in trainer.state.model.state_dict().items())


def test_evaluation_that_ends_a_level_sees_the_trained_network(tmp_path):
    logger = InMemoryLogger()
    _, imp, _ = run(tmp_path, loggers=[logger], eval_interval='2ba', duration='6ba')
    at_level_ends = [v for t, v in logger.data['metrics/eval/MulticlassAccuracy'] if int(t.batch) == 6]
    assert len(at_level_ends) == len(imp.history) == 3
    for record, value in zip(imp.history, at_level_ends):
        assert record['eval']['eval/MulticlassAccuracy'] == pytest.approx(value)


def test_ticket_round_trips_through_load_ticket(tmp_path):
    _, imp, _ = run(tmp_path)
    ticket = imp.ticket()
    model = mlp(seed=123)
    loaded = load_ticket(str(tmp_path / 'imp' / 'level_2'), model)
    assert loaded['level'] == 2 and loaded['rewind_batch'] == 2
    assert all(torch.equal(loaded['masks'][n], ticket['masks'][n]) for n in ticket['masks'])
    state = model.state_dict()
    for name, value in ticket['rewind_point'].items():
        expected = value.masked_fill(~ticket['masks'][name], 0) if name in ticket['masks'] else value
        assert torch.equal(state[name], expected)
    with pytest.raises(ValueError, match='does not fit the model'):
        load_ticket(str(tmp_path / 'imp' / 'level_2'), mlp(hidden=16))
    with pytest.raises(ValueError, match='does not exist'):
        load_ticket(str(tmp_path / 'imp' / 'level_9'), model)


def test_threshold_stopper_ends_a_level_early_and_the_remaining_levels_still_run(tmp_path):
    stopper = ThresholdStopper('MulticlassAccuracy', 'eval', threshold=0.0)
    imp = IMP(levels=2, rewind_to='0ba', folder=str(tmp_path / 'imp'))
    _, imp, rec = run(tmp_path, imp=imp, duration='6ba', callbacks=[stopper], eval_interval='1ba')
    assert [r['level'] for r in imp.history] == [0, 1, 2]
    assert all(r['stopped_early'] for r in imp.history)
    assert [r['steps'] for r in imp.history] == [1, 1, 1]
    assert rec.steps == 3


def test_a_stop_before_the_rewind_step_is_ignored_so_the_rewind_point_exists(tmp_path):
    stopper = ThresholdStopper('MulticlassAccuracy', 'eval', threshold=0.0)
    with pytest.warns(UserWarning, match='came before the rewind step'):
        _, imp, _ = run(tmp_path, duration='6ba', callbacks=[stopper], eval_interval='1ba')
    assert [r['steps'] for r in imp.history] == [2, 1, 1]


def test_rewind_optimizer_restores_the_optimizer_state_of_the_rewind_step(tmp_path):
    class Momentum(Callback):
        imp_rewind = False

        def __init__(self):
            self.buffers, self.steps = {}, 0

        def before_train_batch(self, state, logger):
            opt = state.optimizers[0]
            p = opt.param_groups[0]['params'][0]
            self.buffers[self.steps] = opt.state[p]['momentum_buffer'].clone() if p in opt.state else None

        def batch_end(self, state, logger):
            self.steps += 1

    probe = Momentum()
    imp = IMP(levels=1, rewind_to='2ba', rewind_optimizer=True, folder=str(tmp_path / 'imp'))
    _, imp, _ = run(tmp_path, imp=imp, callbacks=[probe])
    mask = imp.masks['module.0.weight']
    assert torch.equal(probe.buffers[6], probe.buffers[2].masked_fill(~mask, 0))
    probe2 = Momentum()
    run(tmp_path, imp=IMP(levels=1, rewind_to='2ba', folder=str(tmp_path / 'imp2')), callbacks=[probe2])
    assert probe2.buffers[6] is None  # default: fresh optimizer state per level, as open_lth


def test_checkpointed_state_holds_only_plain_types(tmp_path):
    _, imp, _ = run(tmp_path, imp=IMP(levels=1, rewind_to='2ba', rewind_optimizer=True, folder=str(tmp_path / 'i')))

    def check(obj, path='imp'):
        if isinstance(obj, dict):
            for k, v in obj.items():
                assert isinstance(k, (str, int)), path
                check(v, f'{path}.{k}')
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                check(v, f'{path}[{i}]')
        else:
            assert obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool)), (path, type(obj))

    check(imp.state_dict())


@pytest.mark.parametrize('kwargs, message', [
    (dict(levels=2, prune_fraction=1.0), 'prune_fraction: 1.0 is not allowed'),
    (dict(levels=2, prune_fraction=0.0), 'prune_fraction: 0.0 is not allowed'),
    (dict(levels=2, target_density=0.1), 'give exactly one of them'),
    (dict(), 'give exactly one of them'),
    (dict(levels=-1), 'levels: -1 is not allowed'),
    (dict(target_density=1.5), 'target_density: 1.5 is not allowed'),
    (dict(levels=2, scope='row'), "scope: 'row' is not allowed"),
    (dict(levels=2, rewind_to='5xx'), 'rewind_to'),
])
def test_bad_arguments_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IMP(**kwargs)


@pytest.mark.parametrize('imp_kwargs, message', [
    (dict(levels=2, rewind_to='6ba'), 'rewind_to: 6ba .* must come before the end of the level'),
    (dict(levels=2, rewind_to='1ep'), 'rewind_to: 1ep .* must come before the end of the level'),
    (dict(levels=2, ignore=['nothing.*']), "ignore: pattern 'nothing.\\*' matches no prunable weight"),
])
def test_bad_input_raises_before_any_training_step(tmp_path, imp_kwargs, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        Trainer(model=model, train_dataloader=digits_loader(n=384), max_duration='6ba',
                optimizers=torch.optim.SGD(model.parameters(), lr=0.1), algorithms=[IMP(**imp_kwargs)],
                progress_bar=False, device='cpu')


def test_model_without_prunable_weights_raises_before_training():
    from composer.models import ComposerClassifier
    model = ComposerClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(64)), num_classes=64)
    with pytest.raises(ValueError, match='model: no prunable weights'):
        Trainer(model=model, train_dataloader=digits_loader(), max_duration='6ba', algorithms=[IMP(levels=1)],
                progress_bar=False, device='cpu')


def test_existing_imp_folder_is_not_overwritten(tmp_path):
    run(tmp_path)
    before = open(tmp_path / 'imp' / 'levels.jsonl').read()
    with pytest.raises(ValueError, match='already holds an IMP run'):
        run(tmp_path)
    assert open(tmp_path / 'imp' / 'levels.jsonl').read() == before


def test_training_flops_scale_with_the_layer_densities(tmp_path):
    _, imp, _ = run(tmp_path)
    dense, per_layer = imp.dense_macs['dense'], imp.dense_macs['weights']
    assert set(per_layer) == set(imp.masks) and dense >= sum(per_layer.values()) > 0
    level0, level2 = imp.history[0], imp.history[2]
    assert level0['flops'] == pytest.approx(6 * level0['samples'] * dense)
    expected = 6 * level2['samples'] * (dense - sum(m * (1 - level2['layer_density'][n]) for n, m in per_layer.items()))
    assert level2['flops'] == pytest.approx(expected)
    assert level2['flops'] / level2['samples'] < level0['flops'] / level0['samples']

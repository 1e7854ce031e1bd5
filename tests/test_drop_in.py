"""IMP beside every other Composer component: each pruned level replays steps k..T of level 0, or IMP refuses.

One harness runs IMP (2 pruned levels) with a component and checks the invariants of a faithful replay: the step
count T + L(T - k), exact zeros after every step, nested masks, each level starting bit-exactly at mask * theta_k, and
everything a time-reading or stateful component does at local step b of level L equal to what it did at b in level 0
(learning rate, elapsed duration, the batch's data and shape, which parameters train).
"""
from __future__ import annotations

import hashlib
import os
import warnings

import pytest
import torch
from composer import Callback, Trainer, algorithms
from composer.callbacks import EarlyStopper, LRMonitor, ThresholdStopper
from composer.loggers import LoggerDestination
from composer.models import ComposerClassifier
from composer.optim import CosineAnnealingScheduler
from torch import nn
from torch.utils.data import DataLoader

from composer_imp import IMP
from composer_imp.functional.flops import first_tensor
from helpers import digits_loader, digits_tensors

T_EPOCHS, BATCHES_PER_EPOCH, LEVELS = 3, 4, 2


def replay_cnn(seed: int = 0, dropout: bool = False) -> ComposerClassifier:
    """Strided convs, a max-pool, BatchNorm and enough channels for the surgery algorithms to act on."""
    torch.manual_seed(seed)
    layers = [
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
    ]
    if dropout:
        layers.append(nn.Dropout(0.2))
    layers.append(nn.Linear(32, 10))
    return ComposerClassifier(nn.Sequential(*layers), num_classes=10)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def find_imp(state) -> IMP:
    return next(a for a in state.algorithms if isinstance(a, IMP))


class Observer(Callback):
    """What the run looked like at each (level, level-local step), and the invariants after every step."""

    imp_rewind = False  # a record across levels: IMP must not rewind it with the run

    def __init__(self):
        self.steps, self.rows, self.level_starts, self.max_pruned, self.max_pruned_grad = 0, {}, {}, 0.0, 0.0
        self.level_start_components = {}

    def before_train_batch(self, state, logger):
        imp = find_imp(state)
        key = (imp.level, int(state.timestamp.batch))
        if key in self.rows:
            return  # SAM runs the closure twice
        inputs = first_tensor(state.batch)
        self.rows[key] = {
            'lr': [g['lr'] for g in state.optimizers[0].param_groups],
            'elapsed': float(state.get_elapsed_duration()),
            'epoch': int(state.timestamp.epoch),
            'batch_in_epoch': int(state.timestamp.batch_in_epoch),
            'shape': tuple(inputs.shape),
            'data': digest(inputs),
            'trainable': [n for n, p in state.model.named_parameters() if p.requires_grad],
        }
    def batch_start(self, state, logger):
        level = find_imp(state).level
        if level not in self.level_starts:  # after EMA swapped its training weights back in
            self.level_starts[level] = {k: v.clone() for k, v in state.model.state_dict().items()}

    def after_backward(self, state, logger):
        # Before any AFTER_* consumer (gradient clipping, SAM) and before IMP's own AFTER_TRAIN_BATCH work, if any.
        params = dict(state.model.named_parameters())
        for name, mask in find_imp(state).masks.items():
            grad = params[name].grad
            if grad is not None and (~mask).any():
                self.max_pruned_grad = max(self.max_pruned_grad, float(grad[~mask].abs().max()))

    def batch_end(self, state, logger):
        self.steps += 1
        params = dict(state.model.named_parameters())
        for name, mask in find_imp(state).masks.items():
            if (~mask).any():
                self.max_pruned = max(self.max_pruned, float(params[name].detach()[~mask].abs().max()))


def image_loader(n=BATCHES_PER_EPOCH * 32, batch_size=32, split='train', **kw):
    return digits_loader(split, batch_size=batch_size, n=n if split == 'train' else 64, image=True, **kw)


def run_imp(tmp_path, components=(), imp_first=True, duration=f'{T_EPOCHS}ep', rewind_to='6ba', model=None,
            callbacks=(), schedulers=None, optimizer=None, train_dataloader=None, levels=LEVELS, **trainer_kw):
    model = model or replay_cnn()
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    imp = IMP(levels=levels, prune_fraction=0.5, rewind_to=rewind_to, folder=str(tmp_path / 'imp'))
    observer = Observer()
    trainer_kw.setdefault('eval_dataloader', image_loader(split='test'))
    trainer_kw.setdefault('eval_interval', duration)  # once per level, at its end
    trainer = Trainer(
        model=model, train_dataloader=train_dataloader or image_loader(), max_duration=duration, optimizers=optimizer,
        schedulers=[CosineAnnealingScheduler()] if schedulers is None else schedulers,
        algorithms=[imp, *components] if imp_first else [*components, imp], callbacks=[observer, *callbacks],
        progress_bar=False, seed=3, device='cpu', **trainer_kw)
    trainer.fit()
    trainer.close()
    return trainer, imp, observer


def assert_faithful_replay(tmp_path, imp, observer, schedule_batches, rewind_batch, levels=LEVELS,
                           same_data=True, skip_buffers=False):
    assert observer.steps == schedule_batches + levels * (schedule_batches - rewind_batch)
    assert [r['steps'] for r in imp.history] == [schedule_batches] + [schedule_batches - rewind_batch] * levels
    assert observer.max_pruned == 0.0, 'a pruned weight moved'
    assert observer.max_pruned_grad == 0.0, 'a pruned weight had a gradient before the AFTER_* events'
    point = torch.load(tmp_path / 'imp' / 'rewind_point.pt')['state_dict']
    previous = None
    for level in range(levels + 1):
        masks = torch.load(tmp_path / 'imp' / f'level_{level}' / 'mask.pt')['masks']
        if previous is not None:
            assert all(not (masks[n] & ~previous[n]).any() for n in masks), 'masks must be nested'
            start = observer.level_starts[level]
            for name, value in point.items():
                if skip_buffers and name not in dict(imp_parameters(tmp_path, level)):
                    continue
                expected = value.masked_fill(~masks[name], 0) if name in masks else value
                assert torch.equal(start[name], expected), (level, name)
        previous = masks
    for level in range(1, levels + 1):
        for batch in range(rewind_batch, schedule_batches):
            dense, replay = dict(observer.rows[(0, batch)]), dict(observer.rows[(level, batch)])
            if not same_data:
                dense.pop('data'), replay.pop('data')
            assert replay == dense, (level, batch)


def imp_parameters(tmp_path, level):
    trained = torch.load(tmp_path / 'imp' / f'level_{level}' / 'trained.pt')
    return {n: v for n, v in trained.items() if v.is_floating_point() and 'running_' not in n}


def pruned_entries_are_zero(tensors: dict, masks: dict) -> bool:
    return all(float(tensors[n][~m].abs().max()) == 0.0 for n, m in masks.items() if (~m).any() and n in tensors)


# ------------------------------------------------------------------------------------------------ the matrix
def tiny_bottleneck_resnet(seed: int = 0) -> ComposerClassifier:
    """torchvision's Bottleneck blocks (what StochasticDepth replaces), one per stage, on 1-channel 8x8 digits."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(seed)
    net = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=8)
    net.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    return ComposerClassifier(net, num_classes=10)


def _algorithm_cases():
    """Every algorithm in composer.algorithms that runs on an image classifier on CPU, built small:
    name -> (algorithm factory, model factory)."""
    cnn = replay_cnn
    return {
        'BlurPool': (lambda: algorithms.BlurPool(min_channels=1), cnn),
        'ChannelsLast': (lambda: algorithms.ChannelsLast(), cnn),
        'ColOut': (lambda: algorithms.ColOut(p_row=0.25, p_col=0.25), cnn),
        'CutMix': (lambda: algorithms.CutMix(alpha=1.0), cnn),
        'CutOut': (lambda: algorithms.CutOut(length=0.25), cnn),
        'EMA': (lambda: algorithms.EMA(half_life='2ba'), cnn),
        'Factorize': (lambda: algorithms.Factorize(min_channels=8, latent_channels=4, min_features=16,
                                                   latent_features=8), cnn),
        'GhostBatchNorm': (lambda: algorithms.GhostBatchNorm(ghost_batch_size=8), cnn),
        'GradientClipping': (lambda: algorithms.GradientClipping(clipping_type='norm', clipping_threshold=0.5), cnn),
        'GyroDropout': (lambda: algorithms.GyroDropout(p=0.5, sigma=4, tau=2), lambda: replay_cnn(dropout=True)),
        'LabelSmoothing': (lambda: algorithms.LabelSmoothing(smoothing=0.1), cnn),
        'LayerFreezing': (lambda: algorithms.LayerFreezing(freeze_start=0.3, freeze_level=0.8), cnn),
        # fp32 on CPU: Composer leaves the model alone and says so; IMP must still run every level.
        'LowPrecisionGroupNorm': (lambda: algorithms.LowPrecisionGroupNorm(), cnn),
        'LowPrecisionLayerNorm': (lambda: algorithms.LowPrecisionLayerNorm(), cnn),
        'MixUp': (lambda: algorithms.MixUp(alpha=0.5), cnn),
        'ProgressiveResizing': (lambda: algorithms.ProgressiveResizing(initial_scale=0.5, finetune_fraction=0.2,
                                                                       size_increment=2), cnn),
        'SAM': (lambda: algorithms.SAM(rho=0.05), cnn),
        'SelectiveBackprop': (lambda: algorithms.SelectiveBackprop(start=0.3, end=0.9, keep=0.5, interrupt=2), cnn),
        'SqueezeExcite': (lambda: algorithms.SqueezeExcite(min_channels=8, latent_channels=4), cnn),
        'StochasticDepth': (lambda: algorithms.StochasticDepth(target_layer_name='ResNetBottleneck', drop_rate=0.2,
                                                               drop_warmup='0.5dur'), tiny_bottleneck_resnet),
        'SWA': (lambda: algorithms.SWA(swa_start='0.5dur', swa_end='0.9dur', schedule_swa_lr=False), cnn),
        'WeightStandardization': (lambda: algorithms.WeightStandardization(), cnn),
    }


ALGORITHMS = _algorithm_cases()
# Random augmentations and stochastic layers draw from the global RNG, which the replay leaves running: the inputs
# (or dropped blocks) differ between levels; the samples and everything a component schedules do not.
RANDOM_INPUTS = {'ColOut', 'CutMix', 'CutOut', 'MixUp', 'SelectiveBackprop'}


@pytest.mark.parametrize('imp_first', [True, False], ids=['imp-first', 'imp-last'])
@pytest.mark.parametrize('name', sorted(ALGORITHMS))
def test_every_pruned_level_replays_level_zero_beside_a_composer_algorithm(tmp_path, name, imp_first):
    make_algorithm, make_model = ALGORITHMS[name]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # "no layers replaced" and similar notices of the algorithms themselves
        _, imp, observer = run_imp(tmp_path, [make_algorithm()], imp_first=imp_first, model=make_model())
    T = T_EPOCHS * BATCHES_PER_EPOCH
    # SelectiveBackprop scores the batch with a train-mode forward before BATCH_START, which moves BN statistics.
    assert_faithful_replay(tmp_path, imp, observer, T, 6, same_data=name not in RANDOM_INPUTS,
                           skip_buffers=name == 'SelectiveBackprop')
    trained = torch.load(tmp_path / 'imp' / f'level_{LEVELS}' / 'trained.pt')
    assert pruned_entries_are_zero(trained, imp.masks)


def test_the_matrix_covers_every_composer_algorithm():
    """A new Composer algorithm must be added to the matrix or to one of the tests that cover it elsewhere."""
    covered_elsewhere = {
        'Alibi', 'GatedLinearUnits', 'SeqLengthWarmup',  # language models: test_hugging_face_models_replay...
        'AugMix', 'RandAugment',  # dataset transforms on PIL images: test_dataset_augmentations_replay...
        'NoOpModel',  # refused: test_no_op_model_is_refused_at_construction
    }
    from composer.core import Algorithm

    names = {n for n in algorithms.__all__ if isinstance(getattr(algorithms, n), type) and
             issubclass(getattr(algorithms, n), Algorithm)}
    assert names == set(ALGORITHMS) | covered_elsewhere


def test_levels_ending_mid_epoch_restart_the_dataloader_at_the_rewind_step(tmp_path):
    """T = 10 batches on a 4-batch loader: each level ends mid-epoch; the pass restarts at the rewind step's position,
    so the replayed level sees level 0's batches and its epoch ends where level 0's did."""
    _, imp, observer = run_imp(tmp_path, [algorithms.EMA(half_life='2ba'), algorithms.LayerFreezing(freeze_start=0.2)],
                               duration='10ba', rewind_to='3ba')
    assert_faithful_replay(tmp_path, imp, observer, 10, 3)


@pytest.mark.parametrize('rewind_to', ['4ba', '6ba'], ids=['k-on-epoch', 'k-mid-epoch'])
@pytest.mark.parametrize('every_batch', [False, True], ids=['per-epoch', 'per-batch'])
def test_native_pytorch_schedulers_replay_from_the_rewind_step(tmp_path, rewind_to, every_batch):
    model = replay_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1 if not every_batch else 3, gamma=0.5)
    _, imp, observer = run_imp(tmp_path, model=model, optimizer=optimizer, schedulers=[scheduler],
                               rewind_to=rewind_to, step_schedulers_every_batch=every_batch)
    dense_lrs = {observer.rows[(0, b)]['lr'][0] for b in range(12)}
    assert len(dense_lrs) >= 3, 'the schedule must change the LR for this test to mean anything'
    assert_faithful_replay(tmp_path, imp, observer, 12, int(rewind_to[0]))


# ------------------------------------------------------------------------------------------------ stateful callbacks
class StopperState(Callback):
    """The early stopper's best value and when it occurred, at the first batch of each level and at step k."""

    imp_rewind = False

    def __init__(self, stopper, rewind_batch):
        self.stopper, self.rewind_batch, self.seen = stopper, rewind_batch, {}

    def _record(self, state):
        level, batch = find_imp(state).level, int(state.timestamp.batch)
        if batch == self.rewind_batch:
            best = None if self.stopper.best is None else float(self.stopper.best)
            occurred = None if self.stopper.best_occurred is None else int(self.stopper.best_occurred.batch)
            self.seen.setdefault(level, (best, occurred))

    def eval_after_all(self, state, logger):  # level 0: after the stopper saw step k's evaluation
        if find_imp(state).level == 0:
            self._record(state)

    def batch_start(self, state, logger):  # pruned levels: their first batch
        self._record(state)


def test_early_stopper_replays_per_level_from_its_state_at_the_rewind_step(tmp_path):
    stopper = EarlyStopper(monitor='MulticlassAccuracy', dataloader_label='eval', patience='4ba')
    recorder = StopperState(stopper, rewind_batch=6)
    _, imp, _ = run_imp(tmp_path, callbacks=[stopper, recorder], eval_interval='1ba')
    assert imp.level == LEVELS, 'a stopper ends a level, never the run'
    assert set(recorder.seen) == {0, 1, 2}
    assert recorder.seen[1] == recorder.seen[2] == recorder.seen[0], recorder.seen


def test_threshold_stopper_that_never_fires_leaves_every_level_whole(tmp_path):
    stopper = ThresholdStopper(monitor='MulticlassAccuracy', dataloader_label='eval', threshold=2.0,
                               comp=torch.greater_equal)
    _, imp, _ = run_imp(tmp_path, callbacks=[stopper], eval_interval='1ba')
    assert [r['steps'] for r in imp.history] == [12, 6, 6]


def test_threshold_stopper_ends_each_level_where_its_own_metric_crosses(tmp_path):
    stopper = ThresholdStopper(monitor='MulticlassAccuracy', dataloader_label='eval', threshold=0.0,
                               comp=torch.greater_equal)  # fires at the first evaluation after the rewind step
    _, imp, _ = run_imp(tmp_path, callbacks=[stopper], eval_interval='1ba')
    assert [r['steps'] for r in imp.history] == [6, 1, 1]
    assert [r['stopped_early'] for r in imp.history] == [True, True, True]


class ThirdPartyCounter(Callback):
    """A callback IMP has never seen: counts steps, keeps a best value, reads elapsed time."""

    seen = []  # the test's window on it: a class attribute, outside the instance state that IMP rewinds

    def __init__(self):
        self.count, self.best = 0, float('inf')

    def batch_end(self, state, logger):
        self.count += 1
        self.best = min(self.best, float(state.loss))
        ThirdPartyCounter.seen.append((find_imp(state).level, self.count, float(state.get_elapsed_duration())))


def test_an_unknown_callback_is_rewound_with_the_run(tmp_path):
    ThirdPartyCounter.seen = []
    run_imp(tmp_path, callbacks=[ThirdPartyCounter()])
    by_level = {}
    for level, count, elapsed in ThirdPartyCounter.seen:
        by_level.setdefault(level, []).append((count, elapsed))
    assert [c for c, _ in by_level[0]] == list(range(1, 13))
    for level in (1, 2):
        assert by_level[level] == by_level[0][6:], level  # the same counts and elapsed fractions as steps 7..12


class StepRecorder(LoggerDestination):

    def __init__(self):
        self.steps = []

    def log_metrics(self, metrics, step=None):
        self.steps.append(step)


def test_logger_steps_stay_monotonic_and_checkpoint_names_unique(tmp_path):
    recorder = StepRecorder()
    _, imp, _ = run_imp(tmp_path, callbacks=[LRMonitor()], loggers=[recorder], save_folder=str(tmp_path / 'ckpt'),
                        save_interval='1ep', save_num_checkpoints_to_keep=-1)
    assert recorder.steps == sorted(recorder.steps) and max(recorder.steps) == 24
    names = sorted(f for f in os.listdir(tmp_path / 'ckpt') if f.endswith('.pt') and not f.startswith('latest'))
    # Level 0 saves at ep1 and ep2; at ep3 IMP's transition runs first, so the saver sees the replayed time (6ba,
    # inside ep1: no interval crossed). Each pruned level replays from 6ba and saves its ep2; the last level its end.
    assert names == sorted(['ep1-ba4-rank0.pt', 'ep2-ba8-rank0.pt', 'level1-ep2-ba8-rank0.pt',
                            'level2-ep2-ba8-rank0.pt', 'level2-ep3-ba12-rank0.pt'])


# ------------------------------------------------------------------------------------------------ weight averaging
@pytest.mark.parametrize('imp_first', [True, False], ids=['imp-first', 'imp-last'])
def test_ema_average_is_pruned_and_rewound_also_when_checkpoints_swap_it_in(tmp_path, imp_first):
    ema = algorithms.EMA(half_life='2ba')
    _, imp, observer = run_imp(tmp_path, [ema], imp_first=imp_first, save_folder=str(tmp_path / 'ckpt'),
                               save_interval='1ba')
    assert_faithful_replay(tmp_path, imp, observer, 12, 6)
    assert pruned_entries_are_zero(ema.ema_model.named_parameters_dict, imp.masks)


def test_swa_average_is_sparse_in_every_pruned_level(tmp_path):
    swa = algorithms.SWA(swa_start='0.5dur', swa_end='0.9dur', schedule_swa_lr=False)
    trainer, imp, observer = run_imp(tmp_path, [swa])
    assert_faithful_replay(tmp_path, imp, observer, 12, 6)
    for level in range(1, LEVELS + 1):
        trained = torch.load(tmp_path / 'imp' / f'level_{level}' / 'trained.pt')
        masks = torch.load(tmp_path / 'imp' / f'level_{level}' / 'mask.pt')['masks']
        assert pruned_entries_are_zero(trained, masks), level
    assert pruned_entries_are_zero(dict(trainer.state.model.named_parameters()), imp.masks)


# ------------------------------------------------------------------------------------------------ optimizers, layouts
def test_sam_base_optimizer_state_is_cleared_at_every_rewind(tmp_path):
    class BaseState(Callback):
        sizes = {}
        imp_rewind = False

        def before_train_batch(self, state, logger):
            key = (find_imp(state).level, int(state.timestamp.batch))
            BaseState.sizes.setdefault(key, len(state.optimizers[0].base_optimizer.state))

    run_imp(tmp_path, [algorithms.SAM(rho=0.05)], callbacks=[BaseState()])
    assert BaseState.sizes[(0, 0)] == 0 and BaseState.sizes[(0, 6)] > 0
    assert BaseState.sizes[(1, 6)] == 0 and BaseState.sizes[(2, 6)] == 0


@pytest.mark.parametrize('imp_first', [True, False], ids=['imp-first', 'imp-last'])
def test_weight_standardization_convs_are_pruned_through_their_parametrization(tmp_path, imp_first):
    _, imp, _ = run_imp(tmp_path, [algorithms.WeightStandardization()], imp_first=imp_first)
    assert any(n.endswith('parametrizations.weight.original') for n in imp.masks)
    assert imp.density < 0.3


# ------------------------------------------------------------------------------------------------ refusals
def test_partial_fit_duration_is_refused(tmp_path):
    model = replay_cnn()
    trainer = Trainer(model=model, train_dataloader=image_loader(), max_duration='12ba',
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      algorithms=[IMP(levels=1, rewind_to='2ba', folder=str(tmp_path / 'imp'))], progress_bar=False,
                      device='cpu')
    with pytest.raises(ValueError, match=r'fit\(duration=\.\.\.\): IMP runs every level inside one fit\(\)'):
        trainer.fit(duration='5ba')
    assert int(trainer.state.timestamp.batch) == 0


def test_rewind_in_epochs_on_a_loader_without_length_is_refused(tmp_path):

    class Endless(torch.utils.data.IterableDataset):

        def __iter__(self):
            x, y = digits_tensors()
            for start in range(0, 1024, 32):
                yield x[start:start + 32].view(-1, 1, 8, 8), y[start:start + 32]

    model = replay_cnn()
    with pytest.raises(ValueError, match=r"rewind_to: 1ep is in epochs, but the train dataloader has no length"):
        Trainer(model=model, train_dataloader=DataLoader(Endless(), batch_size=None), max_duration='12ba',
                optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                algorithms=[IMP(levels=1, rewind_to='1ep', folder=str(tmp_path / 'imp'))], device='cpu')


def test_no_op_model_is_refused_at_construction(tmp_path):
    model = replay_cnn()
    with pytest.raises(ValueError, match='model: no prunable weights'):
        Trainer(model=model, train_dataloader=image_loader(), max_duration='12ba',
                optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                algorithms=[IMP(levels=1, rewind_to='2ba', folder=str(tmp_path / 'imp')), algorithms.NoOpModel()],
                device='cpu')


def test_a_component_whose_state_cannot_be_rewound_is_refused_at_construction(tmp_path):
    import threading

    class HoldsALock(Callback):

        def __init__(self):
            self.lock = threading.Lock()

    model = replay_cnn()
    with pytest.raises(ValueError, match=r'HoldsALock: IMP cannot rewind its state at each level'):
        Trainer(model=model, train_dataloader=image_loader(), max_duration='12ba',
                optimizers=torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[HoldsALock()],
                algorithms=[IMP(levels=1, rewind_to='2ba', folder=str(tmp_path / 'imp'))], device='cpu')
    opted_out = HoldsALock()
    opted_out.imp_rewind = False
    Trainer(model=replay_cnn(), train_dataloader=image_loader(), max_duration='12ba', callbacks=[opted_out],
            algorithms=[IMP(levels=1, rewind_to='2ba', folder=str(tmp_path / 'imp2'))], device='cpu').close()


def test_layerwise_target_density_stops_at_the_first_level_at_or_below_it(tmp_path):
    imp = IMP(target_density=0.5, prune_fraction=0.5, scope='layerwise', rewind_to='2ba', folder=str(tmp_path / 'imp'))
    torch.manual_seed(0)  # an odd-sized tensor: per-tensor rounding keeps one weight more than the global count
    model = ComposerClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 9), nn.ReLU(), nn.Linear(9, 11), nn.ReLU(),
                                             nn.Linear(11, 10)), num_classes=10)
    trainer = Trainer(model=model, train_dataloader=image_loader(), max_duration='4ba',
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), algorithms=[imp], progress_bar=False,
                      device='cpu')
    trainer.fit()
    assert [r['level'] for r in imp.history] == [0, 1]


# ------------------------------------------------------------------------------------------------ Hugging Face models
def token_loader(rows=64, seq=16, vocab=64, batch_size=8, labels='lm'):
    """Learnable token data (each row counts up from a random start); no tokenizer, nothing downloaded."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (rows, 1), generator=generator)
    ids = (start + torch.arange(seq)) % vocab
    targets = ids if labels == 'lm' else (start.squeeze(1) % 2)
    return DataLoader([{'input_ids': i, 'attention_mask': torch.ones_like(i), 'labels': t} for i, t in zip(ids, targets)],
                      batch_size=batch_size)


def tiny_gpt2(tied: bool = True):
    from composer.models import HuggingFaceModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, tie_word_embeddings=tied)
    return HuggingFaceModel(GPT2LMHeadModel(config), use_logits=True)


def tiny_bert():
    from composer.models import HuggingFaceModel
    from torchmetrics.classification import MulticlassAccuracy
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2)
    return HuggingFaceModel(BertForSequenceClassification(config), use_logits=True,
                            metrics=[MulticlassAccuracy(num_classes=2, average='micro')])


HF_CASES = {
    'gpt2-tied': (tiny_gpt2, lambda: [], 'lm'),
    'gpt2-untied': (lambda: tiny_gpt2(tied=False), lambda: [], 'lm'),
    'gpt2-alibi': (tiny_gpt2, lambda: [algorithms.Alibi(max_sequence_length=32)], 'lm'),
    'gpt2-seq-length-warmup': (tiny_gpt2, lambda: [algorithms.SeqLengthWarmup(duration=0.5, min_seq_length=8,
                                                                              max_seq_length=16, step_size=4)], 'lm'),
    'bert-glu': (tiny_bert, lambda: [algorithms.GatedLinearUnits()], 'class'),
    # Alibi reshapes every tensor of the batch to rescale sequences: not 1-D class labels, so no rescaling here.
    'bert-alibi': (tiny_bert, lambda: [algorithms.Alibi(max_sequence_length=32, train_sequence_length_scaling=1.0)],
                   'class'),
}


@pytest.mark.parametrize('imp_first', [True, False], ids=['imp-first', 'imp-last'])
@pytest.mark.parametrize('case', sorted(HF_CASES))
def test_hugging_face_models_replay_level_zero_beside_language_algorithms(tmp_path, case, imp_first):
    make_model, make_algorithms, labels = HF_CASES[case]
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        # 8 batches per epoch, T = 6: every level ends mid-epoch, so the dict-batch loader restarts each time.
        _, imp, observer = run_imp(tmp_path, make_algorithms(), imp_first=imp_first, model=model, duration='6ba',
                                   rewind_to='2ba', train_dataloader=token_loader(labels=labels),
                                   optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), eval_dataloader=None,
                                   eval_interval=1)
    assert_faithful_replay(tmp_path, imp, observer, 6, 2)
    names = set(imp.masks)
    assert any('attn.c_attn' in n or 'attention.self.query' in n for n in names), 'attention weights are prunable'
    params = dict(model.named_parameters())
    if case == 'gpt2-tied':
        assert 'model.lm_head.weight' not in names  # it is the embedding table: dense by default
        assert params['model.transformer.wte.weight'] is model.model.lm_head.weight
    if case == 'gpt2-untied':
        assert 'model.lm_head.weight' in names


# ------------------------------------------------------------------------------------------------ dataset transforms
class DigitImages(torch.utils.data.Dataset):
    """The 8x8 digits as 16x16 RGB PIL images behind a torchvision-style ``transform`` (what AugMix/RandAugment
    extend)."""

    def __init__(self, n=128):
        from torchvision.transforms import ToTensor

        x, y = digits_tensors()
        self.images, self.targets, self.transform = (x[:n].view(-1, 8, 8) * 255).to(torch.uint8), y[:n], ToTensor()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        from PIL import Image

        image = Image.fromarray(self.images[index].numpy()).convert('RGB').resize((16, 16))
        return self.transform(image), self.targets[index]


def rgb_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10))
    return ComposerClassifier(net, num_classes=10)


@pytest.mark.parametrize('name', ['AugMix', 'RandAugment'])
def test_dataset_augmentations_replay_level_zero(tmp_path, name):
    augmentation = algorithms.AugMix(severity=1, depth=1, width=1) if name == 'AugMix' else algorithms.RandAugment(
        severity=1, depth=1)
    from torchvision.datasets import VisionDataset

    class Images(DigitImages, VisionDataset):  # the augmentations accept torchvision datasets only

        def __init__(self):
            VisionDataset.__init__(self, root=str(tmp_path))
            DigitImages.__init__(self)

    loader = DataLoader(Images(), batch_size=32)
    eval_loader = DataLoader(DigitImages(n=64), batch_size=32)
    _, imp, observer = run_imp(tmp_path, [augmentation], model=rgb_cnn(), train_dataloader=loader,
                               eval_dataloader=eval_loader)
    assert_faithful_replay(tmp_path, imp, observer, 12, 6, same_data=False)  # the augmentation draws are random


def test_a_model_mostly_outside_the_prunable_set_gets_a_warning_naming_what_is_left_out(tmp_path):
    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.head = nn.EmbeddingBag(4096, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.head(self.table((x.flatten(1) * 15).long()))

    model = ComposerClassifier(Bag(), num_classes=10)
    with pytest.warns(UserWarning, match=r'IMP prunes only .*% of the model.s weights; left out: module.table.weight'):
        Trainer(model=model, train_dataloader=image_loader(), max_duration='4ba',
                algorithms=[IMP(levels=1, rewind_to='2ba', folder=str(tmp_path / 'imp'))], device='cpu').close()


def test_a_rewound_callback_that_refers_to_imp_leaves_imps_own_state_alone(tmp_path):
    """Masking a component's weight copies must not reach through its references into the run (IMP's rewind point,
    its parent level's weights)."""

    class Holder(Callback):

        def fit_start(self, state, logger):
            self.imp = find_imp(state)
            self.imp.add_level_end_hook(self.hook, needs_previous_level=True)

        def hook(self, state, logger, record):
            if record['level'] == LEVELS:
                Holder.parent = {k: v.clone() for k, v in self.imp.previous_level_state.items()}

    _, imp, _ = run_imp(tmp_path, callbacks=[Holder()])
    parent = torch.load(tmp_path / 'imp' / f'level_{LEVELS - 1}' / 'trained.pt')
    assert all(torch.equal(Holder.parent[k], v) for k, v in parent.items())
    point = torch.load(tmp_path / 'imp' / 'rewind_point.pt')['state_dict']
    assert all(torch.equal(imp.ticket()['rewind_point'][k], v) for k, v in point.items())


def test_a_run_with_ema_killed_in_a_pruned_level_resumes_to_the_same_result(tmp_path):
    """The components' state at the rewind step travels in the checkpoint: after a kill in level 1, level 2 still
    replays EMA and the stopper from step k, and the run ends exactly as an uninterrupted one."""
    from test_resume import FitStart, Kill

    def train(folder, kill=None):
        ema = algorithms.EMA(half_life='2ba')
        stopper = EarlyStopper(monitor='MulticlassAccuracy', dataloader_label='eval', patience='20ba')
        model = replay_cnn()
        trainer = Trainer(model=model, train_dataloader=image_loader(), eval_dataloader=image_loader(split='test'),
                          max_duration='3ep', optimizers=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                          schedulers=[CosineAnnealingScheduler()], eval_interval='1ep',
                          algorithms=[ema, IMP(levels=2, prune_fraction=0.5, rewind_to='6ba',
                                               folder=str(folder / 'imp'))],
                          callbacks=[stopper, FitStart()] + ([kill] if kill else []),
                          save_folder=str(folder / 'ckpt'), save_interval='1ba', run_name='ema', autoresume=True,
                          progress_bar=False, seed=5, device='cpu')
        try:
            trainer.fit()
            return {k: v.clone() for k, v in trainer.state.model.state_dict().items()}, {
                n: t.clone() for n, t in ema.ema_model.named_parameters_dict.items()}
        except KeyboardInterrupt:
            return None
        finally:
            trainer.close()

    reference = train(tmp_path / 'ref')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the Kill callback is not in the resumed run: IMP says so
        assert train(tmp_path / 'run', Kill('batch_start', 1, 9)) is None
        resumed = train(tmp_path / 'run')
    assert FitStart.batch == 9
    for got, expected in zip(resumed, reference):
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_torch_compiled_model_replays_level_zero(tmp_path):
    """Composer compiles the model's forward in place; the gradient-masking hooks and the replay act on the same
    parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch-pruning cannot trace a compiled forward: FLOPs from parameter counts
        _, imp, observer = run_imp(tmp_path, compile_config={})
    assert_faithful_replay(tmp_path, imp, observer, 12, 6)


def test_rewound_component_state_loads_no_code(tmp_path):
    """The component snapshot travels in checkpoints: a crafted pickle in it must not run, and tensors are kept
    outside the pickle (torch's storage pickles would load through an unrestricted torch.load)."""
    import pickle as std_pickle

    from composer_imp.algorithms.imp.replay import ComponentSnapshot, rewound_components

    _, imp, _ = run_imp(tmp_path, [algorithms.EMA(half_life='2ba')], levels=1)
    snapshot = imp.state_dict()['rewind_components']
    assert snapshot['tensors'] and all(isinstance(t, torch.Tensor) for t in snapshot['tensors'])
    assert b'_load_from_bytes' not in snapshot['data'].numpy().tobytes()

    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    trainer = Trainer(model=replay_cnn(), train_dataloader=image_loader(), max_duration='12ba',
                      algorithms=[IMP(levels=1, rewind_to='2ba', folder=str(tmp_path / 'imp2'))], device='cpu')
    crafted = ComponentSnapshot(std_pickle.dumps({'x#0': {'a': Payload()}}), [])
    with pytest.raises(std_pickle.UnpicklingError, match='posix.system|os.system'):
        crafted.load(trainer.state, rewound_components(trainer.state, imp))
    assert not marker.exists()
    trainer.close()

"""Step-time overhead of IMP against the same dense Composer run, side by side in one process.

Both runs train CIFAR ResNet-20 on the same synthetic 32x32 batches (timing only) for the same number of steps with
SGD + momentum + weight decay and a cosine schedule. IMP runs 2 pruned levels; the dense run has no algorithm. The
per-step time is measured from BATCH_START to the end of BATCH_END (IMP's gradient masking and weight re-zeroing are
inside it); level transitions (prune, rewind, files) are reported separately. Runs alternate to spread machine noise.
Goal: median step time ratio <= 1.03. ``imp_hot_path_share`` isolates IMP's own per-step work (time inside
``IMP.apply`` on the per-step events, synchronized) as a fraction of the dense step, which machine noise hardly moves.
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch
from composer import Callback, Event, Trainer
from composer.optim import CosineAnnealingScheduler
from torch.utils.data import DataLoader, TensorDataset

from composer_imp import IMP
from composer_imp.models import build_model

LEVEL_BATCHES, REWIND_BATCHES, LEVELS = 20, 2, 2


class StepTimer(Callback):
    imp_rewind = False  # a record across levels: IMP must not replay it with the run

    def __init__(self):
        self.steps: list[float] = []
        self._start = 0.0

    def batch_start(self, state, logger):
        _sync()
        self._start = time.perf_counter()

    def batch_end(self, state, logger):
        _sync()
        self.steps.append(time.perf_counter() - self._start)


class TimedIMP(IMP):
    """IMP that accounts the time of its per-step work at the events every batch goes through (its gradient masking
    runs inside backward(), so it shows in the step time only)."""

    PER_STEP = (Event.AFTER_DATALOADER, Event.BATCH_START, Event.BATCH_END)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_step_seconds: list[float] = []

    def apply(self, event, state, logger):
        if event not in self.PER_STEP or self.level == 0:
            return super().apply(event, state, logger)
        _sync()
        start = time.perf_counter()
        super().apply(event, state, logger)
        _sync()
        if event == Event.AFTER_DATALOADER:
            self.per_step_seconds.append(0.0)
        self.per_step_seconds[-1] += time.perf_counter() - start


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _loader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batch_size * 8, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size * 8,),
                                                                                            generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _fit(with_imp: bool, batch_size: int, folder: str, device: str) -> tuple[list[float], float, list[float]]:
    torch.manual_seed(0)
    model = build_model('cifar_resnet20')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    timer = StepTimer()
    total = LEVEL_BATCHES + LEVELS * (LEVEL_BATCHES - REWIND_BATCHES)
    algorithms = [TimedIMP(levels=LEVELS, rewind_to=f'{REWIND_BATCHES}ba', folder=folder)] if with_imp else []
    trainer = Trainer(model=model, train_dataloader=_loader(batch_size),
                      max_duration=f'{LEVEL_BATCHES if with_imp else total}ba', optimizers=optimizer,
                      schedulers=[CosineAnnealingScheduler()], algorithms=algorithms, callbacks=[timer],
                      progress_bar=False, device=device, seed=1)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    trainer.close()
    return timer.steps, wall, algorithms[0].per_step_seconds if with_imp else []


def run(batch_size: int = 64, repeats: int = 4, device: str = 'cpu') -> dict:
    dense_steps, imp_steps, dense_wall, imp_wall, hot_path = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        _fit(False, batch_size, tmp, device)  # warm-up: first Trainer, allocator, thread pools
        for repeat in range(repeats):
            for with_imp in (repeat % 2 == 0, repeat % 2 == 1):  # alternate which run goes first
                steps, wall, per_step = _fit(with_imp, batch_size, f'{tmp}/imp{repeat}', device)
                if with_imp:
                    imp_steps.append(statistics.median(steps[LEVEL_BATCHES:]))  # pruned levels: masks enforced
                    hot_path += per_step
                    imp_wall.append(wall)
                else:
                    dense_steps.append(statistics.median(steps[1:]))
                    dense_wall.append(wall)
    dense, imp = statistics.median(dense_steps), statistics.median(imp_steps)  # medians of per-run medians
    return {
        'dense_median_step_s': dense,
        'imp_median_step_s': imp,
        'step_time_ratio': imp / dense,
        'imp_hot_path_per_step_s': statistics.median(hot_path),
        'imp_hot_path_share': statistics.median(hot_path) / dense,
        'whole_run_ratio': statistics.median(imp_wall) / statistics.median(dense_wall),
    }


if __name__ == '__main__':
    import sys

    for key, value in run(device=sys.argv[1] if len(sys.argv) > 1 else 'cpu').items():  # Composer names: cpu, gpu
        print(f'{key}: {value:.4f}')

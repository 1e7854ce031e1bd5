"""Step-time overhead of IMP against the same dense Composer run, side by side in one process.

Both runs train CIFAR ResNet-20 on the same synthetic 32x32 batches (timing only) for the same number of steps with
SGD + momentum + weight decay and a cosine schedule. IMP runs 2 pruned levels; the dense run has no algorithm. The
per-step time is measured from BATCH_START to the end of BATCH_END (IMP's gradient masking and weight re-zeroing are
inside it); level transitions (prune, rewind, files) are reported separately. Runs alternate to spread machine noise.
Goal: median step time ratio <= 1.03.
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch
from composer import Callback, Trainer
from composer.optim import CosineAnnealingScheduler
from torch.utils.data import DataLoader, TensorDataset

from composer_imp import IMP
from composer_imp.models import build_model

LEVEL_BATCHES, REWIND_BATCHES, LEVELS = 12, 2, 2


class StepTimer(Callback):
    def __init__(self):
        self.steps: list[float] = []
        self._start = 0.0

    def batch_start(self, state, logger):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def batch_end(self, state, logger):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append(time.perf_counter() - self._start)


def _loader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batch_size * 8, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size * 8,),
                                                                                            generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _fit(with_imp: bool, batch_size: int, folder: str, device: str) -> tuple[list[float], float]:
    torch.manual_seed(0)
    model = build_model('cifar_resnet20')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    timer = StepTimer()
    total = LEVEL_BATCHES + LEVELS * (LEVEL_BATCHES - REWIND_BATCHES)
    algorithms = [IMP(levels=LEVELS, rewind_to=f'{REWIND_BATCHES}ba', folder=folder)] if with_imp else []
    trainer = Trainer(model=model, train_dataloader=_loader(batch_size),
                      max_duration=f'{LEVEL_BATCHES if with_imp else total}ba', optimizers=optimizer,
                      schedulers=[CosineAnnealingScheduler()], algorithms=algorithms, callbacks=[timer],
                      progress_bar=False, device=device, seed=1)
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    trainer.close()
    return timer.steps, wall


def run(batch_size: int = 64, repeats: int = 3, device: str = 'cpu') -> dict:
    dense_steps, imp_steps, dense_wall, imp_wall = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        _fit(False, batch_size, tmp, device)  # warm-up: first Trainer, allocator, thread pools
        for repeat in range(repeats):
            steps, wall = _fit(False, batch_size, tmp, device)
            dense_steps += steps[1:]
            dense_wall.append(wall)
            steps, wall = _fit(True, batch_size, f'{tmp}/imp{repeat}', device)
            imp_steps += steps[LEVEL_BATCHES:]  # the pruned levels: masks enforced every step
            imp_wall.append(wall)
    dense, imp = statistics.median(dense_steps), statistics.median(imp_steps)
    return {
        'dense_median_step_s': dense,
        'imp_median_step_s': imp,
        'step_time_ratio': imp / dense,
        'whole_run_ratio': statistics.median(imp_wall) / statistics.median(dense_wall),
    }


if __name__ == '__main__':
    import sys

    for key, value in run(device=sys.argv[1] if len(sys.argv) > 1 else 'cpu').items():  # Composer names: cpu, gpu
        print(f'{key}: {value:.4f}')

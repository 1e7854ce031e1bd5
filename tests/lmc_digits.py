"""The 'original run' of the LMC tests and their DDP worker: IMP-sized training on sklearn digits (tests/helpers.py).

Unlike ``helpers.digits_loader``, the training order depends on the Trainer's seed (a ``RandomSampler`` drawing from
the global RNG, or under DDP a sampler seeded with it): instability analysis needs children with different data
orders, and the callback must be shown to leave that RNG alone.
"""
from __future__ import annotations

import torch
from composer import Trainer
from composer.models import ComposerClassifier
from composer.optim import CosineAnnealingScheduler
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import digits_tensors

T = '20ba'  # one level's schedule


def build_model() -> ComposerClassifier:
    """helpers.mlp with a BatchNorm, so interpolated and re-estimated running statistics are exercised (a small CNN
    doubles the tests' time on two cores)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    return ComposerClassifier(net, num_classes=10)


def _datasets() -> tuple[TensorDataset, TensorDataset]:
    x, y = digits_tensors()
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


def make_trainer(model: nn.Module, seed: int, algorithms=(), callbacks=(), loggers=()) -> Trainer:
    """SGD with momentum, cosine schedule over T, shuffled training data in a seed-dependent order."""
    train, test = _datasets()
    if dist.get_world_size() > 1:
        sampler = dist.get_sampler(train, shuffle=True, seed=seed)
        train_loader = DataLoader(train, batch_size=64, sampler=sampler, drop_last=True)
    else:
        train_loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    eval_loader = DataLoader(test, batch_size=128, sampler=dist.get_sampler(test, shuffle=False))
    return Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        max_duration=T,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        schedulers=CosineAnnealingScheduler(),
        algorithms=list(algorithms),
        callbacks=list(callbacks),
        loggers=list(loggers),
        seed=seed,
        progress_bar=False,
        log_to_console=False,
    )

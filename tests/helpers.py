"""Small real-data models and loaders shared by the tests (sklearn's 1,797 8x8 digits: real, offline, tiny)."""
from __future__ import annotations

import functools
import socket

import torch
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """A gloo process group in a spawned test worker. TCP, not a file store: file:// groups hung here 3 runs in 4
    when two tests spawned groups one after the other; one torch thread per rank, as ranks outnumber the cores."""
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)


def finish_gloo() -> None:
    """End a spawned test worker's group: a barrier, and no ``destroy_process_group``. Destroying a gloo group races
    with rank 0's exit, which takes the TCP store down: the other rank then waited forever in destroy (seen in the full
    suite). Process exit frees the group."""
    import torch.distributed as torch_dist

    torch_dist.barrier()


@functools.lru_cache(maxsize=None)
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return x, y


def digits_loader(split: str = 'train', batch_size: int = 64, shuffle: bool = True, n: int | None = None,
                  image: bool = False) -> DataLoader:
    x, y = digits_tensors()
    x, y = (x[:1400], y[:1400]) if split == 'train' else (x[1400:], y[1400:])
    if n is not None:
        x, y = x[:n], y[:n]
    if image:
        x = x.view(-1, 1, 8, 8)
    dataset = TensorDataset(x, y)
    sampler = dist.get_sampler(dataset, shuffle=shuffle and split == 'train', drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=split == 'train')


def mlp(seed: int = 0, hidden: int = 32) -> ComposerClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return ComposerClassifier(net, num_classes=10)


def small_cnn(seed: int = 0) -> ComposerClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )
    return ComposerClassifier(net, num_classes=10)

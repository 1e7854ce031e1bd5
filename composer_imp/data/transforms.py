"""Per-dataset augmentation and normalisation, shared by the folder data sets and their MDS (streaming) copies.

Array data sets (``mnist-5k``, ``cifar10``, ``cifar100``) hold ``uint8`` images of shape ``(H, W, C)``; their transform
turns one such array into a normalised ``float32`` tensor of shape ``(C, H, W)``. Because the folder data set and the
streaming data set call the same transform on the same bytes, the two give identical tensors.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision import transforms

__all__ = ['ARRAY_DATASETS', 'NORMALIZATION', 'array_transform', 'imagenet_transform', 'uint8_hwc_to_float_chw']

# (mean, std) per channel, applied to pixels scaled to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # The usual MNIST constants, computed on MNIST's full 60k training set (the 4,000 mnist-5k training digits give
    # mean 0.131, std 0.308, so they fit the subset too).
    'mnist-5k': ((0.1307,), (0.3081,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Data sets stored as uint8 (H, W, C) arrays; these are the ones convert_to_mds and the streaming data set know.
ARRAY_DATASETS = ('mnist-5k', 'cifar10', 'cifar100')


def uint8_hwc_to_float_chw(image: np.ndarray) -> torch.Tensor:
    """A ``uint8`` ``(H, W, C)`` array as a ``float32`` ``(C, H, W)`` tensor in ``[0, 1]`` (what ``ToTensor`` computes).

    ``torch.tensor`` copies, so read-only arrays (MDS decodes into read-only buffers) are fine.
    """
    return torch.tensor(image).permute(2, 0, 1).float().div_(255)


def array_transform(dataset: str, augment: bool) -> Callable[[np.ndarray], torch.Tensor]:
    """The transform of an array data set: to float, then (CIFAR, ``augment``) RandomCrop(32, pad 4) + HFlip, then
    per-channel normalisation. ``mnist-5k`` is never augmented (Frankle & Carbin train LeNet on plain MNIST)."""
    if dataset not in ARRAY_DATASETS:
        raise ValueError(f'dataset {dataset!r} is not one of the array data sets {ARRAY_DATASETS}')
    steps: list[Callable] = [uint8_hwc_to_float_chw]
    if augment and dataset != 'mnist-5k':
        steps += [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    steps.append(transforms.Normalize(*NORMALIZATION[dataset]))
    return transforms.Compose(steps)


def imagenet_transform(augment: bool) -> Callable:
    """ImageNet transform on PIL images (open_lth ``datasets/imagenet.py``): train RandomResizedCrop(224, scale
    (0.1, 1.0), ratio (0.8, 1.25)) + HFlip; test Resize(256) + CenterCrop(224); then ImageNet normalisation."""
    if augment:
        steps = [transforms.RandomResizedCrop(224, scale=(0.1, 1.0), ratio=(0.8, 1.25)),
                 transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(256), transforms.CenterCrop(224)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(*NORMALIZATION['imagenet'])])

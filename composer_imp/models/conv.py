"""Conv-2, Conv-4 and Conv-6: the VGG-like CIFAR-10 networks of Frankle & Carbin (2019), Figure 2.

The architecture follows the paper's description; its parameter counts reproduce the paper's 4.3M (Conv-2) and 2.4M
(Conv-4), but Conv-6 as described has 2.26M parameters, not the 1.7M printed in the paper's table.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from composer_imp.models.init import init_weights

__all__ = ['ConvNet', 'conv2', 'conv4', 'conv6']


class ConvNet(nn.Module):
    """Stages of two 3x3 same-padded convolutions (ReLU) followed by 2x2 max-pooling, then FC 256-256-``num_classes``.

    ``stages``: conv widths per stage, e.g. ``(64, 128)`` for Conv-4 (conv 64, 64, pool, 128, 128, pool).
    ``in_channels``/``image_size``: input images are ``in_channels x image_size x image_size``; ``image_size`` must be
    divisible by ``2 ** len(stages)``. Layers: ``features`` (convolutions and pools), ``fc_layers``, output ``fc``.
    ``init``: see :data:`~composer_imp.models.init.INITS` (Frankle & Carbin used ``'xavier_normal'``).
    """

    def __init__(self, stages: Sequence[int], num_classes: int = 10, *, in_channels: int = 3, image_size: int = 32,
                 init: str = 'kaiming_normal'):
        super().__init__()
        if image_size % 2**len(stages):
            raise ValueError(f'model.image_size {image_size} is not divisible by 2**{len(stages)} (one 2x2 pool per '
                             f'stage)')
        layers: list[nn.Module] = []
        channels = in_channels
        for width in stages:
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = image_size // 2**len(stages)
        self.fc_layers = nn.ModuleList([nn.Linear(channels * side * side, 256), nn.Linear(256, 256)])
        self.fc = nn.Linear(256, num_classes)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        for layer in self.fc_layers:
            x = F.relu(layer(x))
        return self.fc(x)


def conv2(num_classes: int = 10, **kwargs) -> ConvNet:
    """Conv-2: conv 64, 64, pool; FC 256, 256, ``num_classes`` (4.30M parameters on 3x32x32)."""
    return ConvNet((64,), num_classes, **kwargs)


def conv4(num_classes: int = 10, **kwargs) -> ConvNet:
    """Conv-4: conv 64, 64, pool, 128, 128, pool; FC 256, 256, ``num_classes`` (2.43M parameters on 3x32x32)."""
    return ConvNet((64, 128), num_classes, **kwargs)


def conv6(num_classes: int = 10, **kwargs) -> ConvNet:
    """Conv-6: conv 64, 64, pool, 128, 128, pool, 256, 256, pool; FC 256, 256, ``num_classes`` (2.26M parameters)."""
    return ConvNet((64, 128, 256), num_classes, **kwargs)

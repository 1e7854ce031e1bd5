"""ResNet-20/32/56 for CIFAR (He et al. 2016, Section 4.2) as defined in open_lth ``models/cifar_resnet.py``.

Open_lth's choices kept here: a 1x1 convolution + BatchNorm shortcut (not zero padding) when a block changes shape;
no biases in convolutions; weights ``kaiming_normal`` and BatchNorm ``gamma ~ U(0, 1)``, ``beta = 0``; the linear
layer's bias keeps PyTorch's default. Parameter names match open_lth (``conv``, ``bn``, ``blocks.i.conv1``, ...,
``blocks.i.shortcut.0``, ``fc``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from composer_imp.models.init import init_weights

__all__ = ['CifarResNet', 'Block']


class Block(nn.Module):
    """Basic residual block: 3x3 conv, BN, ReLU, 3x3 conv, BN, plus the shortcut, then ReLU."""

    def __init__(self, f_in: int, f_out: int, downsample: bool):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(f_in, f_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        if downsample or f_in != f_out:
            self.shortcut = nn.Sequential(nn.Conv2d(f_in, f_out, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(f_out))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-``depth`` (``depth = 6n + 2``): a 3x3 stem, three stages of ``n`` blocks with ``width``, ``2 width`` and
    ``4 width`` channels (stages 2 and 3 halve the resolution), global average pooling and a linear layer ``fc``.

    ``in_channels``: image channels (any square input size works). ``init``/``bn_init``: see
    :func:`~composer_imp.models.init.init_weights`.
    """

    def __init__(self, depth: int, num_classes: int = 10, *, width: int = 16, in_channels: int = 3,
                 init: str = 'kaiming_normal', bn_init: str = 'uniform'):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f'model depth {depth} is not 6n + 2 for an n >= 1 (20, 32, 56, ...)')
        blocks_per_stage = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks = []
        f_in = width
        for stage, f_out in enumerate((width, 2 * width, 4 * width)):
            for index in range(blocks_per_stage):
                blocks.append(Block(f_in, f_out, downsample=stage > 0 and index == 0))
                f_in = f_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(4 * width, num_classes)
        init_weights(self, init, bn_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)

"""LeNet-300-100: the fully connected MNIST network of Frankle & Carbin (2019) (open_lth ``mnist_lenet_300_100``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from composer_imp.models.init import init_weights

__all__ = ['LeNet', 'lenet_300_100']


class LeNet(nn.Module):
    """A ReLU MLP on flattened images: hidden layers ``fc_layers.i`` of widths ``plan``, output layer ``fc``.

    ``in_features``: pixels per image (784 for 1x28x28). ``init``: see :data:`~composer_imp.models.init.INITS`.
    """

    def __init__(self, plan: Sequence[int], num_classes: int = 10, *, in_features: int = 784,
                 init: str = 'kaiming_normal'):
        super().__init__()
        widths = [in_features, *plan]
        self.fc_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.fc_layers:
            x = F.relu(layer(x))
        return self.fc(x)


def lenet_300_100(num_classes: int = 10, **kwargs) -> LeNet:
    """784-300-100-``num_classes`` LeNet (266,610 parameters for 10 classes); ``kwargs`` go to :class:`LeNet`."""
    return LeNet([300, 100], num_classes, **kwargs)

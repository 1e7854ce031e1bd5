"""Torchvision networks: ResNet-18 for 32x32 inputs and any torchvision classification model by name (no weights)."""
from __future__ import annotations

import torchvision
from torch import nn

__all__ = ['resnet18_cifar', 'torchvision_model']


def resnet18_cifar(num_classes: int = 10, *, in_channels: int = 3) -> nn.Module:
    """Torchvision's ResNet-18 adapted to 32x32 images as in lth_diet (``low_res=True``): the 7x7 stride-2 stem becomes
    a 3x3 stride-1 convolution and the max-pool is removed (11.17M parameters for 10 classes). Torchvision's own
    initialisation; the new stem is initialised like torchvision's other convolutions."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode='fan_out', nonlinearity='relu')
    model.maxpool = nn.Identity()
    return model


def torchvision_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)``, randomly initialised.

    ``name``: a torchvision classification model, e.g. ``'resnet50'``; raises ``ValueError`` otherwise.
    """
    allowed = torchvision.models.list_models(module=torchvision.models)
    if name not in allowed:
        raise ValueError(f'model.name torchvision/{name!r} is not a torchvision classification model; allowed: '
                         f'torchvision/<one of {allowed}>')
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

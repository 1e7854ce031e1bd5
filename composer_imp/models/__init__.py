"""Models named in recipes, built as ``ComposerClassifier``s (cross-entropy loss, accuracy metrics).

- ``lenet_300_100``: 784-300-100-10 ReLU MLP on flattened 28x28 images; 266,610 parameters.
- ``conv2``, ``conv4``, ``conv6``: Frankle & Carbin (2019) Conv-2/4/6 on 3x32x32; 4.30M / 2.43M / 2.26M parameters.
- ``cifar_resnet20``, ``cifar_resnet32``, ``cifar_resnet56``: open_lth's CIFAR ResNets, widths 16-32-64;
  272,474 / 466,906 / 855,770 parameters.
- ``resnet18_cifar``: torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool; 11.17M parameters.
- ``torchvision/<name>``: ``torchvision.models.get_model(name, weights=None)``, e.g. ``torchvision/resnet50``.

Counts are for 10 classes, the default (1000 for torchvision models). Every model draws its initial weights from
the global torch RNG, so ``torch.manual_seed`` fixes them. The output layer is called ``fc`` in every model of
:data:`MODELS` and in torchvision's ResNets (parameter ``module.fc.weight`` inside the ``ComposerClassifier``): the
name to leave dense when the output layer is not pruned.

Keyword arguments: LeNet ``in_features``, ``init``; Conv-N ``in_channels``, ``image_size``, ``init``; CIFAR ResNets
``width``, ``in_channels``, ``init``, ``bn_init``; ``resnet18_cifar`` ``in_channels``; torchvision models whatever
``get_model`` accepts. ``init``: ``'kaiming_normal'`` (default, open_lth) or ``'xavier_normal'`` (Frankle & Carbin
2019); ``bn_init``: ``'uniform'`` (default, open_lth: gamma ~ U(0, 1)) or ``'fixed'`` (gamma = 1).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from composer.models import ComposerClassifier
from torch import nn

from composer_imp.models.cifar_resnet import CifarResNet
from composer_imp.models.conv import conv2, conv4, conv6
from composer_imp.models.lenet import lenet_300_100
from composer_imp.models.torchvision_models import resnet18_cifar, torchvision_model

__all__ = ['MODELS', 'TORCHVISION_PREFIX', 'build_model']

TORCHVISION_PREFIX = 'torchvision/'

# name -> builder(num_classes=10, **kwargs) -> nn.Module
MODELS: dict[str, Callable[..., nn.Module]] = {
    'lenet_300_100': lenet_300_100,
    'conv2': conv2,
    'conv4': conv4,
    'conv6': conv6,
    'cifar_resnet20': functools.partial(CifarResNet, 20),
    'cifar_resnet32': functools.partial(CifarResNet, 32),
    'cifar_resnet56': functools.partial(CifarResNet, 56),
    'resnet18_cifar': resnet18_cifar,
}


def build_model(name: str, *, num_classes: int | None = None, **kwargs) -> ComposerClassifier:
    """Model ``name`` (a key of :data:`MODELS` or ``'torchvision/<model>'``) wrapped in a ``ComposerClassifier``.

    ``num_classes``: outputs of the last layer; ``None`` means 10 (1000 for torchvision models). ``kwargs`` go to the
    builder (see the module docstring). Raises ``ValueError`` for an unknown name and ``TypeError`` for an unknown
    keyword.
    """
    if name.startswith(TORCHVISION_PREFIX):
        num_classes = 1000 if num_classes is None else num_classes
        module = torchvision_model(name[len(TORCHVISION_PREFIX):], num_classes=num_classes, **kwargs)
    elif name in MODELS:
        num_classes = 10 if num_classes is None else num_classes
        module = MODELS[name](num_classes=num_classes, **kwargs)
    else:
        raise ValueError(f'model.name {name!r} is unknown; allowed: {sorted(MODELS)} or {TORCHVISION_PREFIX}<name of a '
                         f'torchvision classification model>')
    return ComposerClassifier(module, num_classes=num_classes)

"""Weight initialisation of the models built here (open_lth ``models/initializers.py``, ``bn_initializers.py``)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ['INITS', 'BN_INITS', 'init_weights']

# Applied to the ``.weight`` of every Conv and Linear layer; biases keep PyTorch's default, as in open_lth.
INITS = {
    'kaiming_normal': nn.init.kaiming_normal_,  # open_lth's default for LeNet and the CIFAR ResNets
    'xavier_normal': nn.init.xavier_normal_,  # "Gaussian Glorot", Frankle & Carbin (2019) for LeNet and Conv-2/4/6
}

BN_INITS = ('uniform', 'fixed')  # uniform: gamma ~ U(0, 1), beta = 0 (open_lth's default); fixed: gamma = 1, beta = 0


@torch.no_grad()
def init_weights(model: nn.Module, init: str = 'kaiming_normal', bn_init: str = 'uniform') -> None:
    """Initialise ``model`` in place with the global torch RNG: ``init`` (a key of :data:`INITS`) for Conv/Linear
    weights, ``bn_init`` (one of :data:`BN_INITS`) for BatchNorm scale and shift."""
    if init not in INITS:
        raise ValueError(f'model.init {init!r} is unknown; allowed: {sorted(INITS)}')
    if bn_init not in BN_INITS:
        raise ValueError(f'model.bn_init {bn_init!r} is unknown; allowed: {list(BN_INITS)}')
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            INITS[init](module.weight)
        elif isinstance(module, nn.BatchNorm2d):
            if bn_init == 'uniform':
                module.weight.uniform_(0, 1)
            else:
                module.weight.fill_(1)
            module.bias.zero_()

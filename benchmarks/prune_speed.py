"""One global magnitude prune of ResNet-50's conv/linear weights (25.5M), three ways, side by side in one process.

- composer_imp: ``magnitude_masks`` (histogram-narrowed ``kthvalue`` on the weights' device, exact count);
- ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured`` (computes the masks and installs them);
- an open_lth-style numpy sort (``pruning/sparse_global.py``: concatenate, ``np.sort``, threshold, compare).
Goal: composer_imp >= 5x faster than ``global_unstructured``. Reported as ratios (best of ``repeats``).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torchvision
from torch.nn.utils import prune

from composer_imp.functional import magnitude_masks, prunable_weights

FRACTION = 0.2


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn, repeats):
    times = []
    for _ in range(repeats + 1):  # the first call warms up kernels and the allocator
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def open_lth_numpy(weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    arrays = {name: w.detach().cpu().numpy() for name, w in weights.items()}
    magnitudes = np.sort(np.abs(np.concatenate([a.flatten() for a in arrays.values()])))
    threshold = magnitudes[int(np.ceil(FRACTION * magnitudes.size))]
    return {name: np.abs(a) > threshold for name, a in arrays.items()}


def torch_global_unstructured(model: torch.nn.Module) -> None:
    targets = [(m, 'weight') for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=FRACTION)


def run(repeats: int = 3, device: str = 'cpu') -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device)
    weights = {name: w.detach() for name, w in prunable_weights(model).items()}
    ours = _best(lambda: magnitude_masks(weights, FRACTION), repeats)
    numpy_sort = _best(lambda: open_lth_numpy(weights), repeats)

    def fresh_and_prune():
        fresh = torchvision.models.resnet50().to(device)
        _sync()
        start = time.perf_counter()
        torch_global_unstructured(fresh)
        _sync()
        return time.perf_counter() - start

    nn_prune = min(fresh_and_prune() for _ in range(repeats))
    masks = magnitude_masks(weights, FRACTION)
    alive = sum(int(m.sum()) for m in masks.values())
    total = sum(w.numel() for w in weights.values())
    return {
        'device': device,
        'weights': total,
        'pruned_exactly': total - alive == round(FRACTION * total),
        'composer_imp_s': ours,
        'torch_global_unstructured_s': nn_prune,
        'open_lth_numpy_s': numpy_sort,
        'speedup_vs_global_unstructured': nn_prune / ours,
        'speedup_vs_open_lth_numpy': numpy_sort / ours,
    }


if __name__ == '__main__':
    import sys

    for key, value in run(device=sys.argv[1] if len(sys.argv) > 1 else 'cpu').items():
        print(f'{key}: {value:.3f}' if isinstance(value, float) else f'{key}: {value}')

"""Compute accounting: multiply-accumulates per sample of a network whose layers are partly pruned. Pure torch.

Dense MACs per layer come from torch-pruning's ``count_ops_and_params`` (its per-module counts, divided by the batch
size here because its own per-sample average divides by the length of the first positional input, which is wrong for
Composer's ``(inputs, targets)`` batches). A layer at density d costs d times its dense MACs: the cost of unstructured
sparsity if it were exploited, which is how the IMP literature counts FLOPs. Training costs
``TRAIN_FLOPS_PER_MAC`` (2 FLOPs per MAC, times 3 for forward and backward) per MAC and sample; a forward pass 2.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ['TRAIN_FLOPS_PER_MAC', 'FORWARD_FLOPS_PER_MAC', 'layer_macs', 'sparse_macs']

TRAIN_FLOPS_PER_MAC = 6.0
FORWARD_FLOPS_PER_MAC = 2.0


@torch.no_grad()
def layer_macs(model: nn.Module, example_inputs: Any, batch_size: int,
               weight_names: Iterable[str]) -> tuple[float, dict[str, float]]:
    """Dense MACs per sample of ``model(*example_inputs)`` and of each layer owning one of ``weight_names``."""
    import torch_pruning

    was_training = model.training
    _, _, per_module, _ = torch_pruning.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    model.train(was_training)
    weight_names = set(weight_names)
    per_weight = {f'{name}.weight': float(per_module.get(module) or 0.0) / batch_size
                  for name, module in model.named_modules() if f'{name}.weight' in weight_names}
    return float(per_module.get(model) or 0.0) / batch_size, per_weight


def sparse_macs(dense_macs: float, weight_macs: Mapping[str, float], layer_density: Mapping[str, float]) -> float:
    """MACs per sample once each prunable layer keeps only ``layer_density[name]`` of its weights."""
    return dense_macs - sum(macs * (1.0 - layer_density.get(name, 1.0)) for name, macs in weight_macs.items())

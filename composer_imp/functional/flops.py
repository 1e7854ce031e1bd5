"""Compute accounting: multiply-accumulates per sample of a network whose layers are partly pruned. Pure torch.

``layer_macs`` measures dense MACs per sample on one example batch, with one of three methods, named in its result:

- ``'torch-pruning'``: torch-pruning's ``count_ops_and_params`` counts the calls of the layers it knows (conv,
  linear, norms, ``nn.MultiheadAttention``, RNNs; subclasses and parametrized versions of them count as their base
  class), so the sequence length of a language model's batch is in its counts. Each counted layer's MACs are shared
  among the prunable weights inside it by element count (``nn.MultiheadAttention``'s input and output projections
  3:1). Functional ops (attention products written as matmuls, a tied LM head applied with ``F.linear``) are not
  counted.
- ``'torch-flop-counter'``, when torch-pruning fails or counts none of the prunable layers (transformers' ``Conv1D``,
  functional ``F.linear``; a model under FSDP2, which torch-pruning's deep copy of the model cannot copy): torch's
  own ``torch.utils.flop_counter.FlopCounterMode`` counts the matrix multiplies and convolutions of one forward pass
  of the model itself (in eval mode, without gradients, train flags given back), per module; each module that holds
  prunable weights directly counts as one unit (its children's ops included), shared as above. Element-wise ops,
  norms and embedding lookups cost nothing in this count.
- ``'parameter-count'``, when neither counts any prunable layer: one MAC per parameter per token, the usual ``2N``
  FLOPs per token of a transformer forward pass. Wrong for a conv net, whose kernels are applied at every position,
  hence only the last fallback.

Per sample means per first-dimension entry of the first tensor in the batch (depth first through tuples, lists and
any ``Mapping``, e.g. ``transformers.BatchEncoding``); for a language model a sample is a sequence. When that tensor
holds token ids (2-D, int32 or int64: batch x sequence), its second dimension is the sequence length and the result
also gives MACs per token. A layer at density d costs d times its dense MACs: the cost of unstructured sparsity if it were
exploited, which is how the IMP literature counts FLOPs. Training costs ``TRAIN_FLOPS_PER_MAC`` (2 FLOPs per MAC,
times 3 for forward and backward) per MAC and sample; a forward pass 2.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from composer_imp.functional.interpolate import training_mode
from composer_imp.functional.shards import reshard

__all__ = ['TRAIN_FLOPS_PER_MAC', 'FORWARD_FLOPS_PER_MAC', 'first_tensor', 'layer_macs', 'sparse_macs']

TRAIN_FLOPS_PER_MAC = 6.0
FORWARD_FLOPS_PER_MAC = 2.0
TOKEN_ID_DTYPES = (torch.int32, torch.int64)


def first_tensor(batch: Any) -> Optional[torch.Tensor]:
    """The first tensor in ``batch``, depth first through tuples, lists and mappings; ``None`` when it holds none."""
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


@torch.no_grad()
def layer_macs(model: nn.Module, example_inputs: Any, weight_names: Iterable[str]) -> dict[str, Any]:
    """Dense MACs per sample of ``model(*example_inputs)`` (``model(**example_inputs)`` for a dict), in all and per
    weight named in ``weight_names`` (names of ``model.named_parameters()``).

    Returns ``{'dense': float, 'weights': {name: float}, 'method': 'torch-pruning' | 'torch-flop-counter' |
    'parameter-count', 'sequence_length': int | None, 'dense_per_token': float | None}``, plus ``'fallback_reason'``
    (why the counters before it did not count) for a fallback. Raises ``ValueError`` when ``example_inputs`` holds no
    tensor.
    """
    first = first_tensor(example_inputs)
    if first is None or first.ndim == 0:
        raise ValueError('example_inputs: holds no tensor with a batch dimension to count samples by')
    batch_size = int(first.shape[0])
    sequence_length = int(first.shape[1]) if first.ndim == 2 and first.dtype in TOKEN_ID_DTYPES else None
    parameters = dict(model.named_parameters())
    weights = {name: parameters[name] for name in weight_names}
    reasons = []
    for method, count in (('torch-pruning', _torch_pruning_macs), ('torch-flop-counter', _flop_counter_macs)):
        try:
            dense, units = count(model, example_inputs)
            per_weight = _weight_shares(weights, units)
            if sum(per_weight.values()) > 0:
                break
            reasons.append(f'{method} counted none of the prunable layers')
        except Exception as error:  # a forward a counter cannot run must not stop training
            reasons.append(f'{method} failed ({type(error).__name__}: {error})')
    else:
        method = None
    reason = '; '.join(reasons) or None
    if method is not None:
        result = {'dense': dense / batch_size, 'weights': {n: m / batch_size for n, m in per_weight.items()},
                  'method': method}
        if reason:
            result['fallback_reason'] = reason
    else:
        tokens = sequence_length or 1
        result = {'dense': float(sum(p.numel() for p in model.parameters()) * tokens),
                  'weights': {name: float(w.numel() * tokens) for name, w in weights.items()},
                  'method': 'parameter-count', 'fallback_reason': reason}
    result['sequence_length'] = sequence_length
    result['dense_per_token'] = result['dense'] / sequence_length if sequence_length else None
    return result


def _torch_pruning_macs(model: nn.Module, example_inputs: Any) -> tuple[float, dict[nn.Module, float]]:
    """torch-pruning's dense MACs for the whole batch: in all, and of each module it counts as one unit."""
    from torch_pruning.utils import op_counter

    # Its hooks are looked up by exact type: let subclasses (parametrized layers among them) use their base's hook.
    subclass_hooks = {}
    for module_type in {type(m) for m in model.modules()} - set(op_counter.MODULES_MAPPING):
        base = next((b for b in module_type.__mro__ if b in op_counter.MODULES_MAPPING), None)
        if base is not None:
            subclass_hooks[module_type] = op_counter.MODULES_MAPPING[base]
    op_counter.CUSTOM_MODULES_MAPPING = subclass_hooks
    try:
        _, _, per_module, _ = op_counter.count_ops_and_params(model, example_inputs, layer_wise=True)
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = {}
    counted_types = set(op_counter.MODULES_MAPPING) | set(subclass_hooks)
    units = dict.fromkeys(_counted_units(model, counted_types))
    return float(per_module.get(model) or 0.0), {unit: float(per_module.get(unit) or 0.0) for unit in units}


def _flop_counter_macs(model: nn.Module, example_inputs: Any) -> tuple[float, dict[nn.Module, float]]:
    """torch's FLOP counter on ``model`` itself (no copy): dense MACs for the whole batch, in all and per module holding
    prunable candidates (parameters of 2+ dimensions) directly, top-most first."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with training_mode(model, False), torch.no_grad(), FlopCounterMode(display=False) as counter:
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            else:
                model(*example_inputs)
    finally:
        reshard(model)  # FSDP2 leaves the root unit's weights gathered after a forward: give back the parameters
    counts = counter.get_flop_counts()  # keyed 'Global' and '<root class>.<module path>', FLOPs = 2 per MAC
    root = type(model).__name__
    macs = {module: sum(counts.get(f'{root}.{name}' if name else root, {}).values()) / 2
            for name, module in model.named_modules()}
    owners = [module for module in model.modules() if any(p.dim() >= 2 for p in module.parameters(recurse=False))]
    inside = {id(m) for owner in owners for m in owner.modules() if m is not owner}
    return sum(counts.get('Global', {}).values()) / 2, {m: macs[m] for m in owners if id(m) not in inside}


def _counted_units(module: nn.Module, counted_types: set[type]) -> list[nn.Module]:
    """The top-most modules of a counted type: torch-pruning's sum stops at them, and their count covers everything
    inside (``nn.MultiheadAttention``'s ``out_proj``, a parametrized layer's originals)."""
    if type(module) in counted_types:
        return [module]
    return [unit for child in module.children() for unit in _counted_units(child, counted_types)]


def _weight_shares(weights: Mapping[str, torch.Tensor], units: Mapping[nn.Module, float]) -> dict[str, float]:
    """Each weight's share of the MACs of the units holding it, found by tensor identity (so tied, packed and
    parametrized weights count under whatever name they have); a unit's MACs are split among its weights by element
    count, and a weight in several units (tied) gets a share of each."""
    names_by_id = {id(w): name for name, w in weights.items()}
    shares = dict.fromkeys(weights, 0.0)
    for unit, macs in units.items():
        held = [names_by_id[id(p)] for p in unit.parameters() if id(p) in names_by_id]
        elements = sum(weights[name].numel() for name in held)
        for name in held:
            shares[name] += macs * weights[name].numel() / elements
    return shares


def sparse_macs(dense_macs: float, weight_macs: Mapping[str, float], layer_density: Mapping[str, float]) -> float:
    """MACs per sample once each prunable layer keeps only ``layer_density[name]`` of its weights."""
    return dense_macs - sum(macs * (1.0 - layer_density.get(name, 1.0)) for name, macs in weight_macs.items())

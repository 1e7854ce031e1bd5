"""Exported tickets on disk and what they cost: a state dict plus a JSON module description, never a pickled module.

``save_exported`` writes ``<folder>/exported.pt`` (the smaller network's ``state_dict``, loadable with
``torch.load(..., weights_only=True)``) and ``<folder>/exported.json``: for every module the export changed, the plain
attributes that differ from the original architecture (``out_channels``, ``in_features``, ``num_features``,
``num_attention_heads``, ...) and the new shapes of its parameters and buffers. ``load_exported`` rebuilds the network
from a freshly built original architecture: it sets those attributes, replaces those tensors by empty ones of the
recorded shapes, and loads the state dict strictly.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from composer_imp.functional.structured import export_ticket
from composer_imp.functional.ticket import atomic_save, atomic_write

__all__ = ['EXPORT_FORMAT', 'export_ticket', 'module_description', 'save_exported', 'load_exported',
           'rebuild_exported', 'network_cost', 'cpu_latency']

EXPORT_FORMAT = 'composer_imp.exported_ticket/1'
STATE_FILE = 'exported.pt'
DESCRIPTION_FILE = 'exported.json'
_PLAIN = (bool, int, float, str)


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in vars(module).items()
            if not key.startswith('_') and (isinstance(value, _PLAIN) or
                                            isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))}


def module_description(original: nn.Module, exported: nn.Module) -> dict[str, Any]:
    """What turns ``original``'s architecture into ``exported``'s: per changed module, its changed plain attributes
    and the shapes of its changed parameters and buffers (JSON-serializable)."""
    originals = dict(original.named_modules())
    modules = {}
    for name, module in exported.named_modules():
        before = originals[name]
        attributes = {key: value for key, value in _plain_attributes(module).items()
                      if _plain_attributes(before).get(key) != value}
        tensors = {**module._parameters, **module._buffers}
        old_tensors = {**before._parameters, **before._buffers}
        shapes = {key: list(t.shape) for key, t in tensors.items()
                  if t is not None and old_tensors.get(key) is not None and t.shape != old_tensors[key].shape}
        if attributes or shapes:
            modules[name] = {'attributes': attributes, 'shapes': shapes}
    return {'format': EXPORT_FORMAT, 'modules': modules}


def rebuild_exported(model: nn.Module, description: Mapping[str, Any]) -> nn.Module:
    """Reshape ``model`` (the original architecture, freshly built) in place as ``description`` says; the tensors it
    reshapes are left uninitialized, for ``load_state_dict``. Returns ``model``."""
    if description.get('format') != EXPORT_FORMAT:
        raise ValueError(f'description: format {description.get("format")!r} is not {EXPORT_FORMAT!r}; give a '
                         f'{DESCRIPTION_FILE} written by save_exported')
    modules = dict(model.named_modules())
    unknown = sorted(set(description['modules']) - set(modules))
    if unknown:
        raise ValueError(f'description: modules {unknown[:5]} are not in the model; build the architecture the ticket '
                         'was exported from')
    for name, change in description['modules'].items():
        module = modules[name]
        for key, value in change['attributes'].items():
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
        for key, shape in change['shapes'].items():
            old = getattr(module, key)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if key in module._parameters:
                module._parameters[key] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                module._buffers[key] = new
    return model


def save_exported(exported: nn.Module, original: nn.Module, folder: str,
                  summary: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """Write ``exported.pt`` and ``exported.json`` (with ``summary`` under ``'summary'``) into ``folder``, atomically.
    Returns both paths."""
    description = {**module_description(original, exported), 'summary': dict(summary or {})}
    state_path = atomic_save({k: v.detach().cpu() for k, v in exported.state_dict().items()},
                             os.path.join(folder, STATE_FILE))
    text = json.dumps(description, indent=1, sort_keys=True)
    description_path = atomic_write(os.path.join(folder, DESCRIPTION_FILE), lambda f: f.write(text.encode('utf-8')))
    return state_path, description_path


def load_exported(model: nn.Module, folder: str) -> nn.Module:
    """The exported network saved in ``folder``, rebuilt from ``model`` (the original architecture, freshly built;
    changed in place and returned). Nothing is unpickled: the state dict loads with ``weights_only=True``."""
    description_path, state_path = os.path.join(folder, DESCRIPTION_FILE), os.path.join(folder, STATE_FILE)
    for path in (description_path, state_path):
        if not os.path.isfile(path):
            raise ValueError(f'folder: {path} does not exist; give a folder written by save_exported '
                             '(composer-imp export)')
    with open(description_path) as f:
        description = json.load(f)
    rebuild_exported(model, description)
    model.load_state_dict(torch.load(state_path, map_location='cpu', weights_only=True))
    return model


def network_cost(model: nn.Module, example_inputs: Any) -> dict[str, float]:
    """Parameters and MACs per sample (torch-pruning's count, on ``example_inputs``: a tuple of forward arguments,
    the first tensor's first dimension is the batch)."""
    from torch_pruning.utils import count_ops_and_params

    from composer_imp.functional.flops import first_tensor

    macs, params = count_ops_and_params(model, example_inputs)
    return {'params': float(params), 'macs': float(macs) / int(first_tensor(example_inputs).shape[0])}


@torch.no_grad()
def cpu_latency(model: nn.Module, example_inputs: tuple, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of one eval-mode forward pass of ``model(*example_inputs)``."""
    training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(*example_inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(*example_inputs)
            times.append(time.perf_counter() - start)
    finally:
        model.train(training)
    return statistics.median(times)

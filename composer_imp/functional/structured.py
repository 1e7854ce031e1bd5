"""Structured masks: torch-pruning's coupled channel groups, ranked by magnitude and pruned whole; physical export.

Pure torch plus torch-pruning, no Composer.

Vocabulary. torch-pruning's ``DependencyGraph`` traces the network once and couples every channel index that must go
together: a conv's outputs with its BatchNorm and the next layer's inputs, every conv feeding a residual add with the
others and with every layer reading the sum, a depthwise conv's channels with its producer's. A *group* is one such
set of coupled layers; a *unit* is one index of it -- a channel, or, in an attention layer (the parent of its query,
key and value projections has ``num_attention_heads`` or ``num_heads``, as Hugging Face models do), one head: its
channels in the query, key and value projections and the output projection's matching inputs. Pruning a unit sets all
of its entries in the ordinary per-weight masks to False, so a structured mask is a mask like any other.

Which groups can be pruned. A group is prunable when zeroing its units' mask entries makes the network compute exactly
what the network without those channels computes. It holds only convs (ungrouped or depthwise) and linears whose
weights are all in ``masks``, per-channel layers (BatchNorm, PReLU) and shape or element-wise ops. Everything else
keeps the group whole: an output layer's outputs (a layer that feeds the model's output), a weight not in ``masks``
(IMP's ``ignore`` patterns, embeddings), LayerNorm and GroupNorm (they mix a dead channel's constant into the others'
statistics -- a transformer's hidden size is coupled with them), ``nn.MultiheadAttention``, grouped convs, unwrapped
parameters. Attention is pruned by heads because a dead channel of one head still adds its query and key biases'
product to that head's scores; a dead head only passes its value bias to output columns that are zeroed.

Ranking (``structured_masks``). A unit's importance is the mean over the group's weights of the squared L2 norm of its
slice (rows of the layers whose outputs it is, columns of those reading it; a head averages its channels): torch-pruning's
``GroupMagnitudeImportance(p=2, group_reduction='mean')`` restricted to convs and linears. ``'layerwise'`` ranks each
group by itself. ``'global'`` ranks the alive units of all groups together by importance over their group's mean
(torch-pruning's ``normalizer='mean'``): a unit's norm averages many weights, so raw norms cluster by group, and a raw
global ranking would empty the group of slightly smaller weights (ResNet-20's last residual stream) before touching
any other. Exactly ``round(fraction * alive)``
units are pruned (of all groups, or of each group), smallest first, ties in group and index order, except that every
group keeps its most important alive unit: no layer is ever emptied, and the count is capped accordingly.

Rounding (``round_to``). With ``round_to=r > 1``, after the units to prune are chosen, every channel group keeps a
multiple of ``r`` channels (kernels work in blocks of channels, 16 floats with AVX-512, so a count just past a multiple
costs about what the next multiple does; measured in benchmarks/README.md): its kept count is rounded *up* to the next
multiple of ``r``, capped at the group's size and at its alive count, by sparing the highest-ranked of the units chosen
in it. So rounding never prunes more than asked (the total
pruned falls short of ``round(fraction * alive)`` by the spared units), never revives a unit pruned at an earlier level
(a group whose alive count is not a multiple of ``r`` keeps at most what is alive) and masks stay nested. A group whose
share of the pruning rounds back to its alive count loses nothing at that level. Attention heads are units already:
``round_to`` applies to channel groups only, head groups are pruned as with ``round_to=1``.
"""
from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from composer_imp.functional.masks import apply_masks

__all__ = ['STRUCTURED_SCOPES', 'ChannelGroup', 'Member', 'channel_groups', 'check_round_to', 'structured_masks',
           'export_ticket', 'example_batch']

STRUCTURED_SCOPES = ('global', 'layerwise')
HEAD_COUNT_ATTRIBUTES = ('num_attention_heads', 'num_heads')
EXPORT_TOLERANCE = 1e-5  # max |exported - masked| per unit of the output's largest magnitude (at least 1)


@dataclass(frozen=True)
class Member:
    """One weight's share of a group: entries ``index`` along ``dim`` of ``weight``, entry i belonging to unit
    ``unit[i]``."""
    weight: str
    dim: int
    index: torch.Tensor
    unit: torch.Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels rooted at module ``root``'s outputs; ``units`` channels, or heads when ``head_size`` is set."""
    root: str
    units: int
    members: tuple[Member, ...]
    head_size: int | None = None
    head_parents: tuple[str, ...] = ()


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {key: _map_tensors(value, fn) for key, value in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_tensors(value, fn) for value in obj)
    if isinstance(obj, list):
        return [_map_tensors(value, fn) for value in obj]
    return obj


def example_batch(batch: Any, samples: int = 2) -> Any:
    """A small CPU copy of ``batch`` for tracing: the first ``samples`` entries of every tensor with a batch dimension
    (mappings become dicts, e.g. ``transformers.BatchEncoding``)."""
    return _map_tensors(batch, lambda t: t[:samples].detach().cpu().clone() if t.ndim else t.detach().cpu().clone())


def _check_masks_fit(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    unknown = sorted(set(masks) - set(parameters))
    if unknown:
        raise ValueError(f'masks: {unknown[:5]} are not parameters of the model; give the masks of this model')
    for name, mask in masks.items():
        if tuple(mask.shape) != tuple(parameters[name].shape):
            raise ValueError(f'masks[{name!r}]: shape {tuple(mask.shape)} does not fit the weight shape '
                             f'{tuple(parameters[name].shape)}; give the masks of this model')


def _dependency_graph(model: nn.Module, example_inputs: Any) -> Any:
    """torch-pruning's graph of ``model`` (traced in eval mode, which torch-pruning sets on the module it is given)."""
    import torch_pruning as tp

    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    except Exception as error:  # any failure of tracing is the user's model or inputs, reported as one line
        detail = (str(error).strip().splitlines() or [''])[0][:200]
        raise ValueError(f"model: torch-pruning cannot trace it with these example inputs ({type(error).__name__}: "
                         f"{detail}); use structure='weights'") from error


def _member_dim(module: nn.Module, out_channels: bool) -> int | None:
    """The weight dimension a conv's or linear's channel pruning removes; ``None`` for a grouped conv."""
    if isinstance(module, nn.Linear):
        return 0 if out_channels else 1
    if module.transposed:
        return None
    if module.groups == 1:
        return 0 if out_channels else 1
    depthwise = module.groups == module.out_channels == module.in_channels
    return 0 if depthwise else None


def _group_of(graph: Any, tp_group: Any, names: Mapping[nn.Module, str], weight_names: Mapping[int, str],
              masks: Mapping[str, torch.Tensor], model: nn.Module) -> ChannelGroup | None:
    """The ``ChannelGroup`` of one torch-pruning group, or ``None`` when masks cannot prune it exactly."""
    from torch_pruning import ops

    per_channel = (nn.modules.batchnorm._BatchNorm, nn.PReLU)
    shape_ops = (ops._ElementWiseOp, ops._ReshapeOp, ops._ConcatOp, ops._SplitOp, ops._SliceOp, ops._ExpandOp,
                 ops._UnbindOp)
    members, head_parents = [], []
    for item in tp_group:
        node, module = item.dep.target, item.dep.target.module
        out_channels = graph.is_out_channel_pruning_fn(item.dep.handler)
        if isinstance(module, shape_ops):
            continue
        if isinstance(module, per_channel):
            if not node.outputs:
                return None  # the model's output
            continue
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            return None  # an output op, a norm that mixes channels, an embedding, a parameter, attention, an RNN
        dim = _member_dim(module, out_channels)
        name = weight_names.get(id(module.weight))
        if dim is None or name not in masks or (out_channels and not node.outputs):
            return None  # grouped conv, a weight that stays whole, or a layer whose outputs are the model's
        members.append(Member(name, dim, torch.as_tensor(item.idxs, dtype=torch.long),
                              torch.as_tensor(item.root_idxs, dtype=torch.long)))
        parent_name = names[module].rpartition('.')[0]
        parent = model.get_submodule(parent_name)
        if out_channels and isinstance(module, nn.Linear) and _head_count(parent):
            head_parents.append(parent_name)
    root = tp_group[0].dep.target.module
    channels = len(tp_group[0].idxs)
    head_size = None
    head_parents = tuple(dict.fromkeys(head_parents))
    if head_parents:
        heads = {_head_count(model.get_submodule(p)) for p in head_parents}
        if len(heads) != 1 or channels % next(iter(heads)):
            return None
        head_size = channels // next(iter(heads))
        members = [Member(m.weight, m.dim, m.index, m.unit // head_size) for m in members]
    units = channels // head_size if head_size else channels
    return ChannelGroup(names[root], units, tuple(members), head_size, head_parents)


def _head_count(module: nn.Module) -> int | None:
    for attribute in HEAD_COUNT_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _groups(graph: Any, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[tuple[ChannelGroup, Any]]:
    from torch_pruning import ops

    names = {module: name for name, module in model.named_modules()}
    weight_names = {id(p): name for name, p in model.named_parameters()}
    tp_groups = list(graph.get_all_groups(root_module_types=(ops.TORCH_CONV, ops.TORCH_LINEAR)))
    if not tp_groups:
        raise ValueError("model: torch-pruning cannot trace it: no conv or linear layer lies on an autograd path to "
                         "the output (a detached or non-tensor output?); use structure='weights'")
    found = []
    for tp_group in tp_groups:
        group = _group_of(graph, tp_group, names, weight_names, masks, model)
        if group is not None:
            found.append((group, tp_group[0].dep))
    return found


def channel_groups(model: nn.Module, example_inputs: Any, masks: Mapping[str, torch.Tensor]) -> list[ChannelGroup]:
    """The prunable channel groups of ``model`` (see the module doc), traced on a CPU copy with ``example_inputs``
    (``model(*example_inputs)`` for a tuple, ``model(**example_inputs)`` for a dict; CPU tensors).

    Raises ``ValueError`` when torch-pruning cannot trace the model, the masks do not fit it, or no group is prunable.
    """
    _check_masks_fit(model, masks)
    traced = copy.deepcopy(model).cpu()
    graph = _dependency_graph(traced, example_inputs)
    groups = [group for group, _ in _groups(graph, traced, masks)]
    if not groups:
        raise ValueError('model: torch-pruning found no channel group that masks can prune whole (every group holds an '
                         'output layer, a weight left out of the masks, a LayerNorm/GroupNorm, an embedding or a grouped '
                         "conv); use structure='weights'")
    return groups


def _unit_scores(group: ChannelGroup, weights: Mapping[str, torch.Tensor],
                 masks: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's importance (float64) and whether any of its mask entries is alive."""
    importance = torch.zeros(group.units, dtype=torch.float64)
    alive_entries = torch.zeros(group.units, dtype=torch.long)
    for member in group.members:
        slices = weights[member.weight].detach().movedim(member.dim, 0).flatten(1)
        importance.index_add_(0, member.unit, slices.double().square().sum(1).cpu()[member.index])
        alive = masks[member.weight].movedim(member.dim, 0).flatten(1).any(1).cpu()[member.index]
        alive_entries.index_add_(0, member.unit, alive.long())
    return importance / len(group.members) / (group.head_size or 1), alive_entries > 0


def _kill_units(masks: dict[str, torch.Tensor], group: ChannelGroup, units: torch.Tensor) -> None:
    dead = torch.zeros(group.units, dtype=torch.bool)
    dead[units] = True
    for member in group.members:
        index = member.index[dead[member.unit]]
        if len(index):
            mask = masks[member.weight]
            masks[member.weight] = mask.index_fill(member.dim, index.to(mask.device), False)


def check_round_to(round_to: Any) -> int:
    """``round_to`` as an int, or one ``ValueError`` naming it."""
    if not isinstance(round_to, numbers.Integral) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f'round_to: {round_to!r} is not allowed; use an integer >= 1 (every channel group keeps a '
                         'multiple of it; 1 does not round)')
    return int(round_to)


def _rounded_pruned(group: ChannelGroup, pruned: torch.Tensor, alive_count: int, round_to: int) -> torch.Tensor:
    """The units of ``pruned`` (smallest importance first) still pruned once the group's kept channel count is rounded
    up to a multiple of ``round_to``, capped at its size and at its ``alive_count``; heads are never rounded."""
    if round_to == 1 or group.head_size is not None or not len(pruned):
        return pruned
    kept = alive_count - len(pruned)
    rounded = min(-(-kept // round_to) * round_to, group.units, alive_count)
    return pruned[:len(pruned) - (rounded - kept)]


def structured_masks(model: nn.Module, example_inputs: Any, fraction: float, masks: Mapping[str, torch.Tensor],
                     scope: str = 'global', round_to: int = 1) -> dict[str, torch.Tensor]:
    """Prune ``fraction`` of the alive channel units of ``model`` by group magnitude; return new, nested masks.

    Args:
        model: the trained network, its pruned weights already zero (the ranking reads its weights as they are).
        example_inputs: CPU inputs to trace ``model`` with (see ``channel_groups``), e.g. ``(example_batch(batch),)``.
        fraction: fraction of the *remaining* units (channels, heads) to prune, in [0, 1).
        masks: the current masks, one per prunable weight (``prunable_weights``); weights not in it stay whole.
        scope: ``'global'`` ranks all groups' units together, ``'layerwise'`` prunes ``fraction`` of each group.
        round_to: every channel group keeps a multiple of ``round_to`` channels (or all it has alive, or its whole
            size): the kept count is rounded up by sparing its highest-ranked chosen units (see the module doc).
            Attention heads are not rounded. ``1``: no rounding.

    Returns masks of the same keys and shapes on the weights' devices; a unit counts as alive while any of its entries
    is.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f'fraction: {fraction} is not allowed; use a fraction of the remaining channels in [0, 1)')
    if scope not in STRUCTURED_SCOPES:
        raise ValueError(f'scope: {scope!r} is not allowed with structured pruning; use one of {STRUCTURED_SCOPES}')
    round_to = check_round_to(round_to)
    groups = channel_groups(model, example_inputs, masks)
    weights = dict(model.named_parameters())
    new_masks = {name: mask.to(device=weights[name].device, dtype=torch.bool, copy=True) for name, mask in masks.items()}
    scored = [_unit_scores(group, weights, masks) for group in groups]
    candidates = []  # (group index, unit indices, importance) of the alive units a group may lose
    for index, (importance, alive) in enumerate(scored):
        units = torch.nonzero(alive).flatten()
        if scope == 'global' and len(units):
            importance = importance / importance[units].mean().clamp_min(torch.finfo(torch.float64).tiny)
        if len(units) > 1:
            keep = units[torch.argmax(importance[units])]
            units = units[units != keep]
            candidates.append((index, units, importance[units]))
        elif len(units):
            candidates.append((index, units[:0], importance[units[:0]]))
    if not candidates:
        return new_masks
    if scope == 'global':
        total_alive = sum(int(alive.sum()) for _, alive in scored)
        group_ids = torch.cat([torch.full((len(units),), index) for index, units, _ in candidates])
        unit_ids = torch.cat([units for _, units, _ in candidates])
        order = torch.sort(torch.cat([scores for _, _, scores in candidates]), stable=True).indices
        chosen = order[:round(fraction * total_alive)]
        for index, _, _ in candidates:
            pruned = unit_ids[chosen][group_ids[chosen] == index]  # smallest first: a prefix of the sorted order
            _kill_units(new_masks, groups[index],
                        _rounded_pruned(groups[index], pruned, int(scored[index][1].sum()), round_to))
    else:
        for index, units, scores in candidates:
            alive_count = int(scored[index][1].sum())
            pruned = units[torch.sort(scores, stable=True).indices[:round(fraction * alive_count)]]
            _kill_units(new_masks, groups[index], _rounded_pruned(groups[index], pruned, alive_count, round_to))
    return new_masks


def _set_modes(model: nn.Module, training: list[bool]) -> None:
    for module, mode in zip(model.modules(), training):
        module.training = mode


def _outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    from torch_pruning.utils import flatten_as_list

    with torch.no_grad():
        out = model(**example_inputs) if isinstance(example_inputs, dict) else model(*example_inputs)
    return [t.float() for t in flatten_as_list(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def export_ticket(model: nn.Module, masks: Mapping[str, torch.Tensor], example_inputs: Any) -> nn.Module:
    """A physically smaller copy of ``model`` under ``masks``: every channel unit (see the module doc) whose mask
    entries are all pruned is removed with torch-pruning; the copy's remaining weights are the masked weights.

    ``example_inputs`` (CPU, as for ``channel_groups``) trace the model and check the result: the exported network's
    outputs in eval mode must equal the masked network's within ``EXPORT_TOLERANCE`` (times the outputs' largest
    magnitude, at least 1), else ``RuntimeError``. Unstructured masks export too, with only the units that happen to be
    dead removed. A group never loses its last unit. Returns the copy on the CPU, in ``model``'s train/eval modes.
    Raises ``ValueError`` for masks that do not fit the model or a model torch-pruning cannot trace.
    """
    _check_masks_fit(model, masks)
    masked = copy.deepcopy(model).cpu()
    apply_masks(masked, {name: mask.cpu() for name, mask in masks.items()})
    exported = copy.deepcopy(masked)
    graph = _dependency_graph(exported, example_inputs)
    cpu_masks = {name: mask.cpu() for name, mask in masks.items()}
    removals = []
    for group, root_dep in _groups(graph, exported, cpu_masks):
        _, alive = _unit_scores(group, dict(exported.named_parameters()), cpu_masks)
        dead = torch.nonzero(~alive).flatten()
        if len(dead) == group.units:
            dead = dead[1:]
        if len(dead):
            channels = dead if group.head_size is None else (
                dead[:, None] * group.head_size + torch.arange(group.head_size)).flatten()
            removals.append((group, root_dep, channels.tolist(), len(dead)))
    for group, root_dep, channels, dead_units in removals:
        graph.get_pruning_group(root_dep.target.module, root_dep.handler, channels).prune()
        for parent_name in group.head_parents:
            _shrink_heads(exported.get_submodule(parent_name), dead_units, group.head_size)
    expected, got = _outputs(masked.eval(), example_inputs), _outputs(exported.eval(), example_inputs)
    _set_modes(exported, [module.training for module in model.modules()])
    scale = max([1.0] + [float(t.abs().max()) for t in expected if t.numel()])
    error = max([0.0] + [float((a - b).abs().max()) for a, b in zip(expected, got) if a.numel()])
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)) or \
            error > EXPORT_TOLERANCE * scale:
        raise RuntimeError(f'export_ticket: the exported network differs from the masked one (max abs difference '
                           f'{error:.3g}); torch-pruning mis-traced an operation of this model')
    return exported


def _shrink_heads(attention: nn.Module, removed: int, head_size: int) -> None:
    """Keep an attention module's head bookkeeping (Hugging Face's ``num_attention_heads``, ``all_head_size``) in step
    with its projections after ``removed`` heads went."""
    for attribute in HEAD_COUNT_ATTRIBUTES:
        if isinstance(getattr(attention, attribute, None), int):
            setattr(attention, attribute, getattr(attention, attribute) - removed)
    if isinstance(getattr(attention, 'all_head_size', None), int):
        attention.all_head_size -= removed * head_size

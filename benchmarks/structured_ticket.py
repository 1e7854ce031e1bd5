"""Structured tickets are physically smaller and measurably faster: exported vs dense, side by side in one process.

Part 1, latency and export equality. CIFAR ResNet-20 (synthetic 32x32 inputs), Conv-4 and LeNet-300-100 (28x28):
channel masks at 50%, 25% and 10% of the dense MACs (``structured_masks``, global, one shot, the fraction of channels
found by bisection on the MAC count), once for every ``ROUND_TO`` (``round_to=8``: every channel group keeps a multiple
of 8 channels; its MACs move in steps, so where it lands off the unrounded ticket's MAC ratio an unrounded ticket at
its MAC ratio is added), exported with ``export_ticket``. Forward time of the dense network and
of every exported one on the CPU at batch 1 and 128 (eval mode, BatchNorm folded into the convs with ``torch.fx``'s
``fuse`` as for inference, one intra-op thread, all of a target's networks interleaved, the minimum of ``repeats``
timings each; at batch 128 also unfused), their ratio beside the MAC ratio, and max |exported - masked| on the batch.
Goal: latency ratio <= 1.3 x MAC ratio at batch 128.

Part 1b, why: the time per MAC of one 3x3 conv against its channel count (``CONV_CHANNELS``), on the same kernels.

Part 2, accuracy. LeNet-300-100 on mnist-5k (4,000 train / 1,000 test real digits), IMP rewinding to initialisation,
a plain torch loop (Adam 1.2e-3, batch 60, ``EPOCHS`` epochs per level): structured IMP prunes ``CHANNEL_FRACTION``
of the remaining channels per level; the unstructured control prunes each level to the structured level's parameter
count (``masks_at_density``, global), from its own previous level. Test accuracy of both at the structured levels
closest to 50%, 25% and 10% of the dense MACs.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn import functional as F

from composer_imp.export import export_ticket, network_cost
from composer_imp.functional import apply_masks, density, layer_densities, masks_at_density, prunable_weights
from composer_imp.functional.flops import layer_macs, sparse_macs
from composer_imp.functional.structured import structured_masks
from composer_imp.models.cifar_resnet import CifarResNet
from composer_imp.models.conv import conv4
from composer_imp.models.lenet import lenet_300_100

MAC_TARGETS = (0.5, 0.25, 0.1)
ROUND_TO = (1, 8, 16)  # structured_masks(round_to=...): kept channels per group a multiple of it (16: AVX-512 floats)
MATCH_TOLERANCE = 0.03  # MAC ratios further apart (relative) get an unrounded ticket at the rounded one's MACs
CONV_CHANNELS = {32: (5, 7, 8, 9, 11, 12, 15, 16), 16: (9, 11, 16, 17, 19, 23, 24, 25, 31, 32),
                 8: (18, 24, 32, 36, 40, 45, 48, 49, 56, 64)}  # image side: channel counts (ResNet-20's stages)
GOAL = 1.3  # latency ratio <= GOAL x MAC ratio at batch 128
EPOCHS = 4
CHANNEL_FRACTION = 0.35
BATCH = 60


def _all_alive(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(model).items()}


def _mac_ratio(macs: dict[str, Any], masks: dict[str, torch.Tensor]) -> float:
    return sparse_macs(macs['dense'], macs['weights'], layer_densities(masks)) / macs['dense']


def masks_at_macs(model: nn.Module, inputs: tuple, target: float, steps: int = 8,
                  round_to: int = 1) -> dict[str, torch.Tensor]:
    """One-shot channel masks whose MACs are the largest at or below ``target`` of the dense MACs (bisection on the
    fraction of channels pruned; ``round_to`` as for ``structured_masks``)."""
    macs = layer_macs(model, inputs, _all_alive(model))
    low, high, best = 0.0, 0.999, None
    for _ in range(steps):
        fraction = (low + high) / 2
        masks = structured_masks(model, inputs, fraction, _all_alive(model), round_to=round_to)
        if _mac_ratio(macs, masks) <= target:
            best, high = masks, fraction
        else:
            low = fraction
    return best if best is not None else structured_masks(model, inputs, high, _all_alive(model), round_to=round_to)


@torch.no_grad()
def _interleaved_min(models: list[nn.Module], inputs: torch.Tensor, repeats: int) -> list[float]:
    for model in models:
        model(inputs)  # warm-up
    best = [float('inf')] * len(models)
    for _ in range(repeats):
        for index, model in enumerate(models):
            start = time.perf_counter()
            model(inputs)
            best[index] = min(best[index], time.perf_counter() - start)
    return best


_START = time.perf_counter()


def _progress(message: str) -> None:
    print(f'[{time.perf_counter() - _START:5.0f} s] {message}', file=sys.stderr, flush=True)


def _ticket(make: Callable[[], nn.Module], dense: nn.Module, trace: tuple, macs: dict[str, Any], target: float,
            round_to: int) -> tuple[nn.Module, nn.Module, dict]:
    """The masked and the exported network at ``target`` of the dense MACs, and their sizes."""
    masks = masks_at_macs(dense, trace, target, round_to=round_to)
    masked = make().eval()
    masked.load_state_dict(dense.state_dict())
    apply_masks(masked, masks)
    exported = export_ticket(masked, masks, trace).eval()
    return masked, exported, {
        'round_to': round_to, 'mac_ratio': _mac_ratio(macs, masks),
        'exported_mac_ratio': network_cost(exported, trace)['macs'] / network_cost(dense, trace)['macs'],
        'param_ratio': sum(p.numel() for p in exported.parameters()) / sum(p.numel() for p in dense.parameters()),
        'kept_channels': _kept_channels(exported)}


def latency_rows(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], repeats: int) -> list[dict]:
    """Per MAC target, one ticket for every ``ROUND_TO``; where a rounded ticket's MAC ratio is off the unrounded one's
    by more than ``MATCH_TOLERANCE`` (rounding moves the MACs in steps), also an unrounded ticket at the rounded one's
    MACs (``matched``), so that the comparison is at equal MACs too. All of a target's networks are timed in one
    interleaved loop."""
    torch.manual_seed(0)
    dense = make().eval()
    trace = (torch.randn(2, *shape),)
    macs = layer_macs(dense, trace, _all_alive(dense))
    rows, floored = [], set()
    for target in MAC_TARGETS:
        tickets = [_ticket(make, dense, trace, macs, target, round_to) for round_to in ROUND_TO
                   if round_to not in floored]  # a rounded ticket that missed a larger target is at its floor already
        plain_macs = tickets[0][2]['mac_ratio']
        for _, _, row in tickets[1:]:
            if row['mac_ratio'] > target:
                floored.add(row['round_to'])
            if abs(row['mac_ratio'] - plain_macs) > MATCH_TOLERANCE * plain_macs:
                tickets.append(_ticket(make, dense, trace, macs, row['mac_ratio'], 1))
                tickets[-1][2]['matched'] = row['round_to']
        masked_nets, exported_nets, target_rows = (list(column) for column in zip(*tickets))
        for row in target_rows:
            row.update(model=name, target=target, reached=row['mac_ratio'] <= target)
            row.setdefault('matched', None)
        # the dense network and every exported one, interleaved in one loop: the ratios share the machine's state
        deployed = [fuse(dense)] + [fuse(e) for e in exported_nets]  # BatchNorm folded into the convs, as for inference
        for batch in (1, 128):
            x = torch.randn(batch, *shape)
            with torch.no_grad():
                for row, masked, exported in zip(target_rows, masked_nets, exported_nets):
                    row['max_abs_diff' if batch == 128 else 'max_abs_diff_b1'] = float(
                        (masked(x) - exported(x)).abs().max())
            dense_s, *exported_s = _interleaved_min(deployed, x, repeats if batch == 128 else 5 * repeats)
            for row, seconds in zip(target_rows, exported_s):
                row[f'dense_ms_b{batch}'], row[f'exported_ms_b{batch}'] = 1000 * dense_s, 1000 * seconds
                row[f'latency_ratio_b{batch}'] = seconds / dense_s
        dense_s, *exported_s = _interleaved_min([dense] + exported_nets, x, repeats)
        for row, seconds in zip(target_rows, exported_s):
            row['unfused_latency_ratio_b128'] = seconds / dense_s
            row['latency_per_mac_b128'] = row['latency_ratio_b128'] / row['mac_ratio']
            row['goal_met'] = row['latency_ratio_b128'] <= GOAL * row['mac_ratio']
        rows += target_rows
        _progress(f"{name} at {target:.0%} MACs: latency ratio b128 " + ', '.join(
            f"{r['latency_ratio_b128']:.2f} at MACs {r['mac_ratio']:.3f} (round_to={r['round_to']})"
            for r in target_rows))
    return rows


def _kept_channels(model: nn.Module) -> list[int]:
    """Output channels of every conv and hidden linear of an exported network, in module order."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in layers[:-1]]


@torch.no_grad()
def conv_cost_rows(repeats: int = 15, batch: int = 128) -> list[dict]:
    """Time per MAC of one 3x3 conv (c -> c channels, batch 128, one thread) against the channel count, relative to the
    largest count of its image side: what a kept channel count costs the CPU kernels (interleaved, min of repeats)."""
    rows = []
    for side, channels in CONV_CHANNELS.items():
        convs = [nn.Conv2d(c, c, 3, padding=1).eval() for c in channels]
        inputs = [torch.randn(batch, c, side, side) for c in channels]
        for conv, x in zip(convs, inputs):
            conv(x)  # warm-up
        best = [float('inf')] * len(channels)
        for _ in range(repeats):
            for index, (conv, x) in enumerate(zip(convs, inputs)):
                start = time.perf_counter()
                conv(x)
                best[index] = min(best[index], time.perf_counter() - start)
        reference = best[-1] / channels[-1] ** 2
        rows.append({'side': side, 'per_mac': {c: b / c ** 2 / reference for c, b in zip(channels, best)}})
    _progress('conv cost per MAC: ' + '; '.join(
        f"{r['side']}x{r['side']} " + ' '.join(f'{c}:{v:.2f}' for c, v in r['per_mac'].items()) for r in rows))
    return rows


# ---------------------------------------------------------------------------------------------------- accuracy
def _train(model: nn.Module, masks: dict[str, torch.Tensor] | None, data: dict[str, torch.Tensor], seed: int) -> float:
    """``EPOCHS`` epochs of Adam under ``masks`` (pruned weights re-zeroed after every step); test accuracy."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    x, y = data['x'], data['y']
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - BATCH + 1, BATCH):
            batch = order[start:start + BATCH]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            if masks is not None:
                apply_masks(model, masks)
    model.eval()
    with torch.no_grad():
        return float((model(data['x_test']).argmax(1) == data['y_test']).float().mean())


def _rewound(init: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> nn.Module:
    model = lenet_300_100()
    model.load_state_dict(init)
    apply_masks(model, masks)
    return model


def accuracy_rows(max_levels: int = 12) -> list[dict]:
    from time_to_ticket import _mnist_5k

    (x, y), (x_test, y_test) = _mnist_5k('train'), _mnist_5k('test')
    data = {'x': x, 'y': y, 'x_test': x_test, 'y_test': y_test}
    torch.manual_seed(0)
    model = lenet_300_100()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trace = (x[:2],)
    macs = layer_macs(model, trace, _all_alive(model))
    structured = unstructured = _all_alive(model)
    structured_net = unstructured_net = model
    dense_accuracy = _train(model, None, data, seed=0)
    levels = [{'level': 0, 'mac_ratio': 1.0, 'density': 1.0, 'structured': dense_accuracy,
               'unstructured': dense_accuracy}]
    for level in range(1, max_levels + 1):
        structured = structured_masks(structured_net, trace, CHANNEL_FRACTION, structured)
        unstructured = masks_at_density(prunable_weights(unstructured_net), density(structured), unstructured)
        structured_net, unstructured_net = _rewound(init, structured), _rewound(init, unstructured)
        levels.append({'level': level, 'mac_ratio': _mac_ratio(macs, structured), 'density': density(structured),
                       'structured': _train(structured_net, structured, data, seed=level),
                       'unstructured': _train(unstructured_net, unstructured, data, seed=level)})
        _progress(f"LeNet level {level}: MACs {levels[-1]['mac_ratio']:.3f}, structured {levels[-1]['structured']:.3f}, "
                  f"unstructured {levels[-1]['unstructured']:.3f}")
        if levels[-1]['mac_ratio'] <= min(MAC_TARGETS):
            break
    return levels


def run(repeats: int = 5, threads: int = 1) -> dict:
    # One intra-op thread: on a shared machine a descheduled worker thread stalls every op of a multi-threaded
    # forward, which times the scheduler rather than the kernels.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(repeats)
    finally:
        torch.set_num_threads(previous_threads)


def _run(repeats: int) -> dict:
    latency = (latency_rows('cifar_resnet20', lambda: CifarResNet(20), (3, 32, 32), repeats) +
               latency_rows('conv4', lambda: conv4(in_channels=1, image_size=28), (1, 28, 28), repeats) +
               latency_rows('lenet_300_100', lenet_300_100, (1, 28, 28), repeats))
    conv_cost = conv_cost_rows()
    levels = accuracy_rows()
    chosen = [min(levels[1:], key=lambda r: abs(r['mac_ratio'] - target)) for target in MAC_TARGETS]
    resnet_25 = {r['round_to']: r for r in latency
                 if r['model'] == 'cifar_resnet20' and r['target'] == 0.25 and not r['matched']}
    return {
        'threads': torch.get_num_threads(),
        'resnet20_25pct_latency_ratio_b128': resnet_25[1]['latency_ratio_b128'],
        'resnet20_25pct_latency_ratio_b128_by_round_to': {k: r['latency_ratio_b128'] for k, r in resnet_25.items()},
        'goal_met_all_b128': all(r['goal_met'] for r in latency),
        'goals_met_b128_by_round_to': {k: sum(r['goal_met'] for r in latency if r['round_to'] == k and not r['matched'])
                                       for k in ROUND_TO},
        'max_abs_diff': max(max(r['max_abs_diff'], r['max_abs_diff_b1']) for r in latency),
        'latency': latency,
        'conv_cost': conv_cost,
        'lenet_levels': levels,
        'lenet_at_targets': chosen,
    }


def _target_cell(row: dict) -> str:
    return f"{row['target']:.0%}" + ('' if row['reached'] else ' (not reached)')


def _round_to_cell(row: dict) -> str:
    return f"1 (at round_to={row['matched']}'s MACs)" if row['matched'] else str(row['round_to'])


def markdown(result: dict) -> str:
    lines = ['| model | MAC target | round_to | MAC ratio | params ratio | dense b1 | exported b1 | ratio b1 | '
             'dense b128 | exported b128 | ratio b128 | ratio b128 / MAC ratio | goal (≤ 1.3 × MACs) | '
             'ratio b128 unfused | max abs diff |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|']
    for r in result['latency']:
        lines.append(f"| {r['model']} | {_target_cell(r)} | {_round_to_cell(r)} | {r['mac_ratio']:.3f} | "
                     f"{r['param_ratio']:.3f} | "
                     f"{r['dense_ms_b1']:.2f} ms | {r['exported_ms_b1']:.2f} ms | {r['latency_ratio_b1']:.2f} | "
                     f"{r['dense_ms_b128']:.1f} ms | {r['exported_ms_b128']:.1f} ms | {r['latency_ratio_b128']:.2f} | "
                     f"{r['latency_per_mac_b128']:.2f} | "
                     f"{'met' if r['goal_met'] else 'missed'} | {r['unfused_latency_ratio_b128']:.2f} | "
                     f"{max(r['max_abs_diff'], r['max_abs_diff_b1']):.1e} |")
    lines += ['', '| LeNet level | MAC ratio | density (= params) | structured accuracy | unstructured accuracy |',
              '|---:|---:|---:|---:|---:|']
    for r in result['lenet_levels']:
        lines.append(f"| {r['level']} | {r['mac_ratio']:.3f} | {r['density']:.3f} | {100 * r['structured']:.1f}% | "
                     f"{100 * r['unstructured']:.1f}% |")
    lines += ['', '| 3x3 conv, c -> c, batch 128 | time per MAC relative to the largest c (channels: value) |',
              '|---|---|']
    for r in result['conv_cost']:
        cost = ' '.join(f'{c}: {v:.2f}' for c, v in r['per_mac'].items())
        lines.append(f"| {r['side']}x{r['side']} | {cost} |")
    lines += ['', '| model | MAC target | round_to | kept channels (exported convs and hidden linears) |',
              '|---|---:|---:|---|']
    for r in result['latency']:
        kept = ' '.join(map(str, r['kept_channels']))
        lines.append(f"| {r['model']} | {_target_cell(r)} | {_round_to_cell(r)} | {kept} |")
    return '\n'.join(lines)


if __name__ == '__main__':
    start = time.perf_counter()
    outcome = run()
    print(markdown(outcome))
    print(f'{time.perf_counter() - start:.0f} s')

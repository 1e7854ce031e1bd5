"""Structured tickets are physically smaller and measurably faster: exported vs dense, side by side in one process.

Part 1, latency and export equality. CIFAR ResNet-20 (synthetic 32x32 inputs), Conv-4 and LeNet-300-100 (28x28):
channel masks at 50%, 25% and 10% of the dense MACs (``structured_masks``, global, one shot, the fraction of channels
found by bisection on the MAC count), exported with ``export_ticket``. Forward time of the dense and the exported
network on the CPU at batch 1 and 128 (eval mode, BatchNorm folded into the convs with ``torch.fx``'s ``fuse`` as for
inference, one intra-op thread, interleaved, the minimum of ``repeats`` timings each; at batch 128 also unfused), their ratio beside the MAC
ratio, and max |exported - masked| on the batch. Goal: latency ratio <= 1.3 x MAC ratio at batch 128.

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
GOAL = 1.3  # latency ratio <= GOAL x MAC ratio at batch 128
EPOCHS = 4
CHANNEL_FRACTION = 0.35
BATCH = 60


def _all_alive(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(model).items()}


def _mac_ratio(macs: dict[str, Any], masks: dict[str, torch.Tensor]) -> float:
    return sparse_macs(macs['dense'], macs['weights'], layer_densities(masks)) / macs['dense']


def masks_at_macs(model: nn.Module, inputs: tuple, target: float, steps: int = 8) -> dict[str, torch.Tensor]:
    """One-shot channel masks whose MACs are the largest at or below ``target`` of the dense MACs (bisection on the
    fraction of channels pruned)."""
    macs = layer_macs(model, inputs, _all_alive(model))
    low, high, best = 0.0, 0.999, None
    for _ in range(steps):
        fraction = (low + high) / 2
        masks = structured_masks(model, inputs, fraction, _all_alive(model))
        if _mac_ratio(macs, masks) <= target:
            best, high = masks, fraction
        else:
            low = fraction
    return best if best is not None else structured_masks(model, inputs, high, _all_alive(model))


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


def latency_rows(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    dense = make().eval()
    trace = (torch.randn(2, *shape),)
    macs = layer_macs(dense, trace, _all_alive(dense))
    rows = []
    for target in MAC_TARGETS:
        masks = masks_at_macs(dense, trace, target)
        masked = make().eval()
        masked.load_state_dict(dense.state_dict())
        apply_masks(masked, masks)
        exported = export_ticket(masked, masks, trace).eval()
        row = {'model': name, 'target': target, 'mac_ratio': _mac_ratio(macs, masks),
               'exported_mac_ratio': network_cost(exported, trace)['macs'] / network_cost(dense, trace)['macs'],
               'param_ratio': sum(p.numel() for p in exported.parameters()) / sum(p.numel() for p in dense.parameters())}
        deployed = [fuse(dense), fuse(exported)]  # BatchNorm folded into the convs, as for inference
        for batch in (1, 128):
            x = torch.randn(batch, *shape)
            with torch.no_grad():
                row['max_abs_diff' if batch == 128 else 'max_abs_diff_b1'] = float((masked(x) - exported(x)).abs().max())
            dense_s, exported_s = _interleaved_min(deployed, x, repeats if batch == 128 else 5 * repeats)
            row[f'dense_ms_b{batch}'], row[f'exported_ms_b{batch}'] = 1000 * dense_s, 1000 * exported_s
            row[f'latency_ratio_b{batch}'] = exported_s / dense_s
        dense_s, exported_s = _interleaved_min([dense, exported], x, repeats)
        row['unfused_latency_ratio_b128'] = exported_s / dense_s
        row['goal_met'] = row['latency_ratio_b128'] <= GOAL * row['mac_ratio']
        rows.append(row)
        _progress(f"{name} at {target:.0%} MACs: latency ratio b128 {row['latency_ratio_b128']:.2f}")
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
    levels = accuracy_rows()
    chosen = [min(levels[1:], key=lambda r: abs(r['mac_ratio'] - target)) for target in MAC_TARGETS]
    resnet_25 = next(r for r in latency if r['model'] == 'cifar_resnet20' and r['target'] == 0.25)
    return {
        'threads': torch.get_num_threads(),
        'resnet20_25pct_latency_ratio_b128': resnet_25['latency_ratio_b128'],
        'goal_met_all_b128': all(r['goal_met'] for r in latency),
        'max_abs_diff': max(max(r['max_abs_diff'], r['max_abs_diff_b1']) for r in latency),
        'latency': latency,
        'lenet_levels': levels,
        'lenet_at_targets': chosen,
    }


def markdown(result: dict) -> str:
    lines = ['| model | MAC target | MAC ratio | params ratio | dense b1 | exported b1 | ratio b1 | dense b128 | '
             'exported b128 | ratio b128 | goal (≤ 1.3 × MACs) | ratio b128 unfused | max abs diff |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|']
    for r in result['latency']:
        lines.append(f"| {r['model']} | {r['target']:.0%} | {r['mac_ratio']:.3f} | {r['param_ratio']:.3f} | "
                     f"{r['dense_ms_b1']:.2f} ms | {r['exported_ms_b1']:.2f} ms | {r['latency_ratio_b1']:.2f} | "
                     f"{r['dense_ms_b128']:.1f} ms | {r['exported_ms_b128']:.1f} ms | {r['latency_ratio_b128']:.2f} | "
                     f"{'met' if r['goal_met'] else 'missed'} | {r['unfused_latency_ratio_b128']:.2f} | "
                     f"{max(r['max_abs_diff'], r['max_abs_diff_b1']):.1e} |")
    lines += ['', '| LeNet level | MAC ratio | density (= params) | structured accuracy | unstructured accuracy |',
              '|---:|---:|---:|---:|---:|']
    for r in result['lenet_levels']:
        lines.append(f"| {r['level']} | {r['mac_ratio']:.3f} | {r['density']:.3f} | {100 * r['structured']:.1f}% | "
                     f"{100 * r['unstructured']:.1f}% |")
    return '\n'.join(lines)


if __name__ == '__main__':
    start = time.perf_counter()
    outcome = run()
    print(markdown(outcome))
    print(f'{time.perf_counter() - start:.0f} s')

"""Cost of an error barrier: an 11-point ``error_barrier`` vs eleven bare evaluation passes, same model and data.

Goal (issue 3): the barrier costs at most 1.3x the bare passes, i.e. interpolation in place (no deep copy, no reload
per point) adds little to the forward passes. Both sides run in this process, interleaved, best of ``repeats``.
Also reported: the barrier with BatchNorm re-estimation (``bn='recompute'``, ``bn_batches`` extra forward passes per
point), which is expected to cost more by about (1 + bn_batches / eval batches).

    .venv/bin/python benchmarks/lmc_barrier.py [cpu|cuda] [eval_samples]
"""
from __future__ import annotations

import platform
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer_imp.functional import error_barrier

POINTS = 11
EVAL_SAMPLES = {'cpu': 512, 'cuda': 10_000}  # CIFAR-sized images (3x32x32); 10,000 = a CIFAR test set
BATCH_SIZE = 128
BN_BATCHES = 2


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _data(samples: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH_SIZE, 3, 32, 32, generator=generator), torch.randint(0, 10, (BATCH_SIZE,),
                                                                                     generator=generator))
            for _ in range(samples // BATCH_SIZE)]


@torch.no_grad()
def _bare_passes(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], passes: int) -> None:
    """What a hand-written evaluation does: forward, count errors, sum the loss, read both once per pass."""
    model.eval()
    for _ in range(passes):
        wrong, loss = 0, 0.0
        for inputs, targets in data:
            outputs = model(inputs)
            wrong = wrong + (outputs.argmax(1) != targets).sum()
            loss = loss + F.cross_entropy(outputs, targets, reduction='sum')
        float(wrong), float(loss)


def _timed(fn, device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(repeats: int = 3, device: str | None = None, eval_samples: int | None = None) -> dict[str, Any]:
    """Time both sides ``repeats`` times, interleaved; returns the best times (seconds), ratios and the setting.

    ``device`` defaults to CUDA when available; the model and the data live there, the endpoints on the CPU (as a
    checkpoint loaded with ``map_location='cpu'``; ``error_barrier`` moves them once per call). ``eval_samples``
    defaults to 512 on the CPU and 10,000 on a GPU.
    """
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    eval_samples = eval_samples or EVAL_SAMPLES[device.type]
    model = _model(0).to(device)
    data = [(x.to(device), y.to(device)) for x, y in _data(eval_samples)]
    state_a, state_b = _model(1).state_dict(), _model(2).state_dict()
    bare, barrier, recompute = [], [], []
    _bare_passes(model, data, 1)  # warm-up: first-call allocations and kernel selection
    for _ in range(repeats):
        bare.append(_timed(lambda: _bare_passes(model, data, POINTS), device))
        barrier.append(_timed(lambda: error_barrier(model, state_a, state_b, data, alphas=POINTS), device))
        recompute.append(_timed(lambda: error_barrier(model, state_a, state_b, data, alphas=POINTS, bn='recompute',
                                                      bn_loader=data, bn_batches=BN_BATCHES), device))
    result = {
        'points': POINTS,
        'eval_samples': len(data) * BATCH_SIZE,
        'batch_size': BATCH_SIZE,
        'parameters': sum(p.numel() for p in model.parameters()),
        'bare_s': min(bare),
        'barrier_s': min(barrier),
        'ratio': min(barrier) / min(bare),
        'recompute_s': min(recompute),
        'recompute_ratio': min(recompute) / min(bare),
        'bn_batches': BN_BATCHES,
        'hardware': (torch.cuda.get_device_name(device) if device.type == 'cuda' else
                     f'{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads'),
        'torch': torch.__version__,
    }
    return result


if __name__ == '__main__':
    r = run(device=sys.argv[1] if len(sys.argv) > 1 else None,
            eval_samples=int(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(f"{r['points']}-point error barrier vs {r['points']} bare evaluation passes "
          f"({r['eval_samples']} samples of 3x32x32, batch {r['batch_size']}, {r['parameters']:,} parameters; "
          f"{r['hardware']}; torch {r['torch']})")
    print(f"  bare passes      {r['bare_s']:.3f} s")
    print(f"  error_barrier    {r['barrier_s']:.3f} s   ratio {r['ratio']:.3f}  (goal <= 1.3)")
    print(f"  bn='recompute'   {r['recompute_s']:.3f} s   ratio {r['recompute_ratio']:.3f}  "
          f"(+{r['bn_batches']} train batches per point)")

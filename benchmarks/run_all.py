"""`make bench`: every benchmark, each a side-by-side comparison in one process, printed as ratios.

Usage: python benchmarks/run_all.py [name ...]   (names: prune_speed imp_overhead lmc_barrier time_to_ticket
                                             structured_ticket memory)
Results also go to benchmarks/results.json (machine, torch version and date included); copy the figures into
benchmarks/README.md by hand.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import sys

import torch

BENCHMARKS = ('prune_speed', 'imp_overhead', 'lmc_barrier', 'time_to_ticket', 'structured_ticket', 'memory')


def main(names: list[str]) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f'benchmark: {unknown} unknown; choose from {list(BENCHMARKS)}')
    results = {
        'date': datetime.date.today().isoformat(),
        'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
                   f'{torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"}',
        'torch': torch.__version__,
    }
    for name in names or BENCHMARKS:
        print(f'== {name}', flush=True)
        results[name] = importlib.import_module(name).run()
        for key, value in results[name].items():
            if not isinstance(value, (dict, list)):
                print(f'  {key}: {value:.4g}' if isinstance(value, float) else f'  {key}: {value}', flush=True)
    with open(os.path.join(os.path.dirname(__file__), 'results.json'), 'w') as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == '__main__':
    main(sys.argv[1:])

"""composer_imp: lottery-ticket pruning (IMP with weight rewinding, LMC error barriers, adaptive sparsity step) for
MosaicML Composer.

The public names load lazily, so that ``composer_imp.functional`` (pure torch) can be used without importing Composer.
"""
import importlib
from typing import Any

__version__ = '0.1.0'

_PUBLIC = {
    'IMP': 'composer_imp.algorithms.imp',
    'NonFiniteError': 'composer_imp.algorithms.imp',
    'FixedStep': 'composer_imp.algorithms.imp',
    'SparsityStep': 'composer_imp.algorithms.imp',
    'AdaptiveSparsityStep': 'composer_imp.algorithms.adaptive_sparsity',
    'LMCEvaluator': 'composer_imp.callbacks.lmc_evaluator',
    'instability_analysis': 'composer_imp.instability',
    'run_branch': 'composer_imp.branches',
    'load_ticket': 'composer_imp.functional.ticket',
    'export_ticket': 'composer_imp.export',
    'save_exported': 'composer_imp.export',
    'load_exported': 'composer_imp.export',
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

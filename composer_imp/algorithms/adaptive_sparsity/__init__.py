"""Adaptive sparsity step for IMP: per-level pruning fractions from a projection check, verified, with back-off.

See the method card (README.md) for the algorithm and its defaults.
"""
from composer_imp.algorithms.adaptive_sparsity.adaptive_sparsity import (
    BACKOFF_ON,
    AdaptiveSparsityStep,
    compute_totals,
    max_prune_fraction,
)

__all__ = ['AdaptiveSparsityStep', 'max_prune_fraction', 'compute_totals', 'BACKOFF_ON']

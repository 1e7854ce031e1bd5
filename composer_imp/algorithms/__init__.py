"""Composer algorithms of composer_imp."""
from composer_imp.algorithms.adaptive_sparsity import AdaptiveSparsityStep
from composer_imp.algorithms.imp import IMP, FixedStep, SparsityStep

__all__ = ['IMP', 'AdaptiveSparsityStep', 'FixedStep', 'SparsityStep']

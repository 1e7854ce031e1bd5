"""IMP: Iterative Magnitude Pruning with weight rewinding, as one Composer algorithm."""
from composer_imp.algorithms.imp.finite import NonFiniteError
from composer_imp.algorithms.imp.imp import IMP
from composer_imp.algorithms.imp.sparsity_step import FixedStep, SparsityStep
from composer_imp.functional.masks import magnitude_masks
from composer_imp.functional.rewind import rewind

__all__ = ['IMP', 'NonFiniteError', 'FixedStep', 'SparsityStep', 'magnitude_masks', 'rewind']

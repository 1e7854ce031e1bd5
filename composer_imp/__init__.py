"""composer_imp: lottery-ticket pruning (IMP with weight rewinding, LMC error barriers, adaptive sparsity step) for
MosaicML Composer."""
from composer_imp.algorithms import IMP, FixedStep, SparsityStep
from composer_imp.functional.ticket import load_ticket

__all__ = ['IMP', 'FixedStep', 'SparsityStep', 'load_ticket']
__version__ = '0.1.0'

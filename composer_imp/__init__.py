"""composer_imp: lottery-ticket pruning (IMP with weight rewinding, LMC error barriers, adaptive sparsity step) for
MosaicML Composer."""
from composer_imp.algorithms import IMP, AdaptiveSparsityStep, FixedStep, SparsityStep
from composer_imp.callbacks import LMCEvaluator
from composer_imp.functional.ticket import load_ticket
from composer_imp.instability import instability_analysis

__all__ = ['IMP', 'AdaptiveSparsityStep', 'FixedStep', 'SparsityStep', 'LMCEvaluator', 'load_ticket',
           'instability_analysis']
__version__ = '0.1.0'

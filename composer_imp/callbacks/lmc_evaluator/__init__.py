"""Linear mode connectivity between successive IMP levels (callback) and its functional twin."""
from composer_imp.callbacks.lmc_evaluator.lmc_evaluator import LMCEvaluator
from composer_imp.functional.barrier import error_barrier

__all__ = ['LMCEvaluator', 'error_barrier']

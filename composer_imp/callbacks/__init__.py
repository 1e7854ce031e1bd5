"""Composer callbacks of composer_imp."""
from composer_imp.callbacks.lmc_evaluator import LMCEvaluator

__all__ = ['LMCEvaluator']

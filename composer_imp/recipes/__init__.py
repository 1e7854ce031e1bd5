"""YAML recipes: ``load_recipe`` (parse, override, validate) and ``build_trainer`` (recipe -> Composer Trainer).

A recipe has llm-foundry's shape::

    model: {name: lenet_300_100}
    train_loader: {name: mnist-5k, batch_size: 64}
    eval_loader: {name: mnist-5k, batch_size: 500}
    optimizer: {name: adam, lr: 1.2e-3}
    scheduler: {name: constant}
    max_duration: 10ep                       # one IMP level's training, T
    algorithms: {imp: {levels: 8, rewind_to: 60ba}}
    callbacks: {lmc_evaluator: {}}
    loggers: {file: {}}

Names under ``algorithms``, ``callbacks``, ``loggers``, ``optimizer.name`` and ``scheduler(s).name`` come from
:data:`REGISTRIES` (extensible through entry points, see :mod:`composer_imp.recipes.registry`).
"""
from composer_imp.recipes.build import build_loader, build_model_from_recipe, build_trainer, child_recipe, resolve_run
from composer_imp.recipes.registry import REGISTRIES, Registry
from composer_imp.recipes.schema import LOADER_KEYS, TOP_LEVEL_KEYS, RecipeError, apply_overrides, load_recipe

__all__ = [
    'RecipeError',
    'load_recipe',
    'apply_overrides',
    'build_trainer',
    'build_loader',
    'build_model_from_recipe',
    'child_recipe',
    'resolve_run',
    'REGISTRIES',
    'Registry',
    'TOP_LEVEL_KEYS',
    'LOADER_KEYS',
]

"""Run by tests/test_llmfoundry.py under `composer -n 2`: llm-foundry's train_from_yaml on the recipe given, then each
rank saves the masks, weights and level records it holds.  Arguments: OUT RECIPE [OVERRIDE ...]."""
import os
import sys

import torch
from composer.utils import dist
from llmfoundry.command_utils import train_from_yaml

from composer_imp.evaluation import unwrap_model

out, recipe, *overrides = sys.argv[1:]
trainer = train_from_yaml(recipe, overrides)
imp = next(a for a in trainer.state.algorithms if type(a).__name__ == 'IMP')
torch.save({
    'params': {n: p.detach().clone() for n, p in unwrap_model(trainer.state).named_parameters()},
    'masks': imp.masks,
    'history': imp.history,
}, os.path.join(out, f'rank{dist.get_global_rank()}.pt'))

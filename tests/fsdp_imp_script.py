"""Run by tests/test_fsdp.py under `composer -n 2`: IMP with the LMC evaluator under Composer's FSDP2 (gloo on CPU),
checkpointing every 3 batches with autoresume; each rank saves what it holds. Arguments: the output folder, then
optionally ``exit=L,B`` to end every rank abruptly (``os._exit``) after batch B of level L, as a killed job would, and
``nolmc`` to run without the LMC evaluator."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from composer.optim import CosineAnnealingScheduler
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch import nn

from composer_imp import IMP, LMCEvaluator
from composer_imp.functional.shards import local, reshard
from helpers import digits_loader

out = sys.argv[1]
with_lmc = 'nolmc' not in sys.argv[2:]
exit_at = next((tuple(int(v) for v in arg[5:].split(',')) for arg in sys.argv[2:] if arg.startswith('exit=')), None)


class LevelStarts(Callback):
    """This rank's parameter shards at the first batch of every level (just after IMP's rewind)."""

    imp_rewind = False  # a record across levels: IMP's replay must not rewind it to step k

    def __init__(self, imp):
        self.imp, self.seen, self.starts = imp, set(), {}

    def before_forward(self, state, logger):
        if self.imp.level not in self.seen:
            self.seen.add(self.imp.level)
            self.starts[self.imp.level] = {n: local(p).detach().clone()
                                           for n, p in reshard(state.model).named_parameters()}

    def batch_end(self, state, logger):
        if exit_at == (self.imp.level, int(state.timestamp.batch)):
            os._exit(3)


torch.manual_seed(0)
# Odd channel counts: uneven row shards on 2 ranks (4 + 3 filters, 7 + 6, 5 + 5 rows). GroupNorm, not BatchNorm: FSDP2
# leaves buffers unsynchronised, so each rank's running statistics would differ (see the IMP method card).
net = nn.Sequential(nn.Conv2d(1, 7, 3, padding=1), nn.GroupNorm(1, 7), nn.ReLU(),
                    nn.Conv2d(7, 13, 3, padding=1), nn.GroupNorm(1, 13), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(52, 10))
model = ComposerClassifier(net, num_classes=10)
imp = IMP(levels=2, prune_fraction=0.5, rewind_to='2ba', folder=os.path.join(out, 'imp'), rewind_optimizer=True)
starts = LevelStarts(imp)
trainer = Trainer(model=model, train_dataloader=digits_loader(image=True, batch_size=32),
                  eval_dataloader=digits_loader('test', image=True, n=396), max_duration='8ba',
                  optimizers=torch.optim.Adam(model.parameters(), lr=3e-3), schedulers=[CosineAnnealingScheduler()],
                  algorithms=[imp], callbacks=[LMCEvaluator(alphas=5, rewind_barrier=True)] * with_lmc + [starts], progress_bar=False, seed=3,
                  device='cpu', parallelism_config={'fsdp': FSDP2Config()}, save_folder=os.path.join(out, 'checkpoints'),
                  save_interval='3ba', autoresume=True, run_name='fsdp-imp')
trainer.fit()
params = dict(reshard(trainer.state.model).named_parameters())
torch.save({
    'local_params': {n: local(p).detach().clone() for n, p in params.items()},
    'full_params': {n: p.full_tensor().detach().clone() for n, p in params.items()},
    'masks': imp.masks,
    'density': imp.density,
    'level_starts': starts.starts,
}, os.path.join(out, f'rank{dist.get_global_rank()}.pt'))

"""Run by tests/test_adaptive_sparsity.py under `composer -n 2`: an adaptive IMP run whose ranks save what they hold."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
from composer import Trainer
from composer.utils import dist
from torch.utils.data import DataLoader, TensorDataset

from composer_imp import IMP, AdaptiveSparsityStep
from helpers import digits_tensors, mlp

torch.set_num_threads(1)  # two processes on a small CPU: one thread each, or they fight over the cores
out = sys.argv[1]
x, y = digits_tensors()
train, val = TensorDataset(x[:1100], y[:1100]), TensorDataset(x[1100:1400], y[1100:1400])
test = TensorDataset(x[1400:], y[1400:])


def loader(dataset, shuffle, batch_size):
    return DataLoader(dataset, batch_size=batch_size, sampler=dist.get_sampler(dataset, shuffle=shuffle),
                      drop_last=shuffle)


model = mlp(seed=int(os.environ['RANK']))  # different init per rank: the step must not depend on the user seeding
step = AdaptiveSparsityStep(p_min=0.2, p_max=0.6, projection_metric='loss', projection_tolerance=0.05,
                            probe_samples=512, val_dataloader=loader(val, False, 75))
imp = IMP(target_density=0.3, sparsity_step=step, folder=os.path.join(out, 'imp'))
trainer = Trainer(model=model, train_dataloader=loader(train, True, 32), eval_dataloader=loader(test, False, 100),
                  max_duration='15ba', optimizers=torch.optim.Adam(model.parameters(), lr=0.01), algorithms=[imp],
                  progress_bar=False, seed=3, device='cpu')
trainer.fit()
torch.save({'history': imp.history, 'masks': imp.masks}, os.path.join(out, f'rank{dist.get_global_rank()}.pt'))

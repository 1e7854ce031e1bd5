"""Run by tests/test_ddp.py and tests/test_structured.py under `composer -n 2`: an IMP run whose ranks save what they
hold. Arguments: the output folder, then optionally IMP's structure (default weights)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
from composer import Trainer
from composer.optim import CosineAnnealingScheduler
from composer.utils import dist

from composer_imp import IMP
from helpers import digits_loader, small_cnn

out = sys.argv[1]
structure = sys.argv[2] if len(sys.argv) > 2 else 'weights'
model = small_cnn(seed=int(os.environ['RANK']))  # different init per rank: IMP must not depend on the user seeding
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
imp = IMP(levels=2, rewind_to='2ba', folder=os.path.join(out, 'imp'), structure=structure)
trainer = Trainer(model=model, train_dataloader=digits_loader(image=True, batch_size=32),
                  eval_dataloader=digits_loader('test', image=True), max_duration='6ba', optimizers=opt,
                  schedulers=[CosineAnnealingScheduler()], algorithms=[imp], progress_bar=False, seed=3, device='cpu')
trainer.fit()
torch.save({
    'params': {n: p.detach().clone() for n, p in trainer.state.model.module.named_parameters()},
    'masks': imp.masks,
    'ticket': imp.ticket(),
    'history': imp.history,
}, os.path.join(out, f'rank{dist.get_global_rank()}.pt'))

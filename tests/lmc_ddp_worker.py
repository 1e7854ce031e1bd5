"""Worker for the 2-rank DDP test: an IMP run with LMCEvaluator; each rank writes what it concluded per level.

Run by ``composer -n 2 tests/lmc_ddp_worker.py OUT_DIR``.
"""
import json
import os
import sys

from composer.utils import dist

from composer_imp import IMP
from composer_imp.callbacks import LMCEvaluator
from lmc_digits import build_model, make_trainer

if __name__ == '__main__':
    out_dir = sys.argv[1]
    imp = IMP(levels=2, prune_fraction=0.5, rewind_to='4ba', folder=os.path.join(out_dir, 'imp'))
    # bn='recompute' and a train subset exercise every all-reduce: error counts and BatchNorm statistics.
    lmc = LMCEvaluator(alphas=5, bn='recompute', bn_batches=2, train_subset_batches=2)
    trainer = make_trainer(build_model(), seed=3, algorithms=[imp], callbacks=[lmc])
    trainer.fit()
    trainer.close()
    keys = ('level', 'lmc/error', 'lmc/barrier', 'lmc/barrier_max_minus_mean', 'lmc/connected', 'imp/matching',
            'lmc/curve', 'lmc/train/curve')
    levels = [{k: record[k] for k in keys if k in record} for record in imp.history]
    with open(os.path.join(out_dir, f'rank{dist.get_global_rank()}.json'), 'w') as f:
        json.dump({'world_size': dist.get_world_size(), 'levels': levels}, f)

"""A run killed mid-level, or at the last step of a level, resumes to the same masks and weights."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from composer import Callback, Trainer
from composer.optim import CosineAnnealingScheduler

from composer_imp import IMP
from helpers import digits_loader, small_cnn

HERE = os.path.dirname(__file__)


class Kill(Callback):
    """Dies like a killed process: no clean-up, at a chosen event, level and (level-local) batch."""

    def __init__(self, event, level, batch):
        self.event, self.level, self.batch = event, level, batch

    def run_event(self, event, state, logger):
        if (event.value == self.event and state.algorithms[0].level == self.level and
                int(state.timestamp.batch) == self.batch):
            raise KeyboardInterrupt(f'killed at {event.value} of level {self.level}, batch {self.batch}')


def make_trainer(folder, callbacks=(), duration='6ba', rewind_to='2ba', rewind_optimizer=False, **kw):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return Trainer(model=model, train_dataloader=digits_loader(image=True, n=kw.pop('n', None)),
                   eval_dataloader=digits_loader('test', image=True), max_duration=duration, optimizers=opt,
                   schedulers=[CosineAnnealingScheduler()], eval_interval='2ba',
                   algorithms=[IMP(levels=3, rewind_to=rewind_to, rewind_optimizer=rewind_optimizer,
                                   folder=os.path.join(folder, 'imp'))],
                   callbacks=list(callbacks), save_folder=os.path.join(folder, 'ckpt'), save_interval='1ba',
                   run_name='resume', autoresume=True, progress_bar=False, seed=11, device='cpu', **kw)


class FitStart(Callback):
    batch = None

    def fit_start(self, state, logger):
        FitStart.batch = int(state.timestamp.batch)


def final_state(trainer):
    imp = trainer.state.algorithms[0]
    return trainer.state.model.state_dict(), imp.masks, [r['steps'] for r in imp.history]


def assert_same(a, b):
    assert a[2] == b[2]
    assert set(a[0]) == set(b[0]) and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def train(folder, kill=None, **kw):
    trainer = make_trainer(folder, callbacks=[FitStart(), kill] if kill else [FitStart()], **kw)
    try:
        trainer.fit()
        return final_state(trainer)
    except KeyboardInterrupt:
        return None
    finally:
        trainer.close()


@pytest.mark.parametrize('kill_event, kill_level, kill_batch, rewind_optimizer', [
    ('batch_start', 1, 4, False),  # mid-level 1
    ('batch_start', 1, 4, True),  # mid-level 1, optimizer rewinding (its snapshot travels in the checkpoint)
    ('batch_start', 1, 2, False),  # first step of level 1, right after the transition
    ('batch_start', 0, 3, False),  # level 0, after the rewind point
])
def test_killed_run_resumes_to_the_same_masks_and_weights(tmp_path, kill_event, kill_level, kill_batch,
                                                          rewind_optimizer):
    reference = train(str(tmp_path / 'ref'), rewind_optimizer=rewind_optimizer)
    assert train(str(tmp_path / 'run'), Kill(kill_event, kill_level, kill_batch),
                 rewind_optimizer=rewind_optimizer) is None
    assert_same(train(str(tmp_path / 'run'), rewind_optimizer=rewind_optimizer), reference)
    assert FitStart.batch == kill_batch  # it really resumed from the last checkpoint


def test_killed_at_the_last_step_of_an_epoch_aligned_level_resumes_to_the_same_result(tmp_path):
    # 6 batches per epoch and rewind to 0: every level ends with an epoch, so the transition runs at EPOCH_CHECKPOINT
    # and the checkpoint written at that batch's BATCH_CHECKPOINT still holds the trained, untransitioned level.
    kw = dict(duration='1ep', rewind_to='0ba', n=384)
    reference = train(str(tmp_path / 'ref'), **kw)
    assert train(str(tmp_path / 'run'), Kill('epoch_end', 1, 6), **kw) is None
    resumed = train(str(tmp_path / 'run'), **kw)
    assert FitStart.batch == 6
    assert_same(resumed, reference)
    assert reference[2] == [6, 6, 6, 6]


def test_hard_killed_process_resumes_with_autoresume(tmp_path):
    """A real process death (os._exit in the middle of level 2), then the same command again."""
    script = tmp_path / 'run.py'
    script.write_text(textwrap.dedent(f'''
        import os, sys
        sys.path.insert(0, {HERE!r})
        import torch
        from composer import Callback
        from test_resume import make_trainer, final_state
        class Die(Callback):
            def batch_start(self, state, logger):
                if os.environ.get('DIE') and state.algorithms[0].level == 2 and int(state.timestamp.batch) == 3:
                    os._exit(3)
        trainer = make_trainer(sys.argv[1], callbacks=[Die()])
        trainer.fit()
        model, masks, steps = final_state(trainer)
        torch.save({{'model': model, 'masks': masks, 'steps': steps}}, sys.argv[2])
    '''))
    env = dict(os.environ, DIE='1')
    died = subprocess.run([sys.executable, str(script), str(tmp_path / 'run'), str(tmp_path / 'out.pt')], env=env,
                          capture_output=True)
    assert died.returncode == 3, died.stderr.decode()[-2000:]
    env.pop('DIE')
    for folder, out in (('run', 'resumed.pt'), ('ref', 'ref.pt')):
        done = subprocess.run([sys.executable, str(script), str(tmp_path / folder), str(tmp_path / out)], env=env,
                              capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    resumed, ref = (torch.load(tmp_path / f) for f in ('resumed.pt', 'ref.pt'))
    assert_same((resumed['model'], resumed['masks'], resumed['steps']), (ref['model'], ref['masks'], ref['steps']))
    lines = open(tmp_path / 'run' / 'imp' / 'levels.jsonl').read().splitlines()
    assert len(lines) == 4  # nothing duplicated by the resumed run


def test_a_checkpoint_whose_masks_do_not_fit_the_model_raises_before_training(tmp_path):
    folder = str(tmp_path / 'run')
    assert train(folder, Kill('batch_start', 1, 4)) is None
    model = small_cnn()
    with pytest.raises(ValueError, match='checkpoint: IMP masks are for parameters'):
        Trainer(model=model, train_dataloader=digits_loader(image=True), max_duration='6ba',
                optimizers=torch.optim.SGD(model.parameters(), lr=0.05),
                algorithms=[IMP(levels=3, rewind_to='2ba', ignore=['module.8.weight'],
                                folder=os.path.join(folder, 'imp'))],
                save_folder=os.path.join(folder, 'ckpt'), run_name='resume', autoresume=True, progress_bar=False,
                device='cpu')

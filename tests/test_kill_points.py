"""Kills must never strand a run (issue 10): the kill points test_resume / test_checkpoint_hygiene do not reach. A
real ``composer-imp run`` subprocess SIGKILLs itself at a chosen point, the same ``run`` command is run again, and
the finished run must be bit-identical to an uninterrupted one: every ``imp/level_<L>/mask.pt`` and ``trained.pt``
tensor, and every ``levels.jsonl`` record but its timing."""
import json
import os
import subprocess
import sys

import pytest
import torch

from composer_imp import cli
from composer_imp.functional.ticket import verify_run
from test_checkpoint_hygiene import assert_equal
from test_cli import write_recipe

# Runs `composer-imp run ARGS` and SIGKILLs itself (no clean-up of any kind) where KILL_AT says:
#   file:<path suffix>:<n>  right after the n-th atomic write, by IMP's ticket writer, of a file ending so
#   barrier:<n>             inside LMCEvaluator's barrier computation, before scoring the n-th point of a path
#   epoch_checkpoint:<L>    at EPOCH_CHECKPOINT of level L, before IMP's work there (Composer's checkpoint of the
#                           level's last batch, written at BATCH_CHECKPOINT, is on disk)
KILLER = r'''
import os, signal, sys
mode, arg = os.environ['KILL_AT'].split(':', 1)
calls = [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if mode == 'file':
    import composer_imp.functional.ticket as ticket
    suffix, n = arg.rsplit(':', 1)
    write = ticket.atomic_write
    def killing_write(path, *args, **kwargs):
        result = write(path, *args, **kwargs)
        if path.endswith(suffix):
            calls[0] += 1
            if calls[0] == int(n):
                die()
        return result
    ticket.atomic_write = killing_write
elif mode == 'barrier':
    import composer_imp.callbacks.lmc_evaluator.lmc_evaluator as lmc
    curve = lmc.metric_curve
    def killing_curve(model, state_a, state_b, alphas, evaluate, *args, **kwargs):
        def killing_evaluate(probe):
            calls[0] += 1
            if calls[0] == int(arg):
                die()
            return evaluate(probe)
        return curve(model, state_a, state_b, alphas, killing_evaluate, *args, **kwargs)
    lmc.metric_curve = killing_curve
else:
    assert mode == 'epoch_checkpoint', mode
    from composer.core import Event
    from composer_imp import IMP
    apply = IMP.apply
    def killing_apply(self, event, state, logger):
        if event == Event.EPOCH_CHECKPOINT and self.level == int(arg):
            die()
        return apply(self, event, state, logger)
    IMP.apply = killing_apply
from composer_imp import cli
sys.exit(cli.main(sys.argv[1:]))
'''

TIMING = ('seconds', 'line_sha256')  # the wall clock, and the line checksum that covers it
LEVELS = (0, 1, 2)


@pytest.fixture(scope='module')
def recipe(tmp_path_factory):
    """The tiny recipe: 4 batches per level = one epoch (every level ends with an epoch), 2 pruned levels, LMC on,
    a checkpoint per batch."""
    return write_recipe(tmp_path_factory.mktemp('recipe') / 'tiny.yaml', run_name='kill-points', autoresume=True,
                        save_interval='1ba', loggers={}, callbacks={'lmc_evaluator': {'alphas': 3}})


@pytest.fixture(scope='module')
def reference(recipe, tmp_path_factory):
    """The uninterrupted run's folder."""
    folder = str(tmp_path_factory.mktemp('reference') / 'run')
    assert cli.main(['run', recipe, f'save_folder={folder}']) == 0
    return folder


def killed(recipe, folder, kill_at):
    env = {**os.environ, 'KILL_AT': kill_at, 'PYTHONPATH': os.pathsep.join(sys.path)}
    process = subprocess.run([sys.executable, '-c', KILLER, 'run', recipe, f'save_folder={folder}'], env=env,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == -9, process.stderr[-3000:]  # SIGKILLed where asked, not finished or failed
    return folder


def resumed(recipe, folder):
    """The same command again, with no kill (in this process, as test_checkpoint_hygiene: a second interpreter start
    would double each case's time): it must finish the run, every level's files verified against its manifest."""
    assert cli.main(['run', recipe, f'save_folder={folder}']) == 0
    assert status(folder) == 'complete'
    check = verify_run(os.path.join(folder, 'imp'))
    assert check['problems'] == [] and check['damaged_levels'] == [] and check['missing_levels'] == [], check
    for level in LEVELS:
        assert os.path.isfile(imp(folder, f'level_{level}', 'manifest.json')), level
    return folder


def imp(folder, *parts):
    return os.path.join(folder, 'imp', *parts)


def records(folder):
    with open(imp(folder, 'levels.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def assert_identical(folder, reference):
    for level in LEVELS:
        for name in ('mask.pt', 'trained.pt'):
            ours = torch.load(imp(folder, f'level_{level}', name), weights_only=True)
            theirs = torch.load(imp(reference, f'level_{level}', name), weights_only=True)
            assert_equal(ours, theirs, f'level_{level}/{name}')
    ours, theirs = records(folder), records(reference)
    assert [r['level'] for r in theirs] == list(LEVELS)
    assert len(ours) == len(theirs)
    for level, (mine, their) in enumerate(zip(ours, theirs)):
        assert mine == their, f'levels.jsonl, level {level}'


def lines(folder):
    path = imp(folder, 'levels.jsonl')
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return f.read().count('\n')


def status(folder):
    with open(os.path.join(folder, 'run.json')) as f:
        return json.load(f)['status']


@pytest.mark.parametrize('kill_at, on_disk, missing, lines_before', [
    # level 1's files: killed after its mask, after its weights, and after its levels.jsonl line, each before its
    # manifest (mask.pt, trained.pt, levels.jsonl, manifest.json is the order of the writes)
    ('file:level_1/mask.pt:1', ['level_1/mask.pt'], ['level_1/trained.pt', 'level_1/manifest.json'], 1),
    ('file:level_1/trained.pt:1', ['level_1/mask.pt', 'level_1/trained.pt'], ['level_1/manifest.json'], 1),
    ('file:levels.jsonl:2', ['level_1/mask.pt', 'level_1/trained.pt'], ['level_1/manifest.json'], 2),
    # level 0's, the level whose end also has the rewind point behind it
    ('file:level_0/trained.pt:1', ['level_0/mask.pt', 'level_0/trained.pt'], ['level_0/manifest.json'], 0),
], ids=['after-mask', 'after-trained', 'after-levels-line', 'level-0-after-trained'])
def test_a_kill_between_a_level_end_and_its_files_resumes_identical(recipe, reference, tmp_path, kill_at, on_disk,
                                                                     missing, lines_before):
    folder = killed(recipe, str(tmp_path / 'run'), kill_at)
    for name in on_disk:
        assert os.path.isfile(imp(folder, name)), name
    for name in missing:
        assert not os.path.exists(imp(folder, name)), name
    assert lines(folder) == lines_before
    assert status(folder) == 'running'  # killed: nothing recorded it
    assert_identical(resumed(recipe, folder), reference)


def test_a_kill_inside_the_lmc_barrier_at_the_end_of_level_1_resumes_identical(recipe, reference, tmp_path):
    folder = killed(recipe, str(tmp_path / 'run'), 'barrier:2')  # level 1's path, at its middle point
    assert lines(folder) == 1  # level 0's line only: level 1's record waits for its barrier
    assert not os.path.exists(imp(folder, 'level_1'))
    assert os.readlink(os.path.join(folder, 'checkpoints', 'latest-rank0.pt')) == 'level1-ep0-ba4-rank0.pt'
    assert_identical(resumed(recipe, folder), reference)
    assert records(folder)[1]['lmc/curve']['alphas'] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize('level', [2, 1], ids=['final-level', 'pruned-level'])
def test_a_kill_after_the_last_batch_checkpoint_of_an_epoch_aligned_level_resumes_identical(recipe, reference,
                                                                                            tmp_path, level):
    folder = killed(recipe, str(tmp_path / 'run'), f'epoch_checkpoint:{level}')
    # Composer's checkpoint of the level's last batch is the newest one; IMP's end of the level never ran.
    assert os.readlink(os.path.join(folder, 'checkpoints', 'latest-rank0.pt')) == f'level{level}-ep0-ba4-rank0.pt'
    assert lines(folder) == level and not os.path.exists(imp(folder, f'level_{level}'))
    assert_identical(resumed(recipe, folder), reference)

"""A restart repairs the checkpoint folder a killed run left behind (issue 10): partial or conflicting checkpoint
files are set aside, a missing ``latest`` symlink is re-pointed, and the run resumes to bit-identical masks and
weights. The damaged folders come from real runs killed with SIGKILL in a subprocess."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from composer_imp import cli
from composer_imp.recipes.build import repair_checkpoint_folder
from test_cli import write_recipe

# Runs `composer-imp run ARGS` and SIGKILLs itself at the N-th checkpoint write of Composer: KILL_AT=write:N writes
# half of that checkpoint's bytes at its final name first; KILL_AT=symlink:N dies after the N-th checkpoint is
# written and the old `latest` symlink removed, before the new one exists.
KILLER = r'''
import io, os, signal, sys
import torch
import composer.utils.checkpoint as ckpt
mode, n = os.environ['KILL_AT'].split(':')
n, calls = int(n), [0]
if mode == 'write':
    write = ckpt._write_checkpoint_file
    def killing_write(state_dict, filename):
        calls[0] += 1
        if calls[0] < n:
            return write(state_dict, filename)
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        data = buffer.getvalue()
        with open(filename, 'wb') as f:
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt._write_checkpoint_file = killing_write
else:
    symlink = os.symlink
    def killing_symlink(src, dst, *args, **kwargs):
        if os.path.basename(dst).startswith('latest-rank'):
            calls[0] += 1
            if calls[0] >= n:
                os.kill(os.getpid(), signal.SIGKILL)
        return symlink(src, dst, *args, **kwargs)
    os.symlink = killing_symlink
from composer_imp import cli
sys.exit(cli.main(sys.argv[1:]))
'''

LEVEL_0_SAVES = 4  # the tiny recipe: 4 batches per level, a checkpoint per batch; pruned levels save batches 2..4


def run(argv):
    return cli.main(argv)


@pytest.fixture(scope='module')
def recipe(tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp('recipe') / 'tiny.yaml', run_name='hygiene', autoresume=True,
                        save_interval='1ba', loggers={}, callbacks={})


@pytest.fixture(scope='module')
def reference(recipe, tmp_path_factory):
    """The uninterrupted run's folder."""
    folder = str(tmp_path_factory.mktemp('reference') / 'run')
    assert run(['run', recipe, f'save_folder={folder}']) == 0
    return folder


def killed(recipe, folder, kill_at):
    env = {**os.environ, 'KILL_AT': kill_at, 'PYTHONPATH': os.pathsep.join(sys.path)}
    process = subprocess.run([sys.executable, '-c', KILLER, 'run', recipe, f'save_folder={folder}'], env=env,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == -9, process.stderr[-2000:]
    return folder


@pytest.fixture(scope='module')
def killed_in_write(recipe, tmp_path_factory):
    """A run SIGKILLed half-way through writing its second checkpoint of level 1."""
    return killed(recipe, str(tmp_path_factory.mktemp('killed') / 'run'), f'write:{LEVEL_0_SAVES + 2}')


def checkpoints(folder):
    return os.path.join(folder, 'checkpoints')


def latest(folder):
    return os.readlink(os.path.join(checkpoints(folder), 'latest-rank0.pt'))


def assert_identical(folder, reference):
    for level in (0, 1, 2):
        for name in ('mask.pt', 'trained.pt'):
            ours = torch.load(os.path.join(folder, 'imp', f'level_{level}', name), weights_only=True)
            theirs = torch.load(os.path.join(reference, 'imp', f'level_{level}', name), weights_only=True)
            assert_equal(ours, theirs, f'level_{level}/{name}')


def assert_equal(ours, theirs, where):
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), where
        for key in theirs:
            assert_equal(ours[key], theirs[key], f'{where}:{key}')
    elif isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype and torch.equal(ours, theirs), where
    else:
        assert ours == theirs, where


def copy(folder, tmp_path):
    target = str(tmp_path / 'run')
    shutil.copytree(folder, target, symlinks=True)
    return target


def test_a_kill_during_a_checkpoint_write_leaves_a_partial_file_beside_latest(killed_in_write):
    names = os.listdir(checkpoints(killed_in_write))
    assert latest(killed_in_write) == 'level1-ep0-ba2-rank0.pt'  # the last complete one
    partial = os.path.join(checkpoints(killed_in_write), 'level1-ep0-ba3-rank0.pt')
    assert os.path.isfile(partial) and 'set_aside' not in names
    with pytest.raises(Exception):
        torch.load(partial, weights_only=True)


def test_a_restart_sets_the_partial_file_aside_and_resumes_to_identical_weights(recipe, killed_in_write,
                                                                                 reference, tmp_path):
    folder = copy(killed_in_write, tmp_path)
    with pytest.warns(UserWarning, match=r'level1-ep0-ba3-rank0\.pt to .*set_aside.*newer than level1-ep0-ba2'):
        assert run(['run', recipe, f'save_folder={folder}']) == 0
    assert os.listdir(os.path.join(checkpoints(folder), 'set_aside')) == ['level1-ep0-ba3-rank0.pt']
    assert latest(folder) == latest(reference)
    assert_identical(folder, reference)


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_one_before_resumed(recipe, killed_in_write, reference,
                                                                              tmp_path):
    folder = copy(killed_in_write, tmp_path)
    newest = os.path.join(checkpoints(folder), latest(folder))  # level1-ep0-ba2: cut to a third
    with open(newest, 'rb') as f:
        data = f.read()
    with open(newest, 'wb') as f:
        f.write(data[:len(data) // 3])
    open(os.path.join(checkpoints(folder), 'level1-ep0-ba4-rank0.pt'), 'wb').close()  # an empty newer one too
    with pytest.warns(UserWarning) as caught:
        assert run(['run', recipe, f'save_folder={folder}']) == 0
    moved = [str(w.message) for w in caught if 'set_aside' in str(w.message)]
    assert len(moved) == 3, moved
    assert any('level1-ep0-ba2-rank0.pt' in m and 'cannot read it' in m for m in moved)
    assert any('now points to ep0-ba4-rank0.pt' in str(w.message) for w in caught)  # level 0's end
    assert sorted(os.listdir(os.path.join(checkpoints(folder), 'set_aside'))) == [
        'level1-ep0-ba2-rank0.pt', 'level1-ep0-ba3-rank0.pt', 'level1-ep0-ba4-rank0.pt']
    assert_identical(folder, reference)


def test_a_missing_latest_symlink_is_re_pointed_and_the_run_resumes(recipe, killed_in_write, reference,
                                                                    tmp_path):
    folder = copy(killed_in_write, tmp_path)
    os.remove(os.path.join(checkpoints(folder), 'latest-rank0.pt'))
    assert run(['run', recipe, f'save_folder={folder}']) == 0  # not "already holds an IMP run"
    assert os.listdir(os.path.join(checkpoints(folder), 'set_aside')) == ['level1-ep0-ba3-rank0.pt']
    assert_identical(folder, reference)


def test_a_kill_between_removing_and_re_creating_latest_resumes(recipe, reference, tmp_path):
    folder = killed(recipe, str(tmp_path / 'run'), f'symlink:{LEVEL_0_SAVES + 2}')
    assert not os.path.lexists(os.path.join(checkpoints(folder), 'latest-rank0.pt'))
    assert os.path.isfile(os.path.join(checkpoints(folder), 'level1-ep0-ba3-rank0.pt'))  # complete, no symlink
    assert run(['run', recipe, f'save_folder={folder}']) == 0
    assert not os.path.exists(os.path.join(checkpoints(folder), 'set_aside'))  # resumed from the complete one
    assert_identical(folder, reference)


def test_repair_leaves_a_sound_folder_alone_and_never_moves_an_unsafe_latest(reference, tmp_path):
    folder = copy(reference, tmp_path)
    before = sorted(os.listdir(checkpoints(folder)))
    assert repair_checkpoint_folder(checkpoints(folder)) == []
    assert sorted(os.listdir(checkpoints(folder))) == before
    target = os.path.join(checkpoints(folder), latest(folder))
    torch.save({'state': os.system}, target)  # complete, but not loadable with weights_only=True: refused later
    assert repair_checkpoint_folder(checkpoints(folder)) == []
    assert sorted(os.listdir(checkpoints(folder))) == before

"""`composer-imp run` and the life of a run folder: real SIGINT / SIGTERM to a running CLI, resuming, re-running a
finished run, refusing a resume with another recipe or into another run's folder."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from composer_imp import cli
from test_cli import TINY, levels, run_cli, write_recipe

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'composer-imp')
LONG = {**TINY, 'callbacks': {}, 'loggers': {}, 'algorithms': {'imp': {'levels': 20, 'rewind_to': '1ba'}}}


def start(recipe, *overrides):
    return subprocess.Popen([SCRIPT, 'run', recipe, *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def signal_after_level_0(proc, run, signum, timeout=90):
    """Send ``signum`` once level 0's line is in levels.jsonl; return (exit code, stdout, stderr)."""
    path = os.path.join(run, 'imp', 'levels.jsonl')
    deadline = time.time() + timeout
    while not (os.path.isfile(path) and open(path).read().count('\n') >= 1):
        if proc.poll() is not None or time.time() > deadline:
            out, err = proc.communicate(timeout=10)
            pytest.fail(f'the run ended or stalled before level 0: rc {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}')
        time.sleep(0.02)
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def snapshot(run):
    return {os.path.relpath(os.path.join(d, f), run): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(run) for f in files}


@pytest.mark.timeout(120)
def test_a_real_sigint_stops_the_run_with_exit_130_and_writes_the_report(tmp_path):
    run = str(tmp_path / 'run')
    proc = start(write_recipe(tmp_path / 'long.yaml', LONG), f'save_folder={run}', 'checkpoints=false')
    code, out, err = signal_after_level_0(proc, run, signal.SIGINT)
    assert code == 130, out[-2000:] + err[-3000:]
    lines = out.strip().splitlines()
    assert lines[-1] == os.path.join(run, 'report.md')
    assert lines[-2] == 'Interrupted: the report covers the levels that finished (SIGINT).'
    info = json.load(open(os.path.join(run, 'run.json')))
    assert info['status'] == 'interrupted' and info['signal'] == 'SIGINT'
    finished = len(levels(run))
    assert 1 <= finished < 21
    assert f'interrupted (interrupted): {finished} of 21 planned levels finished' in open(lines[-1]).read()


@pytest.fixture(scope='module')
def resumed(tmp_path_factory):
    """A run stopped by a real SIGTERM after level 0, then resumed by the same command to the end."""
    base = tmp_path_factory.mktemp('resume')
    recipe = write_recipe(base / 'long.yaml', LONG, run_name='resumable', autoresume=True)
    run = str(base / 'run')
    proc = start(recipe, f'save_folder={run}')
    stopped = signal_after_level_0(proc, run, signal.SIGTERM)
    stopped_info = json.load(open(os.path.join(run, 'run.json')))
    stopped_levels = len(levels(run))
    old_stdout = sys.stdout
    with open(base / 'stdout.txt', 'w') as sys.stdout:
        try:
            code = cli.main(['run', recipe, f'save_folder={run}'])
        finally:
            sys.stdout = old_stdout
    return dict(base=base, recipe=recipe, run=run, stopped=stopped, stopped_info=stopped_info,
                stopped_levels=stopped_levels, code=code)


def test_a_real_sigterm_stops_the_run_with_exit_143_and_the_same_command_finishes_it(resumed):
    code, out, err = resumed['stopped']
    assert code == 143, out[-2000:] + err[-3000:]
    assert out.strip().splitlines()[-2:] == ['Interrupted: the report covers the levels that finished (SIGTERM).',
                                            os.path.join(resumed['run'], 'report.md')]
    assert resumed['stopped_info']['status'] == 'interrupted' and resumed['stopped_info']['signal'] == 'SIGTERM'
    assert 1 <= resumed['stopped_levels'] < 21
    assert resumed['code'] == 0
    assert [r['level'] for r in levels(resumed['run'])] == list(range(21))
    assert json.load(open(os.path.join(resumed['run'], 'run.json')))['status'] == 'complete'


def test_running_a_finished_run_again_says_so_and_changes_nothing(resumed, capsys):
    run = resumed['run']
    before, info = snapshot(run), open(os.path.join(run, 'run.json')).read()
    code, out, err = run_cli(['run', resumed['recipe'], f'save_folder={run}'], capsys)
    assert code == 0, err
    assert out.strip() == f'already complete: {os.path.join(run, "report.md")}'
    assert snapshot(run) == before and open(os.path.join(run, 'run.json')).read() == info


def test_console_settings_may_change_on_resume(resumed, capsys):
    run = resumed['run']
    before = snapshot(run)
    code, out, err = run_cli(['run', resumed['recipe'], f'save_folder={run}', 'progress_bar=true',
                              'log_to_console=true', 'loggers.inmemory={}'], capsys)
    assert code == 0 and out.startswith('already complete'), err
    assert snapshot(run) == before


def test_a_resume_with_another_recipe_is_refused_in_one_line(resumed, capsys):
    run = resumed['run']
    before = snapshot(run)
    code, _, err = run_cli(['run', resumed['recipe'], f'save_folder={run}', 'algorithms.imp.levels=25'], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert (f'levels: the run in {run} was started with algorithms.imp.levels=20, this command says 25; resume with '
            'the same recipe, or give a new save_folder') in err
    code, _, err = run_cli(['run', resumed['recipe'], f'save_folder={run}', '~scheduler'], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert 'scheduler: the run in' in err
    assert 'with scheduler={"name": "cosine_decay"}, this command says (unset)' in err
    assert snapshot(run) == before


def test_a_save_folder_of_another_run_is_refused_before_anything_is_touched(resumed, tmp_path, capsys):
    run = resumed['run']
    before = snapshot(run)
    assert {'recipe.yaml', 'report.md', 'plots/accuracy_vs_density.png'} <= set(before)
    recipe = write_recipe(tmp_path / 'other.yaml', LONG, run_name='other', autoresume=True)
    code, _, err = run_cli(['run', recipe, f'save_folder={run}'], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f'save_folder: {run} holds the run resumable, not other' in err
    assert snapshot(run) == before


SLOW_BUILD = """
import os, sys, time
from composer_imp import cli
from composer_imp.models import build_model
from composer_imp.recipes import REGISTRIES

def slow_lenet(num_classes=None):
    open(os.environ['BUILDING_MARKER'], 'w').close()
    time.sleep(60)  # the signal arrives while the trainer is being built
    return build_model('lenet_300_100', num_classes=num_classes).module

REGISTRIES['models'].register('slow_lenet', slow_lenet)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_real_signal_while_the_trainer_is_built_exits_in_one_line_and_leaves_no_run_folder(tmp_path, signum):
    run = tmp_path / 'run'
    recipe = write_recipe(tmp_path / 'r.yaml', model={'name': 'slow_lenet'}, save_folder=str(run))
    marker = tmp_path / 'building'
    proc = subprocess.Popen([sys.executable, '-c', SLOW_BUILD, 'run', recipe], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'BUILDING_MARKER': str(marker)})
    deadline = time.time() + 90
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=30)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err[-2000:]
    assert out.strip().splitlines()[-1] == (f'Interrupted ({name}) while building the trainer: nothing was trained '
                                            'or written.')
    assert 'Traceback' not in err and not run.exists()

"""The composer-imp CLI: run (run folder, level table, plots, loggers), report on interrupted runs, instability,
convert, errors, the console script and Composer's launcher."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from composer.core import Callback

from composer_imp import cli
from composer_imp.recipes import REGISTRIES, load_recipe
from test_recipes import write_cifar

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

TINY = {  # LeNet on real digits, 4 batches per level, 2 pruned levels, LMC on: seconds on a CPU
    'seed': 3,
    'model': {'name': 'lenet_300_100'},
    'train_loader': {'name': 'mnist-5k', 'batch_size': 32, 'limit': 128},
    'eval_loader': {'name': 'mnist-5k', 'batch_size': 100, 'limit': 200},
    'optimizer': {'name': 'adam', 'lr': 1e-3},
    'scheduler': {'name': 'cosine_decay'},
    'max_duration': '4ba',
    'algorithms': {'imp': {'levels': 2, 'rewind_to': '1ba'}},
    'callbacks': {'lmc_evaluator': {'alphas': 3}},
    'loggers': {'tensorboard': {}, 'inmemory': {}},
    'progress_bar': False,
}


def write_recipe(path, recipe=None, **changes):
    recipe = {**(recipe or TINY), **changes}
    with open(path, 'w') as f:
        yaml.safe_dump(recipe, f)
    return str(path)


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path):
    assert os.path.isfile(path), path
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 5000, path


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """One finished `composer-imp run` of the tiny recipe: (run folder, stdout, exit code)."""
    base = tmp_path_factory.mktemp('tiny')
    recipe = write_recipe(base / 'tiny.yaml')
    run = str(base / 'run')
    capture = base / 'stdout.txt'
    old_stdout = sys.stdout
    with open(capture, 'w') as sys.stdout:
        try:
            code = cli.main(['run', recipe, f'save_folder={run}'])
        finally:
            sys.stdout = old_stdout
    return run, capture.read_text(), code


def levels(run):
    with open(os.path.join(run, 'imp', 'levels.jsonl')) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------- run
def test_run_writes_the_run_folder_and_prints_the_report_path_last(tiny_run):
    run, out, code = tiny_run
    assert code == 0
    for name in ('recipe.yaml', 'run.json', 'report.md', 'report.json', 'imp/levels.jsonl', 'imp/rewind_point.pt',
                 'imp/level_2/mask.pt', 'imp/level_2/trained.pt', 'checkpoints/latest-rank0.pt'):
        assert os.path.exists(os.path.join(run, name)), name
    assert out.strip().splitlines()[-1] == os.path.join(run, 'report.md')
    assert json.load(open(os.path.join(run, 'run.json')))['status'] == 'complete'


def test_run_prints_one_table_row_per_level_as_levels_finish(tiny_run):
    _, out, _ = tiny_run
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ['level', 'density', 'test'])
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == ['0', '1', '2']
    assert [r[1] for r in rows] == ['100.00%', '80.00%', '64.00%']


def test_run_records_metrics_and_barriers_for_every_level(tiny_run):
    run, _, _ = tiny_run
    records = levels(run)
    assert [r['level'] for r in records] == [0, 1, 2]
    assert all('eval/MulticlassAccuracy' in r['eval'] for r in records)
    for record in records[1:]:
        assert 0.0 <= record['lmc/barrier'] <= 1.0
        assert record['lmc/curve']['alphas'] == [0.0, 0.5, 1.0]
        assert isinstance(record['imp/matching'], bool)


def test_run_draws_every_plot(tiny_run):
    run, _, _ = tiny_run
    for name in ('accuracy_vs_density.png', 'barrier_per_level.png', 'interpolation_paths.png'):
        assert_png(os.path.join(run, 'plots', name))
    report = open(os.path.join(run, 'report.md')).read()
    for name in ('accuracy_vs_density.png', 'barrier_per_level.png', 'interpolation_paths.png'):
        assert f'(plots/{name})' in report
    assert '## Per-layer density' in report and '`module.fc.weight`' in report
    assert '## Compute' in report and 'complete: 3 of 3 planned levels' in report
    assert "MACs counted per layer by torch-pruning's count_ops_and_params" in report


def test_run_saves_the_resolved_recipe_which_loads_again(tiny_run):
    run, _, _ = tiny_run
    recipe = load_recipe(os.path.join(run, 'recipe.yaml'))
    assert recipe['save_folder'] == run and recipe['run_name'].startswith('tiny-') and recipe['seed'] == 3
    assert recipe['algorithms']['imp']['levels'] == 2


def test_run_sends_the_metrics_to_the_configured_loggers(tiny_run):
    run, _, _ = tiny_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_name = load_recipe(os.path.join(run, 'recipe.yaml'))['run_name']
    events = EventAccumulator(os.path.join(run, 'tensorboard', run_name))  # TensorBoard's run folder: the run name
    events.Reload()
    scalars = set(events.Tags()['scalars'])
    assert {'imp/density', 'imp/level', 'imp/eval/eval/MulticlassAccuracy', 'lmc/barrier', 'imp/total/flops',
            'imp/total/levels'} <= scalars, sorted(scalars)
    assert [e.value for e in events.Scalars('imp/density')] == pytest.approx([1.0, 0.8, 0.64])


def test_run_into_a_used_run_folder_fails_in_one_line_and_touches_nothing(tiny_run, tmp_path, capsys):
    run, _, _ = tiny_run
    before = sorted(os.listdir(run))
    code, _, err = run_cli(['run', write_recipe(tmp_path / 'tiny.yaml'), f'save_folder={run}'], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'save_folder' in err and 'autoresume' in err
    assert sorted(os.listdir(run)) == before


# ---------------------------------------------------------------------------------------------------- report
def test_report_rebuilds_an_interrupted_run_folder(tiny_run, tmp_path, capsys):
    run = str(tmp_path / 'interrupted')
    shutil.copytree(tiny_run[0], run)
    shutil.rmtree(os.path.join(run, 'plots'))
    os.remove(os.path.join(run, 'report.md'))
    with open(os.path.join(run, 'imp', 'levels.jsonl')) as f:
        first = f.readline()
    with open(os.path.join(run, 'imp', 'levels.jsonl'), 'w') as f:
        f.write(first + '{"level": 1, "dens')  # killed while writing level 1's line
    info = json.load(open(os.path.join(run, 'run.json')))
    json.dump({**info, 'status': 'running'}, open(os.path.join(run, 'run.json'), 'w'))

    code, out, err = run_cli(['report', run], capsys)
    assert code == 0, err
    assert out.strip() == os.path.join(run, 'report.md')
    report = open(os.path.join(run, 'report.md')).read()
    assert 'interrupted or still running: 1 of 3 planned levels finished' in report
    assert_png(os.path.join(run, 'plots', 'accuracy_vs_density.png'))
    assert not os.path.exists(os.path.join(run, 'plots', 'barrier_per_level.png'))


class StopAfterFirstLevel(Callback):
    """Ctrl-C right after level 0 has finished, once per `armed = True` (a resume keeps the recipe, so the callback)."""
    armed = True

    def batch_end(self, state, logger):
        from composer_imp.algorithms.imp import IMP

        imp = next(a for a in state.algorithms if isinstance(a, IMP))
        if imp.history and StopAfterFirstLevel.armed:
            StopAfterFirstLevel.armed = False
            raise KeyboardInterrupt


def test_a_run_stopped_by_ctrl_c_still_gets_its_report(tmp_path, capsys):
    REGISTRIES['callbacks'].register('stop_after_first_level', StopAfterFirstLevel)
    StopAfterFirstLevel.armed = True
    try:
        recipe = write_recipe(tmp_path / 'tiny.yaml', callbacks={'stop_after_first_level': None})
        code, out, _ = run_cli(['run', recipe, f'save_folder={tmp_path}/run', 'checkpoints=false',
                                '~loggers.tensorboard'], capsys)
    finally:
        REGISTRIES['callbacks'].unregister('stop_after_first_level')
    assert code == 130
    assert out.strip().splitlines()[-1] == str(tmp_path / 'run' / 'report.md')
    assert json.load(open(tmp_path / 'run' / 'run.json'))['status'] == 'interrupted'
    assert 'interrupted (interrupted): 1 of 3 planned levels finished' in open(tmp_path / 'run' / 'report.md').read()


def test_autoresume_continues_an_interrupted_run_to_the_end(tmp_path, capsys):
    recipe = write_recipe(tmp_path / 'tiny.yaml', run_name='resumable', autoresume=True, loggers={})
    run = str(tmp_path / 'run')
    REGISTRIES['callbacks'].register('stop_after_first_level', StopAfterFirstLevel)
    StopAfterFirstLevel.armed = True
    try:
        code, _, _ = run_cli(['run', recipe, f'save_folder={run}', 'callbacks.stop_after_first_level={}'], capsys)
        assert code == 130 and [r['level'] for r in levels(run)] == [0]
        code, out, err = run_cli(['run', recipe, f'save_folder={run}', 'callbacks.stop_after_first_level={}'],
                                 capsys)  # the same command again
    finally:
        REGISTRIES['callbacks'].unregister('stop_after_first_level')
    assert code == 0, err
    assert [r['level'] for r in levels(run)] == [0, 1, 2]
    assert 'complete: 3 of 3 planned levels' in open(os.path.join(run, 'report.md')).read()


def test_report_on_a_missing_folder_fails_in_one_line(tmp_path, capsys):
    code, _, err = run_cli(['report', str(tmp_path / 'nope')], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'run_dir' in err


# ---------------------------------------------------------------------------------------------------- instability
def test_instability_trains_two_children_of_a_saved_level_and_adds_them_to_the_report(tiny_run, tmp_path, capsys):
    run = str(tmp_path / 'run')
    shutil.copytree(tiny_run[0], run)
    code, out, err = run_cli(['instability', run, '--level', '1', '--seeds', '1', '2', '--alphas', '3'], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == os.path.join(run, 'report.md')
    result = json.load(open(os.path.join(run, 'imp', 'level_1', 'instability_seeds_1_2.json')))
    assert result['level'] == 1 and result['seeds'] == [1, 2] and len(result['values']['error']) == 3
    assert result['barrier_max_minus_mean'] >= 0 and isinstance(result['stable'], bool)
    report = open(os.path.join(run, 'report.md')).read()
    assert '## Instability analysis' in report and 'instability_seeds_1_2.json' in report
    assert_png(os.path.join(run, 'plots', 'instability_level_1_seeds_1_2.png'))
    assert levels(run) == levels(tiny_run[0])  # the analysis leaves the run's own records alone


def test_instability_of_a_level_without_a_ticket_fails_in_one_line(tiny_run, capsys):
    code, _, err = run_cli(['instability', tiny_run[0], '--level', '7'], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert '--level: 7' in err and 'levels with tickets: 0, 1, 2' in err


# ---------------------------------------------------------------------------------------------------- adaptive
def test_an_adaptive_run_reports_the_chosen_fraction_per_level(tmp_path, capsys):
    adaptive = {
        'imp': {'target_density': 0.45, 'rewind_to': '1ba'},
        'adaptive_sparsity_step': {
            'p_min': 0.2, 'p_max': 0.6, 'probe_samples': 64, 'alphas': 3,
            'val_dataloader': {'name': 'mnist-5k', 'split': 'train', 'limit': 64, 'batch_size': 64,
                               'shuffle': False},
        },
    }
    train = {**TINY['train_loader'], 'skip': 64}
    recipe = write_recipe(tmp_path / 'adaptive.yaml', algorithms=adaptive, train_loader=train, loggers={})
    code, out, err = run_cli(['run', recipe, f'save_folder={tmp_path}/run', 'checkpoints=false'], capsys)
    assert code == 0, err
    records = levels(str(tmp_path / 'run'))
    assert records[-1]['density'] <= 0.45 and all('reason' in r['step'] for r in records[1:])
    assert_png(tmp_path / 'run' / 'plots' / 'adaptive_fraction.png')
    report = open(tmp_path / 'run' / 'report.md').read()
    assert '(plots/adaptive_fraction.png)' in report and 'A fixed 20% step needs' in report


# ---------------------------------------------------------------------------------------------------- convert
def test_convert_round_trips_a_cifar_folder_through_mds_and_the_streaming_loader(streaming_env, capsys):
    from composer_imp.data import build_dataloader

    src = write_cifar(str(streaming_env / 'cifar'), 'cifar10', per_file=6)
    out_dir = str(streaming_env / 'mds')
    code, out, err = run_cli(['convert', 'cifar10', '--src', src, '--out', out_dir], capsys)
    assert code == 0, err
    assert 'Wrote 30 train samples, 6 test samples' in out
    for split in ('train', 'test'):
        assert os.path.isfile(os.path.join(out_dir, split, 'index.json'))
        kw = dict(batch_size=4, augment=False, shuffle=False, drop_last=False)
        streamed = list(build_dataloader('streaming', split, root=out_dir, dataset='cifar10', **kw))
        folder = list(build_dataloader('cifar10', split, root=src, **kw))
        assert torch.equal(torch.cat([b[0] for b in streamed]), torch.cat([b[0] for b in folder]))
        assert torch.equal(torch.cat([b[1] for b in streamed]), torch.cat([b[1] for b in folder]))


@pytest.mark.parametrize('argv, words', [
    (['convert', 'cifar10', '--out', 'OUT'], '--src'),
    (['convert', 'cifar10', '--src', 'SRC/missing', '--out', 'OUT'], 'is not a folder'),
    (['convert', 'cifar10', '--src', 'SRC', '--out', 'OUT'], 'no data at'),
    (['convert', 'svhn', '--out', 'OUT'], 'invalid choice'),
    (['convert', 'mnist-5k', '--out', 'BUSY'], 'already holds files'),
])
def test_convert_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, argv, words):
    (tmp_path / 'SRC').mkdir()
    (tmp_path / 'BUSY' / 'train').mkdir(parents=True)
    (tmp_path / 'BUSY' / 'train' / 'index.json').write_text('{}')
    argv = [str(tmp_path / a) if a.isupper() or a.startswith('SRC/') else a for a in argv]
    before = sorted(p for p, _, _ in os.walk(tmp_path))
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert sorted(p for p, _, _ in os.walk(tmp_path)) == before


# ---------------------------------------------------------------------------------------------------- entry points
def test_the_console_script_runs_the_cli():
    # `python -m composer_imp.cli` is exercised by the launcher test below.
    script = os.path.join(os.path.dirname(sys.executable), 'composer-imp')
    result = subprocess.run([script, 'report', '--help'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('usage: composer-imp report')


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    code, _, err = run_cli(['train', 'x.yaml'], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'invalid choice' in err


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_composer_launcher_runs_the_cli_on_two_ranks(tmp_path):
    recipe = write_recipe(tmp_path / 'tiny.yaml', loggers={})  # no run_name: rank 0's generated name is shared
    launcher = os.path.join(os.path.dirname(sys.executable), 'composer')
    run = tmp_path / 'run'
    result = subprocess.run([launcher, '-n', '2', '--master_port', str(free_port()),
                             '--stderr', str(tmp_path / 'stderr_{rank}.txt'), '-m', 'composer_imp.cli', 'run', recipe,
                             f'save_folder={run}'], capture_output=True, text=True, timeout=230, cwd=tmp_path)
    logs = ''.join(open(p).read()[-2000:] for p in sorted(tmp_path.glob('stderr_*.txt')))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:] + logs
    assert str(run / 'report.md') in result.stdout.splitlines()  # the launcher prints its own lines after ours
    assert [r['level'] for r in levels(str(run))] == [0, 1, 2]
    assert json.load(open(run / 'run.json'))['world_size'] == 2
    assert (run / 'checkpoints' / 'latest-rank0.pt').exists()  # DDP: Composer's checkpoint comes from rank 0
    assert sorted(os.listdir(tmp_path)) == ['run', 'stderr_1.txt', 'tiny.yaml']  # rank 1 wrote nothing of its own

"""The CLI tells the truth about bad inputs (issue 10): one line on stderr naming the right key and what is allowed,
exit code 2, no traceback, nothing written; file problems are found before Composer or torch is imported."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from composer_imp import cli
from composer_imp.algorithms.imp import IMP
from test_cli import TINY, write_recipe

PROG = 'composer-imp: error: '


def fails(argv, capsys, folder):
    """Run the CLI in ``folder`` (the working directory); return its one error line, checking exit 2, empty stdout
    and that ``folder`` holds nothing new."""
    before = sorted(os.listdir(folder))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code = cli.main(argv)
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == ''
    assert len(err.splitlines()) == 1 and err.startswith(PROG), err
    assert sorted(os.listdir(folder)) == before, 'something was written'
    return err.strip()[len(PROG):]


@pytest.fixture
def recipe(tmp_path):
    write_recipe(tmp_path / 'tiny.yaml')
    return 'tiny.yaml'


# ---------------------------------------------------------------------------------------------------- before torch
LIGHT = r'''
import json, sys
from composer_imp import cli
codes = [cli.main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules, 'composer': 'composer' in sys.modules}))
'''


def test_file_problems_fail_in_one_line_before_composer_or_torch_is_imported(tmp_path):
    (tmp_path / 'binary.yaml').write_bytes(bytes(range(256)) * 4)
    (tmp_path / 'dup.yaml').write_text(yaml.safe_dump(TINY) + 'seed: 4\n')
    argvs = [['run', 'missing.yaml'], ['run', 'binary.yaml'], ['run', 'dup.yaml']]
    result = subprocess.run([sys.executable, '-c', LIGHT, json.dumps(argvs)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {'codes': [2, 2, 2], 'torch': False, 'composer': False}
    line = 'line {} '.format(len(yaml.safe_dump(TINY).splitlines()) + 1)
    assert result.stderr.splitlines() == [
        PROG + 'recipe: missing.yaml does not exist or is not a file; give the path of a recipe YAML file',
        PROG + 'recipe: binary.yaml is not a text YAML file (byte 0x80 at offset 128 is not UTF-8); give the path of '
        'a recipe YAML file',
        PROG + f'recipe: dup.yaml is not valid YAML at {line.strip()}, column 1: duplicate key \'seed\' (first given '
        f'at line {yaml.safe_dump(TINY).splitlines().index("seed: 3") + 1}); give each key once',
    ]
    assert sorted(os.listdir(tmp_path)) == ['binary.yaml', 'dup.yaml']


def test_the_console_script_fails_on_a_missing_recipe_in_seconds_without_a_traceback(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), 'composer-imp')
    started = time.time()
    result = subprocess.run([script, 'run', 'missing.yaml'], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    took = time.time() - started
    assert result.returncode == 2
    assert result.stderr == (PROG + 'recipe: missing.yaml does not exist or is not a file; give the path of a recipe '
                             'YAML file\n')
    assert 'Traceback' not in result.stderr and result.stdout == ''
    assert took < 8, f'{took:.1f} s: Composer or torch was imported before the file was checked'
    assert os.listdir(tmp_path) == []


def test_a_duplicate_key_in_a_nested_mapping_names_it(tmp_path, capsys):
    (tmp_path / 'dup.yaml').write_text('model: {name: lenet_300_100}\noptimizer:\n  name: adam\n  lr: 0.1\n'
                                       '  lr: 0.2\n')
    assert fails(['run', 'dup.yaml'], capsys, tmp_path) == (
        "recipe: dup.yaml is not valid YAML at line 5, column 3: duplicate key 'lr' (first given at line 4); give "
        'each key once')


def test_yaml_merge_keys_may_still_override(tmp_path):
    from composer_imp.recipes.schema import safe_load

    assert safe_load('base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  a: 3\n')['x'] == {'a': 3, 'b': 2}


# ---------------------------------------------------------------------------------------------------- the right key
@pytest.mark.parametrize('value', ['62', '3'])
def test_rewind_to_without_a_unit_is_one_line(value, recipe, tmp_path, capsys):
    assert fails(['run', recipe, f'algorithms.imp.rewind_to={value}'], capsys, tmp_path) == (
        f"algorithms.imp.rewind_to: {value} has no unit; give a Composer time string such as '{value}ba' or "
        f"'{value}ep' (or '0.05dur')")


def test_num_classes_fewer_than_the_data_fails_before_the_run_folder_is_written(recipe, tmp_path, capsys):
    assert fails(['run', recipe, 'model.num_classes=2', 'save_folder=run'], capsys, tmp_path) == (
        "model.num_classes: 2 is fewer than the 10 classes of mnist-5k (train_loader); use 10 or more, or leave it "
        "out (default: the data set's class count)")


def test_a_negative_max_duration_blames_max_duration(recipe, tmp_path, capsys):
    assert fails(['run', recipe, 'max_duration=-1ep'], capsys, tmp_path) == (
        "max_duration: '-1ep' is not allowed; use a Composer time string > 0 such as '10ep' or '500ba' ('ep', 'ba', "
        "'sp', 'dur' or 'sec')")


def test_ignore_that_is_not_names_blames_ignore(recipe, tmp_path, capsys):
    assert fails(['run', recipe, 'algorithms.imp.ignore=5'], capsys, tmp_path) == (
        'algorithms.imp.ignore: 5 is not allowed; use a list of parameter or module names (strings, fnmatch '
        'patterns), or one such string')


def test_target_density_as_a_string_blames_target_density(recipe, tmp_path, capsys):
    assert fails(['run', recipe, '~algorithms.imp.levels', "algorithms.imp.target_density='0.1'"], capsys,
                 tmp_path) == ("algorithms.imp.target_density: '0.1' is not allowed; use a density (a number) in "
                               '(0, 1)')


@pytest.mark.parametrize('kwargs, message', [
    ({'target_density': '0.1'}, "target_density: '0.1' is not allowed; use a density (a number) in (0, 1)"),
    ({'levels': 2, 'prune_fraction': '0.2'}, "prune_fraction: '0.2' is not allowed; use a fraction (a number) in "
                                             '(0, 1)'),
    ({'levels': '2'}, "levels: '2' is not allowed; use an integer >= 0"),
    ({'levels': 2, 'ignore': 5}, 'ignore: 5 is not allowed; use a list of parameter or module names (strings, '
                                 'fnmatch patterns), or one such string'),
    ({'levels': 2, 'ignore': ['fc1', 3]}, "ignore: ['fc1', 3] is not allowed; use a list of parameter or module "
                                          'names (strings, fnmatch patterns), or one such string'),
    ({'levels': 2, 'rewind_to': 62}, "rewind_to: 62 has no unit; give a Composer time string such as '62ba' or "
                                     "'62ep' (or '0.05dur')"),
])
def test_imp_names_the_argument_of_a_wrong_type(kwargs, message):
    with pytest.raises(ValueError) as error:
        IMP(**kwargs)
    assert str(error.value) == message


def test_imp_still_takes_ignore_as_a_generator_or_a_string():
    assert IMP(levels=1, ignore=(n for n in ['fc3'])).ignore == ['fc3']
    assert IMP(levels=1, ignore='fc3').ignore == ['fc3']


# ---------------------------------------------------------------------------------------------------- intervals
@pytest.mark.parametrize('override, message', [
    ('save_interval=0ba', "save_interval: '0ba' is not allowed; use a Composer time string > 0 such as '10ep' or "
                          "'500ba' ('ep', 'ba', 'sp', 'dur' or 'sec')"),
    ('eval_interval=0', "eval_interval: expected a Composer time string > 0 such as '10ep' or '500ba' ('ep', 'ba', "
                        "'sp', 'dur' or 'sec'), or an integer >= 1 (epochs), got 0 (int)"),
    ('eval_interval=0ep', "eval_interval: '0ep' is not allowed; use a Composer time string > 0 such as '10ep' or "
                          "'500ba' ('ep', 'ba', 'sp', 'dur' or 'sec')"),
])
def test_a_zero_interval_is_refused(override, message, recipe, tmp_path, capsys):
    assert fails(['run', recipe, override, 'save_folder=run'], capsys, tmp_path) == message


# ---------------------------------------------------------------------------------------------------- report
def test_report_on_an_empty_folder_writes_nothing(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    assert fails(['report', 'empty'], capsys, tmp_path) == (
        'run_dir: no levels.jsonl found in empty (nor recipe.yaml or run.json); give the save_folder of a '
        'composer-imp run')
    assert os.listdir(tmp_path / 'empty') == []


def test_report_on_a_parent_folder_names_the_runs_and_writes_nothing(tmp_path, capsys):
    for name in ('a', 'b'):
        (tmp_path / 'runs' / name / 'imp').mkdir(parents=True)
        (tmp_path / 'runs' / name / 'imp' / 'levels.jsonl').write_text('')
    assert fails(['report', 'runs'], capsys, tmp_path) == (
        'run_dir: runs is not a run folder; several runs found below it: runs/a, runs/b; give one of them')
    (tmp_path / 'runs' / 'b' / 'imp' / 'levels.jsonl').unlink()
    assert fails(['report', 'runs'], capsys, tmp_path) == (
        'run_dir: runs is not a run folder; the run below it is runs/a: give that folder')
    assert sorted(os.listdir(tmp_path / 'runs')) == ['a', 'b']

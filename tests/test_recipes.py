"""YAML recipes: every shipped recipe parses and builds on stand-in data; overrides; registries; malformed recipes."""
import glob
import importlib.metadata
import os
import pickle
import tomllib

import numpy as np
import pytest
import yaml

from composer_imp import cli
from composer_imp.recipes import REGISTRIES, RecipeError, apply_overrides, build_trainer, load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, 'recipes', '*.yaml')))
# llmfoundry_*.yaml are in llm-foundry's own train format; tests/test_llmfoundry.py runs them with llm-foundry.
OWN_RECIPES = [p for p in RECIPES if not os.path.basename(p).startswith('llmfoundry_')]
QUICKSTART = os.path.join(ROOT, 'recipes', 'quickstart.yaml')

_CIFAR = {  # name -> (folder, {split: files}, label key, classes)
    'cifar10': ('cifar-10-batches-py', {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']},
                'labels', 10),
    'cifar100': ('cifar-100-python', {'train': ['train'], 'test': ['test']}, 'fine_labels', 100),
}


def write_cifar(root, name, per_file=8, seed=0):
    """A tiny stand-in in torchvision's CIFAR python-pickle layout under ``root``."""
    folder, files, label_key, classes = _CIFAR[name]
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    rng = np.random.default_rng(seed)
    for split_files in files.values():
        for file in split_files:
            entry = {'data': rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8),
                     label_key: rng.integers(0, classes, size=per_file).tolist()}
            with open(os.path.join(root, folder, file), 'wb') as f:
                pickle.dump(entry, f)
    return root


def write_imagefolder(root, classes=2, per_class=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'class{c}'), exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f'class{c}', f'{i}.png'))
    return root


@pytest.fixture(scope='module')
def standins(tmp_path_factory):
    """Tiny data for every data set the recipes name: CIFAR pickles, an ImageFolder, CIFAR-10 MDS shards."""
    from composer_imp.data import convert_to_mds

    base = tmp_path_factory.mktemp('data')
    roots = {'cifar10': write_cifar(str(base / 'c10'), 'cifar10'),
             'cifar100': write_cifar(str(base / 'c100'), 'cifar100', per_file=40),
             'imagenet': write_imagefolder(str(base / 'imagenet'))}
    roots['streaming'] = str(base / 'c10-mds')
    convert_to_mds('cifar10', roots['cifar10'], roots['streaming'])
    return roots


def loader_overrides(recipe, roots, batch_size=4):
    """Point every loader of ``recipe`` (train, eval, and *_dataloader kwargs) at the stand-ins, with small batches."""
    out = []

    def point(path, spec):
        if spec['name'] in roots:
            out.append(f'{path}.root={roots[spec["name"]]}')
        out.append(f'{path}.batch_size={batch_size}')
        if 'num_workers' in spec:
            out.append(f'{path}.num_workers=0')
        if 'limit' in spec:
            out.append(f'{path}.limit=16')
        if 'skip' in spec:
            out.append(f'{path}.skip=16')

    for key in ('train_loader', 'eval_loader'):
        if recipe.get(key):
            point(key, recipe[key])
    for section in ('algorithms', 'callbacks'):
        for name, kwargs in (recipe.get(section) or {}).items():
            for key, value in (kwargs or {}).items():
                if key.endswith('dataloader') and isinstance(value, dict):
                    point(f'{section}.{name}.{key}', value)
    return out


# ---------------------------------------------------------------------------------------------------- shipped recipes
def test_the_shipped_recipes_are_all_there():
    names = {os.path.basename(p) for p in RECIPES}
    assert {'quickstart.yaml', 'mnist_resnet20_lmc.yaml', 'mnist_lenet_adaptive.yaml', 'cifar10_resnet20.yaml', 'cifar10_resnet20_streaming.yaml',
            'cifar100_resnet18.yaml', 'cifar100_resnet18_adaptive.yaml', 'imagenet_resnet50.yaml'} <= names


def test_the_cifar100_fixed_and_adaptive_recipes_differ_only_in_the_sparsity_step():
    """A saving measured between them must be the step's: same training set, T, k, evaluation and final density."""
    fixed, adaptive = (yaml.safe_load(open(os.path.join(ROOT, 'recipes', f'cifar100_resnet18{suffix}.yaml')))
                       for suffix in ('', '_adaptive'))
    assert adaptive['algorithms'].pop('adaptive_sparsity_step')['p_min'] == fixed['algorithms']['imp'].pop(
        'prune_fraction')
    fixed.pop('run_name'), adaptive.pop('run_name')
    assert fixed == adaptive
    assert fixed['train_loader']['skip'] == 5000

@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_every_recipe_starts_with_a_header_naming_what_it_reproduces_its_source_and_cost(path):
    header = []
    for line in open(path):
        if not line.startswith('#'):
            break
        header.append(line)
    text = ''.join(header)
    for word in ('Reproduces:', 'Source:', 'Expected cost:'):
        assert word in text, f'{os.path.basename(path)} header lacks {word}'


@pytest.mark.parametrize('path', OWN_RECIPES, ids=os.path.basename)
def test_every_recipe_parses_and_builds_on_standin_data(path, standins, streaming_env, tmp_path):
    from composer_imp.algorithms.adaptive_sparsity import AdaptiveSparsityStep
    from composer_imp.algorithms.imp import IMP
    from composer_imp.callbacks.lmc_evaluator import LMCEvaluator

    raw = yaml.safe_load(open(path))  # load_recipe would reject the data folders the stand-ins replace
    overrides = loader_overrides(raw, standins) + [f'save_folder={tmp_path / "run"}', 'progress_bar=false',
                                                   'autoresume=false']
    recipe = load_recipe(path, overrides)
    trainer = build_trainer(recipe)
    try:
        imp = next(a for a in trainer.state.algorithms if isinstance(a, IMP))
        assert imp.folder == str(tmp_path / 'run' / 'imp')
        imp_cfg = recipe['algorithms']['imp']
        if 'adaptive_sparsity_step' in recipe['algorithms']:
            assert isinstance(imp.sparsity_step, AdaptiveSparsityStep)
            assert imp.target_density == imp_cfg['target_density']
        else:
            assert (imp.levels, imp.target_density) == (imp_cfg.get('levels'), imp_cfg.get('target_density'))
            assert imp.prune_fraction == imp_cfg['prune_fraction']
        assert any(isinstance(c, LMCEvaluator) for c in trainer.state.callbacks)
        assert trainer.state.schedulers[0].base_lrs[0] == pytest.approx(recipe['optimizer']['lr'])
        assert len(trainer.state.schedulers) == 1
        assert trainer.state.evaluators and trainer.state.train_dataloader is not None
        assert imp.schedule_batches > imp.rewind_batch >= 0  # IMP planned the levels from max_duration and the data
        batch = next(iter(trainer.state.train_dataloader))
        assert batch[0].shape[0] == 4 and batch[0].dtype.is_floating_point
    finally:
        trainer.close()
    # Building trains nothing and writes no IMP files.
    assert not glob.glob(str(tmp_path / 'run' / 'imp' / '*'))


# ---------------------------------------------------------------------------------------------------- overrides
def test_overrides_set_nested_values_parsed_as_yaml_and_create_missing_mappings():
    recipe = {'a': {'b': 1}, 'lst': [{'g': 0.1}, {'g': 0.2}]}
    out = apply_overrides(recipe, ['a.b=2', 'a.c.d=[1, 2]', 'a.e=true', 'a.f=1e-3', 'a.s=hello', 'lst.1.g=0.5',
                                   'new.k={x: 1}', 'a.n=null'])
    assert out == {'a': {'b': 2, 'c': {'d': [1, 2]}, 'e': True, 'f': 1e-3, 's': 'hello', 'n': None},
                   'lst': [{'g': 0.1}, {'g': 0.5}], 'new': {'k': {'x': 1}}}
    assert recipe == {'a': {'b': 1}, 'lst': [{'g': 0.1}, {'g': 0.2}]}  # the input is left alone


def test_a_tilde_override_deletes_a_key():
    assert apply_overrides({'a': {'b': 1, 'c': 2}}, ['~a.b']) == {'a': {'c': 2}}


def test_overrides_reach_the_built_trainer(tmp_path):
    from composer_imp.algorithms.imp import IMP

    trainer = build_trainer(QUICKSTART, overrides=[
        'algorithms.imp.levels=3', 'algorithms.imp.rewind_to=5ba', 'optimizer.lr=0.01', 'callbacks.lr_monitor={}',
        '~callbacks.lmc_evaluator', 'train_loader.limit=256', 'seed=5', 'progress_bar=false',
        f'save_folder={tmp_path}/run'])
    try:
        imp = next(a for a in trainer.state.algorithms if isinstance(a, IMP))
        assert imp.levels == 3 and imp.rewind_batch == 5
        assert trainer.state.optimizers[0].param_groups[0]['lr'] == 0.01
        assert [type(c).__name__ for c in trainer.state.callbacks if type(c).__name__ in
                ('LRMonitor', 'LMCEvaluator')] == ['LRMonitor']
        assert trainer.state.dataloader_len == 4  # 256 digits / 64 per batch
        assert trainer.state.rank_zero_seed == 5
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------------- registries
def test_registries_hold_the_project_names_and_composers_own():
    assert {'imp', 'adaptive_sparsity_step', 'label_smoothing', 'blurpool', 'ema'} <= set(REGISTRIES['algorithms'])
    assert {'lmc_evaluator', 'lr_monitor', 'speed_monitor', 'checkpoint_saver'} <= set(REGISTRIES['callbacks'])
    assert {'inmemory', 'file', 'tensorboard', 'wandb', 'mlflow', 'progress_bar'} <= set(REGISTRIES['loggers'])
    assert {'sgd', 'adam', 'adamw', 'decoupled_sgdw', 'decoupled_adamw'} <= set(REGISTRIES['optimizers'])
    assert {'multistep', 'cosine_decay', 'linear_decay_with_warmup', 'multistep_with_warmup',
            'constant'} <= set(REGISTRIES['schedulers'])
    from composer.algorithms import BlurPool, LabelSmoothing

    assert REGISTRIES['algorithms'].get('label_smoothing') is LabelSmoothing
    assert REGISTRIES['algorithms'].get('blurpool') is BlurPool


def test_composer_algorithms_by_name_build_from_a_recipe(tmp_path):
    from composer.algorithms import LabelSmoothing

    trainer = build_trainer(QUICKSTART, overrides=['algorithms.label_smoothing.smoothing=0.1', 'progress_bar=false',
                                                   f'save_folder={tmp_path}/run', '~callbacks.lmc_evaluator'])
    try:
        smoothing = [a for a in trainer.state.algorithms if isinstance(a, LabelSmoothing)]
        assert len(smoothing) == 1 and smoothing[0].smoothing == 0.1
    finally:
        trainer.close()


def test_other_packages_add_names_through_entry_points(monkeypatch):
    from composer.callbacks import LRMonitor

    fake = importlib.metadata.EntryPoint(name='my_monitor', value='composer.callbacks:LRMonitor',
                                         group='composer_imp.callbacks')
    real = importlib.metadata.entry_points

    def entry_points(**kwargs):
        if kwargs.get('group') == 'composer_imp.callbacks':
            return importlib.metadata.EntryPoints([fake])
        return real(**kwargs)

    monkeypatch.setattr('composer_imp.recipes.registry.metadata.entry_points', entry_points)
    assert 'my_monitor' in REGISTRIES['callbacks'].names()
    assert REGISTRIES['callbacks'].get('my_monitor') is LRMonitor
    recipe = load_recipe(QUICKSTART, ['callbacks.my_monitor={}'])
    assert 'my_monitor' in recipe['callbacks']


def test_pyproject_declares_llmfoundry_entry_points_for_imp_and_the_lmc_evaluator():
    from composer_imp.algorithms.imp import IMP
    from composer_imp.callbacks.lmc_evaluator import LMCEvaluator

    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        entry_points = tomllib.load(f)['project']['entry-points']
    for group, name, cls in (('llmfoundry_algorithms', 'imp', IMP),
                             ('llmfoundry_callbacks', 'lmc_evaluator', LMCEvaluator)):
        ep = importlib.metadata.EntryPoint(name=name, value=entry_points[group][name], group=group)
        assert ep.load() is cls
        installed = {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}  # what llm-foundry reads
        assert installed[name].load() is cls


# ---------------------------------------------------------------------------------------------------- malformed
MALFORMED = {
    # case: (overrides, key path the one-line message must name, a word of what is allowed)
    'unknown top-level key': (['optimiser.lr=0.1'], 'optimiser', 'allowed'),
    'wrong type': (['train_loader.batch_size=lots'], 'train_loader.batch_size', 'integer'),
    'bad time string': (['max_duration=ten epochs'], 'max_duration', 'time string'),
    'missing required key': (['~model'], 'model', 'required'),
    'unknown algorithm': (['algorithms.lottery={}'], 'algorithms.lottery', 'imp'),
    'unknown callback': (['callbacks.lmc={}'], 'callbacks.lmc', 'lmc_evaluator'),
    'unknown logger': (['loggers.tensorbored={}'], 'loggers.tensorbored', 'tensorboard'),
    'unknown optimizer': (['optimizer.name=sgdd'], 'optimizer.name', 'sgd'),
    'unknown scheduler': (['scheduler.name=cosine'], 'scheduler.name', 'cosine_decay'),
    'unknown model': (['model.name=lenet5'], 'model.name', 'lenet_300_100'),
    'unknown data set': (['train_loader.name=mnist'], 'train_loader.name', 'mnist-5k'),
    'unknown argument': (['algorithms.imp.levelz=3'], 'algorithms.imp.levelz', 'levels'),
    'argument of the wrong type': (['optimizer.lr=fast'], 'optimizer.lr', 'a number'),
    'flag of the wrong type': (['algorithms.imp.mask_gradients=sometimes'], 'algorithms.imp.mask_gradients',
                               'true or false'),
    'value the class rejects': (['algorithms.imp.prune_fraction=1.5'], 'algorithms.imp.prune_fraction', '(0, 1)'),
    'rejected inside the Trainer': (['algorithms.imp.rewind_to=100000ba'], 'algorithms.imp.rewind_to', 'before'),
    'adaptive step without imp': (['~algorithms.imp', 'algorithms.adaptive_sparsity_step={}'],
                                  'algorithms.adaptive_sparsity_step', 'imp'),
    'missing data folder': (['train_loader.name=cifar10', 'train_loader.root=/nonexistent/cifar'],
                            'train_loader.root', 'does not exist'),
    'data folder without the data': (['train_loader.name=cifar10', 'train_loader.root=.'], 'train_loader',
                                     'cifar-10-batches-py'),
    'missing checkpoint': (['load_path=/nonexistent/ckpt.pt'], 'load_path', 'does not exist'),
    'malformed override': (['algorithms.imp.levels'], 'overrides', 'key.path=value'),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_a_malformed_recipe_fails_with_one_line_naming_the_key_exit_2_and_writes_nothing(case, tmp_path, capsys,
                                                                                          monkeypatch):
    overrides, key, allowed = MALFORMED[case]
    monkeypatch.chdir(tmp_path)
    run = tmp_path / 'run'
    code = cli.main(['run', QUICKSTART, f'save_folder={run}', 'progress_bar=false', *overrides])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('composer-imp: error: ') and f'{key}' in lines[0] and allowed in lines[0], lines[0]
    assert not run.exists() and os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize('content, words', [
    ('model: [unclosed', 'not valid YAML at line 1'),
    ('- just\n- a list\n', 'must hold a mapping'),
])
def test_a_recipe_file_that_is_not_a_yaml_mapping_fails_in_one_line(tmp_path, capsys, content, words):
    path = tmp_path / 'bad.yaml'
    path.write_text(content)
    assert cli.main(['run', str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and 'recipe' in err[0]
    assert sorted(os.listdir(tmp_path)) == ['bad.yaml']


def test_a_missing_recipe_file_fails_in_one_line(tmp_path, capsys):
    assert cli.main(['run', str(tmp_path / 'nope.yaml')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'nope.yaml does not exist' in err[0]


def test_load_recipe_raises_recipe_error_a_value_error_with_the_key_path():
    with pytest.raises(RecipeError) as info:
        load_recipe(QUICKSTART, ['callbacks.lmc_evaluator.alphaz=3'])
    assert isinstance(info.value, ValueError)
    assert info.value.path == 'callbacks.lmc_evaluator.alphaz'
    assert "did you mean 'alphas'" in str(info.value)


def test_recipes_are_plain_yaml_safe_load(tmp_path):
    path = tmp_path / 'r.yaml'
    path.write_text(open(QUICKSTART).read() + '\nexploit: !!python/object/apply:os.system ["true"]\n')
    with pytest.raises(RecipeError, match='not valid YAML'):
        load_recipe(path)
    assert yaml.safe_load(open(QUICKSTART))['model']['name'] == 'lenet_300_100'

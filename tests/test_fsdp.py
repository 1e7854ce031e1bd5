"""IMP under Composer's FSDP2 (``parallelism_config={'fsdp': FSDP2Config()}``), two gloo ranks on CPU through
Composer's own launcher: masks and rewind points live as each rank's row shards, the global threshold over the shards
gives exactly the single-process masks, rewinds are bit-exact, the LMC evaluator walks the path on the sharded model,
a killed run resumes bit-identically from sharded checkpoints, and what IMP cannot serve is refused at construction."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from composer.utils.parallelism import FSDP2Config
from torch import nn

from composer_imp import IMP
from composer_imp.algorithms.imp.shard_files import read_shard
from composer_imp.functional import interpolate_state, masks_at_density
from helpers import digits_tensors, free_port
from test_ddp import launch

LEVELS, FRACTION, RANKS = 2, 0.5, 2
SKIPPED_IN_COMPARISON = ('seconds', 'line_sha256')  # wall-clock time differs between runs


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp('fsdp_reference')
    launch('fsdp_imp_script.py', str(out))
    return out


def _ranks(out):
    return [torch.load(out / f'rank{rank}.pt') for rank in range(RANKS)]


def _level(out, level):
    folder = out / 'imp' / f'level_{level}'
    return torch.load(folder / 'mask.pt')['masks'], torch.load(folder / 'trained.pt')


def _records(out):
    return [{k: v for k, v in json.loads(line).items() if k not in SKIPPED_IN_COMPARISON}
            for line in open(out / 'imp' / 'levels.jsonl')]


def _rows(tensor, rank):
    """This rank's Shard(0) part, as FSDP2 splits rows (torch.chunk)."""
    return torch.chunk(tensor, RANKS, dim=0)[rank]


def test_sharded_levels_prune_exactly_the_single_process_masks(reference):
    ranks = _ranks(reference)
    assert [tuple(r['masks']['module.0.weight'].shape) for r in ranks] == [(4, 1, 3, 3), (3, 1, 3, 3)]  # uneven
    for level in range(LEVELS):
        masks, trained = _level(reference, level)
        following, _ = _level(reference, level + 1)
        # the distributed selection over the shards == masks_at_density over the whole trained weights, ties included
        expected = masks_at_density({name: trained[name] for name in masks}, FRACTION ** (level + 1), masks)
        assert all(torch.equal(following[name], expected[name]) for name in masks)
        assert all(not following[name][~masks[name]].any() for name in masks)  # nested
    for level in range(LEVELS + 1):
        masks, trained = _level(reference, level)
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == round(FRACTION ** level * total)
        assert all(torch.all(trained[name][~masks[name]] == 0) for name in masks)  # exact zeros after Adam steps
    final_masks, _ = _level(reference, LEVELS)
    for rank, held in enumerate(ranks):
        assert all(torch.equal(held['masks'][name], _rows(final_masks[name], rank)) for name in final_masks)
        assert held['density'] == ranks[0]['density']
        assert all(torch.equal(held['full_params'][name], ranks[0]['full_params'][name]) for name in held['full_params'])
    # torch-pruning cannot copy a sharded model: torch's FLOP counter counts the convolutions and the linear layer
    dense_macs = 7 * 64 * 1 * 9 + 13 * 64 * 7 * 9 + 52 * 10  # per 8x8 sample
    level0 = _records(reference)[0]
    assert level0['flops_method'] == 'torch-flop-counter' and level0['flops'] == 6 * level0['samples'] * dense_macs
    assert [r['density'] for r in _records(reference)] == [
        sum(int(m.sum()) for m in _level(reference, level)[0].values()) /
        sum(m.numel() for m in _level(reference, level)[0].values()) for level in range(LEVELS + 1)]


def test_every_level_starts_from_the_sharded_rewind_point_under_its_mask(reference):
    rewind_point = torch.load(reference / 'imp' / 'rewind_point.pt')['state_dict']  # whole, gathered by rank 0
    for rank, held in enumerate(_ranks(reference)):
        assert sorted(held['level_starts']) == list(range(LEVELS + 1))
        for level in range(1, LEVELS + 1):
            masks, _ = _level(reference, level)
            start = held['level_starts'][level]
            for name, shard in start.items():
                expected = _rows(rewind_point[name], rank)
                if name in masks:
                    expected = expected * _rows(masks[name], rank)
                assert torch.equal(shard, expected), (rank, level, name)


def _network():
    return nn.Sequential(nn.Conv2d(1, 7, 3, padding=1), nn.GroupNorm(1, 7), nn.ReLU(),
                         nn.Conv2d(7, 13, 3, padding=1), nn.GroupNorm(1, 13), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(52, 10)).eval()


@torch.no_grad()
def test_the_lmc_barrier_on_the_sharded_model_equals_the_single_process_path(reference):
    x, y = digits_tensors()
    x, y = x[1400:1796].view(-1, 1, 8, 8), y[1400:1796]  # the 396 eval samples, 198 per rank
    records = _records(reference)
    for level in range(1, LEVELS + 1):
        parent, child = _level(reference, level - 1)[1], _level(reference, level)[1]
        curve = records[level]['lmc/curve']
        assert curve['alphas'] == [0.0, 0.25, 0.5, 0.75, 1.0]
        for index, alpha in enumerate(curve['alphas']):
            network = _network()
            network.load_state_dict({k[len('module.'):]: v for k, v in interpolate_state(parent, child, alpha).items()})
            logits = network(x)
            assert curve['error'][index] == pytest.approx(float((logits.argmax(1) != y).float().mean()), abs=1e-6)
            assert curve['loss'][index] == pytest.approx(float(F.cross_entropy(logits, y)), abs=1e-5)
        assert records[level]['lmc/barrier'] >= 0 and isinstance(records[level]['lmc/connected'], bool)


def test_the_lmc_evaluator_leaves_the_sharded_run_as_it_would_be_without_it(reference, tmp_path):
    """Its paths (levels, and pruned rewind points) are written into the training model's shards; the trained state
    it puts back must be exactly the one it found."""
    launch('fsdp_imp_script.py', str(tmp_path), 'nolmc')
    with_lmc = _records(reference)
    assert all('lmc/rewind_barrier' in record for record in with_lmc[1:])
    assert _records(tmp_path) == [{k: v for k, v in record.items() if not k.startswith(('lmc/', 'imp/matching'))}
                                  for record in with_lmc]
    for level in range(LEVELS + 1):
        for mine, theirs in zip(_level(tmp_path, level), _level(reference, level)):
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    for mine, theirs in zip(_ranks(tmp_path), _ranks(reference)):
        assert all(torch.equal(mine['local_params'][n], theirs['local_params'][n]) for n in theirs['local_params'])


@pytest.mark.parametrize('level, batch, latest', [(1, 7, 'level1-ep0-ba6'), (2, 4, 'level2-ep0-ba3')])
def test_a_killed_sharded_run_resumes_bit_identically(reference, tmp_path, level, batch, latest):
    """Killed mid-level (resuming reads the level's masks, the parent state and the rewind point from every rank's
    files), and just after a transition (the next level's first checkpoint)."""
    launch('fsdp_imp_script.py', str(tmp_path), f'exit={level},{batch}', returncode=3)  # every rank dies there
    checkpoints = sorted(os.listdir(tmp_path / 'checkpoints'))
    assert os.readlink(tmp_path / 'checkpoints' / 'latest-rank0.pt') == latest
    assert not any(name.startswith(f'level{level + 1}') for name in checkpoints)
    launch('fsdp_imp_script.py', str(tmp_path))  # autoresume from the latest checkpoint
    # every level keeps its own sharded checkpoint folders (FSDP2Config names them by the timestamp only)
    assert {'ep0-ba3', 'ep0-ba6', 'level1-ep0-ba3', 'level1-ep0-ba6', 'level2-ep0-ba6'} <= set(
        os.listdir(tmp_path / 'checkpoints'))
    assert sorted(os.listdir(tmp_path / 'imp' / 'shards')) == ['rank0-of-2', 'rank1-of-2']
    assert _records(tmp_path) == _records(reference)  # metrics and LMC curves included
    for level in range(LEVELS + 1):
        for mine, theirs in zip(_level(tmp_path, level), _level(reference, level)):
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for mine, theirs in zip(_ranks(tmp_path), _ranks(reference)):
        for key in ('local_params', 'masks'):
            assert all(torch.equal(mine[key][name], theirs[key][name]) for name in theirs[key])


REFUSED = {  # label -> (parallelism_config, IMP arguments, the one line expected)
    'fsdp1-dict': ("{'fsdp': {}}", 'levels=1',
                   r"^parallelism_config: 'fsdp' with FSDP1 \(FSDPConfig\) is not supported by IMP.*FSDP2Config"),
    'fsdp1-config': ("{'fsdp': FSDPConfig()}", 'levels=1', r"^parallelism_config: 'fsdp' with FSDP1"),
    'channels': ("{'fsdp': FSDP2Config()}", "levels=1, structure='channels'",
                 r"^parallelism_config: IMP under FSDP2 .*structure='channels'"),
    'lamp': ("{'fsdp': FSDP2Config()}", "levels=1, scope='lamp'",
             r"^parallelism_config: IMP under FSDP2 .*scope='lamp' needs DDP"),
    'adaptive': ("{'fsdp': FSDP2Config()}", 'target_density=0.3, sparsity_step=AdaptiveSparsityStep()',
                 r'^parallelism_config: IMP under FSDP2 .*sparsity_step=AdaptiveSparsityStep needs DDP'),
}


@pytest.fixture(scope='module')
def refusals(tmp_path_factory):
    """Each Trainer of REFUSED built in a fresh process (Composer starts a one-rank process group for a parallelism
    config, which cannot be torn down reliably inside the test process): label -> the error raised."""
    script = tmp_path_factory.mktemp('refusals') / 'refuse.py'
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from composer import Trainer
        from composer.utils.parallelism import FSDP2Config, FSDPConfig
        from composer_imp import IMP, AdaptiveSparsityStep
        from helpers import digits_loader, small_cnn
        errors = {{}}
        for label, (config, imp_args) in {({k: v[:2] for k, v in REFUSED.items()})!r}.items():
            try:
                Trainer(model=small_cnn(), train_dataloader=digits_loader(image=True), max_duration='2ba',
                        algorithms=[eval(f'IMP({{imp_args}})')], parallelism_config=eval(config), device='cpu',
                        progress_bar=False)
                errors[label] = 'constructed'
            except Exception as error:
                errors[label] = f'{{type(error).__name__}}: {{error}}'
        # HSDP: weights replicated over one mesh dimension and sharded over the other (a 1 x 1 mesh here)
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        from composer_imp.algorithms.imp.imp import _check_shard_layout
        weight = distribute_tensor(torch.ones(4, 4), init_device_mesh('cpu', (1, 1)), [Replicate(), Shard(0)])
        try:
            _check_shard_layout({{'fc.weight': weight}})
            errors['hsdp'] = 'accepted'
        except Exception as error:
            errors['hsdp'] = f'{{type(error).__name__}}: {{error}}'
        print(json.dumps(errors))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('label', sorted(REFUSED))
def test_what_imp_cannot_serve_is_refused_at_trainer_construction(label, refusals):
    kind, _, message = refusals[label].partition(': ')
    assert kind == 'ValueError', refusals[label]
    assert re.search(REFUSED[label][2], message) and '\n' not in message, message


def test_a_weight_not_sharded_by_rows_over_all_ranks_is_refused(refusals):
    kind, _, message = refusals['hsdp'].partition(': ')
    assert kind == 'ValueError', refusals['hsdp']
    assert re.match(r"parallelism_config: IMP under FSDP2 needs every weight sharded by rows over all 1 ranks .*"
                    r"'fc.weight' is \(Replicate\(\), Shard\(dim=0\)\) over a mesh of shape \(1, 1\) \(HSDP is not "
                    r'supported\)$', message), message


def test_tensor_parallelism_is_refused_at_init():
    """Composer builds a TP world only with >= 2 ranks; IMP's INIT check reads the state's configs."""
    from types import SimpleNamespace

    from composer_imp.algorithms.imp.imp import _refuse_parallelism

    state = SimpleNamespace(tp_config=object(), fsdp_config=FSDP2Config())
    with pytest.raises(ValueError, match=r"^parallelism_config: 'tp' \(tensor parallelism\) is not supported by IMP"):
        _refuse_parallelism(state, IMP(levels=1))


def test_sharded_state_read_on_another_number_of_ranks_names_both(tmp_path):
    references = [{'path': f'shards/rank{r}-of-2/rewind_point.pt', 'sha256': '0' * 64, 'key': None} for r in range(2)]
    with pytest.raises(ValueError, match=r"^checkpoint: IMP's rewind point is sharded over 2 ranks \(FSDP\); resume "
                                         r'with 2 ranks, not 1'):
        read_shard(str(tmp_path), references, 'rewind point')


@pytest.mark.timeout(300)
def test_the_cli_runs_a_recipe_under_fsdp2_on_two_ranks_and_reports_it(tmp_path):
    from test_cli import levels, write_recipe

    recipe = write_recipe(tmp_path / 'tiny.yaml', loggers={}, run_name='tiny-fsdp')
    launcher = os.path.join(os.path.dirname(sys.executable), 'composer')
    run = tmp_path / 'run'
    result = subprocess.run([launcher, '-n', '2', '--master_port', str(free_port()),
                             '--stderr', str(tmp_path / 'stderr_{rank}.txt'), '-m', 'composer_imp.cli', 'run', recipe,
                             f'save_folder={run}', 'fsdp={}'], capture_output=True, text=True, timeout=280,
                            cwd=tmp_path)
    logs = ''.join(open(p).read()[-2000:] for p in sorted(tmp_path.glob('stderr_*.txt')))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:] + logs
    assert [r['level'] for r in levels(str(run))] == [0, 1, 2]
    assert all('lmc/barrier' in r for r in levels(str(run))[1:])
    assert (run / 'checkpoints' / 'latest-rank0.pt' / '__1_0.distcp').exists()  # sharded: one file per rank
    assert sorted(os.listdir(run / 'imp' / 'shards')) == ['rank0-of-2', 'rank1-of-2']
    report = (run / 'report.md').read_text()
    assert '| 2 |' in report  # the level table holds the last level, from the files rank 0 gathered


def test_a_recipe_with_an_unknown_fsdp_setting_is_one_line(tmp_path):
    from composer_imp.recipes import load_recipe
    from composer_imp.recipes.schema import RecipeError
    from test_cli import write_recipe

    with pytest.raises(RecipeError, match=r'fsdp\.reshard: unknown key; allowed: .*reshard_after_forward'):
        load_recipe(write_recipe(tmp_path / 'bad.yaml', fsdp={'reshard': True}))
    with pytest.raises(RecipeError, match=r"fsdp\.state_dict_type: expected one of sharded, full, got 'local'"):
        load_recipe(write_recipe(tmp_path / 'bad.yaml', fsdp={'state_dict_type': 'local'}))

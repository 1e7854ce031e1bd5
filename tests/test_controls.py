"""Control branches of a ticket (random prune, shuffle, reinit, rewind), the perturbation of a rewind point on its
mask's support, ``composer-imp branch`` end to end on a tiny finished run, and the report's section "Does the mask
carry the information?"."""
import json
import os
import shutil

import pytest
import torch

from composer_imp import cli
from composer_imp.branches import branch_ticket, dense_rewind_point
from composer_imp.functional import snapshot
from composer_imp.functional.controls import (
    layer_alive_counts,
    perturb_on_support,
    pruned_rewind_distance,
    random_masks,
    shuffled_masks,
)
from composer_imp.report.controls import claim_line
from test_cli import TINY as CLI_TINY
from test_cli import run_cli, write_recipe


def ticket_masks():
    generator = torch.Generator().manual_seed(0)
    return {'conv.weight': torch.rand(8, 3, 3, 3, generator=generator) < 0.3,
            'fc.weight': torch.rand(10, 64, generator=generator) < 0.7}


@pytest.mark.parametrize('draw', [random_masks, shuffled_masks])
def test_a_random_or_shuffled_mask_keeps_every_layers_alive_count_and_differs_from_the_ticket(draw):
    masks = ticket_masks()
    drawn = draw(masks, torch.Generator().manual_seed(1))
    assert layer_alive_counts(drawn) == layer_alive_counts(masks)
    assert all(drawn[n].dtype == torch.bool and drawn[n].shape == masks[n].shape for n in masks)
    assert all(not torch.equal(drawn[n], masks[n]) for n in masks)
    again = draw(masks, torch.Generator().manual_seed(1))
    assert all(torch.equal(again[n], drawn[n]) for n in masks)  # a seed reproduces the draw


def test_the_perturbation_has_the_given_norm_and_is_exactly_zero_off_the_support():
    masks = ticket_masks()
    generator = torch.Generator().manual_seed(2)
    point = {'conv.weight': torch.randn(8, 3, 3, 3, generator=generator), 'conv.bias': torch.randn(8),
             'fc.weight': torch.randn(10, 64, generator=generator)}
    perturbed = perturb_on_support(point, masks, 0.37, torch.Generator().manual_seed(3))
    delta = {n: (perturbed[n].double() - point[n].double()) for n in masks}
    norm = torch.sqrt(sum(d.square().sum() for d in delta.values())).item()
    assert abs(norm - 0.37) / 0.37 < 1e-6
    for name, mask in masks.items():
        assert torch.equal(perturbed[name][~mask], point[name][~mask])  # bit for bit off the support
        assert bool((delta[name][mask] != 0).all())
    assert torch.equal(perturbed['conv.bias'], point['conv.bias'])


def test_the_distance_between_successive_pruned_rewind_points_is_the_norm_of_the_weights_pruned_next():
    point = {'w': torch.tensor([3.0, -4.0, 1.0, 12.0])}
    masks, next_masks = {'w': torch.tensor([True, True, False, True])}, {'w': torch.tensor([False, False, False, True])}
    assert pruned_rewind_distance(point, masks, next_masks) == 5.0  # sqrt(3^2 + 4^2); the pruned 1.0 never counts
    with pytest.raises(ValueError, match='next_masks'):
        pruned_rewind_distance(point, next_masks, masks)


def rows(*levels):
    return [{'level': level, 'density': density, 'matching': matching, 'barrier': barrier, 'connected': None,
             'barrier_metric': 'error', 'accepted': True} for level, density, matching, barrier in levels]


def test_the_claim_line_counts_the_levels_below_half_density_where_lmc_and_matching_agree():
    table = rows((0, 1.0, None, None), (1, 0.8, True, 0.05), (4, 0.41, True, 0.0), (5, 0.33, False, 0.10),
                 (6, 0.26, False, 0.0), (7, 0.21, None, 0.2))
    # level 1 is above 50%, level 7 has no matching verdict; 4 and 5 agree, 6 does not (connected, not matching)
    assert claim_line(table, 0.02).startswith('**LMC ⇔ matching held at 2 of 3 levels below 50% density**')
    assert claim_line(table, 0.02).endswith('it failed at level 6.')
    assert 'not checked' in claim_line(rows((0, 1.0, None, None), (1, 0.8, True, 0.0)), 0.02)


# ---------------------------------------------------------------------------------------------------- on a run
TINY = {**CLI_TINY, 'loggers': {}}  # LeNet on mnist-5k, 4 batches per level, 2 pruned levels, LMC on


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp('controls')
    run = str(base / 'run')
    assert cli.main(['run', write_recipe(base / 'tiny.yaml', TINY), f'save_folder={run}']) == 0
    return run


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    run = str(tmp_path / 'run')
    shutil.copytree(tiny_run, run)
    return run


def level_files(run, level):
    return sorted(os.listdir(os.path.join(run, 'imp', f'level_{level}')))


def test_a_reinit_branch_keeps_the_mask_on_the_models_own_init_for_its_seed(tiny_run):
    _, _, ticket, _, _, build_model = cli._level_ticket(tiny_run, 1, 'test')
    branch = branch_ticket(ticket, 'reinit', 5, build_model=build_model)
    assert all(torch.equal(branch['masks'][n], ticket['masks'][n]) for n in ticket['masks'])
    fresh = snapshot(build_model(5))
    assert all(torch.equal(branch['rewind_point'][n], fresh[n]) for n in fresh)
    assert all(not torch.equal(branch['rewind_point'][n], ticket['rewind_point'][n]) for n in ticket['masks'])
    assert branch['rewind_batch'] == ticket['rewind_batch']


def test_dense_training_to_the_rewind_step_rebuilds_the_runs_rewind_point_bit_for_bit(tiny_run):
    _, _, ticket, _, make_trainer, build_model = cli._level_ticket(tiny_run, 1, 'test')
    theta = dense_rewind_point(make_trainer, build_model(TINY['seed']), TINY['seed'], ticket['rewind_batch'])
    assert set(theta) == set(ticket['rewind_point'])
    assert all(torch.equal(theta[n], ticket['rewind_point'][n]) for n in theta)


def test_branch_random_prune_writes_its_results_keeps_its_mask_and_shows_in_the_report(run_copy, capsys):
    code, out, err = run_cli(['branch', run_copy, '--level', '1', '--kind', 'random_prune', '--seeds', '1', '2'],
                             capsys)
    assert code == 0, err
    ticket = torch.load(os.path.join(run_copy, 'imp', 'level_1', 'mask.pt'))
    accuracies = []
    for seed in (1, 2):
        stem = os.path.join(run_copy, 'imp', 'level_1', f'branch_random_prune_seed{seed}')
        result = json.load(open(stem + '.json'))
        assert (result['kind'], result['seed'], result['level'], result['rewind_batch']) == ('random_prune', seed, 1, 1)
        assert result['layer_alive'] == layer_alive_counts(ticket['masks'])
        assert abs(result['density'] - ticket['density']) < 1e-12
        assert set(result['eval']) == set(json.loads(open(os.path.join(run_copy, 'imp', 'levels.jsonl'))
                                                     .readline())['eval'])
        saved = torch.load(stem + '.pt')
        for name, mask in saved['masks'].items():
            assert not torch.equal(mask, ticket['masks'][name])
            assert bool((saved['trained'][name][~mask] == 0).all())  # trained k -> T, pruned weights exactly 0
            assert bool((saved['trained'][name][mask] != 0).any())
        accuracies.append(result['eval']['eval/MulticlassAccuracy'])
    report = open(os.path.join(run_copy, 'report.md')).read()
    assert '## Does the mask carry the information?' in report
    mean, low, high = sum(accuracies) / 2, min(accuracies), max(accuracies)
    row = next(line for line in report.splitlines() if line.startswith('| 1 | 80%'))
    assert f'{100 * mean:.2f}% [{100 * low:.2f}, {100 * high:.2f}] (2)' in row
    assert 'LMC ⇔ matching' in report
    summary = json.load(open(os.path.join(run_copy, 'report.json')))
    assert [(b['kind'], b['seed']) for b in summary['branches']] == [('random_prune', 1), ('random_prune', 2)]


def test_branch_perturb_trains_both_copies_and_reports_their_barrier(run_copy, capsys):
    code, out, err = run_cli(['branch', run_copy, '--level', '1', '--kind', 'perturb', '--seeds', '4',
                              '--alphas', '3'], capsys)
    assert code == 0, err
    result = json.load(open(os.path.join(run_copy, 'imp', 'level_1', 'branch_perturb_seed4.json')))
    level_1 = torch.load(os.path.join(run_copy, 'imp', 'level_1', 'mask.pt'))['masks']
    level_2 = torch.load(os.path.join(run_copy, 'imp', 'level_2', 'mask.pt'))['masks']
    point = torch.load(os.path.join(run_copy, 'imp', 'rewind_point.pt'))['state_dict']
    assert result['perturbation_norm'] == pruned_rewind_distance(point, level_1, level_2) > 0
    assert len(result['values']['error']) == 3 and result['barrier_max_minus_mean'] >= 0
    assert isinstance(result['connected'], bool) and set(result['eval_unperturbed']) == set(result['eval'])
    row = next(line for line in open(os.path.join(run_copy, 'report.md')) if line.startswith('| 1 | 80%'))
    assert f'{100 * result["barrier_max_minus_mean"]:.2f} pp' in row


def test_branch_rewind_to_step_0_trains_from_the_runs_initialisation(run_copy, capsys):
    code, out, err = run_cli(['branch', run_copy, '--level', '2', '--kind', 'rewind', '--rewind-to', '0ba'], capsys)
    assert code == 0, err
    result = json.load(open(os.path.join(run_copy, 'imp', 'level_2', 'branch_rewind_0ba_seed1.json')))
    assert result['rewind_to'] == result['rewind_batch'] == 0
    assert 'rewind to 0ba acc' in open(os.path.join(run_copy, 'report.md')).read()


@pytest.mark.parametrize('argv, message', [
    (['--level', '1', '--kind', 'magnitude'], "--kind: invalid choice: 'magnitude'"),
    (['--level', '7', '--kind', 'reinit'], '--level: 7 has no saved ticket'),
    (['--level', '1', '--kind', 'shuffle', '--seeds', '2', '2'], '--seeds: [2, 2] repeats a seed'),
    (['--level', '2', '--kind', 'perturb'], '--level: perturb needs the mask of level 3'),
    (['--level', '1', '--kind', 'rewind'], '--rewind-to: is needed by --kind rewind'),
    (['--level', '1', '--kind', 'reinit', '--rewind-to', '0ba'], '--rewind-to: is only for --kind rewind'),
    (['--level', '1', '--kind', 'rewind', '--rewind-to', '2ep'], "rewind_to: '2ep' is not allowed"),
])
def test_bad_branch_input_fails_in_one_line_and_writes_nothing(tiny_run, capsys, argv, message):
    before = {level: level_files(tiny_run, level) for level in (0, 1, 2)}
    report = open(os.path.join(tiny_run, 'report.md')).read()
    code, out, err = run_cli(['branch', tiny_run, *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert {level: level_files(tiny_run, level) for level in (0, 1, 2)} == before
    assert open(os.path.join(tiny_run, 'report.md')).read() == report

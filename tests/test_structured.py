"""Structured IMP: coupled channel groups pruned whole, nested levels, exact physical export, files that load without
unpickling, IMP(structure='channels') in a real Trainer (rewind, resume, 2-rank DDP) and bad input."""
import os

import pytest
import torch
from composer.models import ComposerClassifier
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from composer_imp import IMP, export_ticket, load_exported, save_exported
from composer_imp.functional import apply_masks, magnitude_masks, prunable_weights
from composer_imp.functional.structured import channel_groups, structured_masks
from composer_imp.models import build_model
from composer_imp.models.cifar_resnet import CifarResNet
from helpers import digits_loader, small_cnn
from test_ddp import launch
from test_imp import run
from test_resume import FitStart, Kill


def all_alive(model, ignore=()):
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(model, ignore).items()}


def dead_out(mask):
    return set(torch.nonzero(~mask.flatten(1).any(1)).flatten().tolist())


def dead_in(mask):
    return set(torch.nonzero(~mask.transpose(0, 1).flatten(1).any(1)).flatten().tolist())


def assert_whole(mask):
    """Every pruned entry lies in a fully pruned output row or a fully pruned input column."""
    rows, cols = mask.flatten(1).any(1), mask.transpose(0, 1).flatten(1).any(1)
    outer = (rows[:, None] & cols[None, :]).view(*mask.shape[:2], *([1] * (mask.ndim - 2)))
    assert torch.equal(mask, outer.expand_as(mask))


def randomize_batchnorm(model):
    """Non-trivial BN statistics and shifts, so that a dead channel's constant output is not 0."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.normal_()
    return model


def resnet20():
    torch.manual_seed(0)
    return randomize_batchnorm(build_model('cifar_resnet20')).eval()


def resnet8():
    """One residual block per stage: the coupling of ResNet-20 at a third of its tracing time."""
    torch.manual_seed(0)
    return randomize_batchnorm(ComposerClassifier(CifarResNet(8), num_classes=10)).eval()


def image_batch(n=4, side=32):
    return ((torch.randn(n, 3, side, side), torch.zeros(n, dtype=torch.long)),)


class DepthwiseNet(nn.Module):
    """A MobileNet-like block: conv, depthwise conv (groups = channels), pointwise conv, pooling, classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x))


class TinyBert(nn.Module):
    """A 2-layer, 4-head BERT classifier built from a config (never downloaded); returns the logits."""

    def __init__(self):
        super().__init__()
        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=32, max_position_embeddings=16, num_labels=3, attn_implementation='eager')
        self.bert = BertForSequenceClassification(config)

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


def test_a_residual_stage_loses_the_same_channels_in_every_conv_feeding_the_add_and_reading_it():
    model = resnet20()
    masks = structured_masks(model, image_batch(), 0.5, all_alive(model))
    stream = dead_out(masks['module.blocks.3.conv2.weight'])
    assert 0 < len(stream) < 32
    for writer in ('blocks.3.shortcut.0', 'blocks.4.conv2', 'blocks.5.conv2'):
        assert dead_out(masks[f'module.{writer}.weight']) == stream
    for reader in ('blocks.4.conv1', 'blocks.5.conv1', 'blocks.6.conv1', 'blocks.6.shortcut.0'):
        assert dead_in(masks[f'module.{reader}.weight']) == stream
    inner = dead_out(masks['module.blocks.4.conv1.weight'])  # a block's own group: conv1's outputs, conv2's inputs
    assert inner and dead_in(masks['module.blocks.4.conv2.weight']) == inner
    for mask in masks.values():
        assert_whole(mask)
    apply_masks(model, masks)
    exported = export_ticket(model, masks, image_batch())
    for bn in ('blocks.3.bn2', 'blocks.3.shortcut.1', 'blocks.5.bn2'):  # the matching BatchNorm entries went with them
        assert exported.get_submodule(f'module.{bn}').num_features == 32 - len(stream)
    assert exported.get_submodule('module.blocks.4.bn1').num_features == 32 - len(inner)


@pytest.mark.parametrize('scope', ['global', 'layerwise'])
def test_levels_nest_keep_the_output_layer_whole_and_never_empty_a_layer(scope):
    model = resnet8()
    masks = all_alive(model)
    for _ in range(4):
        new = structured_masks(model, image_batch(), 0.8, masks, scope)
        assert all(not (new[n] & ~masks[n]).any() for n in masks)  # nothing pruned comes back
        apply_masks(model, new)
        masks = new
    assert all(0 < len(dead_out(m)) < m.shape[0] for n, m in masks.items() if n != 'module.fc.weight')
    assert all(len(dead_in(m)) < m.shape[1] for m in masks.values())
    assert dead_out(masks['module.fc.weight']) == set()  # the classes stay
    assert dead_in(masks['module.fc.weight']) == dead_out(masks['module.blocks.2.conv2.weight'])


def test_ignored_weights_stay_whole_and_keep_their_coupled_channels():
    model = resnet8()
    masks = structured_masks(model, image_batch(), 0.5, all_alive(model, ignore=['module.blocks.1.conv1.weight']))
    assert 'module.blocks.1.conv1.weight' not in masks
    assert dead_in(masks['module.blocks.1.conv2.weight']) == set()  # blocks.1.conv1's outputs: its group stays
    assert dead_out(masks['module.blocks.2.conv1.weight'])  # other groups are pruned


def kept_units(groups, masks):
    """{group root: (group, alive units)} of ``groups`` (``channel_groups``) under ``masks``; a unit is alive while any
    of its entries is."""
    kept = {}
    for group in groups:
        alive = torch.zeros(group.units, dtype=torch.bool)
        for m in group.members:
            alive[m.unit[masks[m.weight].movedim(m.dim, 0).flatten(1).any(1)[m.index]]] = True
        kept[group.root] = (group, int(alive.sum()))
    return kept


def round_up(count, multiple, cap):
    return min(-(-count // multiple) * multiple, cap)


def test_round_to_keeps_a_multiple_of_8_channels_per_group_and_residual_streams_stay_coupled():
    model = resnet20()
    groups = channel_groups(model, image_batch(), all_alive(model))
    plain = kept_units(groups, structured_masks(model, image_batch(), 0.3, all_alive(model)))
    masks = structured_masks(model, image_batch(), 0.3, all_alive(model), round_to=8)
    rounded = kept_units(groups, masks)
    assert any(count % 8 for _, count in plain.values())  # without rounding, counts like 11 or 23
    for root, (group, count) in rounded.items():  # the chosen units' count rounded up, never more pruned than asked
        assert count == round_up(plain[root][1], 8, group.units) and (count % 8 == 0 or count == group.units), root
    assert sum(count for _, count in rounded.values()) < sum(group.units for group, _ in rounded.values())
    stream = dead_out(masks['module.blocks.3.conv2.weight'])
    assert 0 < len(stream) < 32 and len(stream) % 8 == 0
    for writer in ('blocks.3.shortcut.0', 'blocks.4.conv2', 'blocks.5.conv2'):
        assert dead_out(masks[f'module.{writer}.weight']) == stream
    for reader in ('blocks.4.conv1', 'blocks.5.conv1', 'blocks.6.conv1', 'blocks.6.shortcut.0'):
        assert dead_in(masks[f'module.{reader}.weight']) == stream
    for mask in masks.values():
        assert_whole(mask)
    apply_masks(model, masks)
    exported = export_ticket(model, masks, image_batch())
    convs = [m for m in exported.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.out_channels % 8 == 0 for conv in convs) and any(conv.out_channels < 64 for conv in convs[-6:])


@pytest.mark.parametrize('scope', ['global', 'layerwise'])
def test_rounded_levels_nest_and_never_revive_a_channel(scope):
    """Level 1 without rounding leaves counts like 11 or 23; rounding up at levels 2 and 3 keeps at most those."""
    model = resnet8()
    masks, rounds, capped = all_alive(model), 0, 0
    groups = channel_groups(model, image_batch(), masks)
    before = kept_units(groups, masks)
    for level, round_to in ((1, 1), (2, 8), (3, 8)):
        plain = kept_units(groups, structured_masks(model, image_batch(), 0.6, masks, scope))
        new = structured_masks(model, image_batch(), 0.6, masks, scope, round_to=round_to)
        assert all(not (new[n] & ~masks[n]).any() for n in masks), level  # nothing pruned comes back
        after = kept_units(groups, new)
        for root, (group, count) in after.items():
            alive = before[root][1]
            assert 0 < count == round_up(plain[root][1], round_to, alive) <= alive, (level, root)
            assert count % round_to == 0 or count == alive, (level, root)
            rounds += count != plain[root][1]
            capped += round_up(plain[root][1], round_to, group.units) > alive  # the next multiple would revive
        apply_masks(model, new)
        masks, before = new, after
    assert rounds and capped  # both cases happened: rounded up to a multiple, and held at an alive non-multiple


@pytest.mark.parametrize('scope, kept, dead', [
    ('global', {'module.blocks.2.shortcut.0': 39, 'module.blocks.1.shortcut.0': 23, 'module.conv': 12,
                'module.blocks.0.conv1': 12, 'module.blocks.1.conv1': 23, 'module.blocks.2.conv1': 48},
     [4, 9, 13, 15, 18, 25, 27, 28, 29, 33, 34, 47, 49, 50, 57, 63]),
    ('layerwise', {'module.blocks.2.shortcut.0': 45, 'module.blocks.1.shortcut.0': 22, 'module.conv': 11,
                   'module.blocks.0.conv1': 11, 'module.blocks.1.conv1': 22, 'module.blocks.2.conv1': 45},
     [4, 7, 9, 13, 15, 16, 18, 25, 27, 28, 29, 33, 34, 47, 49, 50, 51, 57, 63]),
])
def test_round_to_1_prunes_what_structured_masks_pruned_before_rounding_existed(scope, kept, dead):
    model = resnet8()
    masks = structured_masks(model, image_batch(), 0.3, all_alive(model), scope, round_to=1)
    default = structured_masks(model, image_batch(), 0.3, all_alive(model), scope)
    assert all(torch.equal(masks[n], default[n]) for n in masks)
    groups = channel_groups(model, image_batch(), masks)
    assert {root: count for root, (_, count) in kept_units(groups, masks).items()} == kept
    assert sorted(dead_out(masks['module.blocks.2.conv1.weight'])) == dead


def test_round_to_leaves_attention_heads_alone_and_rounds_the_feed_forward_channels():
    torch.manual_seed(0)
    model = TinyBert().eval()
    inputs = (torch.randint(0, 50, (4, 8)),)
    plain = structured_masks(model, inputs, 0.5, all_alive(model))
    rounded = structured_masks(model, inputs, 0.5, all_alive(model), round_to=8)
    for layer in range(2):
        query = f'bert.bert.encoder.layer.{layer}.attention.self.query.weight'
        assert dead_out(rounded[query]) == dead_out(plain[query])  # 4 heads of 4 channels: not rounded to 8
        intermediate = rounded[f'bert.bert.encoder.layer.{layer}.intermediate.dense.weight']
        assert len(dead_out(intermediate)) % 8 == 0 < len(dead_out(intermediate))


@pytest.mark.parametrize('round_to', [0, -8, 2.5, True, '8', None])
def test_a_bad_round_to_is_refused_with_one_clear_error(round_to):
    model = small_cnn()
    with pytest.raises(ValueError, match=r'round_to: .* is not allowed; use an integer >= 1'):
        structured_masks(model, ((torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)),), 0.5,
                         all_alive(model), round_to=round_to)


@pytest.mark.parametrize('make, inputs', [
    (resnet20, image_batch()),
    (lambda: randomize_batchnorm(DepthwiseNet()).eval(), (torch.randn(4, 3, 16, 16),)),
    (lambda: TinyBert().eval(), (torch.randint(0, 50, (4, 8)),)),
], ids=['resnet20', 'depthwise', 'bert'])
def test_the_exported_network_computes_what_the_masked_network_computes(make, inputs):
    torch.manual_seed(1)
    model = make()
    masks = all_alive(model)
    for _ in range(2):
        masks = structured_masks(model, inputs, 0.5, masks)
        apply_masks(model, masks)
    exported = export_ticket(model, masks, inputs)
    with torch.no_grad():
        error = (model(*inputs) - exported(*inputs)).abs().max()
    assert error <= 1e-5
    assert sum(p.numel() for p in exported.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())


def test_attention_is_pruned_by_whole_heads():
    torch.manual_seed(0)
    model = TinyBert().eval()
    inputs = (torch.randint(0, 50, (4, 8)),)
    masks = structured_masks(model, inputs, 0.5, all_alive(model))
    attention = 'bert.bert.encoder.layer.0.attention'
    dead = dead_out(masks[f'{attention}.self.query.weight'])
    assert dead
    assert all(set(range(4 * (c // 4), 4 * (c // 4) + 4)) <= dead for c in dead)  # whole heads of 4 channels
    for name in ('self.key', 'self.value'):
        assert dead_out(masks[f'{attention}.{name}.weight']) == dead
    assert dead_in(masks[f'{attention}.output.dense.weight']) == dead
    assert dead_out(masks['bert.bert.encoder.layer.0.output.dense.weight']) == set()  # the hidden size (LayerNorm)
    apply_masks(model, masks)
    exported = export_ticket(model, masks, inputs)
    self_attention = exported.get_submodule(f'{attention}.self')
    assert self_attention.num_attention_heads == 4 - len(dead) // 4
    assert self_attention.query.out_features == self_attention.all_head_size == 16 - len(dead)


def test_an_unstructured_ticket_exports_with_almost_nothing_removed():
    model = resnet8()
    masks = magnitude_masks(prunable_weights(model), 0.5)
    apply_masks(model, masks)
    exported = export_ticket(model, masks, image_batch())
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in model.parameters())


def test_the_exported_files_load_with_weights_only_and_rebuild_the_same_network(tmp_path):
    model = resnet20()
    masks = structured_masks(model, image_batch(), 0.5, all_alive(model))
    apply_masks(model, masks)
    exported = export_ticket(model, masks, image_batch()).eval()
    state_path, description_path = save_exported(exported, build_model('cifar_resnet20'), str(tmp_path))
    state = torch.load(state_path, weights_only=True)
    assert state['module.blocks.3.conv2.weight'].shape == exported.get_submodule('module.blocks.3.conv2').weight.shape
    rebuilt = load_exported(build_model('cifar_resnet20'), str(tmp_path)).eval()
    inputs = image_batch()
    with torch.no_grad():
        assert torch.equal(rebuilt(*inputs), exported(*inputs))


def test_export_refuses_masks_that_do_not_fit_before_writing_anything(tmp_path):
    model = resnet20()
    masks = all_alive(model)
    masks['module.fc.weight'] = torch.ones(10, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"masks\['module.fc.weight'\]: shape \(10, 32\) does not fit"):
        export_ticket(model, masks, image_batch())
    with pytest.raises(ValueError, match=r"masks: \['fc.weight'\] are not parameters"):
        export_ticket(model, {'fc.weight': torch.ones(10, 64, dtype=torch.bool)}, image_batch())


# ---------------------------------------------------------------------------------------------- IMP in a Trainer
def structured_run(tmp_path, **imp_kw):
    imp = IMP(levels=2, rewind_to='2ba', prune_fraction=0.5, structure='channels', folder=str(tmp_path / 'imp'),
              **imp_kw)
    return run(tmp_path, imp=imp, model=small_cnn(), train_dataloader=digits_loader(image=True),
               eval_dataloader=digits_loader('test', image=True))


def assert_coupled(masks):
    """small_cnn: conv 0 -> BN -> conv 3 -> BN -> pool 2x2 -> flatten -> fc (4 inputs per conv-3 channel)."""
    conv0, conv3, fc = masks['module.0.weight'], masks['module.3.weight'], masks['module.8.weight']
    for mask in (conv0, conv3, fc):
        assert_whole(mask)
    assert dead_out(conv0) == dead_in(conv3)
    assert dead_in(fc) == {4 * c + i for c in dead_out(conv3) for i in range(4)}
    assert dead_out(fc) == set()
    return len(dead_out(conv0)) + len(dead_out(conv3))


def test_structured_imp_prunes_whole_groups_to_exact_zeros_and_rewinds_survivors_bit_exactly(tmp_path):
    trainer, imp, rec = structured_run(tmp_path)
    point = torch.load(tmp_path / 'imp' / 'rewind_point.pt')['state_dict']
    previous = None
    for level, start, dead_units in ((1, 6, 12), (2, 10, 18)):  # 50% of 24 channels, then of the 12 left
        masks = torch.load(tmp_path / 'imp' / f'level_{level}' / 'mask.pt')['masks']
        assert assert_coupled(masks) == dead_units
        if previous is not None:
            assert all(not (masks[n] & ~previous[n]).any() for n in masks)
        previous = masks
        for name, value in point.items():
            expected = value.masked_fill(~masks[name], 0) if name in masks else value
            assert torch.equal(rec.start_weights[start][name], expected), (level, name)
    assert rec.pruned_max[6:] == [0.0] * 8  # pruned entries stay exactly 0 after every optimizer step
    params = dict(trainer.state.model.named_parameters())
    assert all(not params[n][~m].any() for n, m in imp.masks.items())


def test_a_resumed_structured_run_gives_identical_masks(tmp_path):
    from composer import Trainer
    from composer.optim import CosineAnnealingScheduler

    def train(folder, callbacks=()):
        model = small_cnn()
        trainer = Trainer(model=model, train_dataloader=digits_loader(image=True), max_duration='6ba',
                          optimizers=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                          schedulers=[CosineAnnealingScheduler()],
                          algorithms=[IMP(levels=2, rewind_to='2ba', prune_fraction=0.5, structure='channels',
                                          folder=os.path.join(folder, 'imp'))],
                          callbacks=[FitStart(), *callbacks], save_folder=os.path.join(folder, 'ckpt'),
                          save_interval='1ba', run_name='structured', autoresume=True, progress_bar=False, seed=11,
                          device='cpu')
        try:
            trainer.fit()
            return trainer.state.algorithms[0].masks
        except KeyboardInterrupt:
            return None
        finally:
            trainer.close()

    reference = train(str(tmp_path / 'ref'))
    assert train(str(tmp_path / 'run'), [Kill('batch_start', 1, 4)]) is None
    resumed = train(str(tmp_path / 'run'))
    assert FitStart.batch == 4
    assert assert_coupled(resumed) == 18
    assert all(torch.equal(resumed[n], reference[n]) for n in reference)


def test_two_rank_ddp_gives_identical_structured_masks(tmp_path):
    launch('ddp_imp_script.py', str(tmp_path), 'channels')
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt') for r in range(2))
    assert rank0['ticket']['level'] == rank1['ticket']['level'] == 2
    assert assert_coupled(rank0['masks']) == 5 + 4  # round(0.2 * 24), then round(0.2 * 19) channels
    for key in ('masks', 'params'):
        assert all(torch.equal(rank0[key][k], rank1[key][k]) for k in rank0[key])


def test_imp_rounds_every_level_to_multiples_of_8_channels(tmp_path):
    """small_cnn's convs have 8 and 16 channels: with round_to=8 each keeps 8 or all of them, never e.g. 4 or 12."""
    structured_run(tmp_path, round_to=8)
    for level in (1, 2):
        masks = torch.load(tmp_path / 'imp' / f'level_{level}' / 'mask.pt')['masks']
        assert_coupled(masks)
        kept = [8 - len(dead_out(masks['module.0.weight'])), 16 - len(dead_out(masks['module.3.weight']))]
        assert all(count % 8 == 0 and count > 0 for count in kept), (level, kept)
        assert kept != [8, 16]  # something was pruned


def test_bad_structure_and_scope_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"structure: 'filters' is not allowed; use one of \('weights', 'channels'\)"):
        IMP(levels=1, structure='filters')
    with pytest.raises(ValueError, match=r"scope: 'lamp' is not allowed with structure='channels'"):
        IMP(levels=1, structure='channels', scope='lamp')
    with pytest.raises(ValueError, match=r"round_to: 8 applies to structure='channels' only"):
        IMP(levels=1, round_to=8)
    with pytest.raises(ValueError, match=r'round_to: 0 is not allowed; use an integer >= 1'):
        IMP(levels=1, structure='channels', round_to=0)


class Untraceable(nn.Module):
    """Trains (its loss reaches the bias), but its output leaves autograd: torch-pruning has nothing to trace."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        logits = self.out(torch.relu(self.hidden(x.flatten(1))))
        return logits.detach() + 0 * self.out.bias


def test_an_untraceable_model_fails_at_the_first_batch_before_any_step(tmp_path):
    from composer import Trainer
    from composer.models import ComposerClassifier

    model = ComposerClassifier(Untraceable(), num_classes=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, train_dataloader=digits_loader(image=True), max_duration='4ba',
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      algorithms=[IMP(levels=1, structure='channels', folder=str(tmp_path / 'imp'))],
                      progress_bar=False, device='cpu')
    with pytest.raises(ValueError, match="model: torch-pruning cannot trace it"):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_channel_groups_name_the_coupled_weights():
    model = small_cnn()
    inputs = ((torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)),)
    groups = {g.root: g for g in channel_groups(model, inputs, all_alive(model))}
    assert set(groups) == {'module.0', 'module.3'}  # the classifier's outputs are the model's
    assert {(m.weight, m.dim) for m in groups['module.3'].members} == {('module.3.weight', 0), ('module.8.weight', 1)}


def test_cli_export_writes_a_smaller_network_and_the_report_times_every_level(tmp_path, capsys):
    from composer_imp import cli
    from test_cli import write_recipe

    recipe = write_recipe(tmp_path / 'structured.yaml', callbacks={}, loggers={},
                          algorithms={'imp': {'levels': 1, 'rewind_to': '1ba', 'structure': 'channels',
                                              'prune_fraction': 0.5}})
    run_dir = str(tmp_path / 'run')
    assert cli.main(['run', recipe, f'save_folder={run_dir}']) == 0
    report = open(os.path.join(run_dir, 'report.md')).read()
    assert '## Exported tickets' in report and os.path.isfile(os.path.join(run_dir, 'plots', 'accuracy_vs_latency.png'))
    capsys.readouterr()
    out = str(tmp_path / 'ticket')
    assert cli.main(['export', run_dir, '--level', '1', '--out', out]) == 0
    printed = capsys.readouterr().out
    assert 'parameters 266,610 -> ' in printed and os.path.join(out, 'exported.json') in printed
    hidden = load_exported(build_model('lenet_300_100'), out).module.fc_layers
    assert hidden[0].out_features + hidden[1].out_features == 200  # half of the 300 + 100 channels
    assert cli.main(['export', run_dir, '--level', '5']) == 2
    assert '--level: 5' in capsys.readouterr().err and not os.path.exists(os.path.join(run_dir, 'export'))

"""The functional core: magnitude masks, counting, ties, prunable-layer rule, applying masks, rewinding."""
import pytest
import torch
from torch import nn

from composer_imp.functional import (
    apply_masks,
    density,
    magnitude_masks,
    masks_at_density,
    prunable_weights,
    rewind,
    snapshot,
)


def random_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'a.weight': torch.randn(30, 20, generator=g), 'b.weight': torch.randn(7, 3, 3, 3, generator=g) * 0.3,
            'c.weight': torch.randn(10, 50, generator=g) * 2}


def reference_global(weights, fraction, masks):
    """Straightforward reference: sort every alive magnitude, prune the round(fraction * n) smallest."""
    flat = [(float(w.flatten()[i].abs()), name, i) for name, w in weights.items()
            for i in range(w.numel()) if masks[name].flatten()[i]]
    flat.sort()
    pruned = {(name, i) for _, name, i in flat[:round(fraction * len(flat))]}
    return {name: torch.tensor([masks[name].flatten()[i].item() and (name, i) not in pruned
                                for i in range(w.numel())]).view_as(w) for name, w in weights.items()}


@pytest.mark.parametrize('fraction', [0.2, 0.5, 0.9])
def test_global_masks_equal_a_full_sort_reference(fraction):
    weights = random_weights()
    masks = magnitude_masks(weights, 0.3)
    new = magnitude_masks(weights, fraction, masks)
    expected = reference_global(weights, fraction, masks)
    assert all(torch.equal(new[n], expected[n]) for n in weights)


def test_layerwise_masks_equal_a_per_tensor_reference():
    weights = random_weights(1)
    new = magnitude_masks(weights, 0.4, scope='layerwise')
    for name, w in weights.items():
        expected = reference_global({name: w}, 0.4, {name: torch.ones_like(w, dtype=torch.bool)})[name]
        assert torch.equal(new[name], expected)
        assert int(new[name].sum()) == w.numel() - round(0.4 * w.numel())


def test_global_scope_lets_layer_densities_differ_and_prunes_small_layers_first():
    masks = magnitude_masks(random_weights(), 0.5)
    # 'b' was scaled by 0.3 and 'c' by 2: global pruning hits b hardest and c least
    assert density({'b': masks['b.weight']}) < density({'a': masks['a.weight']}) < density({'c': masks['c.weight']})


def test_masks_are_nested_and_pruned_weights_never_come_back():
    weights = random_weights()
    masks = None
    for level in range(6):
        new = magnitude_masks(weights, 0.2, masks)
        if masks is not None:
            assert all(not (new[n] & ~masks[n]).any() for n in weights)
        masks = new
        # even if a pruned weight grows large it must stay pruned
        weights = {n: torch.where(masks[n], w, torch.full_like(w, 100.0)) for n, w in weights.items()}


def test_ties_prune_exactly_the_requested_count_in_index_order():
    weights = {'x': torch.ones(10), 'y': torch.ones(5)}
    masks = magnitude_masks(weights, 0.4)  # 6 of 15 identical magnitudes
    assert density(masks) == pytest.approx(9 / 15)
    assert masks['x'].tolist() == [False] * 6 + [True] * 4 and masks['y'].all()


def test_density_after_levels_follows_the_geometric_sequence_within_one_weight_per_tensor():
    weights = random_weights(2)
    total = sum(w.numel() for w in weights.values())
    for scope in ('global', 'layerwise'):
        masks = None
        for level in range(1, 12):
            masks = masks_at_density(weights, 0.8**level, masks, scope)
            alive = sum(int(m.sum()) for m in masks.values())
            assert abs(alive - 0.8**level * total) <= len(weights)
            if scope == 'layerwise':
                for name, w in weights.items():
                    assert abs(int(masks[name].sum()) - 0.8**level * w.numel()) <= 1


def reference_lamp(weights, fraction, masks):
    """LAMP from its definition: per tensor, alive weights sorted by |w| ascending (ties in index order) score
    w_u^2 / sum of w_v^2 over v from u to the end; the round(fraction * n) lowest scores overall (ties in index
    order) are pruned."""
    scored = []
    for name, w in weights.items():
        alive = sorted((float(w.flatten()[i]) ** 2, i) for i in range(w.numel()) if masks[name].flatten()[i])
        squares = [square for square, _ in alive]
        scored += [(square / sum(squares[rank:]), name, i) for rank, (square, i) in enumerate(alive)]
    order = {name: k for k, name in enumerate(weights)}
    scored.sort(key=lambda s: (s[0], order[s[1]], s[2]))
    pruned = {(name, i) for _, name, i in scored[:round(fraction * len(scored))]}
    return {name: torch.tensor([masks[name].flatten()[i].item() and (name, i) not in pruned
                                for i in range(w.numel())]).view_as(w) for name, w in weights.items()}


@pytest.mark.parametrize('fraction', [0.2, 0.5, 0.9])
def test_lamp_masks_equal_the_definition_and_are_nested(fraction):
    weights = random_weights(3)
    masks = magnitude_masks(weights, 0.3, scope='lamp')
    new = magnitude_masks(weights, fraction, masks, scope='lamp')
    expected = reference_lamp(weights, fraction, masks)
    assert all(torch.equal(new[n], expected[n]) for n in weights)
    assert all(not (new[n] & ~masks[n]).any() for n in weights)


def test_lamp_ignores_a_layers_scale_where_global_magnitude_does_not():
    weights = random_weights(4)
    rescaled = {**weights, 'b.weight': weights['b.weight'] * 100}
    for fraction in (0.3, 0.7):
        lamp = magnitude_masks(weights, fraction, scope='lamp')
        assert all(torch.equal(lamp[n], magnitude_masks(rescaled, fraction, scope='lamp')[n]) for n in weights)
        plain = magnitude_masks(weights, fraction)
        assert not torch.equal(plain['b.weight'], magnitude_masks(rescaled, fraction)['b.weight'])


def test_lamp_counts_are_exact_and_every_layer_keeps_a_weight():
    weights = {**random_weights(5), 'tiny.weight': torch.randn(4, 4) * 1e-3}
    total = sum(w.numel() for w in weights.values())
    masks = None
    for level in range(1, 14):
        new = masks_at_density(weights, 0.7**level, masks, 'lamp')
        assert sum(int(m.sum()) for m in new.values()) == round(0.7**level * total)
        assert masks is None or all(not (new[n] & ~masks[n]).any() for n in weights)
        assert all(m.any() for m in new.values())
        masks = new
    assert not magnitude_masks(weights, 0.95)['tiny.weight'].any()  # what global magnitude does to that layer


def test_lamp_ties_prune_exactly_the_requested_count_in_index_order():
    masks = magnitude_masks({'x': torch.ones(10), 'y': torch.ones(5)}, 0.4, scope='lamp')
    # scores 1/10, 1/9, ..., 1 in x and 1/5, ..., 1 in y: the five below 1/5 go, then x's 1/5 ties y's and comes first
    assert masks['x'].tolist() == [False] * 6 + [True] * 4 and masks['y'].all()


def test_threshold_is_computed_on_the_weights_device_without_numpy(monkeypatch):
    import numpy
    monkeypatch.setattr(numpy, 'sort', lambda *a, **k: pytest.fail('numpy sort used'))
    weights = {n: w.requires_grad_() for n, w in random_weights().items()}
    masks = magnitude_masks(weights, 0.3)
    assert all(m.dtype == torch.bool and m.device == weights[n].device for n, m in masks.items())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.shortcut = nn.Conv2d(3, 4, 1, bias=False)
        self.fc = nn.Linear(4, 2)


def test_prunable_weights_are_every_conv_and_linear_weight_and_nothing_else():
    assert set(prunable_weights(Net())) == {'conv.weight', 'shortcut.weight', 'fc.weight'}
    assert set(prunable_weights(Net(), ignore=['fc.*', 'shortcut.weight'])) == {'conv.weight'}


def test_bad_ignore_pattern_and_models_without_prunable_weights_raise():
    with pytest.raises(ValueError, match="ignore: pattern 'fc2.weight' matches no prunable weight"):
        prunable_weights(Net(), ignore=['fc2.weight'])
    with pytest.raises(ValueError, match='model: no prunable weights'):
        prunable_weights(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match='fraction'):
        magnitude_masks(random_weights(), 1.0)
    with pytest.raises(ValueError, match='scope'):
        magnitude_masks(random_weights(), 0.2, scope='row')
    with pytest.raises(ValueError, match="masks\\['a.weight'\\]: shape"):
        magnitude_masks(random_weights(), 0.2, {n: torch.ones(2, dtype=torch.bool) for n in random_weights()})


def test_apply_masks_gives_exact_zeros_and_rewind_is_bit_exact():
    net = Net()
    point = snapshot(net)
    masks = magnitude_masks(net, 0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net.bn.running_mean.add_(3.0)
        net.fc.weight[0, 0] = float('inf')
    rewind(net, point, masks)
    state = net.state_dict()
    for name, value in point.items():
        expected = value.masked_fill(~masks[name], 0) if name in masks else value
        assert torch.equal(state[name], expected)
    assert all((state[n][~m] == 0).all() for n, m in masks.items())
    apply_masks(net, masks)
    with pytest.raises(ValueError, match='rewind point'):
        rewind(net, {k: v for k, v in point.items() if k != 'fc.bias'})


def test_the_functional_core_imports_nothing_from_composer():
    import subprocess
    import sys
    code = ('import sys, composer_imp.functional; '
            'bad = [m for m in sys.modules if m == "composer" or m.startswith("composer.")]; '
            'assert not bad, bad')
    subprocess.run([sys.executable, '-c', code], check=True)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), float('-inf')])
@pytest.mark.parametrize('call', [
    lambda w, m: magnitude_masks(w, 0.2, m),
    lambda w, m: magnitude_masks(w, 0.2, m, scope='layerwise'),
    lambda w, m: magnitude_masks(w, 0.2, m, scope='lamp'),
    lambda w, m: masks_at_density(w, 0.5, m),
])
def test_non_finite_alive_weights_are_refused_with_one_error_naming_the_tensors(bad, call):
    """NaN has no magnitude order: ``histc`` fails on it and ``kthvalue`` sorts it last, so it would survive while
    finite weights are over-pruned. Every entry point refuses, naming each bad tensor and no good one."""
    weights = random_weights()
    weights['a.weight'][3, 4] = bad
    weights['c.weight'][0, 0] = bad
    for masks in (None, {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}):
        with pytest.raises(ValueError, match=r"weights: \['a.weight', 'c.weight'\] hold NaN or inf") as error:
            call(weights, masks)
        assert 'b.weight' not in str(error.value)


def test_non_finite_values_at_pruned_positions_do_not_matter():
    weights = random_weights()
    masks = magnitude_masks(weights, 0.5)
    dead = (~masks['a.weight']).nonzero()[0]
    weights['a.weight'][tuple(dead)] = float('nan')
    clean = random_weights()
    assert all(torch.equal(masks_at_density(weights, 0.2, masks)[n], m)
               for n, m in masks_at_density(clean, 0.2, masks).items())


@pytest.mark.parametrize('size', [100, 4096 * 64 + 1])  # the direct kthvalue path and the histogram path
def test_kth_smallest_refuses_nan_instead_of_a_histc_error_or_an_arbitrary_threshold(size):
    from composer_imp.functional.masks import kth_smallest
    values = torch.rand(size)
    assert float(kth_smallest(values, 5)) == float(torch.kthvalue(values, 5).values)
    values[size // 2] = float('nan')
    with pytest.raises(ValueError, match='values: hold NaN or inf'):
        kth_smallest(values, 5)

"""Error barriers, interpolation and BatchNorm re-estimation: the functional core (pure torch)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from composer_imp.functional import (
    alpha_grid,
    barrier_linear,
    barrier_max_minus_mean,
    error_barrier,
    interpolate_state,
    is_matching,
    load_interpolated_,
    metric_curve,
    recompute_batchnorm,
    snapshot,
)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _data(num_batches: int = 3, batch_size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 4, generator=generator), torch.randint(0, 3, (batch_size,), generator=generator))
            for _ in range(num_batches)]


def _product_net(sign: float) -> nn.Module:
    """logits = [w2 * w1 * x, 0.1]: both endpoints (sign +1 and -1) compute w2 * w1 = 1, the midpoint computes 0."""
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.fill_(sign)
        net[1].weight.copy_(torch.tensor([[sign], [0.0]]))
        net[1].bias.copy_(torch.tensor([0.0, 0.1]))
    return net


def _threshold_net(threshold: float) -> nn.Module:
    """logits = [x, threshold]: class 0 is predicted iff x > threshold; the bias moves linearly along the path."""
    net = nn.Linear(1, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0], [0.0]]))
        net.bias.copy_(torch.tensor([0.0, threshold]))
    return net


def test_default_grid_is_eleven_evenly_spaced_points_including_both_endpoints():
    grid = alpha_grid()
    assert grid == [i / 10 for i in range(11)]
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert alpha_grid(3) == [0.0, 0.5, 1.0]


def test_identical_endpoints_give_zero_barrier_at_every_alpha():
    model, data = _net(), _data()
    state = snapshot(model)
    result = error_barrier(model, state, state, data)
    assert len(result['errors']) == 11
    assert len(set(result['errors'])) == 1 and len(set(result['losses'])) == 1
    assert result['barrier_linear'] == 0.0
    assert result['barrier_max_minus_mean'] == 0.0


def test_barrier_conventions_on_a_curve_with_a_known_bump():
    alphas, errors = [0.0, 0.25, 0.5, 0.75, 1.0], [0.1, 0.6, 0.3, 0.2, 0.3]
    # linear baseline at 0.25 is 0.75 * 0.1 + 0.25 * 0.3 = 0.15; the mean of the endpoints is 0.2
    assert barrier_linear(alphas, errors) == pytest.approx(0.45)
    assert barrier_max_minus_mean(alphas, errors) == pytest.approx(0.4)


def test_barrier_linear_puts_weight_one_minus_alpha_on_the_first_endpoint():
    # E linear in alpha from 0.0 (alpha = 0) to 0.4 (alpha = 1); the opposite parametrisation would report 0.2.
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert barrier_linear(alphas, [0.0, 0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.0)


def test_model_with_a_known_bump_on_the_path_gives_the_expected_curve_and_barriers():
    # Class 0 at x = 1 is right iff (1 - 2 alpha)^2 > 0.1, i.e. wrong at alpha = 0.4, 0.5, 0.6; class 1 at x = 0 is
    # always right. Half the samples are class 0, so the error is 0.5 on the bump and 0 elsewhere.
    data = [(torch.tensor([[1.0], [1.0], [0.0], [0.0]]), torch.tensor([0, 0, 1, 1]))]
    model = _product_net(1.0)
    result = error_barrier(model, _product_net(1.0).state_dict(), _product_net(-1.0).state_dict(), data)
    assert result['errors'] == [0.0] * 4 + [0.5] * 3 + [0.0] * 4
    assert result['barrier_linear'] == pytest.approx(0.5)
    assert result['barrier_max_minus_mean'] == pytest.approx(0.5)


def test_endpoints_with_different_errors_on_a_path_linear_in_error():
    # 100 class-0 samples at x = 0.005, 0.015, ..., 0.995; the threshold moves from 0 to 0.5, so E(alpha) = alpha / 2.
    x = (torch.arange(100, dtype=torch.float32) + 0.5) / 100
    data = [(x[:50, None], torch.zeros(50, dtype=torch.long)), (x[50:, None], torch.zeros(50, dtype=torch.long))]
    model = _threshold_net(0.0)
    result = error_barrier(model, _threshold_net(0.0).state_dict(), _threshold_net(0.5).state_dict(), data)
    assert result['errors'] == pytest.approx([a / 2 for a in result['alphas']])
    e0, e1 = result['errors'][0], result['errors'][-1]
    assert result['barrier_linear'] == pytest.approx(0.0, abs=1e-12)
    assert result['barrier_max_minus_mean'] == pytest.approx(abs(e0 - e1) / 2)


def test_error_barrier_leaves_the_model_weights_and_mode_as_they_were():
    model, data = _net(0), _data()
    model.train()
    before = snapshot(model)
    error_barrier(model, snapshot(_net(1)), snapshot(_net(2)), data, alphas=5, bn='recompute', bn_loader=data)
    assert model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_in_place_interpolation_matches_the_new_state_dict_and_copies_integer_buffers_from_state_a():
    a, b = _net(1), _net(2)
    a[1].num_batches_tracked.fill_(7)
    b[1].num_batches_tracked.fill_(9)
    expected = interpolate_state(a.state_dict(), b.state_dict(), 0.3)
    probe = _net(3)
    load_interpolated_(probe, a.state_dict(), b.state_dict(), 0.3)
    for name, tensor in probe.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert int(expected['1.num_batches_tracked']) == 7
    assert torch.allclose(expected['0.weight'], 0.7 * a[0].weight + 0.3 * b[0].weight)
    assert torch.allclose(expected['1.running_var'], 0.7 * a[1].running_var + 0.3 * b[1].running_var)


def test_bn_recompute_re_estimates_running_statistics_and_restores_mode_and_momentum():
    model = _net()
    norm = model[1]
    norm.momentum = 0.3
    model.eval()
    model[3].train()  # a submodule with its own flag keeps it
    with torch.no_grad():
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(7.0)
    data = _data(num_batches=4)
    used = recompute_batchnorm(model, data)

    with torch.no_grad():
        hidden = [model[0](x) for x, _ in data]
    expected_mean = torch.stack([h.mean(0) for h in hidden]).mean(0)  # cumulative average of the batch means
    expected_var = torch.stack([h.var(0, unbiased=True) for h in hidden]).mean(0)
    assert used == 4
    assert torch.allclose(norm.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(norm.running_var, expected_var, atol=1e-5)
    assert int(norm.num_batches_tracked) == 4
    assert norm.momentum == 0.3
    assert not model.training and not norm.training and model[3].training


def test_bn_recompute_on_a_model_without_batchnorm_is_a_no_op():
    model = nn.Linear(4, 3)
    before = snapshot(model)
    assert recompute_batchnorm(model, _data()) == 0
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_matching_rule_allows_the_tolerance_above_the_dense_error():
    assert is_matching(0.105, dense_error=0.1, tolerance=0.01)
    assert not is_matching(0.115, dense_error=0.1, tolerance=0.01)


class _CountingLoader(list):
    """Batches that count how often they are iterated (an evaluation would iterate them)."""

    iterations = 0

    def __iter__(self):
        type(self).iterations += 1
        return super().__iter__()


def _bad_state(kind: str) -> dict[str, torch.Tensor]:
    state = snapshot(_net(1))
    if kind == 'missing':
        del state['3.bias']
    elif kind == 'extra':
        state['extra.weight'] = torch.zeros(1)
    else:
        state['3.weight'] = torch.zeros(3, 9)
    return state


@pytest.mark.parametrize('kwargs, match', [
    ({'state_b': 'missing'}, r'state_b: keys .*missing \[\'3\.bias\'\]'),
    ({'state_b': 'extra'}, r"state_b: keys .*unexpected \['extra.weight'\]"),
    ({'state_b': 'shape'}, r"state_b\['3.weight'\]: shape \(3, 9\)"),
    ({'alphas': [0.0, 0.5]}, 'alphas: .*endpoints 0 and 1'),
    ({'alphas': [0.5, 1.0]}, 'alphas: .*endpoints 0 and 1'),
    ({'alphas': [0.0, 1.0, 1.5]}, r'alphas: \[1.5\] leave \[0, 1\]'),
    ({'alphas': [-0.1, 0.0, 1.0]}, r'alphas: \[-0.1\] leave \[0, 1\]'),
    ({'alphas': 1}, 'alphas: 1 points'),
    ({'dataloader': []}, 'dataloader: is empty'),
    ({'bn': 'recompute'}, "bn_loader: bn='recompute' needs"),
    ({'bn': 'reset'}, "bn: 'reset' is not allowed"),
    ({'bn': 'recompute', 'bn_loader': []}, 'bn_loader: is empty'),
])
def test_every_bad_input_raises_a_clear_error_before_any_evaluation(kwargs, match):
    model = _net()
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    before = snapshot(model)
    _CountingLoader.iterations = 0
    arguments = {'state_a': snapshot(_net(1)), 'state_b': snapshot(_net(2)), 'dataloader': _CountingLoader(_data())}
    arguments.update(kwargs)
    if isinstance(arguments['state_b'], str):
        arguments['state_b'] = _bad_state(arguments['state_b'])
    with pytest.raises(ValueError, match=match):
        error_barrier(model, **arguments)
    assert not forwards and _CountingLoader.iterations == 0
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_mismatch_between_the_model_and_the_endpoints_raises():
    with pytest.raises(ValueError, match='model: keys'):
        error_barrier(nn.Linear(4, 3), snapshot(_net(1)), snapshot(_net(2)), _data())


# ------------------------------------------------------------------ non-finite values (issue 10)
NAN = float('nan')


def test_a_non_finite_value_anywhere_on_the_curve_makes_both_barriers_undefined_whatever_its_position():
    alphas = [0.0, 0.5, 1.0]
    for errors in ([NAN, 0.2, 0.1], [0.1, NAN, 0.1], [0.1, 0.2, NAN], [0.1, float('inf'), 0.1]):
        assert math.isnan(barrier_linear(alphas, errors)), errors
        assert math.isnan(barrier_max_minus_mean(alphas, errors)), errors
    assert barrier_linear(alphas, [0.1, 0.3, 0.1]) == pytest.approx(0.2)  # finite curves are unchanged


@pytest.mark.parametrize('endpoint', ['a', 'b'])
@pytest.mark.parametrize('entry', ['0.weight', '3.bias', '1.running_var'])
def test_nan_in_one_endpoint_gives_an_undefined_barrier_not_zero(endpoint, entry):
    """The issue's ``lmc/barrier 0.0, connected true``: NaN propagates to every point (lerp is a + alpha * (b - a),
    so even alpha = 0 is NaN), every NaN network predicts the same arg-max class, the error curve came out flat and
    finite, and its barrier 0.0. The curve and both barriers must be NaN instead."""
    model, data = _net(0), _data()
    state_a, state_b = snapshot(_net(1)), snapshot(_net(2))
    (state_a if endpoint == 'a' else state_b)[entry].view(-1)[0] = NAN
    result = error_barrier(model, state_a, state_b, data)
    assert all(math.isnan(e) for e in result['errors']), result['errors']
    assert all(math.isnan(v) for v in result['losses'])
    assert math.isnan(result['barrier_linear']) and math.isnan(result['barrier_max_minus_mean'])
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()), \
        'the model gets its own (finite) weights back'


@pytest.mark.parametrize('alpha', [0.0, 0.3, 1.0])
def test_interpolation_propagates_nan_at_every_alpha_and_never_turns_it_into_a_finite_number(alpha):
    state_a, state_b = snapshot(_net(1)), snapshot(_net(2))
    state_b['0.weight'][0, 0] = NAN
    point = interpolate_state(state_a, state_b, alpha)
    model = _net(3)
    load_interpolated_(model, state_a, state_b, alpha)
    for values in (point, model.state_dict()):
        assert math.isnan(float(values['0.weight'][0, 0]))
        assert torch.isfinite(values['0.weight'].view(-1)[1:]).all(), 'NaN stays in its own entry'


def test_metric_curve_scores_a_point_with_non_finite_weights_as_nan_even_when_evaluate_returns_a_number():
    model = _net(0)
    state_a, state_b = snapshot(_net(1)), snapshot(_net(2))

    points = []

    def poison_midpoint(m):  # e.g. BatchNorm statistics re-estimated into inf at one point of the path
        points.append(m)
        if len(points) == 2:
            m[1].running_var.fill_(float('inf'))

    curve = metric_curve(model, state_a, state_b, [0.0, 0.5, 1.0], lambda m: {'error': 0.25}, poison_midpoint)
    assert curve['values']['error'][0] == 0.25 and curve['values']['error'][2] == 0.25
    assert math.isnan(curve['values']['error'][1])
    assert math.isnan(curve['barrier_linear']['error']) and math.isnan(curve['barrier_max_minus_mean']['error'])

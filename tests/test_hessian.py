"""The maximal pruning ratio: Hessian-vector products and Lanczos on a quadratic with a known Hessian, the theory's p*
by hand, and AdaptiveSparsityStep(criterion='hessian') in a real fit on sklearn digits."""
from __future__ import annotations

import os

import pytest
import torch

from composer_imp import AdaptiveSparsityStep
from composer_imp.report.build import build_report
from composer_imp.functional.hessian import (
    flat_live_weights,
    hessian_vector_product,
    lanczos,
    lanczos_top_eigenvalues,
    max_pruning_ratio,
    max_random_prune_fraction,
    projection_length,
    spectrum,
    support_operator,
)
from helpers import mlp
from test_adaptive_sparsity import levels_file, loaders, run


def quadratic(dim: int = 40, seed: int = 0):
    """0.5 x^T A x with a random symmetric A whose top eigenvalues are well separated."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = torch.cat([torch.tensor([9.0, 7.0, 5.0, 4.0]), torch.rand(dim - 4, generator=generator) * 2 - 0.5])
    matrix = (basis * eigenvalues.to(torch.float64)) @ basis.T
    matrix = 0.5 * (matrix + matrix.T)
    x = torch.randn(dim, generator=generator, dtype=torch.float64).requires_grad_()
    return matrix, x, lambda: 0.5 * x @ matrix @ x


def test_hvp_is_a_times_v_and_zero_off_the_support():
    matrix, x, loss = quadratic()
    v = torch.randn(40, dtype=torch.float64)
    (product,) = hessian_vector_product(loss, [x], [v])
    torch.testing.assert_close(product, matrix @ v, rtol=1e-12, atol=1e-12)
    mask = torch.arange(40) % 3 != 0
    (restricted,) = hessian_vector_product(loss, [x], [v], masks=[mask])
    assert torch.equal(restricted[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    torch.testing.assert_close(restricted[mask], matrix[mask][:, mask] @ v[mask], rtol=1e-12, atol=1e-12)


def test_lanczos_top_eigenvalues_match_eigvalsh_on_the_whole_space_and_on_a_support():
    matrix, x, loss = quadratic()
    exact = torch.linalg.eigvalsh(matrix).flip(0)
    operator, dim = support_operator(lambda v: hessian_vector_product(loss, [x], v), [torch.ones(40, dtype=torch.bool)])
    full = lanczos_top_eigenvalues(operator, dim, k=40, iterations=40, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(full, exact, rtol=1e-4, atol=0.0)
    # Fewer iterations than dimensions: the separated top of the spectrum has converged.
    top, vectors = lanczos_top_eigenvalues(operator, dim, k=3, iterations=25, return_vectors=True,
                                           generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(top, exact[:3], rtol=1e-4, atol=0.0)
    torch.testing.assert_close(matrix @ vectors[:, 0], top[0] * vectors[:, 0], rtol=0.0, atol=1e-3)

    mask = torch.arange(40) % 4 != 1
    operator, dim = support_operator(lambda v: hessian_vector_product(loss, [x], v, masks=[mask]), [mask])
    assert dim == 30
    submatrix = torch.linalg.eigvalsh(matrix[mask][:, mask]).flip(0)
    on_support = lanczos_top_eigenvalues(operator, dim, k=30, iterations=30, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(on_support, submatrix, rtol=1e-4, atol=0.0)


def test_quadrature_spectrum_integrates_the_trace_exactly_and_capped_bulk_repeats_the_kth_value():
    matrix, x, loss = quadratic()
    operator, dim = support_operator(lambda v: hessian_vector_product(loss, [x], v), [torch.ones(40, dtype=torch.bool)])
    tridiagonal, basis = lanczos(operator, dim, 40, torch.Generator().manual_seed(3))
    values, counts = spectrum(tridiagonal, dim, 'slq')
    assert float(counts.sum()) == pytest.approx(40.0, rel=1e-12)
    # One start vector q: D * q^T A q estimates tr A; with a full Krylov basis the quadrature equals it exactly.
    q = basis[0]
    assert float((values * counts).sum()) == pytest.approx(40.0 * float(q @ matrix @ q), rel=1e-10)
    top, capped = spectrum(tridiagonal, dim, 'capped', k=3)
    assert capped.tolist() == [1.0, 1.0, 38.0]
    assert torch.equal(top, torch.linalg.eigh(tridiagonal).eigenvalues.flip(0)[:3])


def test_projection_length_and_the_theory_p_star_match_a_hand_computation():
    # Live weights |w| = 1, 2, 3, 4 (squares 1, 4, 9, 16; ||w||^2 = 30), Hessian eigenvalues 2, 2, 0.5, 0.5,
    # eps = 3, so 2 eps / (2 eps + lambda R^2) = 6 / (6 + lambda R^2).
    weights = torch.tensor([3.0, -1.0, 4.0, 2.0])
    values, counts = torch.tensor([2.0, 2.0, 0.5, 0.5]), torch.ones(4)
    assert projection_length(weights, 0.5, 'magnitude') == pytest.approx(5 ** 0.5)  # 1 + 4
    assert projection_length(weights, 0.5, 'random') == pytest.approx(15 ** 0.5)  # 0.5 * 30
    # Magnitude: n = 2, R^2 = 5: w^2 = 2*6/16 + 2*6/8.5 = 2.1618 >= 2; n = 3, R^2 = 14: 2*6/34 + 2*6/13 = 1.276 < 3.
    magnitude = max_pruning_ratio(values, counts, weights, epsilon=3.0, pruning='magnitude')
    assert magnitude['fraction'] == 0.5 and magnitude['pruned'] == 2
    assert magnitude['width_sq'] == pytest.approx(12 / 16 + 12 / 8.5)
    # Random: n = 1, R^2 = 7.5: 12/21 + 12/9.75 = 1.802 >= 1; n = 2, R^2 = 15: 12/36 + 12/13.5 = 1.222 < 2.
    random = max_pruning_ratio(values, counts, weights, epsilon=3.0, pruning='random')
    assert random['fraction'] == 0.25 and random['radius'] == pytest.approx(7.5 ** 0.5)
    assert random['width_sq'] == pytest.approx(12 / 21 + 12 / 9.75)
    # A flat landscape (all eigenvalues 0) admits every weight; a negative eigenvalue counts as flat.
    assert max_pruning_ratio(torch.tensor([0.0, -1.0]), torch.tensor([1.0, 3.0]), weights, 3.0)['fraction'] == 1.0
    with pytest.raises(ValueError, match='counts: they sum to 3'):
        max_pruning_ratio(values[:3], counts[:3], weights, 3.0)
    with pytest.raises(ValueError, match="pruning: 'lamp' is not allowed"):
        max_pruning_ratio(values, counts, weights, 3.0, pruning='lamp')


def test_random_projection_check_is_nested_counts_exactly_and_restores_the_model():
    model = mlp()
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.3
             for n, p in model.named_parameters() if n.endswith('weight')}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def evaluate(net):
        dead = sum(int((p == 0).sum()) for n, p in net.named_parameters() if n in masks)
        seen.append(dead)
        return {'loss': dead / 1000.0}

    result = max_random_prune_fraction(model, masks, evaluate, p_min=0.2, p_max=0.8, tolerance=0.5, metric='loss',
                                       generator=torch.Generator().manual_seed(0))
    alive = sum(int(m.sum()) for m in masks.values())
    dead_at_start = seen[0]
    for entry in result['tried']:
        assert entry['delta'] == pytest.approx(round(entry['fraction'] * alive) / 1000.0)
    assert seen[0] == dead_at_start and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert flat_live_weights([before[n] for n in masks], masks.values()).numel() == alive


def test_unknown_criterion_is_refused_with_one_line():
    with pytest.raises(ValueError, match=r"^criterion: 'curvature' is not allowed; use one of \('projection', "
                                         r"'hessian'\)$"):
        AdaptiveSparsityStep(criterion='curvature')
    with pytest.raises(ValueError, match="^criterion: 'hessian' measures the loss"):
        AdaptiveSparsityStep(criterion='hessian', projection_metric='error', projection_tolerance=0.02)


def test_hessian_criterion_picks_the_recorded_p_star_clipped_to_the_step_bounds_and_the_report_shows_it(tmp_path):
    _, val, _ = loaders()
    step = AdaptiveSparsityStep(criterion='hessian', hessian_analysis=True, p_min=0.2, p_max=0.6, probe_samples=128,
                                val_dataloader=val, hessian_iterations=8, matching_tolerance=0.5, max_levels=2)
    run(tmp_path / 'imp', step, target=0.05)
    records = levels_file(tmp_path / 'imp')
    pruned = [r for r in records if r['level'] > 0]
    assert len(pruned) == 2
    for record in pruned:
        step_record, hessian = record['step'], record['step']['hessian']
        assert step_record['reason'] == 'hessian'
        p_star = hessian['p_star']['magnitude']
        assert step_record['fraction'] == min(max(p_star, 0.2), 0.6)
        assert record['hessian/p_star/magnitude'] == p_star
        assert record['hessian/fraction_used'] == step_record['fraction']
        eigenvalues = hessian['top_eigenvalues']
        assert eigenvalues == sorted(eigenvalues, reverse=True) and eigenvalues[0] > 0
        assert record['hessian/lambda_max'] == eigenvalues[0] and hessian['iterations'] == 8
        assert hessian['p_star']['random'] <= p_star  # a longer projection at every count
        # The analysis also ran both projection checks on the same probe and tolerance.
        for pruning, check in (('magnitude', step_record['projection']), ('random', step_record['projection_random'])):
            assert record.get(f'hessian/admissible/{pruning}') == (check['fraction'] if check['admissible'] else None)
    report = open(build_report(str(tmp_path))).read()
    section = report[report.index('## Maximal pruning ratio'):]
    first = pruned[0]
    row = next(line for line in section.splitlines() if line.startswith('| 1 |'))
    assert f"| {100 * first['hessian/p_star/magnitude']:.1f}% |" in row and f"{first['hessian/lambda_max']:.4g}" in row
    assert os.path.isfile(tmp_path / 'plots' / 'maximal_pruning_ratio.png')

"""The theory's maximal pruning ratio (Paul et al., ICLR 2023, §3.3; science.md §8). Pure torch, no Composer.

Model: near a trained solution w_L the train loss is a quadratic well, L(w) ~ L* + 1/2 (w - w_L)^T H (w - w_L), with
H the Hessian with respect to the prunable weights restricted to the live ones, supp(m_L) (D_L of them, eigenvalues
lambda_i; every other parameter held fixed). Its eps-sublevel set is an ellipsoid with radii r_i = sqrt(2 eps /
lambda_i). Pruning a further fraction p moves to an axial subspace of
codimension n = round(p D_L) through the projection, at distance R(p) from w_L. By Gordon's escape theorem (Larsen et
al., 2022) a random subspace of that codimension meets the sublevel set iff n <= w^2, the squared Gaussian width of
the set seen from the projection:

    w^2(R) = sum_i r_i^2 / (R^2 + r_i^2) = sum_i 2 eps / (2 eps + lambda_i R^2)

(the second form also holds for lambda_i = 0, a flat direction counting 1; negative eigenvalues count as flat).
The maximal pruning ratio p* is the largest n / D_L with n <= w^2(R(n)). R(n)^2 is, for magnitude pruning, the sum
of the n smallest w_i^2 (global order over all tensors) and, for random pruning, its expectation (n / D_L) ||w||^2.

Only a few eigenvalues of a network's Hessian can be computed (Lanczos on Hessian-vector products), while w^2 sums
over all D_L of them. Two ways to fill in the rest, both a *spectrum* (values, counts summing to D_L):

- ``'slq'`` (the estimate): stochastic Lanczos quadrature from the same run, each Ritz value theta_j weighted by
  D_L tau_j^2, tau_j the first component of its eigenvector of the tridiagonal matrix (Ubaru et al., 2017);
- ``'capped'`` (a lower bound on p* when the top k have converged): the top k, the other D_L - k set to the k-th
  (every other eigenvalue is at most that large, and a larger eigenvalue only shrinks w^2).

Relation to the projection check (``projection.py``): the check asks whether the *projection itself* keeps the loss
within ``tolerance`` of L(w_L), i.e. (for a quadratic) 1/2 d^T H d <= eps with d the pruned weights. The theory asks
whether the pruned *subspace* meets the eps-sublevel set anywhere, which retraining can then find. With the same eps
(the probe's loss tolerance, in nats of the mean per-sample loss the Hessian is taken of) the projection check is the
stricter of the two, so p* is expected at or above its fraction.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from composer_imp.functional.barrier import Evaluate
from composer_imp.functional.masks import magnitude_masks
from composer_imp.functional.projection import check_fraction_range, search_fraction

__all__ = ['hessian_vector_product', 'support_operator', 'flat_live_weights', 'lanczos', 'lanczos_top_eigenvalues',
           'spectrum', 'projection_length', 'gaussian_width_sq', 'max_pruning_ratio', 'max_random_prune_fraction',
           'PRUNINGS', 'BULKS']

PRUNINGS = ('magnitude', 'random')
BULKS = ('slq', 'capped')

Tensors = Sequence[torch.Tensor]


def hessian_vector_product(loss_fn: Callable[[], torch.Tensor], params: Tensors, vector: Tensors,
                           masks: Tensors | None = None) -> list[torch.Tensor]:
    """H v of the scalar ``loss_fn()`` with respect to ``params``, by double backward.

    ``vector`` holds one tensor per parameter (same shapes). With ``masks`` (bool, one per parameter, True = alive),
    the off-support components of ``vector`` and of the result are zero: the product with the Hessian restricted to
    the support (its principal submatrix). Parameters the loss does not reach give zeros.
    """
    if masks is not None:
        vector = [v * m for v, m in zip(vector, masks)]
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    directional = sum((g * v).sum() for g, v in zip(grads, vector))
    products = torch.autograd.grad(directional, params, allow_unused=True)
    products = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(products, params)]
    if masks is not None:
        products = [h * m for h, m in zip(products, masks)]
    return products


def support_operator(hvp: Callable[[Tensors], Sequence[torch.Tensor]],
                     masks: Tensors) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``hvp`` (per-parameter tensors -> per-parameter tensors) as an operator on flat vectors of the live weights.

    Returns ``(operator, dim)``: ``operator(v)`` takes a vector of the ``dim`` alive entries (in the masks' order,
    row-major) and returns H v on the same entries, on ``v``'s device and dtype, so Lanczos sees exactly the
    principal submatrix of H on the support.
    """
    alive = [m.flatten().nonzero().squeeze(1) for m in masks]
    sizes = [int(a.numel()) for a in alive]

    def operator(flat: torch.Tensor) -> torch.Tensor:
        pieces = []
        for index, mask, piece in zip(alive, masks, flat.split(sizes)):
            full = torch.zeros(mask.numel(), dtype=flat.dtype, device=flat.device)
            pieces.append(full.index_copy_(0, index.to(flat.device), piece).view(mask.shape))
        products = hvp(pieces)
        return torch.cat([h.flatten().to(flat)[index.to(flat.device)] for h, index in zip(products, alive)])

    return operator, sum(sizes)


def lanczos(operator: Callable[[torch.Tensor], torch.Tensor], dim: int, iterations: int,
            generator: torch.Generator | None = None, device: torch.device | str | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos tridiagonalisation of a symmetric ``operator`` on R^dim, with full reorthogonalisation, in float64.

    Gradients stay enabled (the operator may differentiate). Starts from a Gaussian vector drawn with ``generator``
    (on the CPU, so a seed gives the same start everywhere) and runs ``min(iterations, dim)`` steps, fewer when an invariant subspace is found. Returns ``(T, Q)``: the
    tridiagonal matrix (m x m) and the orthonormal basis (m x dim); ``Q^T T Q`` is H on the Krylov subspace.
    """
    if dim < 1:
        raise ValueError(f'dim: {dim} is not allowed; the support needs at least one live weight')
    if iterations < 1:
        raise ValueError(f'iterations: {iterations} is not allowed; use at least 1')
    steps = min(iterations, dim)
    q = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
    q /= q.norm()
    basis = torch.zeros(steps, dim, dtype=torch.float64, device=device)
    diagonal, off_diagonal = [], []
    for j in range(steps):
        basis[j] = q
        w = operator(q).to(torch.float64)
        diagonal.append(torch.dot(w, q))
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            w -= basis[:j + 1].T @ (basis[:j + 1] @ w)
        beta = w.norm()
        scale = max(abs(float(d)) for d in diagonal) or 1.0
        if j == steps - 1 or float(beta) <= 1e-10 * scale:
            break
        off_diagonal.append(beta)
        q = w / beta
    m = len(diagonal)
    tridiagonal = torch.diag(torch.stack(diagonal))
    if off_diagonal:
        betas = torch.stack(off_diagonal)
        tridiagonal += torch.diag(betas, 1) + torch.diag(betas, -1)
    return tridiagonal, basis[:m]


def lanczos_top_eigenvalues(operator: Callable[[torch.Tensor], torch.Tensor], dim: int, k: int, iterations: int,
                            generator: torch.Generator | None = None, return_vectors: bool = False,
                            device: torch.device | str | None = None
                            ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues of a symmetric ``operator``, descending (float64), by :func:`lanczos`.

    ``return_vectors=True`` also returns the Ritz vectors as the columns of a (dim x k) matrix. Exact (to rounding)
    when ``iterations >= dim``; otherwise the extreme eigenvalues converge first, so take ``iterations`` a few times
    ``k``. Fewer than ``k`` values come back when the Krylov subspace is smaller.
    """
    tridiagonal, basis = lanczos(operator, dim, iterations, generator, device)
    values, vectors = torch.linalg.eigh(tridiagonal)
    order = torch.argsort(values, descending=True)[:k]
    if return_vectors:
        return values[order], basis.T @ vectors[:, order]
    return values[order]


def spectrum(tridiagonal: torch.Tensor, dim: int, bulk: str = 'slq', k: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole spectrum ``(values, counts)``, counts summing to ``dim``, from a Lanczos tridiagonal matrix.

    ``bulk='slq'``: every Ritz value weighted by ``dim * tau_j^2`` (stochastic Lanczos quadrature, one start vector).
    ``'capped'``: the ``k`` largest Ritz values once each and the other ``dim - k`` at the k-th: a lower bound on
    p* once those k have converged (the extreme Ritz values converge first; interior ones are no eigenvalues).
    """
    if bulk not in BULKS:
        raise ValueError(f'bulk: {bulk!r} is not allowed; use one of {BULKS}')
    if bulk == 'capped' and (k is None or k < 1):
        raise ValueError(f"k: {k!r} is not allowed; bulk='capped' needs the number of converged top eigenvalues >= 1")
    values, vectors = torch.linalg.eigh(tridiagonal)
    if bulk == 'slq':
        return values, dim * vectors[0] ** 2
    top = torch.sort(values, descending=True).values[:k]
    counts = torch.ones_like(top)
    counts[-1] += dim - top.numel()
    return top, counts


def _check_pruning(pruning: str) -> None:
    if pruning not in PRUNINGS:
        raise ValueError(f'pruning: {pruning!r} is not allowed; use one of {PRUNINGS}')


def _squared_lengths(weights: torch.Tensor, pruning: str) -> Callable[[int], float]:
    """n -> R^2 after pruning n of the live ``weights`` (flat): the n smallest squares, or n / D of the total."""
    squares = weights.detach().flatten().to(torch.float64) ** 2
    if pruning == 'random':
        total, size = float(squares.sum()), squares.numel()
        return lambda n: total * n / size
    cumulative = torch.cat([squares.new_zeros(1), torch.sort(squares).values.cumsum(0)]).cpu()
    return lambda n: float(cumulative[n])


def projection_length(weights: torch.Tensor, fraction: float, pruning: str = 'magnitude') -> float:
    """R(p): the distance from the live ``weights`` (flat) to their projection after pruning ``fraction`` of them.

    ``round(fraction * D)`` weights are pruned, as :func:`~composer_imp.functional.magnitude_masks` counts:
    ``'magnitude'`` the smallest |w| (exact), ``'random'`` a uniformly random subset (the expected R^2 = p ||w||^2).
    """
    _check_pruning(pruning)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f'fraction: {fraction} is not allowed; use a fraction of the live weights in [0, 1]')
    return math.sqrt(_squared_lengths(weights, pruning)(round(fraction * weights.numel())))


def gaussian_width_sq(values: torch.Tensor, counts: torch.Tensor, radius_sq: float, epsilon: float) -> float:
    """w^2 = sum_i counts_i * 2 eps / (2 eps + max(lambda_i, 0) R^2) of the eps-sublevel set seen from distance R."""
    curvature = values.to(torch.float64).clamp(min=0.0) * radius_sq
    return float((counts.to(torch.float64) * (2 * epsilon) / (2 * epsilon + curvature)).sum())


def max_pruning_ratio(values: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor, epsilon: float,
                      pruning: str = 'magnitude') -> dict[str, float]:
    """The theory's p*: the largest n / D with n <= w^2(R(n)), over n = 0 .. D pruned of the D live ``weights``.

    ``(values, counts)`` is the Hessian's spectrum on the support (:func:`spectrum`; counts sum to D), ``epsilon``
    the height of the sublevel set in the loss's units. ``n - w^2(R(n))`` increases with n, so a bisection over the
    integers finds the crossing. Returns ``{'fraction', 'pruned', 'radius', 'width_sq'}`` at that n.
    """
    _check_pruning(pruning)
    if not epsilon > 0:
        raise ValueError(f'epsilon: {epsilon!r} is not allowed; use a positive rise of the loss')
    size = weights.numel()
    if abs(float(counts.sum()) - size) > 1e-6 * size:
        raise ValueError(f'counts: they sum to {float(counts.sum()):g}, not to the {size} live weights')
    radius_sq = _squared_lengths(weights, pruning)

    def admissible(n: int) -> bool:
        return n <= gaussian_width_sq(values, counts, radius_sq(n), epsilon)

    low, high = 0, size  # admissible(0) always holds
    if admissible(high):
        low = high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if admissible(middle) else (low, middle)
    return {'fraction': low / size, 'pruned': low, 'radius': math.sqrt(radius_sq(low)),
            'width_sq': gaussian_width_sq(values, counts, radius_sq(low), epsilon)}


@torch.no_grad()
def max_random_prune_fraction(model: nn.Module, masks: Mapping[str, torch.Tensor], evaluate: Evaluate, *,
                              p_min: float, p_max: float, tolerance: float, metric: str = 'loss',
                              resolution: float = 0.05, candidates: Sequence[float] | None = None,
                              generator: torch.Generator | None = None) -> dict[str, object]:
    """The projection check of :func:`~composer_imp.functional.max_prune_fraction` for *random* pruning.

    One random order of the live weights (drawn with ``generator``) prunes the first ``round(p * D)`` of them, so
    the projections are nested in p as in magnitude pruning. Returns ``search_fraction``'s dict plus ``reference``;
    the model is restored bit-exactly.
    """
    check_fraction_range(p_min, p_max, tolerance, resolution, candidates)
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in masks}
    trained = {n: w.detach().clone() for n, w in weights.items()}
    order = {n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in weights.items()}
    alive = {n: m.to(device=weights[n].device, dtype=torch.bool) for n, m in masks.items()}

    def score(keep: Mapping[str, torch.Tensor]) -> dict[str, float]:
        for name, weight in weights.items():
            weight.copy_(trained[name]).masked_fill_(~keep[name], 0.0)
        return {name: float(value) for name, value in evaluate(model).items()}

    try:
        reference = score(alive)
        if metric not in reference:
            raise ValueError(f'metric: {metric!r} is not allowed; evaluate gives {sorted(reference)}')
        result = search_fraction(lambda p: score(magnitude_masks(order, p, alive))[metric] - reference[metric],
                                 p_min, p_max, tolerance, resolution=resolution, candidates=candidates)
    finally:
        for name, weight in weights.items():
            weight.copy_(trained[name])
    result['reference'] = reference
    return result


def flat_live_weights(weights: Iterable[torch.Tensor], masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """The live entries of ``weights`` as one flat vector, in the masks' order (row-major): the coordinates of
    :func:`support_operator`."""
    return torch.cat([w.detach().flatten()[m.flatten().to(w.device)] for w, m in zip(weights, masks)])

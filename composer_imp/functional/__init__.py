"""Pure torch core of composer_imp: masks, rewinding, interpolation, error barriers, projection checks, FLOPs and
ticket files. Imports nothing from Composer."""
from composer_imp.functional.barrier import (
    ClassificationScorer,
    alpha_grid,
    barrier_linear,
    barrier_max_minus_mean,
    classification_error,
    error_barrier,
    is_matching,
    metric_curve,
)
from composer_imp.functional.controls import (
    layer_alive_counts,
    perturb_on_support,
    pruned_rewind_distance,
    random_masks,
    shuffled_masks,
)
from composer_imp.functional.hessian import (
    hessian_vector_product,
    lanczos_top_eigenvalues,
    max_pruning_ratio,
    projection_length,
)
from composer_imp.functional.interpolate import interpolate_state, load_interpolated_, recompute_batchnorm
from composer_imp.functional.masks import (
    Coverage,
    alive_count,
    apply_masks,
    coverage_warning,
    density,
    layer_densities,
    magnitude_masks,
    mask_gradients,
    masks_at_density,
    non_finite_weights,
    prunable_coverage,
    prunable_weights,
)
from composer_imp.functional.projection import (
    check_fraction_range,
    max_prune_fraction,
    projection_scores,
    search_fraction,
)
from composer_imp.functional.rewind import rewind, rewind_optimizer, snapshot, snapshot_optimizer
from composer_imp.functional.ticket import load_ticket, verify_level, verify_run

__all__ = [
    'ClassificationScorer',
    'Coverage',
    'alive_count',
    'alpha_grid',
    'apply_masks',
    'barrier_linear',
    'barrier_max_minus_mean',
    'check_fraction_range',
    'classification_error',
    'coverage_warning',
    'density',
    'error_barrier',
    'hessian_vector_product',
    'interpolate_state',
    'is_matching',
    'lanczos_top_eigenvalues',
    'layer_alive_counts',
    'layer_densities',
    'load_interpolated_',
    'load_ticket',
    'magnitude_masks',
    'mask_gradients',
    'masks_at_density',
    'max_prune_fraction',
    'max_pruning_ratio',
    'metric_curve',
    'non_finite_weights',
    'perturb_on_support',
    'projection_length',
    'projection_scores',
    'prunable_coverage',
    'prunable_weights',
    'pruned_rewind_distance',
    'random_masks',
    'recompute_batchnorm',
    'rewind',
    'rewind_optimizer',
    'search_fraction',
    'shuffled_masks',
    'snapshot',
    'snapshot_optimizer',
    'verify_level',
    'verify_run',
]

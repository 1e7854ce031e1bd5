"""Pure torch core of composer_imp: masks, rewinding, interpolation and error barriers. Imports nothing from Composer."""
from composer_imp.functional.masks import (
    alive_count,
    apply_masks,
    density,
    layer_densities,
    magnitude_masks,
    mask_gradients,
    masks_at_density,
    prunable_weights,
)
from composer_imp.functional.rewind import rewind, rewind_optimizer, snapshot, snapshot_optimizer
from composer_imp.functional.barrier import (
    alpha_grid,
    barrier_linear,
    barrier_max_minus_mean,
    classification_error,
    error_barrier,
    error_curve,
    is_matching,
)
from composer_imp.functional.interpolate import interpolate_state, load_interpolated_, recompute_batchnorm

__all__ = [
    'alpha_grid',
    'barrier_linear',
    'barrier_max_minus_mean',
    'classification_error',
    'error_barrier',
    'error_curve',
    'is_matching',
    'interpolate_state',
    'load_interpolated_',
    'recompute_batchnorm',
    'alive_count',
    'apply_masks',
    'density',
    'layer_densities',
    'magnitude_masks',
    'mask_gradients',
    'masks_at_density',
    'prunable_weights',
    'rewind',
    'rewind_optimizer',
    'snapshot',
    'snapshot_optimizer',
]
from composer_imp.functional.projection import (
    check_fraction_range,
    max_prune_fraction,
    projection_scores,
    search_fraction,
)

__all__ += ['check_fraction_range', 'max_prune_fraction', 'projection_scores', 'search_fraction']

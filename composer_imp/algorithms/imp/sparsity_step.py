"""How much IMP prunes after each level. ``FixedStep`` is open_lth's constant fraction; the adaptive step subclasses
``SparsityStep`` (``composer_imp.algorithms.adaptive_sparsity``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from composer.core import State
from composer.loggers import Logger

if TYPE_CHECKING:
    from composer_imp.algorithms.imp.imp import IMP

__all__ = ['SparsityStep', 'FixedStep']


class SparsityStep:
    """Chooses each level's pruning fraction and may reject a trained level.

    IMP calls, on every rank, at the end of an accepted level L (its trained network in ``state.model``):
    ``fraction(state, imp, logger)`` -> fraction of the remaining weights to prune for level L+1. After a pruned level
    has trained, ``accept(state, imp, record, logger)`` -> ``False`` discards it: IMP restores the parent level's mask
    and trained weights exactly and asks ``fraction`` again. ``decision`` (a JSON-able dict) is written into the next
    level's metrics line. Decisions must be identical on every rank (all-reduce whatever they depend on).
    """

    #: IMP keeps the parent level's trained weights (``imp.previous_level_state``) when this is True.
    needs_previous_level = False

    def __init__(self) -> None:
        self.decision: dict[str, Any] = {}

    def check(self, imp: 'IMP') -> None:
        """Validate against the IMP settings; called by ``IMP.__init__`` (raise ``ValueError`` naming the argument)."""

    def setup(self, state: State, imp: 'IMP') -> None:
        """Called at ``AFTER_LOAD``, inside ``Trainer.__init__``: the place for errors that need the run's state."""

    def fraction(self, state: State, imp: 'IMP', logger: Logger) -> float:
        raise NotImplementedError

    def accept(self, state: State, imp: 'IMP', record: dict[str, Any], logger: Logger) -> bool:
        return True

    def finished(self, imp: 'IMP') -> bool:
        """True to end the run after the level just accepted, before IMP's own ``levels``/``target_density`` rule."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {'decision': self.decision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decision = state.get('decision', {})


class FixedStep(SparsityStep):
    """Prune the same fraction of the remaining weights after every level."""

    def __init__(self, prune_fraction: float = 0.2) -> None:
        super().__init__()
        if not 0.0 < prune_fraction < 1.0:
            raise ValueError(f'prune_fraction: {prune_fraction} is not allowed; use a fraction in (0, 1)')
        self.prune_fraction = prune_fraction

    def fraction(self, state: State, imp: 'IMP', logger: Logger) -> float:
        self.decision = {'fraction': self.prune_fraction}
        return self.prune_fraction


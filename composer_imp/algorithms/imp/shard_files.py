"""Per-rank files for IMP's state under FSDP2, referred to from checkpoints.

Composer writes a sharded checkpoint with ``torch.distributed.checkpoint``, which saves the algorithms' state as one
object *from the lowest rank* (its planner de-duplicates non-tensor entries), and a full checkpoint from rank 0 only.
So IMP's checkpointed state must be the same on every rank: each rank writes the parts that differ (its shards of the
masks, the rewind point, the parent level's state, the optimizer state at step k) once to
``<IMP folder>/shards/rank<r>-of-<world>/``, and the checkpoint holds the references of every rank's file (path and
SHA-256, gathered into one list), as on one device it refers to the whole files.
"""
from __future__ import annotations

import os
from typing import Any

from composer.utils import dist

from composer_imp.functional.ticket import atomic_save, file_reference, read_reference

__all__ = ['file_shards', 'read_shard']


def _shard_folder() -> str:
    return os.path.join('shards', f'rank{dist.get_global_rank()}-of-{dist.get_world_size()}')


def file_shards(folder: str, name: str, obj: Any, key: str | None = None) -> list[dict[str, Any]]:
    """Every rank writes its ``obj`` to ``shards/rank<r>-of-<world>/<name>`` (atomically) and gets every rank's
    reference, rank 0's first (collective: one ``all_gather_object``)."""
    relative = os.path.join(_shard_folder(), name)
    atomic_save(obj, os.path.join(folder, relative))
    return dist.all_gather_object(file_reference(folder, relative, key=key))


def read_shard(folder: str, references: list[dict[str, Any]], what: str) -> tuple[Any, str]:
    """This rank's object of :func:`file_shards`' ``references`` (SHA-256 checked, ``read_reference``); one line naming
    both world sizes when the run resumes on another number of ranks."""
    world = dist.get_world_size()
    if len(references) != world:
        raise ValueError(f"checkpoint: IMP's {what} is sharded over {len(references)} ranks (FSDP); resume with "
                         f'{len(references)} ranks, not {world} (IMP does not re-shard its state)')
    return read_reference(folder, references[dist.get_global_rank()], what)

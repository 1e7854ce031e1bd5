"""Writing the array data sets as MDS shards (mosaicml-streaming); ``streaming`` is imported only when writing.

Layout: ``convert_to_mds(name, src, out)`` writes one MDS folder per split, ``out/train`` and ``out/test``, each with
its ``index.json`` and ``shard.*.mds`` files. Columns: ``image`` (``ndarray:uint8``, ``(H, W, C)``) and ``label``
(``int``). The ``streaming`` data set with ``root=out`` reads split ``s`` from ``out/s`` (with a ``remote``, it
downloads ``remote/s`` there).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from composer_imp.data.folders import check_split, cifar_arrays, mnist_5k_arrays
from composer_imp.data.transforms import ARRAY_DATASETS

__all__ = ['MDS_COLUMNS', 'convert_to_mds']

MDS_COLUMNS = {'image': 'ndarray:uint8', 'label': 'int'}


def convert_to_mds(name: str,
                   src: str | os.PathLike | None,
                   out: str | os.PathLike,
                   *,
                   splits: Sequence[str] = ('train', 'test'),
                   size_limit: int | str = 1 << 26,
                   limit: int | None = None,
                   overwrite: bool = False) -> dict[str, int]:
    """Write the raw ``uint8`` images and labels of data set ``name`` as MDS shards, one folder per split.

    ``name``: ``'mnist-5k'`` (``src`` unused, pass ``None``), ``'cifar10'`` or ``'cifar100'`` (``src``: the folder
    that :func:`~composer_imp.data.folders.cifar10` reads). ``out``: local folder; split ``s`` goes to ``out/s``.
    ``size_limit``: maximum shard size (bytes, or a string such as ``'64mb'``). ``limit``: write only the first
    ``limit`` samples of each split. ``overwrite``: replace an existing non-empty split folder (otherwise
    ``FileExistsError``). Returns the number of samples written per split. No augmentation or normalisation is
    stored: the streaming data set applies the same transforms as the folder data set.
    """
    if name not in ARRAY_DATASETS:
        raise ValueError(f'name {name!r} cannot be converted to MDS; allowed: {ARRAY_DATASETS}')
    if name != 'mnist-5k' and (src is None or not Path(src).is_dir()):
        raise ValueError(f'src {str(src)!r} is not a folder; {name} needs src = the folder holding its pickles')
    for split in splits:
        check_split(split)
    from streaming import MDSWriter  # ~3 s: it imports transformers

    written = {}
    for split in splits:
        images, labels = mnist_5k_arrays(split) if name == 'mnist-5k' else cifar_arrays(name, split, src)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        with MDSWriter(columns=MDS_COLUMNS, out=os.path.join(os.fspath(out), split), size_limit=size_limit,
                       exist_ok=overwrite) as writer:
            for image, label in zip(images, labels):
                writer.write({'image': image, 'label': int(label)})
        written[split] = len(labels)
    return written

"""Streaming the MDS shards written by :func:`~composer_imp.data.mds.convert_to_mds`.

Importing this module imports ``streaming`` (~3 s, it pulls ``transformers``), so ``composer_imp.data`` imports it only
when a streaming data set is built.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset

__all__ = ['StreamingImageDataset']


class StreamingImageDataset(StreamingDataset):
    """A ``StreamingDataset`` over MDS shards with :data:`~composer_imp.data.mds.MDS_COLUMNS`, yielding
    ``(transform(image), label)``.

    ``transform`` maps a ``uint8`` ``(H, W, C)`` array to a tensor; every other keyword goes to ``StreamingDataset``.
    """

    def __init__(self, *, transform: Callable[[np.ndarray], torch.Tensor], **kwargs: Any):
        super().__init__(**kwargs)
        self.transform = transform

    def get_item(self, sample_id: int, retry: int = 7) -> tuple[torch.Tensor, int]:
        sample = super().get_item(sample_id, retry)
        return self.transform(sample['image']), int(sample['label'])

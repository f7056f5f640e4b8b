"""Counting positives block by block: the one tally that label statistics, the converter's
statistics, the store's per-class counts and the AP-vs-frequency plots share.

Why blocks: an N x L state array (a memmap of tens of GB) is never read whole; each caller walks
it in row blocks and adds up. Blocks may be numpy arrays or torch tensors on any device.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .states import POS


def _to_numpy(counts) -> np.ndarray:
    return counts.cpu().numpy() if hasattr(counts, "cpu") else np.asarray(counts)


def positive_counts(block) -> tuple[np.ndarray, np.ndarray]:
    """(positives per class (L,), positives per row (rows,)) of one (rows, L) block of states."""
    pos = block == POS
    return _to_numpy(pos.sum(0)), _to_numpy(pos.sum(1))


def positives_per_class(blocks: Iterable, num_labels: int) -> np.ndarray:
    """int64 (L,) positives per class, summed over (rows, L) blocks of states one block at a time."""
    out = np.zeros(int(num_labels), np.int64)
    for block in blocks:
        out += _to_numpy((block == POS).sum(0))
    return out


def row_blocks(states, chunk_rows: int) -> Iterable:
    """Consecutive (chunk_rows, L) slices of a 2-D array, memmap or tensor (only one is read at a time)."""
    return (states[a:a + chunk_rows] for a in range(0, states.shape[0], chunk_rows))

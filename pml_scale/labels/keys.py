"""Counter-based keys of the setting draws: label j of row i gets ``fmix32(rowkey(seed, i) ^ j*GOLDEN)``.

Why: a row's draw then depends only on (seed, i, its labels) -- not on chunking, order or the
machine -- and, for one seed, the kept sets are nested across ratios (PAL_0.3 ⊂ PAL_0.6,
SPL ⊂ PPL_r). Within a row the keys are distinct (fmix32 is a bijection), so there are no ties.
"""

from __future__ import annotations

import numpy as np

M64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_ROW_MUL = 0xD1B54A32D192ED03
_GOLDEN32 = 0x9E3779B9


def _fmix64_int(h: int) -> int:
    h &= M64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & M64
    return h ^ (h >> 33)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(33)
    np.multiply(h, np.uint64(0xFF51AFD7ED558CCD), out=h)
    h ^= h >> np.uint64(33)
    np.multiply(h, np.uint64(0xC4CEB9FE1A85EC53), out=h)
    h ^= h >> np.uint64(33)
    return h


def fmix32(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint32(16)
    np.multiply(h, np.uint32(0x85EBCA6B), out=h)
    h ^= h >> np.uint32(13)
    np.multiply(h, np.uint32(0xC2B2AE35), out=h)
    h ^= h >> np.uint32(16)
    return h


def row_keys(seed: int, start: int, stop: int) -> np.ndarray:
    """(stop-start,) uint32: one key per global row; distinct rows give distinct 64-bit states."""
    base = np.uint64(_fmix64_int(seed ^ _GOLDEN64))
    rows = np.arange(start, stop, dtype=np.uint64)
    np.multiply(rows, np.uint64(_ROW_MUL), out=rows)
    rows ^= base
    return (_fmix64(rows) >> np.uint64(32)).astype(np.uint32)


def col_mix(cols: np.ndarray) -> np.ndarray:
    return np.multiply(cols.astype(np.uint32), np.uint32(_GOLDEN32), dtype=np.uint32)

"""Label states: int8 everywhere, 1 positive, 0 negative, -1 missing; and the checks every reader runs.

Why a module of its own: the settings, the store, the statistics and the pseudo-label stores all
speak these three values, and all of them reject anything else with the same message.
"""

from __future__ import annotations

import numpy as np

POS, NEG, MISSING = 1, 0, -1


def check_states(arr: np.ndarray, name: str) -> None:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (or memmap) of int8, got {type(arr).__name__}")
    if arr.dtype != np.int8:
        raise TypeError(f"{name} must have dtype int8 (1 pos, 0 neg, -1 missing), got {arr.dtype}; "
                        f"convert with .astype(np.int8)")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N images, L labels), got shape {arr.shape}")


def check_values(chunk: np.ndarray, start: int, name: str, allowed=(-1, 0, 1)) -> None:
    """Raise naming the first bad row/column if ``chunk`` has a value outside ``allowed``."""
    if chunk.size == 0:
        return
    lo, hi = int(chunk.min()), int(chunk.max())
    if lo >= min(allowed) and hi <= max(allowed):  # allowed sets are contiguous ranges
        return
    bad = (chunk < min(allowed)) | (chunk > max(allowed))
    r, c = np.argwhere(bad)[0]
    raise ValueError(f"{name}[{start + r}, {c}] = {int(chunk[r, c])}; accepted values: "
                     f"{', '.join(map(str, allowed))} (1 positive, 0 negative, -1 missing)")

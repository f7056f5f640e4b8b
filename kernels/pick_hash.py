"""Host side of the counter-based pick hash, shared by the Triton kernel and the PyTorch
reference (``pml_scale.losses.picks``, which documents the recipe). No triton import here."""

from __future__ import annotations

import numbers

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
C1 = 0x85EBCA6B
C2 = 0xC2B2AE35
PICK_BITS = 24


def fmix32_int(h: int) -> int:
    """murmur3's 32-bit finaliser on a Python int."""
    h &= MASK32
    h ^= h >> 16
    h = (h * C1) & MASK32
    h ^= h >> 13
    h = (h * C2) & MASK32
    h ^= h >> 16
    return h


def launch_key(seed: int, epoch: int) -> int:
    """The per-(seed, epoch) uint32 key of one launch."""
    for name, v in (("seed", seed), ("epoch", epoch)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not (0 <= int(v) <= MASK32):
            raise ValueError(f"{name} must be an integer in [0, 2**32), got {v!r}")
    return fmix32_int(fmix32_int(int(seed) ^ GOLDEN) ^ int(epoch))


def pick_threshold(q: float) -> int:
    """Threshold on the 24-bit draw: a slot is picked iff its draw < threshold (probability q)."""
    try:
        qf = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"q must be in [0, 1] (a float), got {q!r}") from None
    if not (0.0 <= qf <= 1.0):
        raise ValueError(f"q must be in [0, 1] (a float), got {q!r}")
    return int(round(qf * (1 << PICK_BITS)))

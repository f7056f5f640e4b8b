"""Counter-based picks of missing labels (the paper's q% sampling, Eq. 12).

Each (seed, epoch, sample id, label index) maps to a fixed 24-bit uniform number through
murmur3's 32-bit finaliser, so a sample gets the same picks whatever its batch, rank or
world size, and the Triton kernel (``pml_scale.kernels``) reproduces them bit for bit.

The exact recipe, all arithmetic modulo 2**32 (uint32):

    fmix32(h):  h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
    key      = fmix32(fmix32(seed ^ 0x9E3779B9) ^ epoch)              (host, per launch)
    row      = fmix32(fmix32(key ^ id_lo) ^ id_hi)                     (per sample id, int64)
    h        = fmix32(row ^ ((j + 1) * 0x9E3779B9))                    (per label index j)
    picked   = (h >> 8) < round(q * 2**24)

Torch has no uint32 arithmetic, so the reference emulates it in int64 with 16-bit split
multiplies (no intermediate exceeds 2**49, no signed overflow). On CPU tensors the (B, L) part
runs in numpy uint32 instead (unsigned arithmetic wraps modulo 2**32 by definition; in place, a
quarter of the int64 emulation's memory traffic): the same draws bit for bit (tests/test_picks.py),
0.7 ms instead of 21 ms at 64 x 9,605 on one thread (benchmarks/RESULTS.md, issue 17).
"""

from __future__ import annotations

import numpy as np
import torch

from pml_scale.kernels.pick_hash import (  # noqa: F401 (re-exported: the one host-side copy)
    C1, C2, GOLDEN, MASK32, PICK_BITS, fmix32_int, launch_key, pick_threshold)
from pml_scale.labels.keys import fmix32  # the same murmur3 finaliser, numpy uint32, in place


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, C1)
    h = h ^ (h >> 13)
    h = _mul32(h, C2)
    return h ^ (h >> 16)


def row_hash(sample_ids: torch.Tensor, key: int) -> torch.Tensor:
    """(B,) int64 per-sample hash in [0, 2**32) for the given launch key."""
    ids = sample_ids.to(torch.int64)
    lo = ids & MASK32
    hi = (ids >> 32) & MASK32
    return _fmix32(_fmix32(lo ^ key) ^ hi)


def pick_draws(sample_ids: torch.Tensor, num_labels: int, *, seed: int, epoch: int) -> torch.Tensor:
    """(B, L) int64 24-bit uniform draws; ``pick_mask`` compares them with the threshold."""
    draws = _draws(sample_ids, num_labels, seed=seed, epoch=epoch)
    return torch.from_numpy(draws.astype(np.int64)) if isinstance(draws, np.ndarray) else draws


def pick_mask(sample_ids: torch.Tensor, num_labels: int, *, seed: int, epoch: int, q: float) -> torch.Tensor:
    """(B, L) bool: which label slots are picked (before intersecting with missing).

    Each slot is picked independently with probability q (exactly q in the 24-bit grid).
    """
    thr = pick_threshold(q)
    draws = _draws(sample_ids, num_labels, seed=seed, epoch=epoch)
    return torch.from_numpy(draws < np.uint32(thr)) if isinstance(draws, np.ndarray) else draws < thr


def _draws(sample_ids: torch.Tensor, num_labels: int, *, seed: int, epoch: int):
    """The (B, L) draws: numpy uint32 for CPU ids (unsigned arithmetic wraps by itself), int64
    tensors emulating uint32 on other devices."""
    if sample_ids.dim() != 1:
        raise ValueError(f"sample_ids must be 1-D (B,), got shape {tuple(sample_ids.shape)}")
    if sample_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"sample_ids must be int64 or int32, got {sample_ids.dtype}")
    if int(num_labels) < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels!r}")
    row = row_hash(sample_ids, launch_key(seed, epoch))
    if row.device.type == "cpu":
        col = np.arange(1, int(num_labels) + 1, dtype=np.uint32) * np.uint32(GOLDEN)
        h = fmix32(row.numpy().astype(np.uint32)[:, None] ^ col[None, :])  # in place
        h >>= np.uint32(32 - PICK_BITS)
        return h
    j = torch.arange(1, int(num_labels) + 1, dtype=torch.int64, device=sample_ids.device)
    col = _mul32(j, GOLDEN)
    return _fmix32(row[:, None] ^ col[None, :]) >> (32 - PICK_BITS)

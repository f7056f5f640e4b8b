"""The label-missing settings (docs/design.md §1): parsing a setting and drawing its observed labels.

A setting is drawn once, seeded, and saved (the paper never re-draws). The draw is
counter-based (``labels.keys``): a row's result depends only on (seed, row, its labels).
"""

from __future__ import annotations

import math
import re

import numpy as np

from .keys import M64, col_mix, fmix32, row_keys
from .observed import ObservedLabels, block_rows, concat_parts, csr_indptr, csr_of_blocks
from .states import MISSING, POS, check_states, check_values

SETTINGS = ("FAL", "PAL", "PPL", "SPL", "NATIVE")
_RATIO_SETTINGS = ("PAL", "PPL")
_ACCEPTED = "FAL, PAL_<r>, PPL_<r>, SPL, NATIVE (case-insensitive, r in (0, 1], e.g. PAL_0.3)"


def _check_ratio(ratio, where: str) -> float:
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r} ({where})") from None
    if not (math.isfinite(r) and 0.0 < r <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r} ({where})")
    return r


def _split_setting(text: str) -> tuple[str, float | None]:
    """Name and optional ratio of a setting string, without requiring the ratio."""
    if not isinstance(text, str):
        raise ValueError(f"setting must be a string, one of {_ACCEPTED}; got {text!r}")
    m = re.fullmatch(r"\s*([A-Za-z]+)(?:_([^_\s]+))?\s*", text)
    name = m.group(1).upper() if m else None
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {text!r}; accepted: {_ACCEPTED}")
    raw = m.group(2)
    if raw is not None and name not in _RATIO_SETTINGS:
        raise ValueError(f"setting {name} takes no ratio, got {text!r}; accepted: {_ACCEPTED}")
    return name, (None if raw is None else _check_ratio(raw, f"setting {text!r}"))


def parse_setting(text: str) -> tuple[str, float | None]:
    """"PAL_0.3" -> ("PAL", 0.3); "fal" -> ("FAL", None). Ratio settings need a ratio, others none."""
    name, ratio = _split_setting(text)
    if name in _RATIO_SETTINGS and ratio is None:
        raise ValueError(f"setting {text!r} needs a ratio, e.g. {name}_0.3; accepted: {_ACCEPTED}")
    return name, ratio


def _resolve_setting(setting: str, ratio) -> tuple[str, float | None]:
    name, parsed = _split_setting(setting)
    if ratio is None:
        ratio = parsed
    elif parsed is not None and _check_ratio(ratio, "argument") != parsed:
        raise ValueError(f"ratio={ratio!r} contradicts setting {setting!r}")
    if name in _RATIO_SETTINGS:
        if ratio is None:
            raise ValueError(f"setting {name} needs ratio in (0, 1] (pass ratio= or '{name}_0.3')")
        return name, _check_ratio(ratio, f"setting {name}")
    if ratio is not None:
        raise ValueError(f"setting {name} takes no ratio, got ratio={ratio!r}")
    return name, None


# ----------------------------------------------------------------------------- draws


def _pal_chunk(chunk: np.ndarray, keys_row: np.ndarray, k: int, colmix: np.ndarray) -> np.ndarray:
    """Keep the k label slots with the smallest keys in each row (an already missing slot stays missing)."""
    keys = keys_row[:, None] ^ colmix[None, :]
    fmix32(keys)
    kth = np.partition(keys, k - 1, axis=1)[:, k - 1:k]
    return np.where(keys <= kth, chunk, np.int8(MISSING))


def _ppl_select(rows: np.ndarray, cols: np.ndarray, n_rows: int, keys_row: np.ndarray,
                ratio: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the positives kept: max(1, round(ratio*n+)) per row (1 when ratio is None:
    SPL). ``rows`` must be grouped by row in increasing order (row-major nonzero, or CSR order)."""
    if rows.size == 0:
        return rows, cols
    keys = keys_row[rows] ^ col_mix(cols)
    fmix32(keys)
    order = np.argsort((rows.astype(np.uint64) << np.uint64(32)) | keys.astype(np.uint64))
    n_pos = np.bincount(rows, minlength=n_rows)
    if ratio is None:
        k_row = np.minimum(n_pos, 1)
    else:
        k_row = np.where(n_pos > 0, np.maximum(1, np.rint(ratio * n_pos)), 0).astype(np.int64)
    starts = np.cumsum(n_pos) - n_pos
    srows = rows[order]
    keep = (np.arange(rows.size) - starts[srows]) < k_row[srows]
    return srows[keep], cols[order][keep]


def _ppl_chunk(chunk: np.ndarray, keys_row: np.ndarray, ratio: float | None) -> np.ndarray:
    """Keep max(1, round(ratio*n+)) positives per row (1 when ratio is None: SPL), no negatives.

    Works on the positive entries only, so cost grows with the number of positives, not L.
    """
    rows, cols = np.nonzero(chunk == POS)  # row-major: grouped by row
    out = np.full(chunk.shape, MISSING, dtype=np.int8)
    r, c = _ppl_select(rows, cols, chunk.shape[0], keys_row, ratio)
    out[r, c] = POS
    return out


def make_observed(full: np.ndarray, setting: str, ratio: float | None = None, seed: int = 0, *,
                  chunk_rows: int = 65536, progress: bool = False,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Observed int8 (N, L) labels of a label-missing setting, drawn from ``full`` (docs/design.md §1).

    FAL keeps all; PAL_r keeps round(r*L) slots per image chosen uniformly (positive or
    negative); PPL_r keeps max(1, round(r*n+)) of the n+ positives, no negatives (rows with
    n+ = 0 keep nothing); SPL keeps one positive; NATIVE copies ``full`` (with its -1s).
    ``round`` is Python's (half to even). Entries already missing in ``full`` stay missing.
    ``setting`` may carry the ratio ("PAL_0.3") or take it from ``ratio``.

    Deterministic per row in (seed, row index): independent of ``chunk_rows``. Memory: one
    chunk, about 6 x chunk_rows x L bytes for PAL (uint32 keys), beyond ``full`` and the
    output; pass ``out`` (e.g. an ``np.lib.format.open_memmap``) to keep the N x L output on disk.
    """
    name, r = _resolve_setting(setting, ratio)
    check_states(full, "full")
    n, num_labels = full.shape
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= M64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    seed = int(seed)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    k = None
    if name == "PAL":
        k = round(r * num_labels)
        if k < 1:
            raise ValueError(f"ratio={r} keeps round({r} * {num_labels}) = 0 labels per image in PAL; "
                             f"use ratio >= {0.5 / num_labels:.3g}")
    if out is None:
        out = np.empty((n, num_labels), dtype=np.int8)
    elif not isinstance(out, np.ndarray) or out.shape != full.shape or out.dtype != np.int8:
        raise ValueError(f"out must be an int8 array of shape {full.shape}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    colmix = col_mix(np.arange(num_labels))
    starts = range(0, n, int(chunk_rows))
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=f"make_observed {name}", unit="chunk")
    for a in starts:
        b = min(a + int(chunk_rows), n)
        chunk = np.asarray(full[a:b])
        check_values(chunk, a, "full")
        if name in ("FAL", "NATIVE"):
            out[a:b] = chunk
            continue
        keys_row = row_keys(seed, a, b)
        if name == "PAL":
            out[a:b] = _pal_chunk(chunk, keys_row, k, colmix)
        else:
            out[a:b] = _ppl_chunk(chunk, keys_row, r if name == "PPL" else None)
    return out


def observed_csr(full: "ObservedLabels", setting: str, ratio: float | None = None, seed: int = 0, *,
                 chunk_rows: int | None = None, progress: bool = False) -> "ObservedLabels":
    """``make_observed`` of any ``ObservedLabels`` (dense or CSR), returned as CSR (fill -1), never
    holding N x L: the same draw, row by row (the keys depend on the global row only).

    PPL/SPL/NATIVE on CSR work on the listed entries alone (O(entries)); PAL and dense inputs go
    through dense blocks of ``chunk_rows`` rows (default: 16 MiB of states per block)."""
    name, r = _resolve_setting(setting, ratio)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= M64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    n, num_labels = full.shape
    if full.form == "csr" and name in ("NATIVE", "FAL", "PPL", "SPL"):
        if name in ("NATIVE", "FAL"):  # every entry kept: the labels themselves (fill included)
            return full
        ptr, idx, val = full.indptr, full.indices, full.values
        chunk = int(chunk_rows or 1 << 20)
        counts, idx_parts = [], []
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            lo, hi = int(ptr[a]), int(ptr[b])
            sel = val[lo:hi] == POS
            rows = np.repeat(np.arange(b - a), np.diff(ptr[a:b + 1]))[sel]
            kr, kc = _ppl_select(rows, idx[lo:hi][sel].astype(np.int64), b - a, row_keys(int(seed), a, b),
                                 r if name == "PPL" else None)
            order = np.lexsort((kc, kr))
            counts.append(np.bincount(kr, minlength=b - a))
            idx_parts.append(kc[order].astype(np.int32))
        indptr, indices = csr_indptr(counts, n), concat_parts(idx_parts, np.int32)
        return ObservedLabels(csr=(indptr, indices, np.full(indices.size, POS, np.int8), full.shape),
                              source=full.source)
    chunk = int(chunk_rows or block_rows(num_labels))
    blocks = full.iter_rows(chunk)
    if progress:
        from tqdm import tqdm
        blocks = tqdm(blocks, total=-(-n // chunk), desc=f"observed {name}", unit="chunk")
    drawn = ((a, draw_block(block, a, name, r, int(seed))) for a, block in blocks)
    return ObservedLabels(csr=(*csr_of_blocks(drawn, n), full.shape), source=full.source)


def draw_block(chunk: np.ndarray, start: int, name: str, ratio: float | None, seed: int) -> np.ndarray:
    """The setting's draw of the rows start .. start + len(chunk) (global row numbers)."""
    check_values(chunk, start, "full")
    if name in ("FAL", "NATIVE"):
        return chunk
    keys_row = row_keys(seed, start, start + chunk.shape[0])
    if name == "PAL":
        k = round(ratio * chunk.shape[1])
        if k < 1:
            raise ValueError(f"ratio={ratio} keeps round({ratio} * {chunk.shape[1]}) = 0 labels per image in PAL; "
                             f"use ratio >= {0.5 / chunk.shape[1]:.3g}")
        return _pal_chunk(chunk, keys_row, k, col_mix(np.arange(chunk.shape[1])))
    return _ppl_chunk(chunk, keys_row, ratio if name == "PPL" else None)

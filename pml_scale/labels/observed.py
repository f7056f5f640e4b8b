"""Label states, the label-missing settings (docs/design.md §1) and the observed-label store.

States are int8 everywhere: 1 positive, 0 negative, -1 missing.

A setting is drawn once, seeded, and saved (the paper never re-draws). The draw is
counter-based: label j of row i gets the 32-bit key ``fmix32(rowkey(seed, i) ^ j*GOLDEN)``,
so a row's result depends only on (seed, i, its labels) -- not on chunking, order or the
machine -- and, for one seed, the kept sets are nested across ratios (PAL_0.3 ⊂ PAL_0.6,
SPL ⊂ PPL_r). Within a row the keys are distinct (fmix32 is a bijection), so there are no ties.

The store (``ObservedLabels``) is indexed by sample id = row. Dense form: an int8 ``.npy``
opened with ``mmap_mode="r"`` (5.6M x 600 = 3.4 GB never read in whole). CSR form (``.npz``)
stores only the entries that differ from its ``fill`` state (-1: observed entries of partial
labels; 0: positives of full labels, negatives implied), for 10k+ label spaces where N x L
would be tens of GB although each image lists a handful of labels. Every reader here (settings,
statistics, gathers, evaluation columns) works on it without densifying more than one block.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from pml_scale.atomic import atomic_path, atomic_save_npy, atomic_save_npz

POS, NEG, MISSING = 1, 0, -1
SETTINGS = ("FAL", "PAL", "PPL", "SPL", "NATIVE")
_RATIO_SETTINGS = ("PAL", "PPL")
_ACCEPTED = "FAL, PAL_<r>, PPL_<r>, SPL, NATIVE (case-insensitive, r in (0, 1], e.g. PAL_0.3)"

_M64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_ROW_MUL = 0xD1B54A32D192ED03
_GOLDEN32 = 0x9E3779B9

# Dense saves above this size are streamed through a memmap instead of an in-memory buffer.
_STREAM_BYTES = 64 << 20


# ----------------------------------------------------------------------------- settings


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


# ----------------------------------------------------------------------------- hashing


def _fmix64_int(h: int) -> int:
    h &= _M64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(33)
    np.multiply(h, np.uint64(0xFF51AFD7ED558CCD), out=h)
    h ^= h >> np.uint64(33)
    np.multiply(h, np.uint64(0xC4CEB9FE1A85EC53), out=h)
    h ^= h >> np.uint64(33)
    return h


def _fmix32(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint32(16)
    np.multiply(h, np.uint32(0x85EBCA6B), out=h)
    h ^= h >> np.uint32(13)
    np.multiply(h, np.uint32(0xC2B2AE35), out=h)
    h ^= h >> np.uint32(16)
    return h


def _row_keys(seed: int, start: int, stop: int) -> np.ndarray:
    """(stop-start,) uint32: one key per global row; distinct rows give distinct 64-bit states."""
    base = np.uint64(_fmix64_int(seed ^ _GOLDEN64))
    rows = np.arange(start, stop, dtype=np.uint64)
    np.multiply(rows, np.uint64(_ROW_MUL), out=rows)
    rows ^= base
    return (_fmix64(rows) >> np.uint64(32)).astype(np.uint32)


def _col_mix(cols: np.ndarray) -> np.ndarray:
    return np.multiply(cols.astype(np.uint32), np.uint32(_GOLDEN32), dtype=np.uint32)


# ----------------------------------------------------------------------------- settings


def _check_states(arr: np.ndarray, name: str) -> None:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (or memmap) of int8, got {type(arr).__name__}")
    if arr.dtype != np.int8:
        raise TypeError(f"{name} must have dtype int8 (1 pos, 0 neg, -1 missing), got {arr.dtype}; "
                        f"convert with .astype(np.int8)")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N images, L labels), got shape {arr.shape}")


def _check_values(chunk: np.ndarray, start: int, name: str, allowed=(-1, 0, 1)) -> None:
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


def _pal_chunk(chunk: np.ndarray, keys_row: np.ndarray, k: int, colmix: np.ndarray) -> np.ndarray:
    """Keep the k label slots with the smallest keys in each row (an already missing slot stays missing)."""
    keys = keys_row[:, None] ^ colmix[None, :]
    _fmix32(keys)
    kth = np.partition(keys, k - 1, axis=1)[:, k - 1:k]
    return np.where(keys <= kth, chunk, np.int8(MISSING))


def _ppl_select(rows: np.ndarray, cols: np.ndarray, n_rows: int, keys_row: np.ndarray,
                ratio: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the positives kept: max(1, round(ratio*n+)) per row (1 when ratio is None:
    SPL). ``rows`` must be grouped by row in increasing order (row-major nonzero, or CSR order)."""
    if rows.size == 0:
        return rows, cols
    keys = keys_row[rows] ^ _col_mix(cols)
    _fmix32(keys)
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
    _check_states(full, "full")
    n, num_labels = full.shape
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _M64:
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
    colmix = _col_mix(np.arange(num_labels))
    starts = range(0, n, int(chunk_rows))
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=f"make_observed {name}", unit="chunk")
    for a in starts:
        b = min(a + int(chunk_rows), n)
        chunk = np.asarray(full[a:b])
        _check_values(chunk, a, "full")
        if name in ("FAL", "NATIVE"):
            out[a:b] = chunk
            continue
        keys_row = _row_keys(seed, a, b)
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
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= _M64:
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
            kr, kc = _ppl_select(rows, idx[lo:hi][sel].astype(np.int64), b - a, _row_keys(int(seed), a, b),
                                 r if name == "PPL" else None)
            order = np.lexsort((kc, kr))
            counts.append(np.bincount(kr, minlength=b - a))
            idx_parts.append(kc[order].astype(np.int32))
        indptr = np.zeros(n + 1, np.int64)
        if counts:
            np.cumsum(np.concatenate(counts), out=indptr[1:])
        indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int32)
        return ObservedLabels(csr=(indptr, indices, np.full(indices.size, POS, np.int8), full.shape),
                              source=full.source)
    chunk = int(chunk_rows or block_rows(num_labels))
    counts, idx_parts, val_parts = [], [], []
    blocks = full.iter_rows(chunk)
    if progress:
        from tqdm import tqdm
        blocks = tqdm(blocks, total=-(-n // chunk), desc=f"observed {name}", unit="chunk")
    for a, block in blocks:
        drawn = _draw_block(block, a, name, r, int(seed))
        rr, cc = np.nonzero(drawn != MISSING)
        counts.append(np.bincount(rr, minlength=block.shape[0]))
        idx_parts.append(cc.astype(np.int32))
        val_parts.append(drawn[rr, cc])
    indptr = np.zeros(n + 1, np.int64)
    if counts:
        np.cumsum(np.concatenate(counts), out=indptr[1:])
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    return ObservedLabels(csr=(indptr, cat(idx_parts, np.int32), cat(val_parts, np.int8), full.shape),
                          source=full.source)


def _draw_block(chunk: np.ndarray, start: int, name: str, ratio: float | None, seed: int) -> np.ndarray:
    """The setting's draw of the rows start .. start + len(chunk) (global row numbers)."""
    _check_values(chunk, start, "full")
    if name in ("FAL", "NATIVE"):
        return chunk
    keys_row = _row_keys(seed, start, start + chunk.shape[0])
    if name == "PAL":
        k = round(ratio * chunk.shape[1])
        if k < 1:
            raise ValueError(f"ratio={ratio} keeps round({ratio} * {chunk.shape[1]}) = 0 labels per image in PAL; "
                             f"use ratio >= {0.5 / chunk.shape[1]:.3g}")
        return _pal_chunk(chunk, keys_row, k, _col_mix(np.arange(chunk.shape[1])))
    return _ppl_chunk(chunk, keys_row, ratio if name == "PPL" else None)


# ----------------------------------------------------------------------------- statistics


def label_stats(states, *, chunk_rows: int | None = None) -> dict:
    """Per-image means and per-class counts of positives, negatives and missing entries.

    ``states`` is an int8 (N, L) array/memmap (read chunk by chunk) or an ``ObservedLabels``
    (CSR is counted without densifying). Memory: O(chunk_rows x L + L).
    """
    if isinstance(states, ObservedLabels) and states.form == "csr":
        n, num_labels = states.shape
        ptr, idx, val = states.indptr, states.indices, states.values
        pos_c = np.bincount(idx[val == POS], minlength=num_labels).astype(np.int64)
        if states.fill == NEG:  # negatives implied: every entry not listed as positive or missing
            neg_c = n - pos_c - np.bincount(idx[val == MISSING], minlength=num_labels).astype(np.int64)
        else:
            neg_c = np.bincount(idx[val == NEG], minlength=num_labels).astype(np.int64)
        row_pos = np.diff(np.concatenate([[0], np.cumsum(val == POS)])[ptr])  # positives per row
        no_pos = int((row_pos == 0).sum())
    else:
        if isinstance(states, ObservedLabels):
            states = states.dense
        _check_states(states, "states")
        n, num_labels = states.shape
        chunk_rows = int(chunk_rows or block_rows(num_labels))
        pos_c = np.zeros(num_labels, np.int64)
        neg_c = np.zeros(num_labels, np.int64)
        no_pos = 0
        for a in range(0, n, chunk_rows):
            chunk = np.asarray(states[a:a + int(chunk_rows)])
            _check_values(chunk, a, "states")
            pos = chunk == POS
            pos_c += pos.sum(0)
            neg_c += (chunk == NEG).sum(0)
            no_pos += int((~pos.any(1)).sum())
    miss_c = n - pos_c - neg_c
    per = (lambda c: float(c.sum()) / n) if n else (lambda c: float("nan"))
    return {
        "num_images": n, "num_labels": num_labels,
        "pos_per_image": per(pos_c), "neg_per_image": per(neg_c), "missing_per_image": per(miss_c),
        "pos_per_class": pos_c, "neg_per_class": neg_c, "missing_per_class": miss_c,
        "images_without_positive": no_pos,
    }


def class_prior(stats: dict, expected_positives: float, *, floor: float = 1e-3, ceil: float = 0.5) -> np.ndarray:
    """(L,) float32 estimate of P(y_j = 1) from observed labels (``label_stats``): the initial
    pseudo labels of ours+ (``pseudo.init=prior``) instead of the paper's 0.5.

    A class with observed negatives: its observed positive rate. A class without (PPL, SPL: only
    positives are observed): ``expected_positives`` (k per image, as EPR/ROLE use) times its share
    of the observed positives. Clipped to [floor, ceil]: a prior is a soft start, never certain.
    """
    pos = np.asarray(stats["pos_per_class"], np.float64)
    neg = np.asarray(stats["neg_per_class"], np.float64)
    if not (np.isfinite(expected_positives) and expected_positives >= 0):
        raise ValueError(f"expected_positives must be a finite number >= 0, got {expected_positives!r}")
    from_ratio = pos / np.maximum(pos + neg, 1.0)
    from_share = float(expected_positives) * pos / max(pos.sum(), 1.0)
    return np.clip(np.where(neg > 0, from_ratio, from_share), floor, ceil).astype(np.float32)


# ----------------------------------------------------------------------------- the store


def _atomic_save_npy_stream(path: Path, shape: tuple[int, int], blocks: Iterator[tuple[int, np.ndarray]]) -> None:
    """Atomic .npy write through a memmap: memory stays at one block whatever the array size."""
    with atomic_path(path) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int8, shape=shape)
        for a, block in blocks:
            mm[a:a + block.shape[0]] = block
        mm.flush()
        del mm


class ObservedLabels:
    """Observed label states indexed by sample id, dense (int8 memmap) or CSR (observed entries only).

    Dense memory: the OS page cache of the rows touched. CSR memory: 13 bytes per observed
    entry + 8 per sample, loaded whole.
    """

    def __init__(self, *, dense: np.ndarray | None = None, csr: tuple | None = None,
                 source: str | None = None, fill: int = MISSING):
        if (dense is None) == (csr is None):
            raise ValueError("give exactly one of dense= or csr=; use from_dense / from_csr / load")
        if int(fill) not in (MISSING, NEG):
            raise ValueError(f"{source or '<in-memory>'}: CSR fill must be -1 (unlisted = missing) or 0 "
                             f"(unlisted = negative), got {fill!r}")
        self.source = source or "<in-memory>"
        self.fill = int(fill)  # the state of every entry a CSR row does not list
        self.dense = dense
        if csr is not None:
            indptr, indices, values, shape = csr
            self.indptr, self.indices, self.values = indptr, indices, values
            self._shape = (int(shape[0]), int(shape[1]))
        else:
            self.indptr = self.indices = self.values = None
            self._shape = tuple(int(s) for s in dense.shape) if dense.ndim == 2 else tuple(dense.shape)

    # -- construction
    @classmethod
    def from_dense(cls, array: np.ndarray, *, validate: bool = True) -> "ObservedLabels":
        """Wrap an int8 (N, L) array or memmap (no copy)."""
        _check_states(array, "array")
        obj = cls(dense=array)
        if validate:
            obj.validate()
        return obj

    @classmethod
    def from_csr(cls, indptr, indices, values, shape, *, fill: int = MISSING,
                 validate: bool = True) -> "ObservedLabels":
        """From CSR arrays: indptr int64 (N+1,), indices int32 label ids sorted per row, values int8
        states other than ``fill`` (the state of unlisted entries: -1 missing, 0 negative)."""
        obj = cls(csr=(np.asarray(indptr), np.asarray(indices), np.asarray(values), tuple(shape)), fill=fill)
        if validate:
            obj.validate()
        return obj

    @classmethod
    def load(cls, path, *, validate: bool = True) -> "ObservedLabels":
        """Open ``.npy`` (dense, memory-mapped read-only) or ``.npz`` (CSR); validated unless told not to."""
        path = Path(path)
        if path.suffix not in (".npy", ".npz"):
            raise ValueError(f"{path}: unknown label file extension {path.suffix!r}; accepted: "
                             f".npy (dense int8) or .npz (CSR)")
        if not path.is_file():
            raise FileNotFoundError(f"observed-label file not found: {path}")
        try:
            if path.suffix == ".npy":
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                if arr.dtype != np.int8 or arr.ndim != 2:
                    raise ValueError(f"expected int8 2-D array, got {arr.dtype} shape {arr.shape}")
                obj = cls(dense=arr, source=str(path))
            else:
                with np.load(path, allow_pickle=False) as z:
                    missing = [k for k in ("indptr", "indices", "values", "shape") if k not in z.files]
                    if missing:
                        raise ValueError(f"missing CSR key(s) {missing}; found {sorted(z.files)}")
                    shape = z["shape"]
                    if shape.shape != (2,) or shape.dtype.kind not in "iu":
                        raise ValueError(f"key 'shape' must be 2 integers, got {shape!r}")
                    fill = int(z["fill"]) if "fill" in z.files else MISSING  # files before fill: -1
                    obj = cls(csr=(z["indptr"], z["indices"], z["values"], tuple(shape)), source=str(path),
                              fill=fill)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{path}: not a valid observed-label file: {e}") from e
        if validate:
            obj.validate()
        return obj

    # -- shape
    @property
    def form(self) -> str:
        return "dense" if self.dense is not None else "csr"

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def num_samples(self) -> int:
        return self._shape[0]

    @property
    def num_labels(self) -> int:
        return self._shape[1]

    def __repr__(self) -> str:
        fill = f", fill={self.fill}" if self.form == "csr" else ""
        return f"ObservedLabels({self.form}, shape={self.shape}{fill}, source={self.source!r})"

    @property
    def nbytes(self) -> int:
        """Bytes of the label arrays (the file's payload): N x L dense, or the three CSR arrays."""
        if self.form == "dense":
            return self.num_samples * self.num_labels
        return int(self.indptr.nbytes + self.indices.nbytes + self.values.nbytes)

    # -- validation
    def validate(self, *, chunk_rows: int = 65536) -> "ObservedLabels":
        """Check dtype, shape and values (dense), or indptr/indices/values (CSR); errors name the file and row."""
        src = self.source
        if self.form == "dense":
            a = self.dense
            if a.dtype != np.int8 or a.ndim != 2:
                raise ValueError(f"{src}: dense labels must be int8 2-D, got {a.dtype} shape {a.shape}")
            for s in range(0, a.shape[0], chunk_rows):
                try:
                    _check_values(np.asarray(a[s:s + chunk_rows]), s, "labels")
                except ValueError as e:
                    raise ValueError(f"{src}: {e}") from None
            return self
        n, num_labels = self._shape
        ptr, idx, val = self.indptr, self.indices, self.values
        if n < 0 or num_labels < 1:
            raise ValueError(f"{src}: CSR shape must be (N >= 0, L >= 1), got {self._shape}")
        for name, arr, dt in (("indptr", ptr, np.int64), ("indices", idx, np.int32), ("values", val, np.int8)):
            if arr.dtype != dt or arr.ndim != 1:
                raise ValueError(f"{src}: CSR {name} must be 1-D {np.dtype(dt)}, got {arr.dtype} shape {arr.shape}")
        if ptr.shape[0] != n + 1:
            raise ValueError(f"{src}: CSR indptr has {ptr.shape[0]} entries, expected N+1 = {n + 1}")
        if idx.shape != val.shape:
            raise ValueError(f"{src}: CSR indices ({idx.shape[0]}) and values ({val.shape[0]}) differ in length")
        if ptr[0] != 0 or ptr[-1] != idx.shape[0]:
            raise ValueError(f"{src}: CSR indptr must start at 0 and end at len(indices) = {idx.shape[0]}, "
                             f"got {int(ptr[0])} .. {int(ptr[-1])}")
        d = ptr[1:] < ptr[:-1]
        if d.any():
            raise ValueError(f"{src}: CSR indptr decreases at row {int(np.argmax(d))} (must be non-decreasing)")
        if idx.size:
            if int(idx.min()) < 0 or int(idx.max()) >= num_labels:
                bad = (idx < 0) | (idx >= num_labels)
                k = int(np.argmax(bad))
                raise ValueError(f"{src}: CSR row {self._row_of(k)}: label index {int(idx[k])} "
                                 f"out of range [0, {num_labels})")
            allowed = [v for v in (MISSING, NEG, POS) if v != self.fill]
            bad = (val != allowed[0]) & (val != allowed[1])  # 1 B per entry
            if bad.any():
                k = int(np.argmax(bad))
                what = {MISSING: "observed entries only", NEG: "positives and explicit missing entries only"}
                raise ValueError(f"{src}: CSR row {self._row_of(k)}: value {int(val[k])}; CSR with fill "
                                 f"{self.fill} stores {what[self.fill]}, accepted values "
                                 f"{' and '.join(map(str, allowed))}")
            starts = np.zeros(idx.size, bool)  # True where a row begins: no order needed across it
            starts[ptr[:-1][ptr[:-1] < idx.size]] = True
            for a in range(0, idx.size - 1, 1 << 22):  # blocks: a few MB of temporaries, not 16 B/entry
                b = min(a + (1 << 22), idx.size - 1)
                step = (idx[a + 1:b + 1] <= idx[a:b]) & ~starts[a + 1:b + 1]
                if step.any():
                    k = a + int(np.argmax(step)) + 1
                    raise ValueError(f"{src}: CSR row {self._row_of(k)}: label indices not strictly increasing "
                                     f"({int(idx[k - 1])} then {int(idx[k])})")
        return self

    def _row_of(self, k: int) -> int:
        return int(np.searchsorted(self.indptr, k, side="right") - 1)

    # -- access
    def _check_ids(self, ids) -> np.ndarray:
        if hasattr(ids, "detach"):  # torch tensor
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"ids must be a 1-D integer array of sample ids, got {ids.dtype} shape {ids.shape}")
        ids = ids.astype(np.int64, copy=False)
        bad = (ids < 0) | (ids >= self.num_samples)
        if bad.any():
            k = int(np.argmax(bad))
            raise IndexError(f"ids[{k}] = {int(ids[k])} out of range [0, {self.num_samples}) for {self.source}")
        return ids

    def gather(self, ids) -> np.ndarray:
        """int8 (B, L) rows for the given sample ids (numpy/torch/list; any order, repeats allowed)."""
        ids = self._check_ids(ids)
        if self.form == "dense":
            return np.asarray(self.dense[ids], dtype=np.int8)
        starts, lens = self.indptr[ids], self.indptr[ids + 1] - self.indptr[ids]
        out = np.full((ids.size, self.num_labels), self.fill, dtype=np.int8)
        total = int(lens.sum())
        if total:
            first = np.cumsum(lens) - lens
            pos = np.repeat(starts - first, lens) + np.arange(total)
            out[np.repeat(np.arange(ids.size), lens), self.indices[pos]] = self.values[pos]
        return out

    def iter_rows(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, int8 dense block) over all rows; memory O(chunk_rows x L), by default
        ``block_rows(L)`` rows (16 MiB blocks whatever L)."""
        chunk_rows = int(chunk_rows or block_rows(self.num_labels))
        for a in range(0, self.num_samples, chunk_rows):
            b = min(a + chunk_rows, self.num_samples)
            yield a, (np.asarray(self.dense[a:b]) if self.form == "dense" else self.gather(np.arange(a, b)))

    def to_dense(self) -> np.ndarray:
        """In-memory int8 (N, L) copy."""
        out = np.empty(self.shape, dtype=np.int8)
        for a, block in self.iter_rows():
            out[a:a + block.shape[0]] = block
        return out

    def to_csr(self, *, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """(indptr int64, indices int32, values int8, shape); only observed entries, sorted per row.
        A CSR store with fill 0 is re-expressed with fill -1 (its implied negatives listed)."""
        if self.form == "csr" and self.fill == MISSING:
            return self.indptr, self.indices, self.values, self.shape
        counts, idx_parts, val_parts = [], [], []
        for a, block in self.iter_rows(chunk_rows):
            r, c = np.nonzero(block != MISSING)  # row-major: sorted per row
            counts.append(np.bincount(r, minlength=block.shape[0]))
            idx_parts.append(c.astype(np.int32))
            val_parts.append(block[r, c])
        indptr = np.zeros(self.num_samples + 1, dtype=np.int64)
        if counts:
            np.cumsum(np.concatenate(counts), out=indptr[1:])
        cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
        return indptr, cat(idx_parts, np.int32), cat(val_parts, np.int8), self.shape

    def as_csr(self) -> "ObservedLabels":
        """The same labels in CSR form (self if already CSR)."""
        return self if self.form == "csr" else ObservedLabels(csr=self.to_csr(), source=self.source)

    # -- persistence
    def save(self, path) -> Path:
        """Dense ``.npy`` (int8), written atomically; streamed chunk by chunk when large."""
        path = Path(path)
        if path.suffix != ".npy":
            raise ValueError(f"{path}: save() writes dense .npy; use save_csr() for .npz")
        if self.num_samples * self.num_labels <= _STREAM_BYTES:
            atomic_save_npy(path, self.dense if self.form == "dense" else self.to_dense())
        else:
            _atomic_save_npy_stream(path, self.shape, self.iter_rows())
        return path

    def save_csr(self, path) -> Path:
        """CSR ``.npz`` (indptr int64, indices int32, values int8, shape int64), written atomically."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: save_csr() writes .npz; use save() for dense .npy")
        if self.form == "csr":  # kept as it is (fill included): no re-expression
            indptr, indices, values, shape, fill = self.indptr, self.indices, self.values, self.shape, self.fill
        else:
            (indptr, indices, values, shape), fill = self.to_csr(), MISSING
        save_csr(path, indptr, indices, values, shape, fill=fill)
        return path

    # -- sparse readers
    def positives_per_class(self) -> np.ndarray:
        """int64 (L,) positives per class, counted without densifying (CSR) or block by block."""
        if self.form == "csr":
            return np.bincount(self.indices[self.values == POS], minlength=self.num_labels).astype(np.int64)
        out = np.zeros(self.num_labels, np.int64)
        for _, block in self.iter_rows():
            out += (block == POS).sum(0)
        return out

    def columns(self, ids) -> "SparseColumns":
        """The rows ``ids`` (in that order) as a column-block reader for per-class evaluation."""
        return SparseColumns(self, self._check_ids(ids))


class SparseColumns:
    """Rows ``ids`` of an ``ObservedLabels`` read a block of classes at a time: ``column_block(a, b)``
    gives int8 (b - a, len(ids)), so a per-class metric never holds len(ids) x L states. For CSR the
    entries of the rows are sorted by class once (O(entries)); dense rows are read per block."""

    def __init__(self, labels: ObservedLabels, ids: np.ndarray):
        self.labels, self.ids = labels, ids
        self.shape = (int(ids.size), labels.num_labels)
        self.ndim, self.dtype = 2, np.dtype(np.int8)
        if labels.form == "csr":
            starts, lens = labels.indptr[ids], labels.indptr[ids + 1] - labels.indptr[ids]
            total = int(lens.sum())
            pos = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)
            rows = np.repeat(np.arange(ids.size), lens)
            cols = labels.indices[pos].astype(np.int64)
            order = np.argsort(cols, kind="stable")
            self._rows, self._vals = rows[order], labels.values[pos][order]
            self._colptr = np.searchsorted(cols[order], np.arange(labels.num_labels + 1))

    def column_block(self, a: int, b: int) -> np.ndarray:
        if self.labels.form == "dense":
            order = np.argsort(self.ids, kind="stable")
            block = np.empty((self.ids.size, b - a), np.int8)
            block[order] = self.labels.dense[self.ids[order], a:b]
            return np.ascontiguousarray(block.T)
        out = np.full((b - a, self.ids.size), self.labels.fill, dtype=np.int8)
        lo, hi = int(self._colptr[a]), int(self._colptr[b])
        cols = np.repeat(np.arange(b - a), np.diff(self._colptr[a:b + 1]))
        out[cols, self._rows[lo:hi]] = self._vals[lo:hi]
        return out


def block_rows(num_labels: int, elements: int = 1 << 24) -> int:
    """Rows per dense block so that one block holds about ``elements`` entries (16 MiB of int8)."""
    return max(1, min(65536, int(elements) // max(int(num_labels), 1)))


def save_csr(path, indptr, indices, values, shape, *, fill: int = MISSING) -> Path:
    """Atomic CSR ``.npz`` (indptr int64, indices int32, values int8, shape int64, fill int8)."""
    path = Path(path)
    atomic_save_npz(path, indptr=np.asarray(indptr, np.int64), indices=np.asarray(indices, np.int32),
                    values=np.asarray(values, np.int8), shape=np.asarray(shape, dtype=np.int64),
                    fill=np.asarray(fill, np.int8))
    return path

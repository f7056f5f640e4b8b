"""The observed-label store (``ObservedLabels``), indexed by sample id = row.

Dense form: an int8 ``.npy`` opened with ``mmap_mode="r"`` (5.6M x 600 = 3.4 GB never read in
whole). CSR form (``.npz``) stores only the entries that differ from its ``fill`` state (-1:
observed entries of partial labels; 0: positives of full labels, negatives implied), for 10k+
label spaces where N x L would be tens of GB although each image lists a handful of labels.
Every reader here (settings, statistics, gathers, evaluation columns) works on it without
densifying more than one block.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from pml_scale.atomic import atomic_path, atomic_save_npy, atomic_save_npz

from .counts import positives_per_class
from .states import MISSING, NEG, POS, check_states, check_values

# Dense saves above this size are streamed through a memmap instead of an in-memory buffer.
_STREAM_BYTES = 64 << 20


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
        check_states(array, "array")
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
                    check_values(np.asarray(a[s:s + chunk_rows]), s, "labels")
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
        return (*csr_of_blocks(self.iter_rows(chunk_rows), self.num_samples), self.shape)

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
        return positives_per_class((block for _, block in self.iter_rows()), self.num_labels)

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


def csr_indptr(counts: list[np.ndarray], num_samples: int) -> np.ndarray:
    """int64 CSR row pointers from the per-row entry counts of consecutive row blocks."""
    indptr = np.zeros(num_samples + 1, np.int64)
    if counts:
        np.cumsum(np.concatenate(counts), out=indptr[1:])
    return indptr


def concat_parts(parts: list[np.ndarray], dtype) -> np.ndarray:
    """The blocks' parts end to end as ``dtype`` (an empty array when there are none)."""
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def csr_of_blocks(blocks, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr int64, indices int32, values int8) of every entry other than missing in
    (start, dense block) pairs covering the rows in order; row-major, so sorted per row."""
    counts, idx_parts, val_parts = [], [], []
    for _, block in blocks:
        r, c = np.nonzero(block != MISSING)
        counts.append(np.bincount(r, minlength=block.shape[0]))
        idx_parts.append(c.astype(np.int32))
        val_parts.append(block[r, c])
    return csr_indptr(counts, num_samples), concat_parts(idx_parts, np.int32), concat_parts(val_parts, np.int8)


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

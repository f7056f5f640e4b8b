"""Per-sample label state indexed by sample id: pseudo labels and ROLE estimates.

Why memory maps by id: a sample is trained by whichever rank its shard lands on, at a random
position of an epoch; its pseudo label must still come from its previous visit. An N x L array
on node-local disk, addressed by the sample id carried in every shard, gives that with O(B x L)
work per step and no host RAM beyond the page cache of the rows touched.

Sizes (what grows with N, L, ranks):
  PseudoLabelStore   N x L x 2 bytes logical, created instantly as a sparse file (zero bytes
                     mean y~ = 0.5, docs/design.md §2); disk use grows as rows are written.
                     5.6M x 600 -> 6.7 GB; 5.6M x 10k -> 112 GB (use pseudo.sync=affinity and
                     per-node subsets, or fewer labels, at that scale).
  RoleEstimates      N x L x 4 bytes, dense (its initial values are random), written once at
                     creation in 1024-row blocks.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..atomic import WriteFailed, atomic_path, atomic_write_json

STORE_FORMAT = "pml-scale-store"
STORE_VERSION = 1
COPY_CHUNK = 1 << 20  # bytes; all-zero chunks of this size stay holes in copies
ROLE_BLOCK_ROWS = 1024  # the ROLE initialisation draws one RNG stream per block of rows

# ROLE (Cole et al. 2021, official code): missing entries uniform in logit space on
# [logit(0.4), logit(0.6)], observed positives at logit(0.995), observed negatives at logit(0.005).
ROLE_INIT_WIDTH = float(np.log(0.6 / 0.4))
ROLE_POS_LOGIT = float(np.log(0.995 / 0.005))
ROLE_NEG_LOGIT = -ROLE_POS_LOGIT


# ----------------------------------------------------------------------------- helpers


def _check_dims(num_samples, num_labels) -> tuple[int, int]:
    for name, v in (("num_samples", num_samples), ("num_labels", num_labels)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(num_samples), int(num_labels)


def _ids_numpy(ids, num_samples: int, where: str) -> np.ndarray:
    """Sample ids (torch/numpy/list) -> 1-D int64 numpy, range-checked."""
    if torch.is_tensor(ids):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"{where}: ids must be a 1-D integer tensor of sample ids, got {ids.dtype} shape {ids.shape}")
    ids = ids.astype(np.int64, copy=False)
    bad = (ids < 0) | (ids >= num_samples)
    if bad.any():
        k = int(np.argmax(bad))
        raise IndexError(f"{where}: ids[{k}] = {int(ids[k])} out of range [0, {num_samples})")
    return ids


def _rows_numpy(values, shape: tuple[int, int], name: str, where: str) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.detach().to("cpu", torch.float32).numpy()
    values = np.asarray(values, dtype=np.float32)
    if values.shape != shape:
        raise ValueError(f"{where}: {name} must have shape {shape} (ids x labels), got {values.shape}")
    return values


def _last_occurrence(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids, row of each one's last occurrence): repeated ids, last wins."""
    rev = ids[::-1]
    uniq, first_in_rev = np.unique(rev, return_index=True)
    return uniq, ids.size - 1 - first_in_rev


def _data_extents(fd: int, size: int):
    """(start, end) byte ranges that may hold data; holes are skipped where the OS says so."""
    if not hasattr(os, "SEEK_DATA"):
        yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            yield pos, size  # SEEK_DATA unsupported here: copy the rest, skipping zero chunks
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def sparse_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Atomically copy ``src`` to ``dst``, leaving all-zero 1 MiB chunks as holes.

    Reads only the data extents of ``src`` (SEEK_DATA/SEEK_HOLE), so copying a fresh store of
    any size is instant; time and disk grow with the bytes actually written.
    """
    src, dst = Path(src), Path(dst)
    size = src.stat().st_size
    with atomic_path(dst) as tmp, open(src, "rb") as fi, open(tmp, "wb") as fo:
        fo.truncate(size)
        for start, end in _data_extents(fi.fileno(), size):
            pos = start - start % COPY_CHUNK
            while pos < end:
                n = min(COPY_CHUNK, size - pos)
                fi.seek(pos)
                buf = fi.read(n)
                if np.frombuffer(buf, dtype=np.uint8).any():
                    fo.seek(pos)
                    fo.write(buf)
                pos += n


# ----------------------------------------------------------------------------- base


class _RowStore:
    """An N x L memmap file plus a JSON header sidecar (``<file>.json``) checked on open."""

    KIND = ""
    DTYPE = np.dtype(np.float32)
    ENCODING = ""

    def __init__(self, path, num_samples, num_labels, *, create: bool, init=None):
        self.num_samples, self.num_labels = _check_dims(num_samples, num_labels)
        self.path = Path(path)
        self.nbytes = self.num_samples * self.num_labels * self.DTYPE.itemsize
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"{self.KIND} store {self.path} does not exist (opened with create=False)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.header_path(self.path), self._header())
            self._create(init)
        self.check_file(self.path)
        self._open()

    # -- files
    @staticmethod
    def header_path(path: str | os.PathLike) -> Path:
        path = Path(path)
        return path.with_name(path.name + ".json")

    def _header(self) -> dict:
        return {"format": STORE_FORMAT, "version": STORE_VERSION, "kind": self.KIND,
                "shape": [self.num_samples, self.num_labels], "dtype": self.DTYPE.name,
                "byte_order": "little", "encoding": self.ENCODING}

    def check_file(self, path: str | os.PathLike) -> None:
        """Raise a clear error unless ``path`` + header is a store of this kind and shape."""
        path = Path(path)
        hp = self.header_path(path)
        if not path.exists():
            raise FileNotFoundError(f"{self.KIND} store file {path} does not exist")
        if not hp.exists():
            raise ValueError(f"{path}: header {hp.name} is missing (incomplete or foreign file); "
                             f"delete {path} to start a fresh store")
        try:
            header = json.loads(hp.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{hp}: unreadable store header ({e})") from None
        want = self._header()
        for key in ("format", "version", "kind", "dtype", "encoding"):
            if header.get(key) != want[key]:
                raise ValueError(f"{hp}: {key} is {header.get(key)!r}, expected {want[key]!r} "
                                 f"(not a {self.KIND} store of this version)")
        if list(header.get("shape", [])) != want["shape"]:
            raise ValueError(f"{hp}: store shape {header.get('shape')} does not match the expected "
                             f"{want['shape']} (num_samples x num_labels); is it from another dataset "
                             f"or label set?")
        size = path.stat().st_size
        if size != self.nbytes:
            raise ValueError(f"{path}: {size} bytes, expected {self.nbytes} for shape {want['shape']} "
                             f"{self.DTYPE.name}; the file is truncated or corrupt")

    def _create(self, init) -> None:
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as f:
                f.truncate(self.nbytes)  # sparse: no blocks allocated, reads as zeros
            if init is not None:
                mm = np.memmap(tmp, dtype=self.DTYPE, mode="r+", shape=(self.num_samples, self.num_labels))
                init(mm)
                mm.flush()
                del mm

    def _open(self) -> None:
        self._mm = np.memmap(self.path, dtype=self.DTYPE, mode="r+", shape=(self.num_samples, self.num_labels))

    # -- persistence
    def flush(self) -> None:
        """Push dirty pages to the file (the page cache already serves other readers)."""
        self._mm.flush()

    def snapshot(self, dst_path: str | os.PathLike) -> None:
        """Atomic copy of the store (and its header) to ``dst_path``; holes stay holes."""
        dst = Path(dst_path)
        self.flush()
        try:
            sparse_copy(self.path, dst)  # on failure nothing is left at dst (atomic)
        except OSError as e:
            raise WriteFailed(dst, self.nbytes, e, f"writing the {self.KIND} store snapshot") from e
        atomic_write_json(self.header_path(dst), self._header())

    def restore(self, src_path: str | os.PathLike) -> None:
        """Replace the store's contents with the snapshot at ``src_path`` (checked first)."""
        src = Path(src_path)
        self.check_file(src)
        self.flush()
        sparse_copy(src, self.path)  # atomic rename: a kill leaves the old store whole
        self._open()

    def reopen(self) -> None:
        """Map the file again: after another process of this node restored a snapshot (an atomic
        rename puts a new file at ``path``), this process's old mapping still shows the old one."""
        self.flush()
        self._open()

    def _read_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows for ids in any order, read in sorted order for locality."""
        order = np.argsort(ids, kind="stable")
        out = np.empty((ids.size, self.num_labels), dtype=self.DTYPE)
        out[order] = self._mm[ids[order]]
        return out

    def _out(self, out, n: int, dtype) -> np.ndarray:
        if out is None:
            return np.empty((n, self.num_labels), dtype)
        if out.shape != (n, self.num_labels) or out.dtype != dtype:
            raise ValueError(f"{self.path}: out must be {np.dtype(dtype).name} of shape {(n, self.num_labels)}, "
                             f"got {out.dtype} {out.shape}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.num_samples}, {self.num_labels})"


# ----------------------------------------------------------------------------- pseudo labels


def _scatter_inputs(ids, yhat, mask, momentum, num_samples: int, num_labels: int, where: str):
    """The checked (ids, ŷ rows, mask) of a scatter, shared by every store dtype: ids in range,
    ŷ probabilities of shape (B, L), mask bool (B, L) or None, momentum in [0, 1)."""
    if not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum!r}")
    ids_np = _ids_numpy(ids, num_samples, where)
    shape = (ids_np.size, num_labels)
    values = _rows_numpy(yhat, shape, "yhat", where)
    if not ((values >= 0.0) & (values <= 1.0)).all():
        raise ValueError(f"{where}: yhat must be probabilities in [0, 1] (sigmoid outputs); "
                         f"got min {np.nanmin(values) if values.size else 0}, NaN: {bool(np.isnan(values).any())}")
    mask_np = None
    if mask is not None:
        mask_np = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
        if mask_np.shape != shape or mask_np.dtype != np.bool_:
            raise ValueError(f"{where}: mask must be bool of shape {shape}, got {mask_np.dtype} {mask_np.shape}")
    return ids_np, values, mask_np


class PseudoLabelStore(_RowStore):
    """Pseudo labels y~ (docs/design.md §1, Eq. 5), stored as float16 y~ - init so that a fresh
    sparse file reads as y~ = init everywhere: 0.5 (the paper), or a per-label initial value
    (``init``, e.g. the class prior: ours+), kept in the header. Precision: 2**-12 absolute near
    y~ = 0 or 1."""

    KIND = "pseudo"
    DTYPE = np.dtype(np.float16)
    ENCODING = "yhat_minus_half"

    def __init__(self, path, num_samples, num_labels, *, create: bool = True, init=None):
        """``init``: None (0.5 everywhere, or what an existing store's header says) or a (num_labels,)
        array of initial values in [0, 1], rounded to float16."""
        self.init = None
        if init is not None:
            init = np.asarray(init, dtype=np.float32).reshape(-1)
            if init.shape != (int(num_labels),) or not ((init >= 0) & (init <= 1)).all():
                raise ValueError(f"{path}: init must be {int(num_labels)} values in [0, 1], got shape {init.shape}")
            self.init = init.astype(np.float16).astype(np.float32)
        elif Path(path).exists() and self.header_path(path).exists():
            try:
                saved = json.loads(self.header_path(path).read_text()).get("init")
            except (OSError, json.JSONDecodeError):
                saved = None  # check_file reports the unreadable header
            if saved is not None:
                self.init = np.asarray(saved, dtype=np.float32)
        super().__init__(path, num_samples, num_labels, create=create)

    def _header(self) -> dict:
        header = super()._header()
        if self.init is not None:
            header.update(encoding="yhat_minus_init", init=[float(v) for v in self.init])
        return header

    def check_file(self, path) -> None:
        super().check_file(path)
        if self.init is not None:
            saved = json.loads(self.header_path(path).read_text()).get("init")
            if saved is None or not np.array_equal(np.asarray(saved, np.float32), self.init):
                raise ValueError(f"{self.header_path(path)}: the store's initial pseudo labels differ from the ones "
                                 f"asked for; delete {path} to start a fresh store")

    @property
    def _offset(self):
        return np.float32(0.5) if self.init is None else self.init

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 (B, L) pseudo labels of ``ids`` (repeats allowed), on ``ids.device``."""
        out = torch.from_numpy(self.gather_numpy(_ids_numpy(ids, self.num_samples, f"{self.path}: gather")))
        return out.to(ids.device) if torch.is_tensor(ids) else out

    def gather_numpy(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 (B, L) pseudo labels of host ``ids``, written into ``out`` if given (e.g. the
        numpy view of a pinned tensor, so the device copy needs no staging). Host work only (the
        fp16 -> fp32 conversion is torch's on CPU tensors, exact and ~30x faster than numpy's):
        safe in a background thread."""
        ids_np = _ids_numpy(ids, self.num_samples, f"{self.path}: gather")
        out = self._out(out, ids_np.size, np.float32)
        torch.from_numpy(out).copy_(torch.from_numpy(self._read_rows(ids_np)))
        out += self._offset
        if self.init is not None:  # fp16 rounding of ŷ - init can step just outside [0, 1]
            np.clip(out, 0.0, 1.0, out=out)
        return out

    def scatter(self, ids: torch.Tensor, yhat: torch.Tensor, mask: torch.Tensor | None = None,
                momentum: float = 0.0, *, base: "PseudoLabelStore | None" = None) -> None:
        """y~ <- momentum * y~ + (1 - momentum) * yhat for the rows ``ids``.

        ``mask`` (B, L) bool: only True entries change (the caller passes "missing"). An id
        that repeats is written once, from its last row (its mask row included). The update
        works in the stored encoding, so entries left unchanged keep their exact bits. ``base``:
        the store the old y~ is read from (default this one; ``VersionedPseudoStore`` reads the
        previous epoch's version and writes this epoch's).
        """
        where = f"{self.path}: scatter"
        ids_np, values, mask_np = _scatter_inputs(ids, yhat, mask, momentum, self.num_samples, self.num_labels, where)
        if ids_np.size == 0:
            return
        uniq, rows = _last_occurrence(ids_np)
        enc = values[rows] - self._offset
        if momentum or mask_np is not None:
            old = (self if base is None else base)._mm[uniq].astype(np.float32)
            if momentum:
                enc = np.float32(momentum) * old + np.float32(1.0 - momentum) * enc
            if mask_np is not None:
                enc = np.where(mask_np[rows], enc, old)
        self._mm[uniq] = _to_fp16(enc)


class PseudoLabelStore8(PseudoLabelStore):
    """``pseudo.dtype=uint8``: y~ quantised to 1/255 in one byte, half the disk and page cache of
    fp16. Stored u = (round(255 y~) - q0) mod 256 with q0 = round(255 init) per label, so a fresh
    sparse file (zero bytes) reads as the initial value rounded to 1/255 (0.5 reads as 128/255 =
    0.502). Error <= 1/510 per entry; a momentum step smaller than that is lost."""

    DTYPE = np.dtype(np.uint8)
    ENCODING = "q255_minus_init"

    def _header(self) -> dict:
        header = super()._header()
        header["encoding"] = self.ENCODING  # the base sets yhat_minus_init when init is given
        return header

    @property
    def _q0(self) -> np.ndarray:
        init = np.float32(0.5) if self.init is None else self.init
        return np.rint(np.asarray(init, np.float32) * 255).astype(np.int16)

    def _decode(self, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.multiply(((raw.astype(np.int16) + self._q0) % 256).astype(np.float32), np.float32(1 / 255), out=out)
        return out

    def _encode(self, values: np.ndarray) -> np.ndarray:
        return ((np.rint(values * 255).astype(np.int16) - self._q0) % 256).astype(np.uint8)

    def gather_numpy(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        ids_np = _ids_numpy(ids, self.num_samples, f"{self.path}: gather")
        out = self._out(out, ids_np.size, np.float32)
        return self._decode(self._read_rows(ids_np), out)

    def scatter(self, ids, yhat, mask=None, momentum: float = 0.0, *, base=None) -> None:
        """As ``PseudoLabelStore.scatter``, in value space (decode, update, re-encode); masked-out
        entries keep their exact bytes."""
        where = f"{self.path}: scatter"
        ids_np, values, mask_np = _scatter_inputs(ids, yhat, mask, momentum, self.num_samples, self.num_labels, where)
        if ids_np.size == 0:
            return
        uniq, rows = _last_occurrence(ids_np)
        new = values[rows]
        if momentum or mask_np is not None:
            old_raw = (self if base is None else base)._mm[uniq]
            if momentum:
                old = self._decode(old_raw, np.empty(old_raw.shape, np.float32))
                new = np.float32(momentum) * old + np.float32(1.0 - momentum) * new
            enc = self._encode(new)
            if mask_np is not None:
                enc = np.where(mask_np[rows], enc, old_raw)
        else:
            enc = self._encode(new)
        self._mm[uniq] = enc


class VersionedPseudoStore:
    """The pseudo-label store as two versions by epoch parity, so that a checkpoint copies nothing.

    Epoch e reads y~ from version (e + 1) % 2 (the previous epoch's, never written during e) and
    writes y~ <- f(old, ŷ) into version e % 2, ``old`` read from the read version. Within an epoch
    a sample is visited once, so this is exactly the in-place update. At the end of the epoch the
    rows written before but not in this epoch (the plan's dropped remainder, skipped samples) are
    copied over (``end_epoch``): the write version is then complete and becomes the next read one.

    A checkpoint at (epoch e, batch k) needs only this process's bitmaps (rows written in epoch e,
    rows ever written: 2 x N bits, 1.4 MB at 5.6M): the read version is untouched until epoch e+1,
    whose first step comes after the epoch-end checkpoint is committed; rows written after the
    checkpoint by a killed run are rewritten by the resumed one with the same values before any
    read (reads go to the other version). Only the latest checkpoint is restorable this way (an
    older one of an earlier epoch has had its read version overwritten); ``pseudo.snapshot=copy``
    keeps self-contained copies. Disk: 2 x N x L x 2 bytes (sparse), instead of the store plus
    ``run.keep_checkpoints`` full copies. ``{name}.f16`` is a symlink to the newest complete version.
    """

    KIND = "pseudo"

    def __init__(self, folder, num_samples, num_labels, *, create: bool = True, init=None, name: str = "pseudo",
                 dtype: str = "fp16"):
        self.folder = Path(folder)
        self.name = name
        cls = pseudo_store_class(dtype)
        self.versions = [cls(self.version_path(self.folder, k, name), num_samples, num_labels,
                             create=create, init=init) for k in (0, 1)]
        self.num_samples, self.num_labels = self.versions[0].num_samples, self.versions[0].num_labels
        self.init = self.versions[0].init
        self.path = self.folder / f"{name}.f16"
        self.epoch = 0
        self.written = np.zeros(self.num_samples, bool)  # rows this process wrote in this epoch
        self.ever = np.zeros(self.num_samples, bool)  # rows this process ever wrote
        if create and not self.path.is_symlink():
            self._link(1)

    @staticmethod
    def version_path(folder, k: int, name: str = "pseudo") -> Path:
        return Path(folder) / f"{name}.v{k}.f16"

    @property
    def read_store(self) -> PseudoLabelStore:
        return self.versions[(self.epoch + 1) % 2]

    @property
    def write_store(self) -> PseudoLabelStore:
        return self.versions[self.epoch % 2]

    def _link(self, k: int) -> None:
        """Point ``{name}.f16`` at version k atomically (symlink to a temp name, then rename)."""
        with atomic_path(self.path, fsync=False) as tmp:  # a symlink: nothing to fsync
            tmp.unlink(missing_ok=True)
            os.symlink(self.version_path(self.folder, k, self.name).name, tmp)

    # -- the epoch protocol
    def begin_epoch(self, epoch: int) -> None:
        """Reads now come from version (epoch + 1) % 2, writes go to epoch % 2 (no I/O)."""
        self.epoch = int(epoch)

    def end_epoch(self, *, link: bool = True) -> int:
        """Copy the rows written before but not in this epoch into the write version, which is
        then complete; returns the number of rows copied (``link``: one process per folder)."""
        carry = np.flatnonzero(self.ever & ~self.written)
        src, dst = self.read_store, self.write_store
        step = max(1, (16 << 20) // (2 * self.num_labels))
        for a in range(0, carry.size, step):
            rows = carry[a:a + step]
            dst._mm[rows] = src._mm[rows]
        dst.flush()
        self.written[:] = False
        if link:
            self._link(self.epoch % 2)
        return int(carry.size)

    # -- reads and writes
    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return self.read_store.gather(ids)

    def gather_numpy(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.read_store.gather_numpy(ids, out=out)

    def scatter(self, ids, yhat, mask=None, momentum: float = 0.0) -> None:
        """As ``PseudoLabelStore.scatter``, the old values read from the previous epoch's version."""
        self.write_store.scatter(ids, yhat, mask=mask, momentum=momentum, base=self.read_store)
        ids_np = _ids_numpy(ids, self.num_samples, f"{self.path}: scatter")
        self.written[ids_np] = True
        self.ever[ids_np] = True

    # -- checkpoints
    def flush(self) -> None:
        for v in self.versions:
            v.flush()

    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps of this process's store: the epoch and the two bitmaps."""
        self.flush()
        return {"epoch": np.int64(self.epoch), "num_samples": np.int64(self.num_samples),
                "written": np.packbits(self.written), "ever": np.packbits(self.ever)}

    def load_checkpoint_state(self, state: dict, where: str = "") -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"{where}: pseudo-store state for {int(state['num_samples'])} samples, this run has "
                             f"{self.num_samples}")
        self.epoch = int(state["epoch"])
        self.written = np.unpackbits(state["written"], count=self.num_samples).astype(bool)
        self.ever = np.unpackbits(state["ever"], count=self.num_samples).astype(bool)

    def reopen(self) -> None:
        for v in self.versions:
            v.reopen()

    def __repr__(self) -> str:
        return f"VersionedPseudoStore({str(self.folder)!r}, {self.num_samples}, {self.num_labels}, epoch={self.epoch})"


def pseudo_store_class(dtype: str):
    """``pseudo.dtype``: fp16 (PseudoLabelStore) or uint8 (PseudoLabelStore8, y~ to 1/255)."""
    classes = {"fp16": PseudoLabelStore, "uint8": PseudoLabelStore8}
    if dtype not in classes:
        raise ValueError(f"pseudo.dtype must be one of {sorted(classes)}, got {dtype!r}")
    return classes[dtype]


# ----------------------------------------------------------------------------- ROLE


def _observed_block(source, start: int, stop: int) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return np.asarray(source[start:stop])
    return np.asarray(source.gather(np.arange(start, stop)))


class RoleEstimates(_RowStore):
    """ROLE's learnable label-estimate matrix (logits), N x L float32, by sample id.

    Created once (dense, random) when the file is absent; reopened as is otherwise, so a
    resumed run keeps its estimates. ``init_observed`` (N x L int8 states, an
    or an ``ObservedLabels``) pins observed entries as ROLE's code does.
    The initial values depend only on (seed, sample id block), not on the machine.
    """

    KIND = "role"
    DTYPE = np.dtype(np.float32)
    ENCODING = "logit"

    def __init__(self, path, num_samples, num_labels, init_observed=None, seed: int = 0, *,
                 create: bool = True):
        n, num_l = _check_dims(num_samples, num_labels)
        if init_observed is not None:
            shape = (getattr(init_observed, "num_samples", None), getattr(init_observed, "num_labels", None))
            if isinstance(init_observed, np.ndarray):
                shape = init_observed.shape
            if tuple(shape) != (n, num_l):
                raise ValueError(f"RoleEstimates {path}: init_observed has shape {tuple(shape)}, expected {(n, num_l)}")
        self.seed = int(seed)

        def init(mm: np.ndarray) -> None:
            for b, start in enumerate(range(0, n, ROLE_BLOCK_ROWS)):
                stop = min(start + ROLE_BLOCK_ROWS, n)
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, b]))
                block = rng.uniform(-ROLE_INIT_WIDTH, ROLE_INIT_WIDTH, size=(stop - start, num_l)).astype(np.float32)
                if init_observed is not None:
                    states = _observed_block(init_observed, start, stop)
                    block[states == 1] = ROLE_POS_LOGIT
                    block[states == 0] = ROLE_NEG_LOGIT
                mm[start:stop] = block

        super().__init__(path, n, num_l, create=create, init=init)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 (B, L) logits of ``ids``, on ``ids.device``."""
        ids_np = _ids_numpy(ids, self.num_samples, f"{self.path}: gather")
        out = torch.from_numpy(self._read_rows(ids_np))
        return out.to(ids.device) if torch.is_tensor(ids) else out

    def gather_numpy(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 (B, L) logits of host ``ids`` (into ``out`` if given); no torch, no device."""
        ids_np = _ids_numpy(ids, self.num_samples, f"{self.path}: gather")
        out = self._out(out, ids_np.size, np.float32)
        out[...] = self._read_rows(ids_np)
        return out

    def scatter(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the rows ``ids`` with ``values`` (B, L) logits; repeated ids: last wins."""
        where = f"{self.path}: scatter"
        ids_np = _ids_numpy(ids, self.num_samples, where)
        vals = _rows_numpy(values, (ids_np.size, self.num_labels), "values", where)
        if not np.isfinite(vals).all():
            raise ValueError(f"{where}: values must be finite logits")
        if ids_np.size == 0:
            return
        uniq, rows = _last_occurrence(ids_np)
        self._mm[uniq] = vals[rows]


def _to_fp16(values: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 with round-to-nearest-even, as numpy's astype, through torch (~30x faster at
    B × 10k labels: numpy converts element by element)."""
    return torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(torch.float16).numpy()

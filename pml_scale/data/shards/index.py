"""Random access to samples by id, through the offsets in our DALI ``.idx`` files.

No tar is scanned at run time: the index gives, per sample, the byte offset and size of
``KEY.jpg`` and the offset of ``KEY.id``; a reader fetches both with one ``os.pread`` (the
members are adjacent: image data, tar padding, a 512-byte header, 8 id bytes) and checks that
the id stored in the tar is the id asked for, so a stale index cannot silently mislabel.

Sizes: the index holds 4 arrays over the samples it loads (shard int32, image offset int64,
image size int64, id offset int64, plus ids int64: 36 bytes/sample, ~200 MB at 5.6M). Loading
parses every ``.idx`` line once (vectorised per shard with numpy). In affinity mode a rank loads
only its own shards. File handles are opened lazily, once per process (fork-safe), per shard.

Whole-batch reads for DALI (one buffer per batch, vectorised checks) are in ``data.input.batch_source``;
this module and that one import no torch.
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import DALI_INDEX_VERSION, ID_EXT, IMAGE_EXT, index_name_for, read_manifest, sample_key, split_shards

MAX_IMAGE_BYTES = 256 << 20


class SampleError(ValueError):
    """A sample that cannot be used; names its shard and key."""

    def __init__(self, shard: str, key: str, reason: str):
        super().__init__(f"shard {shard}, key {key}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason


def _parse_index(idx_path: Path, tar_path: Path) -> tuple[np.ndarray, ...]:
    """(ids, image offsets, image sizes, id offsets) of one shard; errors name the file."""
    if not idx_path.exists():
        raise FileNotFoundError(f"{idx_path}: missing DALI index of shard {tar_path.name}")
    raw = idx_path.read_bytes()
    head, _, body = raw.partition(b"\n")
    parts = head.split()
    if len(parts) != 2 or parts[0].decode(errors="replace") != DALI_INDEX_VERSION or not parts[1].isdigit():
        raise ValueError(f"{idx_path}, line 1: expected '{DALI_INDEX_VERSION} <count>', got {head[:80]!r}")
    n = int(parts[1])
    tokens = body.split()
    if n == 0 or len(tokens) % n:
        raise ValueError(f"{idx_path}: {len(tokens)} fields do not make {n} equal sample lines")
    width = len(tokens) // n
    if width % 4:
        raise ValueError(f"{idx_path}: sample lines must hold 'ext offset size name' groups, got {width} fields")
    table = np.array(tokens, dtype=object).reshape(n, width // 4, 4)
    exts = table[0, :, 0].tolist()
    cols = {e.decode(): j for j, e in enumerate(exts)}
    for ext in (IMAGE_EXT, ID_EXT):
        if ext not in cols:
            raise ValueError(f"{idx_path}, line 2: no '{ext}' member (has {sorted(cols)})")
    if not (table[:, :, 0] == table[0:1, :, 0]).all():
        bad = int(np.nonzero((table[:, :, 0] != table[0:1, :, 0]).any(1))[0][0])
        raise ValueError(f"{idx_path}, line {bad + 2}: members differ from line 2 ({exts})")
    j, k = cols[IMAGE_EXT], cols[ID_EXT]
    try:
        off = table[:, j, 1].astype(np.int64)
        size = table[:, j, 2].astype(np.int64)
        id_off = table[:, k, 1].astype(np.int64)
        suffix = len(IMAGE_EXT) + 1
        ids = np.array([name[:-suffix] for name in table[:, j, 3]], dtype=object).astype(np.int64)
    except ValueError as e:
        raise ValueError(f"{idx_path}: non-numeric offset, size or key ({e})") from None
    if (id_off <= off).any() or (id_off - off - size > 1024 + 512).any():
        bad = int(np.nonzero((id_off <= off) | (id_off - off - size > 1536))[0][0])
        raise ValueError(f"{idx_path}, line {bad + 2}: the .{ID_EXT} member must directly follow "
                         f"the .{IMAGE_EXT} member")
    if (size <= 0).any() or (size > MAX_IMAGE_BYTES).any():
        bad = int(np.nonzero((size <= 0) | (size > MAX_IMAGE_BYTES))[0][0])
        raise ValueError(f"{idx_path}, line {bad + 2}: image size {int(size[bad])} out of (0, {MAX_IMAGE_BYTES}]")
    if not tar_path.exists():
        raise FileNotFoundError(f"{tar_path}: shard file is missing (listed in the manifest)")
    need = int((id_off + 8).max())
    have = tar_path.stat().st_size
    if have < need:
        raise ValueError(f"{tar_path}: shard is truncated: {have} bytes, its index needs {need}")
    return ids, off, size, id_off


@dataclass
class SampleIndex:
    """Where each sample of a split lives; rows sorted by sample id."""

    paths: list[Path]  # shard tar paths, by shard number
    shard_counts: np.ndarray  # (num_shards,) samples per shard (from the manifest)
    ids: np.ndarray  # (n,) int64, sorted
    shard: np.ndarray  # (n,) int32
    offset: np.ndarray  # (n,) int64, image data
    size: np.ndarray  # (n,) int64, image bytes
    id_offset: np.ndarray  # (n,) int64, id member data
    num_samples: int  # samples in the whole split

    @classmethod
    def load(cls, root: str | os.PathLike, split: str, shards: list[int] | None = None) -> "SampleIndex":
        """Read the manifest and the ``.idx`` files of ``shards`` (default: all) of ``split``."""
        manifest = read_manifest(root)
        paths = split_shards(root, manifest, split)
        infos = manifest["splits"][split]["shards"]
        counts = np.array([int(s["count"]) for s in infos], dtype=np.int64)
        wanted = range(len(paths)) if shards is None else shards
        parts = []
        for k in wanted:
            tar = paths[k]
            if not tar.exists():
                raise FileNotFoundError(f"{tar}: shard file is missing (listed in {Path(root) / 'manifest.json'})")
            expect = infos[k].get("bytes")
            if expect is not None and tar.stat().st_size != int(expect):
                raise ValueError(f"{tar}: shard is {tar.stat().st_size} bytes, the manifest says {expect} "
                                 f"(truncated or replaced)")
            ids, off, size, id_off = _parse_index(index_name_for(tar), tar)
            if len(ids) != counts[k]:
                raise ValueError(f"{index_name_for(tar)}: {len(ids)} samples, the manifest says {counts[k]}")
            parts.append((np.full(len(ids), k, np.int32), ids, off, size, id_off))
        if not parts:
            raise ValueError(f"split {split!r} of {root}: no shards selected")
        shard, ids, off, size, id_off = (np.concatenate(c) for c in zip(*parts))
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        if len(ids) > 1 and (np.diff(ids) == 0).any():
            dup = int(ids[1:][np.diff(ids) == 0][0])
            raise ValueError(f"split {split!r} of {root}: sample id {dup} appears in more than one place")
        return cls(paths, counts, ids, shard[order], off[order], size[order], id_off[order], int(counts.sum()))

    def shard_ids(self) -> list[np.ndarray]:
        """Sample ids per shard number, sorted (an empty placeholder of the right length where the
        shard is not loaded); O(n log n), no per-shard scan."""
        out = [np.empty(int(c), np.int64) for c in self.shard_counts]
        order = np.argsort(self.shard, kind="stable")  # rows are id-sorted, so each group stays sorted
        loaded = np.bincount(self.shard, minlength=len(out))
        for k, group in enumerate(np.split(self.ids[order], np.cumsum(loaded)[:-1])):
            if loaded[k]:
                out[k] = group
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each sample id; a clear error for ids not in the loaded shards."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids).clip(0, max(len(self.ids) - 1, 0))
        missing = self.ids[pos] != ids
        if missing.any():
            raise KeyError(f"sample id {int(ids[missing][0])} is not in the loaded shards")
        return pos

    def locate(self, ids: np.ndarray) -> "Locations":
        r = self.rows(ids.reshape(-1))
        shape = ids.shape
        return Locations([str(p) for p in self.paths], ids.astype(np.int64), self.shard[r].reshape(shape),
                         self.offset[r].reshape(shape), self.size[r].reshape(shape),
                         self.id_offset[r].reshape(shape))


@dataclass
class Locations:
    """Self-contained read list for an array of ids (picklable; what loader workers receive)."""

    paths: list[str]
    ids: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    id_offset: np.ndarray

    def where(self, pos) -> tuple[str, str]:
        """(shard file name, key) of entry ``pos`` for error reports."""
        return Path(self.paths[int(self.shard[pos])]).name, sample_key(int(self.ids[pos]))


def check_image_bytes(data: bytes | memoryview) -> str | None:
    """A cheap pre-decode check (markers + header parse): the reason it is bad, or None.

    DALI fails a whole batch on one undecodable image, so obvious damage (truncation, garbage)
    is caught here; PIL only parses headers, no pixel decoding (~20 us per image).
    """
    if len(data) < 4:
        return f"image has only {len(data)} bytes"
    head = bytes(data[:2])
    if head == b"\xff\xd8":
        if b"\xff\xd9" not in bytes(data[-64:]):
            return "JPEG end-of-image marker missing (truncated file)"
        if b"\xff\xda" not in bytes(data):
            return "JPEG has no start-of-scan marker (no image data)"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            if im.width <= 0 or im.height <= 0:
                return f"image has size {im.width}x{im.height}"
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


class ShardFiles:
    """Read-only descriptors of shard files by path, opened once per process and shared by
    threads (positional reads need no seek). A forked worker opens its own: the parent's are
    not its to share. Pickles as an empty set (never ship open descriptors)."""

    def __init__(self):
        self._pid = None
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> int:
        with self._lock:
            if self._pid != os.getpid():
                self._fds, self._pid = {}, os.getpid()
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise FileNotFoundError(f"{path}: shard file disappeared while reading") from None
                self._fds[path] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class ShardReader:
    """Reads samples by location with ``os.pread``; one handle per shard per process."""

    def __init__(self):
        self._files = ShardFiles()

    def _fd(self, path: str) -> int:
        return self._files.get(path)

    def read(self, loc: Locations, pos) -> bytes:
        """Image bytes of entry ``pos``; ``SampleError`` naming shard+key if unusable."""
        path = loc.paths[int(loc.shard[pos])]
        off, size, id_off = int(loc.offset[pos]), int(loc.size[pos]), int(loc.id_offset[pos])
        want = id_off + 8 - off
        buf = os.pread(self._fd(path), want, off)
        shard, key = loc.where(pos)
        if len(buf) != want:
            raise SampleError(shard, key, f"short read: {len(buf)} of {want} bytes at offset {off} (truncated shard)")
        stored = int.from_bytes(buf[-8:], "little", signed=True)
        if stored != int(loc.ids[pos]):
            raise SampleError(shard, key, f"the .{ID_EXT} member holds {stored}, the index says {int(loc.ids[pos])}")
        data = buf[:size]
        reason = check_image_bytes(data)
        if reason:
            raise SampleError(shard, key, reason)
        return data

    def close(self) -> None:
        self._files.close()


_FALLBACK: bytes | None = None


def fallback_jpeg() -> bytes:
    """A tiny grey JPEG that stands in when no sample of a batch is readable (valid=False)."""
    global _FALLBACK
    if _FALLBACK is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (124, 116, 104)).save(buf, "JPEG")
        _FALLBACK = buf.getvalue()
    return _FALLBACK


def read_checked(reader: ShardReader, loc: Locations, pos, known_bad: dict) -> bytes:
    sid = int(loc.ids[pos])
    if sid in known_bad:
        shard, key = loc.where(pos)
        raise SampleError(shard, key, known_bad[sid])
    return reader.read(loc, pos)

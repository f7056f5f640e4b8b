"""The on-disk shard format: the one place that knows names, members and the DALI index.

A dataset folder written by ``pml-shard`` holds

    manifest.json                    written last; its presence means the folder is complete
    {split}-{k:06d}.tar              WebDataset shards (POSIX tar, no compression)
    {split}-{k:06d}.idx              DALI webdataset index (v1.2), written by us: no GNU tar
    {split}-labels.npy               full int8 labels of the split, rows by sample id (dense), or
    {split}-labels.npz               the same as CSR (indptr int64, indices int32, values int8,
                                     shape, fill): only entries that differ from ``fill`` (-1 for
                                     native partial labels, 0 when negatives are implied); the
                                     converter picks the smaller (``labels_form``), the manifest's
                                     ``splits.{split}.labels`` names the file
    observed/{setting}.npy ...       observed-label files of missing-label settings

Each sample in a shard has three members sharing the key ``{sample_id:010d}``:

    KEY.jpg    the image (original bytes, or re-encoded RGB JPEG)
    KEY.id     the sample id, int64 little-endian, 8 raw bytes (DALI reads it as INT64)
    KEY.json   provenance: {"src": source file name, "pos": [...], "neg": [...]} (full labels)

Sample ids are dense 0..N-1 per split; the id is the row of every label and pseudo-label store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ...atomic import atomic_save_npy, atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)
from ...atomic import commit, temp_path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ID_EXT = "id"
IMAGE_EXT = "jpg"
META_EXT = "json"
MEMBER_ORDER = (IMAGE_EXT, ID_EXT, META_EXT)
DALI_INDEX_VERSION = "v1.2"


def sample_key(sample_id: int) -> str:
    return f"{int(sample_id):010d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{int(index):06d}.tar"


def index_name_for(tar_path: str | os.PathLike) -> Path:
    return Path(tar_path).with_suffix(".idx")


def labels_name(split: str, form: str = "dense") -> str:
    if form not in ("dense", "csr"):
        raise ValueError(f"label form must be 'dense' or 'csr', got {form!r}")
    return f"{split}-labels.{'npy' if form == 'dense' else 'npz'}"


def labels_path(folder: str | os.PathLike, split: str, manifest: dict | None = None) -> Path:
    """The label file of a split: the one the manifest names, else whichever of .npy/.npz exists
    (a folder written by other tools), else the dense name (for a clear not-found error later)."""
    folder = Path(folder)
    if manifest is None and (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
    entry = (manifest or {}).get("splits", {}).get(split, {})
    if entry.get("labels"):
        return folder / entry["labels"]
    for form in ("dense", "csr"):
        if (folder / labels_name(split, form)).is_file():
            return folder / labels_name(split, form)
    return folder / labels_name(split)


def open_labels(folder: str | os.PathLike, split: str, manifest: dict | None = None, *, validate: bool = False):
    """The full labels of a split as ``labels.ObservedLabels`` (dense memmap or CSR in memory:
    13 B per listed entry + 8 B per image); CSR is always checked (O(entries)), dense only if asked."""
    from ...labels import ObservedLabels

    path = labels_path(folder, split, manifest)
    return ObservedLabels.load(path, validate=validate or path.suffix == ".npz")


def encode_id(sample_id: int) -> bytes:
    return int(sample_id).to_bytes(8, "little", signed=True)


def decode_id(raw: bytes) -> int:
    if len(raw) != 8:
        raise ValueError(f"a .id member must be 8 bytes (int64 little-endian), got {len(raw)}")
    return int.from_bytes(raw, "little", signed=True)


@dataclass
class ShardInfo:
    """What the manifest records of one finished shard."""

    name: str
    count: int
    first_id: int
    last_id: int
    sha256: str
    bytes: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ShardWriter:
    """Writes one shard and its DALI index; both appear only when ``close`` succeeds.

    Offsets for the index are the byte positions of each member's data (after its 512-byte
    tar header), exactly what DALI's ``wds2idx`` computes with GNU tar.
    """

    path: Path
    _entries: list = field(default_factory=list)

    def __post_init__(self):
        self.path = Path(self.path)
        self._tmp = temp_path(self.path)
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._ids: list[int] = []

    def add(self, sample_id: int, image: bytes, meta: dict) -> None:
        key = sample_key(sample_id)
        members = {IMAGE_EXT: image, ID_EXT: encode_id(sample_id),
                   META_EXT: json.dumps(meta, separators=(",", ":")).encode()}
        row = []
        for ext in MEMBER_ORDER:
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            header_at = self._file.tell()
            self._tar.addfile(info, io.BytesIO(data))
            row.append((ext, header_at + tarfile.BLOCKSIZE, len(data), info.name))
        self._entries.append(row)
        self._ids.append(int(sample_id))

    def close(self) -> ShardInfo:
        """Finish the tar, write the index, then rename both into place."""
        if not self._entries:
            self.abort()
            raise ValueError(f"shard {self.path} would be empty")
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        lines = [f"{DALI_INDEX_VERSION} {len(self._entries)}"]
        for row in self._entries:
            lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in row))
        atomic_write_bytes(index_name_for(self.path), ("\n".join(lines) + "\n").encode())
        digest, size = file_sha256(self._tmp)
        commit(self._tmp, self.path, fsync=False)  # fsynced through its handle above
        return ShardInfo(self.path.name, len(self._ids), min(self._ids), max(self._ids), digest, size)

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:
            pass
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def read_manifest(folder: str | os.PathLike) -> dict:
    """Load and check ``manifest.json``; a clear error names the file and what is wrong."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; the dataset folder is missing or its conversion did not finish "
                                f"(run `pml-shard convert ...` or `pml-shard demo {folder}`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("num_classes", "classes", "splits"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key {key!r}")
    return manifest


def split_shards(folder: str | os.PathLike, manifest: dict, split: str) -> list[Path]:
    """Absolute paths of the shards of one split, in id order."""
    if split not in manifest["splits"]:
        raise KeyError(f"{Path(folder) / MANIFEST}: no split {split!r}; has {sorted(manifest['splits'])}")
    return [Path(folder) / s["name"] for s in manifest["splits"][split]["shards"]]

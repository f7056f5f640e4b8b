"""How to checkpoint an N x L fp16 pseudo-label store without copying it: the options measured on
this machine's filesystem, on a real store file.

    python benchmarks/checkpoint_store.py [--rows 56000] [--labels 9605] [--dir /tmp]

Options timed on a store whose rows are all written (the state after one epoch):
  copy            the current ``sparse_copy`` (reads data extents, writes non-zero 1 MiB chunks)
  copy_file_range os.copy_file_range of the whole file (in-kernel; shares extents only where the
                  filesystem does: XFS/Btrfs reflink, NFS server-side copy)
  reflink         ioctl FICLONE (XFS with reflink=1, Btrfs): ~0 bytes written, or unsupported
  incremental     the rows written since the last checkpoint (ids + rows): at an epoch-end
                  checkpoint that is every visited row, i.e. ~ the whole store again
  versioned       two stores by epoch parity (read last epoch's, write this epoch's): a checkpoint
                  writes 2 bitmaps of N bits; the epoch end copies the unvisited rows only
Prints one JSON line per option: seconds, bytes written, and the rate extrapolated to 5.6M x 9,605.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pml_scale.atomic import commit  # noqa: E402
from pml_scale.labels.stores import sparse_copy  # noqa: E402

FICLONE = 0x40049409
FULL = 5_600_000 * 9605 * 2


def _drop(path: Path) -> None:
    """Push the file out of the page cache's dirty set, so a timing includes the disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=56_000)
    ap.add_argument("--labels", type=int, default=9605)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=a.dir, prefix="ckpt-bench-"))
    src = work / "store.f16"
    n, L = a.rows, a.labels
    size = n * L * 2
    mm = np.lib.format.open_memmap(work / "tmp.npy", mode="w+", dtype=np.float16, shape=(n, L))
    rng = np.random.default_rng(0)
    for s in range(0, n, 4096):
        mm[s:s + 4096] = rng.random((min(4096, n - s), L), dtype=np.float32) - 0.5
    mm.flush()
    del mm
    commit(work / "tmp.npy", src, fsync=False)  # .npy header: a few bytes more, irrelevant here
    _drop(src)
    fs = os.popen(f"df -T {work} | tail -1").read().split()
    results = []

    def record(option, seconds, written, note=""):
        r = {"option": option, "rows": n, "labels": L, "store_bytes": size, "seconds": round(seconds, 3),
             "bytes_written": int(written), "written_share": round(written / size, 4),
             "at_5.6M_x_9605_s": round(seconds * FULL / size, 1) if written else 0.0,
             "filesystem": fs[1] if len(fs) > 1 else "?", "note": note}
        results.append(r)
        print(json.dumps(r), flush=True)

    t = time.perf_counter()
    sparse_copy(src, work / "copy.f16")
    _drop(work / "copy.f16")
    record("copy", time.perf_counter() - t, size)
    (work / "copy.f16").unlink()

    t = time.perf_counter()
    with open(src, "rb") as fi, open(work / "cfr.f16", "wb") as fo:
        left = os.fstat(fi.fileno()).st_size
        while left:
            left -= os.copy_file_range(fi.fileno(), fo.fileno(), left)
    _drop(work / "cfr.f16")
    blocks = os.stat(work / "cfr.f16").st_blocks * 512
    record("copy_file_range", time.perf_counter() - t, blocks, "in-kernel copy; no extent sharing on this fs"
           if fs[1:2] == ["ext4"] else "")
    (work / "cfr.f16").unlink()

    t = time.perf_counter()
    try:
        with open(src, "rb") as fi, open(work / "clone.f16", "wb") as fo:
            fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
        record("reflink", time.perf_counter() - t, 0, "FICLONE shares extents")
    except OSError as e:
        record("reflink", 0.0, 0, f"unsupported here: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})")
    (work / "clone.f16").unlink(missing_ok=True)

    # incremental: rows written since the last checkpoint; at checkpoint_every = epoch/10, 10% of the rows
    store = np.load(src, mmap_mode="r")
    for share in (0.1, 1.0):
        ids = np.sort(rng.choice(n, size=int(share * n), replace=False))
        t = time.perf_counter()
        with open(work / "delta.bin", "wb") as f:
            f.write(ids.astype(np.int64).tobytes())
            for s in range(0, ids.size, 4096):
                f.write(np.ascontiguousarray(store[ids[s:s + 4096]]).tobytes())
            f.flush()
            os.fsync(f.fileno())
        written = os.path.getsize(work / "delta.bin")
        record(f"incremental_{int(share * 100)}pct_rows", time.perf_counter() - t, written,
               "an epoch-end checkpoint writes every row visited since the last checkpoint")
        (work / "delta.bin").unlink()

    # versioned: a checkpoint writes the two bitmaps; the epoch end copies unvisited rows (< W*B)
    written_bits = np.ones(n, bool)
    t = time.perf_counter()
    from pml_scale.atomic import atomic_save_npz

    atomic_save_npz(work / "state.npz", written=np.packbits(written_bits), ever=np.packbits(written_bits))
    record("versioned_checkpoint", time.perf_counter() - t, os.path.getsize(work / "state.npz"),
           "bitmaps only; at 5.6M rows: 1.4 MB")
    for p in work.iterdir():
        p.unlink()
    work.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Atomic file writes: temp file in the same folder, fsync, rename. A reader (or a resumed
job) never sees a half-written file, whatever moment the writer is killed at.

``commit`` is the one place that tail is written; ``atomic_path`` (a temp path to write, committed
on a clean exit) and the helpers below use it, and so does every writer that needs a path (memmaps,
sparse copies, shard tars, symlinks). A write that fails (disk full, file size
limit) is reported by :class:`WriteFailed`: the file, the bytes it needed, the bytes free.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np


def temp_path(path: str | os.PathLike) -> Path:
    """The temp name beside ``path`` that an atomic write of it uses (``.<name>.tmp-<pid>``:
    hidden, and a killed writer's leftovers are found by the ``.*.tmp-*`` pattern)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def commit(tmp: str | os.PathLike, path: str | os.PathLike, *, fsync: bool = True) -> None:
    """The tail of every atomic write: make the finished temp file durable (``fsync=False`` when
    the writer already did, through its own handle, or for a symlink), then rename it over ``path``."""
    if fsync:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for the caller to write and close. On a clean exit it
    is committed (fsynced, renamed over ``path``); on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path, fsync=fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class WriteFailed(OSError):
    """A file could not be written; the message names it, the bytes it needed and the bytes free
    on its filesystem (a full disk or a file size limit says nothing about either)."""

    def __init__(self, path: str | os.PathLike, needed: int | None, cause: BaseException, what: str = ""):
        self.path, self.needed = Path(path), needed
        self.free = free_bytes(self.path)
        code = cause.errno if isinstance(cause, OSError) else None
        reason = os.strerror(code) if code else _likely_reason(needed, self.free, cause)
        if code == errno.EFBIG or (code is None and reason.startswith(os.strerror(errno.EFBIG))):
            reason = _size_limit_reason()
        need = f"it needs {human_bytes(needed)}" if needed is not None else "its size is unknown"
        free = f"{human_bytes(self.free)} free there" if self.free is not None else "free space unknown"
        self.message = f"{what or 'writing'} {self.path} failed ({reason}): {need}, {free}"
        super().__init__(code, self.message)

    def __str__(self) -> str:
        return self.message


def _file_size_limit() -> int | None:
    """This process's file size limit (``ulimit -f``) in bytes, None if unlimited or unknown."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _size_limit_reason() -> str:
    limit = _file_size_limit()
    text = os.strerror(errno.EFBIG)
    return f"{text}: files may not exceed {human_bytes(limit)} here (ulimit -f)" if limit is not None else text


def _likely_reason(needed: int | None, free: int | None, cause: BaseException) -> str:
    """Writers that hide errno (torch's zip writer raises RuntimeError): say what the numbers show."""
    limit = _file_size_limit()
    if limit is not None and needed is not None and needed > limit:
        return os.strerror(errno.EFBIG)
    if free is not None and needed is not None and needed > free:
        return os.strerror(errno.ENOSPC)
    first = str(cause).splitlines()[0] if str(cause) else ""
    return f"{type(cause).__name__}: {first}"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to us on the filesystem holding ``path`` (its nearest existing folder)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "? bytes"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"

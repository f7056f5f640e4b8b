"""Shards changed under a run: named when the run resumes, before anything is restored.

Resuming is exact only over the same data. A shard's size is checked against the manifest
whenever its index is loaded (``index.SampleIndex.load``); a shard replaced by one of the same
size is caught here without hashing the whole dataset at every start: a fresh run records the
size and mtime of every shard it reads (``RECORD`` in the run folder); a resumed run hashes only
the shards whose size or mtime differ from that record, and compares them with the manifest's
sha256. A shard that was only touched (same bytes) passes, and the record is refreshed.
"""

from __future__ import annotations

from pathlib import Path

from ...atomic import atomic_write_json
from .format import file_sha256, split_shards

RECORD = "shards.json"


class ShardChangedError(ValueError):
    """A shard of the dataset differs from the manifest since the run started."""


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _shards(root: Path, manifest: dict, splits) -> list[tuple[Path, dict]]:
    out = []
    for split in dict.fromkeys(splits):
        infos = manifest["splits"][split]["shards"]
        out += list(zip(split_shards(root, manifest, split), infos))
    return out


def record_shards(run_dir: Path, root, manifest: dict, splits) -> None:
    """At a fresh start: the size and mtime of every shard the run reads."""
    stats = {str(p.name): _stat(p) for p, _ in _shards(Path(root), manifest, splits)}
    atomic_write_json(Path(run_dir) / RECORD, {"root": str(root), "shards": stats})


def changed_shards(run_dir: Path, root, manifest: dict, splits) -> list[str]:
    """At a resume: one line per shard whose bytes are no longer the manifest's (size or sha256),
    among those whose size or mtime changed since the record. Refreshes the record if all pass."""
    import json

    path = Path(run_dir) / RECORD
    if not path.exists():  # a run started before this check existed: start recording now
        record_shards(run_dir, root, manifest, splits)
        return []
    seen = json.loads(path.read_text()).get("shards", {})
    problems, touched = [], False
    for tar, info in _shards(Path(root), manifest, splits):
        now = _stat(tar)
        if now == seen.get(tar.name):
            continue
        touched = True
        if now is None:
            problems.append(f"{tar}: missing (the manifest lists it)")
            continue
        if now[0] != info["bytes"]:
            problems.append(f"{tar}: {now[0]} bytes, the manifest says {info['bytes']} (truncated or replaced)")
            continue
        digest, _ = file_sha256(tar)
        if digest != info["sha256"]:
            problems.append(f"{tar}: sha256 {digest[:12]}... differs from the manifest's {info['sha256'][:12]}... "
                            "(same size: replaced or overwritten in place)")
    if touched and not problems:
        record_shards(run_dir, root, manifest, splits)
    return problems


def shard_change_error(problems: list[str], root) -> ShardChangedError:
    lines = "\n  ".join(problems)
    return ShardChangedError(
        f"{len(problems)} shard(s) of {root} changed since this run started; it cannot resume exactly:\n  {lines}\n"
        f"Put the original shards back (`pml-shard verify {root}` checks them), or start a new run "
        "(another run.name, or run.resume=false)")

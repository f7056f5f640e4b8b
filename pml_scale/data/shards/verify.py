"""``pml-shard verify``: re-read everything in a shard folder and report what differs from its
manifest (checksums, DALI indexes, samples, labels, id coverage).

Why a module of its own: verification reads shards the way the loaders will (tar members,
webdataset, the label store) and must not share code paths with the writer it checks.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from ...labels import ObservedLabels
from . import images
from .convert import pool_worker_init
from .format import DALI_INDEX_VERSION, decode_id, file_sha256, index_name_for, labels_path, read_manifest, sample_key


def _verify_shard(folder: str, split: str, info: dict, labels_path: str, num_classes: int,
                  decode: bool) -> tuple[list[str], list[int]]:
    """Re-read one shard: sha256/size, DALI index vs tar headers, every sample through the
    ``webdataset`` library (key, id, json labels vs the label store, image decode).
    Returns (problems, ids in file order)."""
    path = Path(folder) / info["name"]
    problems: list[str] = []
    if not path.is_file():
        return [f"{path.name}: missing"], []
    digest, size = file_sha256(path)
    if size != info["bytes"] or digest != info["sha256"]:
        problems.append(f"{path.name}: sha256/size differ from the manifest ({size} bytes, expected {info['bytes']})")
    try:
        with tarfile.open(path) as t:
            members = [(m.name, m.offset_data, m.size) for m in t.getmembers()]
    except (tarfile.TarError, OSError, EOFError) as e:
        return problems + [f"{path.name}: not a readable tar ({e})"], []
    problems += _index_problems(path, info, members)
    ids = _sample_problems(path, labels_path, decode, problems)
    if ids and (ids[0] != info["first_id"] or ids[-1] != info["last_id"] or len(ids) != info["count"]):
        problems.append(f"{path.name}: holds ids {ids[0]}..{ids[-1]} ({len(ids)}), manifest says "
                        f"{info['first_id']}..{info['last_id']} ({info['count']})")
    return problems, ids


def _index_problems(path: Path, info: dict, members: list) -> list[str]:
    """The DALI index against the tar: one line per sample, member offsets = tar data offsets."""
    idx = index_name_for(path)
    if not idx.is_file():
        return [f"{idx.name}: missing"]
    problems = []
    lines = idx.read_text().splitlines()
    head = lines[0].split() if lines else []
    if head != [DALI_INDEX_VERSION, str(info["count"])]:
        problems.append(f"{idx.name}:1: header {lines[:1]} should be '{DALI_INDEX_VERSION} {info['count']}'")
    listed = []
    for n, line in enumerate(lines[1:], 2):
        f = line.split()
        if len(f) % 4:
            problems.append(f"{idx.name}:{n}: malformed line")
            continue
        listed += [(f[k + 3], int(f[k + 1]), int(f[k + 2])) for k in range(0, len(f), 4)]
    if listed != members:
        problems.append(f"{idx.name}: offsets/sizes/names do not match the tar members of {path.name}")
    return problems


def _sample_problems(path: Path, labels_path: str, decode: bool, problems: list[str]) -> list[int]:
    """Every sample read back through webdataset (members, key, id, json labels vs the label
    store, optionally the image decode); adds to ``problems``, returns the ids in file order."""
    import webdataset as wds

    labels = _open_labels_cached(labels_path)
    ids: list[int] = []
    try:
        ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
        for sample in ds:
            key = sample.get("__key__")
            if set(sample) - {"__key__", "__url__", "__local_path__"} != {"jpg", "id", "json"}:
                problems.append(f"{path.name} [{key}]: members {sorted(sample)} should be jpg, id, json")
                continue
            sid = decode_id(sample["id"])
            ids.append(sid)
            if key != sample_key(sid):
                problems.append(f"{path.name} [{key}]: key does not match the stored id {sid}")
            meta = json.loads(sample["json"])
            if labels is not None and 0 <= sid < labels.shape[0]:
                row = labels.gather(np.array([sid]))[0]
                if meta.get("pos") != np.flatnonzero(row == 1).tolist() or \
                        meta.get("neg") != np.flatnonzero(row == 0).tolist():
                    problems.append(f"{path.name} [{key}]: json labels differ from {Path(labels_path).name} row {sid}")
            if decode:
                why = images.decode_check(sample["jpg"])
                if why:
                    problems.append(f"{path.name} [{key}]: {why}")
    except Exception as e:  # noqa: BLE001 - any reader failure is a finding about this shard
        problems.append(f"{path.name}: webdataset cannot read it ({type(e).__name__}: {e})")
    return ids


_LABELS_CACHE: dict = {}


def _open_labels_cached(path: str):
    """The split's labels (dense memmap or CSR), opened once per process: a CSR file is loaded
    whole, so each verify worker loads it once, not once per shard. None if absent or invalid
    (``verify`` reports that itself)."""
    if path not in _LABELS_CACHE:
        try:
            _LABELS_CACHE.clear()
            _LABELS_CACHE[path] = ObservedLabels.load(path, validate=False) if Path(path).is_file() else None
        except ValueError:
            _LABELS_CACHE[path] = None
    return _LABELS_CACHE[path]


def _verify_labels(lpath: Path, n: int, L: int, stats: dict) -> list[str]:
    """Problems of a split's label file: dtype/shape and values (dense, block by block), or CSR
    consistency (indptr monotone from 0 to len(indices), indices in [0, L) and strictly increasing
    per row, values in {-1, 0, 1} other than the fill); per-class positives vs the manifest."""
    try:
        labels = ObservedLabels.load(lpath, validate=False)
    except ValueError as e:
        return [str(e)]
    if labels.shape != (n, L):
        return [f"{lpath.name}: shape {labels.shape}, expected ({n}, {L})"]
    try:
        labels.validate()
    except ValueError as e:
        return [str(e).replace(str(lpath), lpath.name)]
    if "class_positives" in stats and stats["class_positives"] != labels.positives_per_class().tolist():
        return [f"{lpath.name}: per-class positive counts differ from the manifest"]
    return []


def verify(folder, *, workers: int = 1, decode: bool = True, progress: bool = False) -> list[str]:
    """Every problem found in a shard folder (empty list: all consistent). Reads every byte."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    problems: list[str] = []
    L = manifest["num_classes"]
    if len(manifest["classes"]) != L:
        problems.append(f"manifest.json: {len(manifest['classes'])} class names for num_classes {L}")
    jobs = []
    for split, entry in manifest["splits"].items():
        lpath = labels_path(folder, split, manifest)
        n = entry["num_samples"]
        if not lpath.is_file():
            problems.append(f"{lpath.name}: missing")
        else:
            problems += _verify_labels(lpath, n, L, entry.get("label_stats", {}))
        expect = 0
        for info in entry["shards"]:
            if info["first_id"] != expect:
                problems.append(f"manifest.json: split {split}: shard {info['name']} starts at id {info['first_id']}, "
                                f"expected {expect} (ids must be dense)")
            expect = info["last_id"] + 1
            jobs.append((split, info, str(lpath)))
        if expect != n:
            problems.append(f"manifest.json: split {split}: shards hold ids 0..{expect - 1}, num_samples is {n}")
    from tqdm import tqdm

    bar = tqdm(total=sum(j[1]["count"] for j in jobs), unit="img", desc="verify", disable=not progress)
    seen: dict[str, list] = {}

    def collect(job, result):
        found, ids = result
        problems.extend(found)
        seen.setdefault(job[0], []).extend(ids)
        bar.update(job[1]["count"])

    if workers > 1:
        with cf.ProcessPoolExecutor(workers, initializer=pool_worker_init, initargs=(os.getpid(),)) as pool:
            futs = {pool.submit(_verify_shard, str(folder), s, info, lp, L, decode): (s, info, lp)
                    for s, info, lp in jobs}
            for fut in cf.as_completed(futs):
                collect(futs[fut], fut.result())
    else:
        for job in jobs:
            collect(job, _verify_shard(str(folder), job[0], job[1], job[2], L, decode))
    bar.close()
    for split, ids in seen.items():
        ids = np.sort(np.asarray(ids, np.int64))
        n = manifest["splits"][split]["num_samples"]
        if len(ids) != n or (n and not np.array_equal(ids, np.arange(n))):
            dup = int((np.diff(ids) == 0).sum()) if len(ids) > 1 else 0
            problems.append(f"split {split}: sample ids are not exactly 0..{n - 1} ({len(ids)} read, {dup} duplicates)")
    return problems

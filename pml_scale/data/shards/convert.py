"""Parallel, resumable conversion of a parsed :class:`~pml_scale.data.shards.sources.Source` to shards.

Two phases, both over a process pool and both journaled in ``OUT/.progress.jsonl``:

1. **check**: workers read and fully decode every input image (``images.check_bytes``) in
   chunks of ``shard_size``; the verdicts (only the non-OK ones) go to the journal.
2. **write**: the valid inputs of each split, in source order, get dense sample ids 0..n-1
   (known before any shard is written, so a resumed run writes identical shards); workers
   write shard k = ids [k*S, (k+1)*S) through ``ShardWriter`` (atomic rename on close).

Then the label store ``{split}-labels.npy`` (dense, chunked, temp file + rename) or
``{split}-labels.npz`` (CSR, when smaller: see ``choose_labels_form``), and ``manifest.json``
last, atomically. A killed run leaves only temp files (deleted on resume) and complete shards
recorded in the journal with their sha256 (kept if the file still matches). The journal starts
with a fingerprint of the inputs and options: a rerun with different ones is refused.

Faults: pool workers die with the converter (``PR_SET_PDEATHSIG`` on Linux, and a thread that
watches the parent pid everywhere), so ``kill -9`` of ``pml-shard convert`` leaves no orphan still
writing; workers ignore SIGINT, so Ctrl-C in a terminal reaches the parent only, which stops them.

Memory: the parsed source (~200 B per image) plus ``workers * 4`` jobs in flight; the label
store is written in row chunks (``CHUNK_ROWS * L`` bytes) or as CSR from the parsed entries, so
nothing holds N x L in memory.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import datetime as _dt
import fcntl
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ... import __version__
from ...atomic import atomic_path, atomic_write_json
from ...labels import save_csr
from ...labels.counts import positive_counts
from . import images
from .format import FORMAT_VERSION, MANIFEST, ShardWriter, file_sha256, index_name_for, labels_name, \
    shard_name
from .sources import Source, SplitInputs
from .sources.base import NEG, POS, ranges

JOURNAL = ".progress.jsonl"
LOCK = ".lock"
CHUNK_ROWS = 65536
LABEL_FORMS = ("auto", "dense", "csr")
AUTO_DENSE_MAX = 16 << 20  # bytes: a dense label file this small stays dense under "auto"
MAX_ITEMS = 100_000  # rejected/converted entries listed one by one in the manifest (all are counted)


class ConvertError(RuntimeError):
    """The conversion cannot go on (output folder in use or from other inputs, files changed)."""


class StrictError(ConvertError):
    """``--strict`` and an input was rejected: the message names file, line/key and reason."""


# ----------------------------------------------------------------------------------------------
# worker lifetime: a worker must never outlive the converter (it would go on writing, orphaned)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_S = 0.2


def pool_worker_init(parent_pid: int) -> None:
    """Pool initializer: die with the parent, and leave Ctrl-C to it (a terminal sends SIGINT to
    the whole process group; the parent stops the pool, the workers must not print tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="pml-parent-watch", daemon=True).start()


def _set_parent_death_signal() -> bool:
    """Linux: have the kernel SIGKILL this process when its parent dies (any death, kill -9 too).
    Returns False where unavailable; the parent watch below then does the job within a poll."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    """Fallback to the death signal: exit as soon as this process was re-parented (parent gone)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _stop_workers(pool: cf.ProcessPoolExecutor) -> None:
    """On an interrupt: terminate the workers now rather than let them finish their shards (temp
    files they leave are deleted by the rerun), then release the pool."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# worker functions (top level: they are pickled to the pool)


def _check_chunk(paths: list[str], allow_convert: bool) -> list[tuple]:
    """Verdicts of one chunk: (index in chunk, action, code, reason) for every non-OK input."""
    issues = []
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            issues.append((i, images.REJECT, "missing_file", "file not found"))
            continue
        except OSError as e:
            issues.append((i, images.REJECT, "unreadable", f"cannot read: {e.strerror or e}"))
            continue
        c = images.check_bytes(data, allow_convert=allow_convert)
        if c.action != images.OK:
            issues.append((i, c.action, c.code, c.reason))
    return issues


def _write_shard(path: str, rows: list[tuple], max_side: int | None, quality: int) -> dict:
    """Write one shard; rows are (sample id, image path, key, pos, neg, action)."""
    writer = ShardWriter(Path(path))
    try:
        for sid, src, key, pos, neg, action in rows:
            try:
                with open(src, "rb") as f:
                    data = f.read()
                image = images.encode(data, images.Check(action), max_side=max_side, quality=quality)
            except Exception as e:  # noqa: BLE001 - the image passed the check phase: it changed since
                raise ConvertError(f"{src} [{key}]: cannot be read or encoded although it passed the check "
                                   f"phase ({e}); did it change? Rerun with --restart") from e
            writer.add(sid, image, {"src": key, "pos": pos, "neg": neg})
        return writer.close().to_json()
    except BaseException:
        writer.abort()
        raise


def _shard_intact(path: str, info: dict) -> bool:
    """A journaled shard is kept only if tar and index exist and the tar's sha256 still matches."""
    p = Path(path)
    if not p.is_file() or not index_name_for(p).is_file() or p.stat().st_size != info["bytes"]:
        return False
    return file_sha256(p)[0] == info["sha256"]


# ----------------------------------------------------------------------------------------------
# small helpers


def _run(fn, jobs, workers: int, on_result, pool):
    """Run ``fn(*args)`` for (tag, args) in ``jobs``; ``on_result(tag, result)`` in the parent.
    At most ``4 * workers`` jobs are in flight, so the job list is never all in memory."""
    if pool is None:
        for tag, args in jobs:
            on_result(tag, fn(*args))
        return
    pending = {}
    jobs = iter(jobs)
    try:
        while True:
            while len(pending) < 4 * workers:
                nxt = next(jobs, None)
                if nxt is None:
                    break
                pending[pool.submit(fn, *nxt[1])] = nxt[0]
            if not pending:
                return
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                tag = pending.pop(fut)
                on_result(tag, fut.result())
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise


class _Journal:
    """Append-only JSON lines, fsynced per event; a torn last line (kill mid-write) is ignored."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return events

    def append(self, event: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", unit_scale=True, smoothing=0.05,
                dynamic_ncols=True, disable=not enabled)


def fingerprint(source: Source, options: dict) -> str:
    payload = {"format_version": FORMAT_VERSION, "format": source.format, "args": source.args,
               "classes": source.classes, "class_ids": [str(c) for c in source.class_ids], "options": options,
               "splits": {s: inp.digest() for s, inp in source.splits.items()}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_OUTPUT_PATTERNS = ("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar", "*-[0-9][0-9][0-9][0-9][0-9][0-9].idx", "*-labels.npy",
                    "*-labels.npz", MANIFEST, JOURNAL)


def _our_outputs(out: Path) -> list[Path]:
    return [p for pattern in _OUTPUT_PATTERNS for p in out.glob(pattern)]


def _clean(out: Path, everything: bool) -> None:
    """Delete temp files of killed runs; with ``everything`` also our outputs (``--restart``)."""
    for p in out.glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
    if everything:
        for p in _our_outputs(out):
            p.unlink()


@contextlib.contextmanager
def _locked(out: Path):
    with open(out / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ConvertError(f"{out}: another pml-shard process is writing into this folder") from e
        yield


def _summary(items: list[dict]) -> dict:
    return {"count": len(items), "by_reason": dict(sorted(Counter(i["code"] for i in items).items())),
            "items": items[:MAX_ITEMS]}


def _csr_entries(inputs: SplitInputs, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, values) of input rows ``rows`` (= sample ids 0..n-1), sorted by class within
    a row, without the entries equal to the unlisted state (listed negatives of full labels)."""
    rows = np.asarray(rows, np.int64)
    counts = inputs.indptr[rows + 1] - inputs.indptr[rows]
    take = ranges(inputs.indptr[rows], counts)
    rid = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    cols, vals = inputs.cols[take].astype(np.int32), inputs.vals[take].astype(np.int8)
    keep = vals != inputs.unlisted
    rid, cols, vals = rid[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, rid))
    indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(np.bincount(rid, minlength=len(rows)), out=indptr[1:])
    return indptr, cols[order], vals[order]


def choose_labels_form(num_samples: int, num_classes: int, num_entries: int, form: str = "auto") -> str:
    """"csr" or "dense". Auto: CSR (5 B per listed entry + 8 B per image on disk) when it is smaller
    than the dense N x L file, except for dense files under ``AUTO_DENSE_MAX``: those stay
    dense, since a memmap needs no load and any tool reads a .npy."""
    if form not in LABEL_FORMS:
        raise ValueError(f"labels_form must be one of {', '.join(LABEL_FORMS)}, got {form!r}")
    if form != "auto":
        return form
    dense = num_samples * num_classes
    csr = num_entries * 5 + (num_samples + 1) * 8
    return "csr" if dense > AUTO_DENSE_MAX and csr < dense else "dense"


def write_labels(path: Path, inputs: SplitInputs, rows: np.ndarray, num_classes: int) -> dict:
    """Write int8 (len(rows), L) labels, row k = input ``rows[k]`` (= sample id k), in chunks via a
    temp memmap renamed into place; returns the label statistics computed in the same pass."""
    n = len(rows)
    pos_c = np.zeros(num_classes, np.int64)
    neg_c = np.zeros(num_classes, np.int64)
    per_img_pos = np.zeros(n, np.int32)
    n_neg = n_miss = 0
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int8, shape=(n, num_classes))
        for a in range(0, n, CHUNK_ROWS):
            block = inputs.dense(rows[a:a + CHUNK_ROWS], num_classes)
            arr[a:a + len(block)] = block
            class_pos, row_pos = positive_counts(block)
            pos_c += class_pos
            neg_c += (block == 0).sum(0)
            per_img_pos[a:a + len(block)] = row_pos
            n_neg += int((block == 0).sum())
            n_miss += int((block == -1).sum())
        arr.flush()
        del arr
    return _label_stats(n, per_img_pos, pos_c, neg_c, n_neg, n_miss)


def write_labels_csr(path: Path, inputs: SplitInputs, rows: np.ndarray, num_classes: int,
                     entries: tuple | None = None) -> dict:
    """The CSR form of ``write_labels`` (fill = the inputs' unlisted state), atomically; the same
    statistics, counted from the entries (nothing N x L)."""
    indptr, cols, vals = entries if entries is not None else _csr_entries(inputs, rows)
    n = len(rows)
    save_csr(path, indptr, cols, vals, (n, num_classes), fill=inputs.unlisted)
    rid = np.repeat(np.arange(n), np.diff(indptr))
    pos_c = np.bincount(cols[vals == POS], minlength=num_classes).astype(np.int64)
    per_img_pos = np.bincount(rid[vals == POS], minlength=n).astype(np.int32)
    listed_neg = np.bincount(cols[vals == NEG], minlength=num_classes).astype(np.int64)
    listed_miss = np.bincount(cols[vals == -1], minlength=num_classes).astype(np.int64)
    neg_c = n - pos_c - listed_miss if inputs.unlisted == NEG else listed_neg
    n_neg = int(neg_c.sum())
    return _label_stats(n, per_img_pos, pos_c, neg_c, n_neg, n * num_classes - int(pos_c.sum()) - n_neg)


def _label_stats(n, per_img_pos, pos_c, neg_c, n_neg, n_miss) -> dict:
    denom = max(n, 1)
    return {"num_samples": n, "positives_per_image": float(per_img_pos.sum() / denom),
            "negatives_per_image": n_neg / denom, "missing_per_image": n_miss / denom,
            "min_positives": int(per_img_pos.min()) if n else 0, "max_positives": int(per_img_pos.max()) if n else 0,
            "images_without_positive": int((per_img_pos == 0).sum()),
            "classes_without_positive": int((pos_c == 0).sum()),
            "class_positives": pos_c.tolist(), "class_negatives": neg_c.tolist()}


# ----------------------------------------------------------------------------------------------
# the driver


def convert(source: Source, out, *, workers: int = 1, shard_size: int = 1000, max_side: int | None = None,
            quality: int = 90, strict: bool = False, allow_convert: bool = True, progress: bool = True,
            restart: bool = False, labels_form: str = "auto", log=print) -> dict:
    """Convert ``source`` into the shard folder ``out``; returns the manifest.

    Rerunning on a finished folder with the same inputs is a no-op; on an interrupted one it
    resumes. ``strict`` raises :class:`StrictError` at the first rejected input. ``labels_form``:
    auto (CSR where smaller, see ``choose_labels_form``), dense or csr."""
    _check_options(source, workers, shard_size, max_side, quality, strict, labels_form)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = {"shard_size": shard_size, "max_side": max_side, "quality": quality, "allow_convert": allow_convert}
    if labels_form != "auto":  # auto is a function of the inputs: fingerprints of earlier runs stay valid
        options["labels_form"] = labels_form
    fp = fingerprint(source, options)
    with _locked(out):
        journal = _Journal(out / JOURNAL)
        finished = None if restart else _finished_manifest(out, fp, log)
        if finished is not None:
            return finished
        events = [] if restart else journal.read()
        _check_resumable(out, fp, restart, events)
        _clean(out, everything=restart)
        if restart and (out / "observed").is_dir():
            log(f"warning: {out / 'observed'} holds settings drawn from the previous labels; redraw them")
        if not events:
            journal.append({"event": "start", "fingerprint": fp, "time": _now()})
        checked = {(e["split"], e["chunk"]): e["issues"] for e in events if e.get("event") == "checked"}
        written = {(e["split"], e["info"]["name"]): e["info"] for e in events if e.get("event") == "shard"}
        plan, shards = _run_phases(source, out, shard_size, max_side, quality, allow_convert, strict, checked,
                                   written, journal, workers, progress)
        manifest = _finish(source, out, plan, shards, options, fp)
        (out / JOURNAL).unlink(missing_ok=True)
    (out / LOCK).unlink(missing_ok=True)
    return manifest


def _check_options(source: Source, workers, shard_size, max_side, quality, strict: bool, labels_form: str) -> None:
    if labels_form not in LABEL_FORMS:
        raise ValueError(f"labels_form must be one of {', '.join(LABEL_FORMS)}, got {labels_form!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if max_side is not None and (not isinstance(max_side, int) or max_side < 8):
        raise ValueError(f"max_side must be an integer >= 8 or None, got {max_side!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    if strict:
        first = next(iter(source.rejects), None)
        if first is not None:
            raise StrictError(f"--strict: {first} ({len(source.rejects)} bad input rows in total)")


def _finished_manifest(out: Path, fp: str, log) -> dict | None:
    """The manifest of a finished conversion of the same inputs (nothing to do), None if there is
    none; a finished conversion of other inputs is refused."""
    man_path = out / MANIFEST
    if not man_path.exists():
        return None
    try:
        old = json.loads(man_path.read_text())
    except json.JSONDecodeError:
        old = {}
    if old.get("fingerprint") == fp:
        log(f"{out}: already converted from these inputs (manifest.json present); nothing to do")
        return old
    raise ConvertError(f"{out}: holds a finished conversion of other inputs or options; choose another "
                       "folder or pass --restart to replace it")


def _check_resumable(out: Path, fp: str, restart: bool, events: list) -> None:
    """Refuse to resume another conversion's journal, or to overwrite outputs no journal accounts for."""
    if events and (events[0].get("event") != "start" or events[0].get("fingerprint") != fp):
        raise ConvertError(f"{out / JOURNAL}: a partial conversion of other inputs or options is in this folder; "
                           "rerun with the same arguments to resume, or pass --restart to start over")
    if not events and not restart and _our_outputs(out):
        raise ConvertError(f"{out}: holds shard or label files but no progress journal or manifest; they are "
                           "not from a run that can be resumed: pass --restart to replace them")


def _run_phases(source, out, shard_size, max_side, quality, allow_convert, strict, checked, written, journal,
                workers, progress):
    """Check every image, plan the shards, write them: (plan, shards), on a worker pool when workers > 1."""
    pool = None
    if workers > 1:
        pool = cf.ProcessPoolExecutor(max_workers=workers, initializer=pool_worker_init, initargs=(os.getpid(),))
    try:
        _check_phase(source, shard_size, allow_convert, strict, checked, journal, workers, pool, progress)
        plan = _plan(source, shard_size, checked)
        shards = _write_phase(source, out, plan, shard_size, max_side, quality, written, journal, workers, pool,
                              progress)
    except KeyboardInterrupt:
        if pool is not None:
            _stop_workers(pool)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return plan, shards


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_phase(source, shard_size, allow_convert, strict, checked, journal, workers, pool, progress):
    todo = [(s, k) for s, inp in source.splits.items() for k in range(-(-len(inp) // shard_size))
            if (s, k) not in checked]
    total = sum(len(inp) for inp in source.splits.values())
    done = sum(min(shard_size, len(source.splits[s]) - k * shard_size) for s, k in checked)
    bar = _progress(total, done, "check", progress)

    def jobs():
        for s, k in todo:
            yield (s, k), (source.splits[s].paths[k * shard_size:(k + 1) * shard_size], allow_convert)

    def on_result(tag, issues):
        s, k = tag
        if strict:
            bad = next((x for x in issues if x[1] == images.REJECT), None)
            if bad is not None:
                i = k * shard_size + bad[0]
                raise StrictError(f"--strict: {source.splits[s].paths[i]} [{source.splits[s].keys[i]}]: {bad[3]}")
        journal.append({"event": "checked", "split": s, "chunk": k, "issues": issues})
        checked[tag] = issues
        bar.update(min(shard_size, len(source.splits[s]) - k * shard_size))

    try:
        _run(_check_chunk, jobs(), workers, on_result, pool)
    finally:
        bar.close()


def _plan(source: Source, shard_size: int, checked: dict) -> dict:
    """Per split: kept input rows in id order, their actions, the rejected and converted lists."""
    plan = {}
    for s, inp in source.splits.items():
        action = np.zeros(len(inp), np.int8)  # 0 ok, 1 convert, 2 reject
        rejected, converted = [], []
        for k in range(-(-len(inp) // shard_size)):
            for i, act, code, reason in checked[(s, k)]:
                j = k * shard_size + i
                entry = {"file": inp.paths[j], "key": inp.keys[j], "code": code, "reason": reason, "split": s}
                if act == images.REJECT:
                    action[j] = 2
                    rejected.append(entry)
                else:
                    action[j] = 1
                    converted.append(entry)
        rows = np.flatnonzero(action != 2)
        plan[s] = {"rows": rows, "action": action, "rejected": rejected, "converted": converted}
    return plan


def _write_phase(source, out, plan, shard_size, max_side, quality, written, journal, workers, pool, progress):
    """Write every shard not already complete; returns {split: [ShardInfo json in id order]}."""
    L = len(source.classes)
    specs = []  # (split, shard index, file name, first id, end id)
    for s, p in plan.items():
        n = len(p["rows"])
        specs += [(s, k, shard_name(s, k), k * shard_size, min(n, (k + 1) * shard_size))
                  for k in range(-(-n // shard_size))]
    results: dict[tuple, dict] = {}
    kept = [(spec, written[(spec[0], spec[2])]) for spec in specs if (spec[0], spec[2]) in written]

    def on_checked(spec, ok):
        if ok:
            results[spec] = written[(spec[0], spec[2])]

    _run(_shard_intact, ((spec, (str(out / spec[2]), info)) for spec, info in kept), workers, on_checked, pool)
    total = sum(len(p["rows"]) for p in plan.values())
    bar = _progress(total, sum(r["count"] for r in results.values()), "write", progress)

    def jobs():
        for spec in specs:
            if spec in results:
                continue
            s, _, name, a, b = spec
            inp, p = source.splits[s], plan[s]
            rows = []
            for sid in range(a, b):
                j = int(p["rows"][sid])
                pos, neg = inp.row(j, L)
                act = images.CONVERT if p["action"][j] == 1 else images.OK
                rows.append((sid, inp.paths[j], inp.keys[j], pos, neg, act))
            yield spec, (str(out / name), rows, max_side, quality)

    def on_written(spec, info):
        journal.append({"event": "shard", "split": spec[0], "info": info})
        results[spec] = info
        bar.update(info["count"])

    try:
        _run(_write_shard, jobs(), workers, on_written, pool)
    finally:
        bar.close()
    return {s: [results[spec] for spec in specs if spec[0] == s] for s in plan}


def _finish(source: Source, out: Path, plan: dict, shards: dict, options: dict, fp: str) -> dict:
    """Label stores, then the manifest (last, atomic): the folder is complete once it exists."""
    splits = {}
    L = len(source.classes)
    for s, p in plan.items():
        inputs = source.splits[s]
        entries = _csr_entries(inputs, p["rows"])
        form = choose_labels_form(len(p["rows"]), L, len(entries[1]), options.get("labels_form", "auto"))
        name = labels_name(s, form)
        (out / labels_name(s, "csr" if form == "dense" else "dense")).unlink(missing_ok=True)  # one form per split
        if form == "csr":
            stats = write_labels_csr(out / name, inputs, p["rows"], L, entries)
        else:
            del entries
            stats = write_labels(out / name, inputs, p["rows"], L)
        splits[s] = {"num_samples": len(p["rows"]), "num_inputs": len(source.splits[s]), "labels": name,
                     "labels_form": form,
                     "unlisted": "missing" if source.splits[s].unlisted == -1 else "negative",
                     "shards": shards[s], "label_stats": stats}
    as_items = lambda rs: [dict(r.to_json()) for r in rs]  # noqa: E731
    rejected = as_items(source.rejects) + [r for p in plan.values() for r in p["rejected"]]
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {"format": source.format, "args": source.args, "notes": source.notes},
        "created": _now(),
        "tool": {"name": "pml-shard", "version": __version__},
        "options": options,
        "fingerprint": fp,
        "num_classes": len(source.classes),
        "classes": source.classes,
        "class_ids": source.class_ids,
        "splits": splits,
        "rejected": _summary(rejected),
        "converted": _summary([r for p in plan.values() for r in p["converted"]]),
        "skipped": _summary(as_items(source.skipped)),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest

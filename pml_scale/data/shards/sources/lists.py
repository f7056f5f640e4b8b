"""Generic csv / jsonl lists of (path, positives[, negatives]): any dataset without its own parser."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .base import MISSING, NEG, InputError, Reject, Source, SplitBuilder, given_args, need_file, text_lines


def parse_list(fmt: str, train=None, test=None, *, classes=None, images=None, unlisted: str | None = None,
               sep: str = ";") -> Source:
    """Generic lists. ``csv``: header with ``path,positives[,negatives]``, class names separated
    by ``sep``. ``jsonl``: one object per line ``{"path", "positives": [...], "negatives": [...]}``
    (names, or integer indexes into ``classes``). Paths are relative to ``images`` (default: the
    list's folder). Classes: the ``classes`` file (one name per line) or, if absent, every name
    seen, sorted. ``unlisted``: the state of classes a row does not list, ``negative`` (full
    labels) or ``missing`` (partial); default ``missing`` if the lists carry negatives, else
    ``negative``."""
    if fmt not in ("csv", "jsonl"):
        raise InputError(f"format must be csv or jsonl, got {fmt!r}")
    if unlisted not in (None, "negative", "missing"):
        raise InputError(f"--unlisted must be 'negative' or 'missing', got {unlisted!r}")
    files = {s: need_file(p, f"--{s}") for s, p in (("train", train), ("test", test)) if p is not None}
    if not files:
        raise InputError(f"{fmt}: give --train and/or --test")
    names = _class_file(classes) if classes is not None else None
    rejects = []
    raw = {}  # split -> [(line, path, pos names, neg names)]
    has_neg = False
    for split, path in files.items():
        read = _read_csv if fmt == "csv" else _read_jsonl
        raw[split], listed_neg = read(path, split, sep, rejects)
        has_neg |= listed_neg
    if names is None:
        names = _names_seen(raw, fmt)
    col = {c: j for j, c in enumerate(names)}
    state = {"negative": NEG, "missing": MISSING}[unlisted or ("missing" if has_neg else "negative")]
    splits = {}
    seen_paths = {}
    for split, rows in raw.items():
        path = files[split]
        root = Path(images) if images is not None else path.parent
        b = SplitBuilder()
        for n, rel, pos, neg in rows:
            kept = _check_row(path, split, n, rel, pos, neg, names, col, seen_paths, rejects)
            if kept is not None:
                b.add(str(root / rel), rel, *kept)
        splits[split] = b.finish(state)
    args = given_args(train=train, test=test, classes=classes, images=images)
    args["unlisted"] = "missing" if state == MISSING else "negative"
    return Source(fmt, args, names, names, splits, rejects, [])


def _class_file(classes) -> list[str]:
    cpath = need_file(classes, "--classes")
    names = [t for _, t in text_lines(cpath)]
    if len(set(names)) != len(names):
        raise InputError(f"{cpath}: duplicate class names")
    return names


def _names_seen(raw: dict, fmt: str) -> list[str]:
    """Every class name the lists use, sorted (when no --classes file gives the order)."""
    seen = {c for rows in raw.values() for r in rows for c in (*r[2], *r[3]) if isinstance(c, str)}
    if not seen:
        raise InputError(f"{fmt}: no class names in the lists and no --classes file")
    return sorted(seen)


def _read_csv(path, split: str, sep: str, rejects: list) -> tuple[list, bool]:
    """(rows (line, path, positive names, negative names), whether the file has a negatives column)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or "positives" not in header:
            raise InputError(f"{path}:1: header must name the columns path,positives[,negatives] "
                             f"(got {header})")
        ip, ipos = header.index("path"), header.index("positives")
        ineg = header.index("negatives") if "negatives" in header else None
        for n, row in enumerate(reader, 2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                rejects.append(Reject(str(path), "malformed_row", f"{len(row)} fields, expected "
                                      f"{len(header)}", line=n, split=split))
                continue
            split_names = (lambda s: [t.strip() for t in s.split(sep) if t.strip()])
            rows.append((n, row[ip].strip(), split_names(row[ipos]),
                         split_names(row[ineg]) if ineg is not None else []))
    return rows, ineg is not None


def _read_jsonl(path, split: str, _sep: str, rejects: list) -> tuple[list, bool]:
    """(rows (line, path, positives, negatives), whether any object lists negatives)."""
    rows, has_neg = [], False
    for n, text in text_lines(path):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rejects.append(Reject(str(path), "malformed_row", f"not valid JSON ({e.msg})", line=n, split=split))
            continue
        ok = (isinstance(obj, dict) and isinstance(obj.get("path"), str)
              and isinstance(obj.get("positives", []), list) and isinstance(obj.get("negatives", []), list))
        if not ok:
            rejects.append(Reject(str(path), "malformed_row", "needs {\"path\": str, \"positives\": [...], "
                                  "\"negatives\": [...]}", line=n, split=split))
            continue
        has_neg |= "negatives" in obj
        rows.append((n, obj["path"].strip(), obj.get("positives", []), obj.get("negatives", [])))
    return rows, has_neg


def _check_row(path, split: str, n: int, rel: str, pos, neg, names: list, col: dict, seen_paths: dict,
               rejects: list) -> tuple[list, list] | None:
    """(sorted positive columns, sorted negative columns) of a row, or None after recording why it is left out."""
    where = dict(line=n, split=split)
    if not rel:
        rejects.append(Reject(str(path), "malformed_row", "empty path", **where))
        return None
    try:
        pos_i = [_class_index(c, col, len(names)) for c in pos]
        neg_i = [_class_index(c, col, len(names)) for c in neg]
    except KeyError as e:
        rejects.append(Reject(str(path), "unknown_class", f"unknown class {e.args[0]!r}", **where))
        return None
    both = set(pos_i) & set(neg_i)
    if both:
        rejects.append(Reject(str(path), "malformed_row", f"classes both positive and negative: "
                              f"{[names[j] for j in sorted(both)]}", **where))
        return None
    if rel in seen_paths:
        rejects.append(Reject(str(path), "duplicate", f"image {rel} already listed at {seen_paths[rel]} "
                              "(first kept)", **where))
        return None
    seen_paths[rel] = f"{path}:{n}"
    return sorted(set(pos_i)), sorted(set(neg_i))


def _class_index(c, col: dict, num: int) -> int:
    if isinstance(c, bool):
        raise KeyError(c)
    if isinstance(c, int):
        if 0 <= c < num:
            return c
        raise KeyError(c)
    if isinstance(c, str) and c in col:
        return col[c]
    raise KeyError(c)

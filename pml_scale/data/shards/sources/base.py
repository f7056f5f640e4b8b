"""What every parser shares: the error type, reject records, the per-split builder and the
parsed-dataset record, and the small file helpers.

Labels are kept as CSR arrays (listed entries only), so memory is ~200 B per image for its path
and key plus ~5 B per listed label: Open Images (5.6M images, ~9 listed labels each) fits in a
few GB, whatever the number of classes.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

POS, NEG, MISSING = 1, 0, -1


class InputError(ValueError):
    """A whole input file is unusable (missing, wrong columns, inconsistent): nothing to keep."""


@dataclass
class Reject:
    """One input left out, with where it came from. ``code`` is the counted category."""

    file: str
    code: str
    reason: str
    line: int | None = None
    key: str | None = None
    split: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def __str__(self) -> str:
        where = f":{self.line}" if self.line is not None else (f" [{self.key}]" if self.key is not None else "")
        return f"{self.file}{where}: {self.reason}"


@dataclass
class SplitInputs:
    """The inputs of one split in id order. Row i: image ``paths[i]`` (``keys[i]`` is its name in
    the source, stored as provenance), labels in CSR (``cols``/``vals`` between ``indptr[i]`` and
    ``indptr[i+1]``), every class not listed has the state ``unlisted`` (0 full labels, -1 partial)."""

    paths: list[str]
    keys: list[str]
    indptr: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    unlisted: int

    def __len__(self) -> int:
        return len(self.paths)

    def row(self, i: int, num_classes: int) -> tuple[list[int], list[int]]:
        """(positives, negatives) of row i, negatives made explicit."""
        a, b = int(self.indptr[i]), int(self.indptr[i + 1])
        cols, vals = self.cols[a:b], self.vals[a:b]
        pos = sorted(int(c) for c in cols[vals == POS])
        if self.unlisted == NEG:
            mask = np.ones(num_classes, bool)
            mask[cols[vals == POS]] = False
            neg = np.flatnonzero(mask).tolist()
        else:
            neg = sorted(int(c) for c in cols[vals == NEG])
        return pos, neg

    def dense(self, rows: np.ndarray, num_classes: int) -> np.ndarray:
        """int8 (len(rows), L) labels of the given rows; callers chunk ``rows`` to bound memory."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.full((len(rows), num_classes), self.unlisted, dtype=np.int8)
        starts = self.indptr[rows]
        counts = self.indptr[rows + 1] - starts
        take = ranges(starts, counts)
        out[np.repeat(np.arange(len(rows)), counts), self.cols[take]] = self.vals[take]
        return out

    def digest(self) -> str:
        """Fingerprint of the inputs (paths, keys, labels): a resumed run must see the same."""
        h = hashlib.sha256()
        for p, k in zip(self.paths, self.keys):
            h.update(p.encode() + b"\0" + k.encode() + b"\n")
        for arr in (self.indptr, self.cols, self.vals):
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(str(self.unlisted).encode())
        return h.hexdigest()

    def subset(self, keep: np.ndarray) -> "SplitInputs":
        """The rows ``keep`` (sorted indices), in that order."""
        keep = np.asarray(keep, dtype=np.int64)
        counts = self.indptr[keep + 1] - self.indptr[keep]
        indptr = np.zeros(len(keep) + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        take = ranges(self.indptr[keep], counts)
        return SplitInputs([self.paths[i] for i in keep], [self.keys[i] for i in keep], indptr,
                           self.cols[take].astype(np.int32), self.vals[take].astype(np.int8), self.unlisted)


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) over rows, vectorised (no per-row Python loop)."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    return np.repeat(np.asarray(starts, np.int64) - (ends - counts), counts) + np.arange(total)


class SplitBuilder:
    """Accumulates rows in compact arrays; ``finish`` sorts them by key (the id order)."""

    def __init__(self):
        self.paths: list[str] = []
        self.keys: list[str] = []
        self._counts = array("q")
        self._cols = array("i")
        self._vals = array("b")

    def add(self, path: str, key: str, pos=(), neg=()) -> None:
        pos, neg = list(pos), list(neg)
        self.paths.append(path)
        self.keys.append(key)
        self._counts.append(len(pos) + len(neg))
        self._cols.extend(pos)
        self._cols.extend(neg)
        self._vals.extend([POS] * len(pos))
        self._vals.extend([NEG] * len(neg))

    def finish(self, unlisted: int) -> SplitInputs:
        counts = np.frombuffer(self._counts, dtype=np.int64) if len(self._counts) else np.zeros(0, np.int64)
        indptr = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        raw = SplitInputs(self.paths, self.keys, indptr,
                          np.frombuffer(self._cols, dtype=np.int32).copy() if len(self._cols) else np.zeros(0, np.int32),
                          np.frombuffer(self._vals, dtype=np.int8).copy() if len(self._vals) else np.zeros(0, np.int8),
                          unlisted)
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        return raw.subset(np.asarray(order, dtype=np.int64)) if len(order) else raw


@dataclass
class Source:
    """A parsed dataset: classes (order = label column), inputs per split, and what was left out
    (``rejects``: bad rows; ``skipped``: valid images without any label, see ``keep_empty``)."""

    format: str
    args: dict
    classes: list[str]
    class_ids: list
    splits: dict[str, SplitInputs]
    rejects: list[Reject] = field(default_factory=list)
    skipped: list[Reject] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


def need_file(path, what: str) -> Path:
    if path is None:
        raise InputError(f"{what}: no file given")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}: {p} does not exist or is not a file")
    return p


def need_dir(path, what: str) -> Path:
    if path is None:
        raise InputError(f"{what}: no folder given")
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{what}: {p} does not exist or is not a folder")
    return p


def load_json(path: Path):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def text_lines(path: Path):
    """(line number, stripped text) for non-empty lines; a bad encoding names the line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 text ({e})") from e
            if text:
                yield n, text


def as_int(text) -> int | None:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def drop_empty(builder_rows, keep_empty: bool, split: str, file: str, skipped: list):
    """Apply the ``keep_empty`` policy to (path, key, pos, neg) rows of a full-label dataset."""
    for path, key, pos, neg in builder_rows:
        if not pos and not keep_empty:
            skipped.append(Reject(file, "no_positive_labels", "image has no positive label (--keep-empty keeps it)",
                                  key=key, split=split))
            continue
        yield path, key, pos, neg


def given_args(**paths) -> dict:
    """The arguments a parser was given, as strings for the manifest (those left out are not recorded)."""
    return {k: str(v) for k, v in paths.items() if v is not None}

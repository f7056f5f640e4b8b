"""Dataset parsers: annotation files in, a validated, sorted list of inputs per split out.

Why this split of work: parsing annotations is cheap and single-threaded; it decides the class
order, which rows are malformed, and the input order from which sample ids are assigned. Images
are not opened here (the workers of ``convert`` do that). Labels are kept as CSR arrays (listed
entries only) so memory is ~200 B per image for its path and key plus ~5 B per listed label:
Open Images (5.6M images, ~9 listed labels each) fits in a few GB, whatever the number of classes.

Every parser returns a :class:`Source`. Row-level problems become :class:`Reject` records
(file + line or key + reason, counted in the manifest); whole-file problems raise
:class:`InputError` naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np

POS, NEG, MISSING = 1, 0, -1
FORMATS = ("coco", "openimages", "nuswide", "cub", "csv", "jsonl")


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
        take = _ranges(starts, counts)
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
        take = _ranges(self.indptr[keep], counts)
        return SplitInputs([self.paths[i] for i in keep], [self.keys[i] for i in keep], indptr,
                           self.cols[take].astype(np.int32), self.vals[take].astype(np.int8), self.unlisted)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------
# helpers


def _need_file(path, what: str) -> Path:
    if path is None:
        raise InputError(f"{what}: no file given")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what}: {p} does not exist or is not a file")
    return p


def _need_dir(path, what: str) -> Path:
    if path is None:
        raise InputError(f"{what}: no folder given")
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{what}: {p} does not exist or is not a folder")
    return p


def _load_json(path: Path):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def _lines(path: Path):
    """(line number, stripped text) for non-empty lines; a bad encoding names the line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 text ({e})") from e
            if text:
                yield n, text


def _int(text) -> int | None:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def _drop_empty(builder_rows, keep_empty: bool, split: str, file: str, skipped: list):
    """Apply the ``keep_empty`` policy to (path, key, pos, neg) rows of a full-label dataset."""
    for path, key, pos, neg in builder_rows:
        if not pos and not keep_empty:
            skipped.append(Reject(file, "no_positive_labels", "image has no positive label (--keep-empty keeps it)",
                                  key=key, split=split))
            continue
        yield path, key, pos, neg


# ----------------------------------------------------------------------------------------------
# COCO


def parse_coco(train_json=None, train_images=None, test_json=None, test_images=None, *,
               keep_empty: bool = False) -> Source:
    """COCO instances JSON (2014/2017). Classes = categories sorted by id; an image's positives
    are the categories of its annotations (crowd included); full labels. Images without any
    annotation are skipped unless ``keep_empty`` (the usual multi-label COCO protocol)."""
    pairs = {"train": (train_json, train_images), "test": (test_json, test_images)}
    pairs = {s: p for s, p in pairs.items() if p[0] is not None or p[1] is not None}
    if not pairs:
        raise InputError("coco: give --train-json/--train-images and/or --test-json/--test-images")
    rejects, skipped, splits = [], [], {}
    cats = None
    for split, (jpath, ipath) in pairs.items():
        jpath = _need_file(jpath, f"--{split}-json")
        idir = _need_dir(ipath, f"--{split}-images")
        data = _load_json(jpath)
        if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
            raise InputError(f"{jpath}: not a COCO instances file (needs keys images, annotations, categories)")
        these = {}
        for i, c in enumerate(data["categories"]):
            cid = c.get("id") if isinstance(c, dict) else None
            if not isinstance(cid, int) or not isinstance(c.get("name"), str):
                raise InputError(f"{jpath}: categories[{i}]: needs an integer 'id' and a string 'name'")
            these[cid] = c["name"]
        if not these:
            raise InputError(f"{jpath}: no categories")
        if cats is None:
            cats = these
        elif these != cats:
            raise InputError(f"{jpath}: categories differ from the train file's; both splits need one class list")
        images = {}
        for i, im in enumerate(data["images"]):
            iid = im.get("id") if isinstance(im, dict) else None
            name = im.get("file_name") if isinstance(im, dict) else None
            if not isinstance(iid, int) or not isinstance(name, str) or not name:
                rejects.append(Reject(str(jpath), "malformed_row", "image entry needs an integer 'id' and a "
                                      "'file_name'", key=f"images[{i}]", split=split))
            elif iid in images:
                rejects.append(Reject(str(jpath), "duplicate", f"duplicate image id {iid} (first kept)",
                                      key=f"images[{i}]", split=split))
            else:
                images[iid] = name
        labels: dict[int, set] = {}
        for i, a in enumerate(data["annotations"]):
            iid = a.get("image_id") if isinstance(a, dict) else None
            cid = a.get("category_id") if isinstance(a, dict) else None
            if not isinstance(iid, int) or not isinstance(cid, int):
                rejects.append(Reject(str(jpath), "malformed_row", "annotation needs integer 'image_id' and "
                                      "'category_id'", key=f"annotations[{i}]", split=split))
            elif cid not in cats:
                rejects.append(Reject(str(jpath), "unknown_class", f"unknown category_id {cid} (known: "
                                      f"{sorted(cats)[:5]}...)", key=f"annotations[{i}]", split=split))
            elif iid not in images:
                rejects.append(Reject(str(jpath), "unknown_image", f"image_id {iid} is not in 'images'",
                                      key=f"annotations[{i}]", split=split))
            else:
                labels.setdefault(iid, set()).add(cid)
        col = {cid: j for j, cid in enumerate(sorted(cats))}
        rows = ((str(idir / name), name, sorted(col[c] for c in labels.get(iid, ())), ())
                for iid, name in images.items())
        b = SplitBuilder()
        for row in _drop_empty(rows, keep_empty, split, str(jpath), skipped):
            b.add(*row)
        splits[split] = b.finish(NEG)
    ids = sorted(cats)
    args = {k: str(v) for k, v in dict(train_json=train_json, train_images=train_images, test_json=test_json,
                                       test_images=test_images).items() if v is not None}
    args["keep_empty"] = keep_empty
    return Source("coco", args, [cats[c] for c in ids], ids, splits, rejects, skipped)


# ----------------------------------------------------------------------------------------------
# Open Images


def _read_class_table(path: Path) -> list[tuple[str, str]]:
    """MID and name rows from a descriptions CSV (header optional) or a one-MID-per-line list."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            mid = row[0].strip()
            if n == 1 and mid.lower() in ("labelname", "label_name", "mid"):
                continue
            out.append((mid, row[1].strip() if len(row) > 1 else mid))
    if not out:
        raise InputError(f"{path}: no classes")
    return out


def parse_openimages(train_labels=None, train_images=None, test_labels=None, test_images=None, *,
                     class_descriptions=None, trainable=None) -> Source:
    """Open Images image-level labels (``ImageID,Source,LabelName,Confidence``): Confidence 1 is
    a positive, 0 a negative, any class not listed for an image is missing (the native partial
    labels). Classes: the ``trainable`` list in its order (e.g. the 600 boxable classes), names
    from ``class_descriptions``; labels of other known classes are ignored (counted), labels of
    unknown classes are rejected. An image is ``{images}/{ImageID}.jpg``."""
    desc = dict(_read_class_table(_need_file(class_descriptions, "--class-descriptions")))
    if trainable is not None:
        tpath = _need_file(trainable, "--trainable")
        mids = [m for m, _ in _read_class_table(tpath)]
        unknown = [m for m in mids if m not in desc]
        if unknown:
            raise InputError(f"{tpath}: classes not in {class_descriptions}: {unknown[:5]}")
        if len(set(mids)) != len(mids):
            raise InputError(f"{tpath}: duplicate class ids")
    else:
        mids = list(desc)
    col = {m: j for j, m in enumerate(mids)}
    pairs = {"train": (train_labels, train_images), "test": (test_labels, test_images)}
    pairs = {s: p for s, p in pairs.items() if p[0] is not None or p[1] is not None}
    if not pairs:
        raise InputError("openimages: give --train-labels/--train-images and/or --test-labels/--test-images")
    rejects, skipped, splits, ignored = [], [], {}, {}
    for split, (lpath, ipath) in pairs.items():
        lpath = _need_file(lpath, f"--{split}-labels")
        idir = _need_dir(ipath, f"--{split}-images")
        img_index: dict[str, int] = {}
        rows_img, rows_col, rows_val, rows_line = array("q"), array("i"), array("b"), array("q")
        n_ignored = 0
        with open(lpath, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            need = ("ImageID", "LabelName", "Confidence")
            if header is None or not all(h in header for h in need):
                raise InputError(f"{lpath}:1: header must name the columns {', '.join(need)} (got {header})")
            ci, cl, cc = (header.index(h) for h in need)
            width = len(header)
            for n, row in enumerate(reader, 2):
                if len(row) != width:
                    rejects.append(Reject(str(lpath), "malformed_row", f"{len(row)} fields, expected {width}",
                                          line=n, split=split))
                    continue
                image, label, conf = row[ci].strip(), row[cl].strip(), row[cc].strip()
                value = {"1": POS, "0": NEG, "1.0": POS, "0.0": NEG}.get(conf)
                if not image or value is None:
                    rejects.append(Reject(str(lpath), "malformed_row", f"needs an ImageID and Confidence 0 or 1 "
                                          f"(got {image!r}, {conf!r})", line=n, split=split))
                    continue
                if label not in col:
                    if label in desc:
                        n_ignored += 1
                    else:
                        rejects.append(Reject(str(lpath), "unknown_class", f"unknown class id {label!r}",
                                              line=n, split=split))
                    continue
                rows_img.append(img_index.setdefault(image, len(img_index)))
                rows_col.append(col[label])
                rows_val.append(value)
                rows_line.append(n)
        ignored[split] = n_ignored
        img = np.frombuffer(rows_img, np.int64) if len(rows_img) else np.zeros(0, np.int64)
        cols = np.frombuffer(rows_col, np.int32) if len(rows_col) else np.zeros(0, np.int32)
        vals = np.frombuffer(rows_val, np.int8) if len(rows_val) else np.zeros(0, np.int8)
        lines = np.frombuffer(rows_line, np.int64) if len(rows_line) else np.zeros(0, np.int64)
        order = np.lexsort((lines, cols, img))  # by image, class, then file order
        img, cols, vals, lines = img[order], cols[order], vals[order], lines[order]
        names = list(img_index)
        dup = np.zeros(len(img), bool)
        dup[1:] = (img[1:] == img[:-1]) & (cols[1:] == cols[:-1])
        for k in np.flatnonzero(dup):
            rejects.append(Reject(str(lpath), "duplicate", f"duplicate label row for image {names[img[k]]} "
                                  f"class {mids[cols[k]]} (first row kept)", line=int(lines[k]), split=split))
        img, cols, vals = img[~dup], cols[~dup], vals[~dup]
        counts = np.bincount(img, minlength=len(names))
        by_name = np.asarray(sorted(range(len(names)), key=names.__getitem__), np.int64)
        starts = np.zeros(len(names) + 1, np.int64)
        np.cumsum(counts, out=starts[1:])
        indptr = np.zeros(len(names) + 1, np.int64)
        np.cumsum(counts[by_name], out=indptr[1:])
        take = _ranges(starts[by_name], counts[by_name])
        keys = [f"{names[i]}.jpg" for i in by_name]
        splits[split] = SplitInputs([str(idir / k) for k in keys], keys, indptr, cols[take], vals[take], MISSING)
    args = {k: str(v) for k, v in dict(train_labels=train_labels, train_images=train_images,
                                       test_labels=test_labels, test_images=test_images,
                                       class_descriptions=class_descriptions, trainable=trainable).items()
            if v is not None}
    return Source("openimages", args, [desc[m] for m in mids], mids, splits, rejects, skipped,
                  notes={"label_rows_outside_class_list": ignored})


# ----------------------------------------------------------------------------------------------
# NUS-WIDE


def _nus_rel(text: str) -> str:
    """``C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg`` or ``actor\\0001_...jpg`` → ``actor/0001_...jpg``."""
    parts = PureWindowsPath(text.strip()).parts if "\\" in text else Path(text.strip()).parts
    return "/".join(parts[-2:])


def parse_nuswide(image_list=None, labels_dir=None, train_list=None, test_list=None, images=None, *,
                  concepts=None, keep_empty: bool = False) -> Source:
    """NUS-WIDE: ``Imagelist.txt`` (all images, in label-file order), the 81 files
    ``Labels_<concept>.txt`` (one 0/1 per line, aligned with the image list), the train/test
    image lists, and the image root (paths are matched on their last two components,
    ``concept/file.jpg``). Full labels; images without positives skipped unless ``keep_empty``."""
    lpath = _need_file(image_list, "--image-list")
    ldir = _need_dir(labels_dir, "--labels-dir")
    root = _need_dir(images, "--images")
    if concepts is not None:
        cpath = _need_file(concepts, "--concepts")
        names = [t for _, t in _lines(cpath)]
    else:
        names = sorted(p.name[len("Labels_"):-len(".txt")] for p in ldir.glob("Labels_*.txt"))
    if not names:
        raise InputError(f"{ldir}: no Labels_<concept>.txt files")
    rejects, skipped = [], []
    entries = [(n, _nus_rel(t)) for n, t in _lines(lpath)]
    with open(lpath, "rb") as f:
        total_lines = sum(1 for _ in f)
    bad_rows = np.zeros(total_lines, bool)
    labels = np.zeros((total_lines, len(names)), np.int8)
    for j, name in enumerate(names):
        fpath = ldir / f"Labels_{name}.txt"
        if not fpath.is_file():
            raise InputError(f"{fpath}: missing label file for concept {name!r}")
        with open(fpath, "rb") as f:
            values = np.array([r.strip()[:20] for r in f], dtype="S20")
        if len(values) != total_lines:
            raise InputError(f"{fpath}: {len(values)} lines but {lpath} has {total_lines}; they must align")
        ones = values == b"1"
        labels[ones, j] = 1
        for n in np.flatnonzero(~ones & (values != b"0")):
            if not bad_rows[n]:
                bad_rows[n] = True
                rejects.append(Reject(str(fpath), "malformed_row", f"label must be 0 or 1, got {values[n]!r}",
                                      line=int(n) + 1))
    split_of = {}
    for split, path in (("train", train_list), ("test", test_list)):
        if path is None:
            continue
        spath = _need_file(path, f"--{split}-list")
        for n, t in _lines(spath):
            rel = _nus_rel(t)
            if rel in split_of:
                rejects.append(Reject(str(spath), "duplicate", f"{rel} already listed in the {split_of[rel]} "
                                      "list (first kept)", line=n, split=split))
            else:
                split_of[rel] = split
    if not split_of:
        raise InputError("nuswide: give --train-list and/or --test-list")
    seen, builders = set(), {s: [] for s in sorted(set(split_of.values()))}
    for n, rel in entries:
        if rel in seen:
            rejects.append(Reject(str(lpath), "duplicate", f"{rel} listed twice (first kept)", line=n))
            continue
        seen.add(rel)
        if bad_rows[n - 1] or rel not in split_of:
            continue
        split = split_of[rel]
        builders[split].append((str(root / rel), rel, np.flatnonzero(labels[n - 1]).tolist(), ()))
    for rel, split in split_of.items():
        if rel not in seen:
            rejects.append(Reject(str(train_list if split == "train" else test_list), "unknown_image",
                                  f"{rel} is not in {lpath}", key=rel, split=split))
    splits = {}
    for split, rows in builders.items():
        b = SplitBuilder()
        for row in _drop_empty(rows, keep_empty, split, str(lpath), skipped):
            b.add(*row)
        splits[split] = b.finish(NEG)
    args = {k: str(v) for k, v in dict(image_list=image_list, labels_dir=labels_dir, train_list=train_list,
                                       test_list=test_list, images=images, concepts=concepts).items()
            if v is not None}
    args["keep_empty"] = keep_empty
    return Source("nuswide", args, names, names, splits, rejects, skipped)


# ----------------------------------------------------------------------------------------------
# CUB-200-2011


def parse_cub(root=None, *, attributes=None) -> Source:
    """CUB-200-2011: ``images.txt`` (id, path under ``images/``), ``train_test_split.txt``
    (id, 1 = train), ``attributes/image_attribute_labels.txt`` (image id, attribute id,
    is_present, certainty, time) → 312 binary attributes, full labels (absent = negative);
    names from ``attributes.txt`` (searched in the root, ``attributes/`` and its parent)."""
    root = _need_dir(root, "--root")
    if attributes is None:
        for cand in (root / "attributes.txt", root / "attributes" / "attributes.txt", root.parent / "attributes.txt"):
            if cand.is_file():
                attributes = cand
                break
    apath = _need_file(attributes, "--attributes (attributes.txt)")
    attr_ids, names = [], []
    for n, t in _lines(apath):
        parts = t.split(maxsplit=1)
        if len(parts) != 2 or _int(parts[0]) is None:
            raise InputError(f"{apath}:{n}: expected '<attribute id> <name>'")
        attr_ids.append(_int(parts[0]))
        names.append(parts[1])
    col = {a: j for j, a in enumerate(attr_ids)}
    rejects = []
    ipath = _need_file(root / "images.txt", "images.txt")
    images = {}
    for n, t in _lines(ipath):
        parts = t.split()
        iid = _int(parts[0]) if len(parts) == 2 else None
        if iid is None:
            rejects.append(Reject(str(ipath), "malformed_row", "expected '<image id> <path>'", line=n))
        elif iid in images:
            rejects.append(Reject(str(ipath), "duplicate", f"duplicate image id {iid} (first kept)", line=n))
        else:
            images[iid] = parts[1]
    spath = _need_file(root / "train_test_split.txt", "train_test_split.txt")
    split_of = {}
    for n, t in _lines(spath):
        parts = t.split()
        iid = _int(parts[0]) if len(parts) == 2 else None
        flag = _int(parts[1]) if len(parts) == 2 else None
        if iid is None or flag not in (0, 1):
            rejects.append(Reject(str(spath), "malformed_row", "expected '<image id> <1 train | 0 test>'", line=n))
        elif iid not in images:
            rejects.append(Reject(str(spath), "unknown_image", f"image id {iid} is not in images.txt", line=n))
        elif iid in split_of:
            rejects.append(Reject(str(spath), "duplicate", f"image id {iid} listed twice (first kept)", line=n))
        else:
            split_of[iid] = "train" if flag == 1 else "test"
    lpath = _need_file(root / "attributes" / "image_attribute_labels.txt", "image_attribute_labels.txt")
    pos: dict[int, set] = {}
    for n, t in _lines(lpath):
        parts = t.split()
        # The official file has a few rows with an extra field; the first three are what count.
        iid, aid, present = ((_int(parts[0]), _int(parts[1]), _int(parts[2])) if 4 <= len(parts) <= 6
                             else (None, None, None))
        if iid is None or aid is None or present not in (0, 1):
            rejects.append(Reject(str(lpath), "malformed_row", "expected '<image id> <attribute id> <0|1> "
                                  "<certainty> <time>'", line=n))
        elif aid not in col:
            rejects.append(Reject(str(lpath), "unknown_class", f"unknown attribute id {aid}", line=n))
        elif iid not in images:
            rejects.append(Reject(str(lpath), "unknown_image", f"image id {iid} is not in images.txt", line=n))
        elif present:
            pos.setdefault(iid, set()).add(col[aid])
    builders = {}
    for iid, rel in images.items():
        split = split_of.get(iid)
        if split is None:
            rejects.append(Reject(str(spath), "unknown_image", f"image id {iid} has no train/test flag",
                                  key=str(iid)))
            continue
        builders.setdefault(split, SplitBuilder()).add(str(root / "images" / rel), rel, sorted(pos.get(iid, ())))
    splits = {s: b.finish(NEG) for s, b in sorted(builders.items())}
    return Source("cub", {"root": str(root), "attributes": str(apath)}, names, attr_ids, splits, rejects, [])


# ----------------------------------------------------------------------------------------------
# generic csv / jsonl


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
    files = {s: _need_file(p, f"--{s}") for s, p in (("train", train), ("test", test)) if p is not None}
    if not files:
        raise InputError(f"{fmt}: give --train and/or --test")
    names = None
    if classes is not None:
        cpath = _need_file(classes, "--classes")
        names = [t for _, t in _lines(cpath)]
        if len(set(names)) != len(names):
            raise InputError(f"{cpath}: duplicate class names")
    rejects = []
    raw = {}  # split -> [(line, path, pos names, neg names)]
    has_neg = False
    for split, path in files.items():
        rows = raw[split] = []
        if fmt == "csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                header = [h.strip().lower() for h in next(reader, [])]
                if "path" not in header or "positives" not in header:
                    raise InputError(f"{path}:1: header must name the columns path,positives[,negatives] "
                                     f"(got {header})")
                ip, ipos = header.index("path"), header.index("positives")
                ineg = header.index("negatives") if "negatives" in header else None
                has_neg |= ineg is not None
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
        else:
            for n, text in _lines(path):
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
    if names is None:
        seen = {c for rows in raw.values() for r in rows for c in (*r[2], *r[3]) if isinstance(c, str)}
        names = sorted(seen)
        if not names:
            raise InputError(f"{fmt}: no class names in the lists and no --classes file")
    col = {c: j for j, c in enumerate(names)}
    state = {"negative": NEG, "missing": MISSING}[unlisted or ("missing" if has_neg else "negative")]
    splits = {}
    seen_paths = {}
    for split, rows in raw.items():
        path = files[split]
        root = Path(images) if images is not None else path.parent
        b = SplitBuilder()
        for n, rel, pos, neg in rows:
            where = dict(line=n, split=split)
            if not rel:
                rejects.append(Reject(str(path), "malformed_row", "empty path", **where))
                continue
            try:
                pos_i = [_class_index(c, col, len(names)) for c in pos]
                neg_i = [_class_index(c, col, len(names)) for c in neg]
            except KeyError as e:
                rejects.append(Reject(str(path), "unknown_class", f"unknown class {e.args[0]!r}", **where))
                continue
            both = set(pos_i) & set(neg_i)
            if both:
                rejects.append(Reject(str(path), "malformed_row", f"classes both positive and negative: "
                                      f"{[names[j] for j in sorted(both)]}", **where))
                continue
            if rel in seen_paths:
                rejects.append(Reject(str(path), "duplicate", f"image {rel} already listed at {seen_paths[rel]} "
                                      "(first kept)", **where))
                continue
            seen_paths[rel] = f"{path}:{n}"
            b.add(str(root / rel), rel, sorted(set(pos_i)), sorted(set(neg_i)))
        splits[split] = b.finish(state)
    args = {k: str(v) for k, v in dict(train=train, test=test, classes=classes, images=images).items()
            if v is not None}
    args["unlisted"] = "missing" if state == MISSING else "negative"
    return Source(fmt, args, names, names, splits, rejects, [])


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

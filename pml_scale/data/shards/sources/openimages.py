"""Open Images image-level label CSVs: the dataset's own partial labels (unlisted = missing)."""

from __future__ import annotations

import csv
from array import array
from pathlib import Path

import numpy as np

from .base import (MISSING, NEG, POS, InputError, Reject, Source, SplitInputs, given_args, need_dir, need_file,
                   ranges)


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
    desc = dict(_read_class_table(need_file(class_descriptions, "--class-descriptions")))
    mids = _trainable(trainable, desc, class_descriptions) if trainable is not None else list(desc)
    col = {m: j for j, m in enumerate(mids)}
    pairs = {"train": (train_labels, train_images), "test": (test_labels, test_images)}
    pairs = {s: p for s, p in pairs.items() if p[0] is not None or p[1] is not None}
    if not pairs:
        raise InputError("openimages: give --train-labels/--train-images and/or --test-labels/--test-images")
    rejects, skipped, splits, ignored = [], [], {}, {}
    for split, (lpath, ipath) in pairs.items():
        lpath = need_file(lpath, f"--{split}-labels")
        idir = need_dir(ipath, f"--{split}-images")
        rows, names, ignored[split] = _label_rows(lpath, split, col, desc, rejects)
        splits[split] = _split_inputs(rows, names, mids, lpath, idir, split, rejects)
    args = given_args(train_labels=train_labels, train_images=train_images, test_labels=test_labels,
                      test_images=test_images, class_descriptions=class_descriptions, trainable=trainable)
    return Source("openimages", args, [desc[m] for m in mids], mids, splits, rejects, skipped,
                  notes={"label_rows_outside_class_list": ignored})


def _trainable(trainable, desc: dict, class_descriptions) -> list[str]:
    """The trainable class ids in the list's order, each one described, none repeated."""
    tpath = need_file(trainable, "--trainable")
    mids = [m for m, _ in _read_class_table(tpath)]
    unknown = [m for m in mids if m not in desc]
    if unknown:
        raise InputError(f"{tpath}: classes not in {class_descriptions}: {unknown[:5]}")
    if len(set(mids)) != len(mids):
        raise InputError(f"{tpath}: duplicate class ids")
    return mids


def _label_rows(lpath: Path, split: str, col: dict, desc: dict, rejects: list):
    """((image index, column, state, line) arrays of the usable rows, image ids in first-seen order,
    rows of known classes outside the class list)."""
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
    arrays = tuple(np.frombuffer(a, dt) if len(a) else np.zeros(0, dt)
                   for a, dt in ((rows_img, np.int64), (rows_col, np.int32), (rows_val, np.int8), (rows_line, np.int64)))
    return arrays, list(img_index), n_ignored


def _split_inputs(rows, names: list[str], mids: list[str], lpath: Path, idir: Path, split: str,
                  rejects: list) -> SplitInputs:
    """The split's CSR inputs, images in name order; a repeated (image, class) row keeps its first."""
    img, cols, vals, lines = rows
    order = np.lexsort((lines, cols, img))  # by image, class, then file order
    img, cols, vals, lines = img[order], cols[order], vals[order], lines[order]
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
    take = ranges(starts[by_name], counts[by_name])
    keys = [f"{names[i]}.jpg" for i in by_name]
    return SplitInputs([str(idir / k) for k in keys], keys, indptr, cols[take], vals[take], MISSING)

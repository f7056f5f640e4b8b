"""NUS-WIDE: an image list, one 0/1 label file per concept, train/test lists."""

from __future__ import annotations

from pathlib import Path, PureWindowsPath

import numpy as np

from .base import (NEG, InputError, Reject, Source, SplitBuilder, drop_empty, given_args, need_dir, need_file,
                   text_lines)


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
    lpath = need_file(image_list, "--image-list")
    ldir = need_dir(labels_dir, "--labels-dir")
    root = need_dir(images, "--images")
    names = _concepts(concepts, ldir)
    rejects, skipped = [], []
    entries = [(n, _nus_rel(t)) for n, t in text_lines(lpath)]
    labels, bad_rows = _concept_labels(lpath, ldir, names, rejects)
    split_of = _split_lists(train_list, test_list, rejects)
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
        for row in drop_empty(rows, keep_empty, split, str(lpath), skipped):
            b.add(*row)
        splits[split] = b.finish(NEG)
    args = given_args(image_list=image_list, labels_dir=labels_dir, train_list=train_list, test_list=test_list,
                      images=images, concepts=concepts)
    args["keep_empty"] = keep_empty
    return Source("nuswide", args, names, names, splits, rejects, skipped)


def _concepts(concepts, ldir: Path) -> list[str]:
    """Concept names: the --concepts file's order, else the Labels_<concept>.txt files' sorted."""
    if concepts is not None:
        names = [t for _, t in text_lines(need_file(concepts, "--concepts"))]
    else:
        names = sorted(p.name[len("Labels_"):-len(".txt")] for p in ldir.glob("Labels_*.txt"))
    if not names:
        raise InputError(f"{ldir}: no Labels_<concept>.txt files")
    return names


def _concept_labels(lpath: Path, ldir: Path, names: list[str], rejects: list) -> tuple[np.ndarray, np.ndarray]:
    """(int8 (lines, concepts) labels aligned with the image list, bool rows holding a value other than 0/1)."""
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
    return labels, bad_rows


def _split_lists(train_list, test_list, rejects: list) -> dict[str, str]:
    """{concept/file.jpg: "train" | "test"} from the split lists (the first listing kept)."""
    split_of = {}
    for split, path in (("train", train_list), ("test", test_list)):
        if path is None:
            continue
        spath = need_file(path, f"--{split}-list")
        for n, t in text_lines(spath):
            rel = _nus_rel(t)
            if rel in split_of:
                rejects.append(Reject(str(spath), "duplicate", f"{rel} already listed in the {split_of[rel]} "
                                      "list (first kept)", line=n, split=split))
            else:
                split_of[rel] = split
    if not split_of:
        raise InputError("nuswide: give --train-list and/or --test-list")
    return split_of

"""CUB-200-2011: 312 binary attributes per image as the label space."""

from __future__ import annotations

from .base import NEG, InputError, Reject, Source, SplitBuilder, as_int, need_dir, need_file, text_lines


def parse_cub(root=None, *, attributes=None) -> Source:
    """CUB-200-2011: ``images.txt`` (id, path under ``images/``), ``train_test_split.txt``
    (id, 1 = train), ``attributes/image_attribute_labels.txt`` (image id, attribute id,
    is_present, certainty, time) → 312 binary attributes, full labels (absent = negative);
    names from ``attributes.txt`` (searched in the root, ``attributes/`` and its parent)."""
    root = need_dir(root, "--root")
    apath = need_file(_find_attributes(root) if attributes is None else attributes, "--attributes (attributes.txt)")
    attr_ids, names = _attribute_names(apath)
    col = {a: j for j, a in enumerate(attr_ids)}
    rejects = []
    images = _images(need_file(root / "images.txt", "images.txt"), rejects)
    spath = need_file(root / "train_test_split.txt", "train_test_split.txt")
    split_of = _split_flags(spath, images, rejects)
    lpath = need_file(root / "attributes" / "image_attribute_labels.txt", "image_attribute_labels.txt")
    pos = _present_attributes(lpath, col, images, rejects)
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


def _find_attributes(root):
    """attributes.txt in the root, in ``attributes/`` or in the root's parent (None: not found)."""
    for cand in (root / "attributes.txt", root / "attributes" / "attributes.txt", root.parent / "attributes.txt"):
        if cand.is_file():
            return cand
    return None


def _attribute_names(apath) -> tuple[list[int], list[str]]:
    attr_ids, names = [], []
    for n, t in text_lines(apath):
        parts = t.split(maxsplit=1)
        if len(parts) != 2 or as_int(parts[0]) is None:
            raise InputError(f"{apath}:{n}: expected '<attribute id> <name>'")
        attr_ids.append(as_int(parts[0]))
        names.append(parts[1])
    return attr_ids, names


def _images(ipath, rejects: list) -> dict[int, str]:
    """{image id: path under images/} from images.txt (the first of a repeated id kept)."""
    images = {}
    for n, t in text_lines(ipath):
        parts = t.split()
        iid = as_int(parts[0]) if len(parts) == 2 else None
        if iid is None:
            rejects.append(Reject(str(ipath), "malformed_row", "expected '<image id> <path>'", line=n))
        elif iid in images:
            rejects.append(Reject(str(ipath), "duplicate", f"duplicate image id {iid} (first kept)", line=n))
        else:
            images[iid] = parts[1]
    return images


def _split_flags(spath, images: dict, rejects: list) -> dict[int, str]:
    """{image id: "train" | "test"} from train_test_split.txt."""
    split_of = {}
    for n, t in text_lines(spath):
        parts = t.split()
        iid = as_int(parts[0]) if len(parts) == 2 else None
        flag = as_int(parts[1]) if len(parts) == 2 else None
        if iid is None or flag not in (0, 1):
            rejects.append(Reject(str(spath), "malformed_row", "expected '<image id> <1 train | 0 test>'", line=n))
        elif iid not in images:
            rejects.append(Reject(str(spath), "unknown_image", f"image id {iid} is not in images.txt", line=n))
        elif iid in split_of:
            rejects.append(Reject(str(spath), "duplicate", f"image id {iid} listed twice (first kept)", line=n))
        else:
            split_of[iid] = "train" if flag == 1 else "test"
    return split_of


def _present_attributes(lpath, col: dict, images: dict, rejects: list) -> dict[int, set]:
    """{image id: label columns of its present attributes} from image_attribute_labels.txt."""
    pos: dict[int, set] = {}
    for n, t in text_lines(lpath):
        parts = t.split()
        # The official file has a few rows with an extra field; the first three are what count.
        iid, aid, present = ((as_int(parts[0]), as_int(parts[1]), as_int(parts[2])) if 4 <= len(parts) <= 6
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
    return pos

"""COCO instances JSON (2014/2017): one class per category, full labels."""

from __future__ import annotations

from .base import (NEG, InputError, Reject, Source, SplitBuilder, drop_empty, given_args, load_json, need_dir,
                   need_file)


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
        jpath = need_file(jpath, f"--{split}-json")
        idir = need_dir(ipath, f"--{split}-images")
        data = _load_instances(jpath)
        cats = _same_categories(cats, _categories(data, jpath), jpath)
        images = _images(data, jpath, split, rejects)
        labels = _labels(data, jpath, split, cats, images, rejects)
        col = {cid: j for j, cid in enumerate(sorted(cats))}
        rows = ((str(idir / name), name, sorted(col[c] for c in labels.get(iid, ())), ())
                for iid, name in images.items())
        b = SplitBuilder()
        for row in drop_empty(rows, keep_empty, split, str(jpath), skipped):
            b.add(*row)
        splits[split] = b.finish(NEG)
    ids = sorted(cats)
    args = given_args(train_json=train_json, train_images=train_images, test_json=test_json, test_images=test_images)
    args["keep_empty"] = keep_empty
    return Source("coco", args, [cats[c] for c in ids], ids, splits, rejects, skipped)


def _load_instances(jpath) -> dict:
    data = load_json(jpath)
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise InputError(f"{jpath}: not a COCO instances file (needs keys images, annotations, categories)")
    return data


def _categories(data: dict, jpath) -> dict[int, str]:
    """{category id: name}; a malformed entry stops the parse (the class list must be whole)."""
    these = {}
    for i, c in enumerate(data["categories"]):
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, int) or not isinstance(c.get("name"), str):
            raise InputError(f"{jpath}: categories[{i}]: needs an integer 'id' and a string 'name'")
        these[cid] = c["name"]
    if not these:
        raise InputError(f"{jpath}: no categories")
    return these


def _same_categories(cats: dict | None, these: dict, jpath) -> dict:
    if cats is not None and these != cats:
        raise InputError(f"{jpath}: categories differ from the train file's; both splits need one class list")
    return these if cats is None else cats


def _images(data: dict, jpath, split: str, rejects: list) -> dict[int, str]:
    """{image id: file name}, malformed and repeated entries rejected (the first of a repeat kept)."""
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
    return images


def _labels(data: dict, jpath, split: str, cats: dict, images: dict, rejects: list) -> dict[int, set]:
    """{image id: category ids of its annotations}; annotations naming no known image or class rejected."""
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
    return labels

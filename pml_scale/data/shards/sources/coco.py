"""COCO instances JSON (2014/2017): one class per category, full labels."""

from __future__ import annotations

from .base import NEG, InputError, Reject, Source, SplitBuilder, drop_empty, load_json, need_dir, need_file


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
        data = load_json(jpath)
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
        for row in drop_empty(rows, keep_empty, split, str(jpath), skipped):
            b.add(*row)
        splits[split] = b.finish(NEG)
    ids = sorted(cats)
    args = {k: str(v) for k, v in dict(train_json=train_json, train_images=train_images, test_json=test_json,
                                       test_images=test_images).items() if v is not None}
    args["keep_empty"] = keep_empty
    return Source("coco", args, [cats[c] for c in ids], ids, splits, rejects, skipped)

"""An Open Images-shaped dataset, generated: the real V6 file layout, any number of classes and
images, long-tailed and natively partial, then converted by the real ``convert openimages`` path.

Why: Open Images itself (5.6M images, 9,605 trainable classes) cannot be downloaded here; what
matters for the pipeline is its *shape*: thousands of classes with a Zipf-like tail, about 2.4
verified positives and 2.6 verified negatives per image, every other class missing, in train
and test alike. Written files (``OUT/openimages-raw/``), as Open Images ships them:

    class-descriptions.csv                 LabelName,DisplayName (header; more MIDs than trainable)
    classes-trainable.txt                  one MID per line, the label order
    {split}-annotations-human-imagelabels.csv   ImageID,Source,LabelName,Confidence (1 or 0),
                                           sorted by ImageID; a few rows name non-trainable MIDs
    {split}/{ImageID}.jpg                  small RGB JPEGs

Pictures: each class has a fixed 4x4 colour tile (seeded by the class), drawn enlarged at a random
place for every *true* positive of an image on a noisy background, so a network can learn it.
True positives per image: 1 + Poisson(pos_mean / keep - 1); each is verified (listed, Confidence
1) with probability ``keep`` (at least one per image), the rest stay unlisted (missing although
present, as in Open Images). Negatives: Poisson(neg_mean) classes not in the image, drawn by class
frequency (frequent classes get verified absent more often), listed with Confidence 0.
Deterministic in ``seed``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

RAW = "openimages-raw"
KEEP = 0.83  # share of an image's true positives that are verified (listed)


def _mid(k: int) -> str:
    """A MID-like class id (``/m/0`` + base-36 digits), unique per k."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    s, k = "", k + 36 ** 3
    while k:
        k, r = divmod(k, 36)
        s = digits[r] + s
    return f"/m/0{s}"


def class_weights(num_classes: int, zipf_s: float = 1.0) -> np.ndarray:
    """Zipf-like class frequencies (class 0 the most frequent): the long tail of Open Images."""
    w = 1.0 / np.arange(1, num_classes + 1, dtype=np.float64) ** zipf_s
    return w / w.sum()


def _tiles(num_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    return rng.integers(0, 256, size=(num_classes, 4, 4, 3), dtype=np.uint8)


def _image(rng, tiles: np.ndarray, classes: np.ndarray, size: int) -> bytes:
    from PIL import Image

    canvas = rng.integers(90, 150, size=(size, size, 3), dtype=np.uint8)
    side = max(4, size // 3)
    for c in classes:
        tile = np.kron(tiles[c], np.ones((-(-side // 4), -(-side // 4), 1), np.uint8))[:side, :side]
        y, x = rng.integers(0, size - side + 1, size=2)
        canvas[y:y + side, x:x + side] = tile
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_openimages_like(out, *, num_classes: int = 9605, n_train: int = 20000, n_test: int = 2000,
                          size: int = 48, seed: int = 0, pos_mean: float = 2.4, neg_mean: float = 2.6,
                          zipf_s: float = 1.0, extra_classes: float = 0.1) -> dict:
    """Write the raw Open Images-format files under ``out`` (see the module docstring); returns the
    arguments ``parse_openimages`` takes for them."""
    if num_classes < 2 or n_train < 1 or n_test < 0 or size < 8:
        raise ValueError(f"openimages-like: need num_classes >= 2, n_train >= 1, n_test >= 0, size >= 8; got "
                         f"{num_classes}, {n_train}, {n_test}, {size}")
    if not (0 < pos_mean and 0 <= neg_mean):
        raise ValueError(f"openimages-like: pos_mean must be > 0 and neg_mean >= 0, got {pos_mean}, {neg_mean}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_extra = int(round(extra_classes * num_classes))
    mids = [_mid(k) for k in range(num_classes + n_extra)]
    order = np.random.default_rng(np.random.SeedSequence([seed, 1])).permutation(len(mids))
    with open(out / "class-descriptions.csv", "w", newline="") as f:  # descriptions list MIDs in their own order
        w = csv.writer(f)
        w.writerow(["LabelName", "DisplayName"])
        for k in order:
            w.writerow([mids[k], f"class {k}"])
    (out / "classes-trainable.txt").write_text("".join(m + "\n" for m in mids[:num_classes]))
    weights = class_weights(num_classes, zipf_s)
    tiles = _tiles(num_classes, seed)
    args = {"class_descriptions": out / "class-descriptions.csv", "trainable": out / "classes-trainable.txt"}
    for split, n, sub in (("train", n_train, 2), ("test", n_test, 3)):
        if n == 0:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, sub]))
        idir = out / split
        idir.mkdir(exist_ok=True)
        rows = []
        for i in range(n):
            image_id = f"{int(rng.integers(0, 2 ** 63)):016x}"[:16]
            k_true = min(num_classes, 1 + rng.poisson(max(pos_mean / KEEP - 1.0, 0.0)))
            true = rng.choice(num_classes, size=k_true, replace=False, p=weights)
            listed = true[rng.random(k_true) < KEEP]
            if listed.size == 0:
                listed = true[:1]
            k_neg = min(rng.poisson(neg_mean), num_classes - k_true)
            neg = np.zeros(0, np.int64)
            if k_neg:
                p = weights.copy()
                p[true] = 0
                neg = rng.choice(num_classes, size=k_neg, replace=False, p=p / p.sum())
            (idir / f"{image_id}.jpg").write_bytes(_image(rng, tiles, true, size))
            src = "verification" if i % 3 else "crowdsource-verified"
            rows += [(image_id, src, mids[c], "1") for c in listed]
            rows += [(image_id, src, mids[c], "0") for c in neg]
            if n_extra and rng.random() < 0.05:  # a label of a class outside the trainable list
                rows.append((image_id, "verification", mids[num_classes + int(rng.integers(n_extra))], "1"))
        rows.sort(key=lambda r: r[0])
        lpath = out / f"{split}-annotations-human-imagelabels.csv"
        with open(lpath, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageID", "Source", "LabelName", "Confidence"])
            w.writerows(rows)
        args[f"{split}_labels"], args[f"{split}_images"] = lpath, idir
    return args


def build_openimages_like(out, *, num_classes: int = 9605, n_train: int = 20000, n_test: int = 2000,
                          size: int = 48, seed: int = 0, shard_size: int = 1000, workers: int = 1,
                          labels_form: str = "auto", progress: bool = False) -> dict:
    """Generate the raw files in ``out/openimages-raw`` (kept: ``pml-shard convert openimages`` can
    be rerun on them) and convert them into ``out`` through ``parse_openimages`` + ``convert``, the
    path real Open Images takes. Rerunning on a finished folder is a no-op. Returns the manifest."""
    from ..data.shards.convert import convert
    from ..data.shards.format import MANIFEST
    from ..data.shards.sources import parse_openimages

    out = Path(out)
    if (out / MANIFEST).exists():
        import json

        return json.loads((out / MANIFEST).read_text())
    args = write_openimages_like(out / RAW, num_classes=num_classes, n_train=n_train, n_test=n_test, size=size,
                                 seed=seed)
    source = parse_openimages(args.get("train_labels"), args.get("train_images"), args.get("test_labels"),
                              args.get("test_images"), class_descriptions=args["class_descriptions"],
                              trainable=args["trainable"])
    return convert(source, out, workers=workers, shard_size=shard_size, progress=progress,
                   labels_form=labels_form, log=lambda *_: None)

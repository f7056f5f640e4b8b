"""The embedded demo dataset: real handwritten digits composed into multi-label colour images.

Why: every part of the system (sharding, loaders, loss, training, mAP) needs a real dataset
that ships with the code, trains on 2 CPU cores in minutes, and has the statistics that make
the paper's problem hard: COCO-like ~2.9 positives out of 80 classes per image and a long tail.

Classes: 10 digits x 8 colours = 80 (``"7-red"``), drawn per image without replacement with
Zipf weights over a seeded class ranking; 1..6 digits per image (1 + Poisson(1.95), truncated).
Digits are scikit-learn's ``load_digits`` (1797 real 8x8 scans): indices [0, 898) feed train,
[898, 1797) test, so no scan appears in both. Each digit is upscaled ~3x with random scale and
placement on a textured background; JPEG quality 90. The images are written as a COCO
instances JSON + JPEG folder and converted through the same ``coco`` path as real data.
Time and memory grow linearly with ``n_train + n_test`` (one image at a time).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (70, 100, 255), "yellow": (240, 220, 40),
           "cyan": (40, 220, 230), "magenta": (225, 60, 225), "orange": (255, 140, 0), "white": (240, 240, 240)}
NUM_DIGITS = 10
NUM_CLASSES = NUM_DIGITS * len(COLOURS)
DIGIT_SPLIT = 898  # load_digits indices below: train writers; from here: test
ZIPF_S = 1.0
EXTRA_DIGITS_MEAN = 1.95  # 1 + Poisson(1.95), truncated to 1..6: ~2.9 positives per image
MAX_DIGITS = 6


def class_names() -> list[str]:
    return [f"{d}-{c}" for d in range(NUM_DIGITS) for c in COLOURS]


def category_id(cls: int) -> int:
    """COCO-style sparse category ids (gaps, like COCO's 1..90), in class order."""
    d, c = divmod(cls, len(COLOURS))
    return 1 + d * 10 + c


def class_weights(rng: np.random.Generator) -> np.ndarray:
    """Zipf weights 1/rank^s over a seeded permutation of the 80 classes (the long tail)."""
    ranks = rng.permutation(NUM_CLASSES) + 1
    w = 1.0 / ranks.astype(np.float64) ** ZIPF_S
    return w / w.sum()


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark smooth colour texture plus fine grain: digits must be found, not thresholded."""
    coarse = rng.uniform(20, 110, size=(4, 4, 3)).astype(np.uint8)
    bg = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    return bg + rng.normal(0, 8, size=(size, size, 3)).astype(np.float32)


def _place(rng, side: int, size: int, boxes: list) -> tuple[int, int]:
    """Best of 8 random positions: least overlap with the digits already placed (some overlap,
    as in real scenes, but rarely a digit hidden under another)."""
    cand = rng.integers(0, size - side + 1, size=(8, 2))
    if not boxes:
        return int(cand[0, 0]), int(cand[0, 1])
    b = np.asarray(boxes)
    ox = np.clip(np.minimum(cand[:, None, 0] + side, b[None, :, 0] + b[None, :, 2])
                 - np.maximum(cand[:, None, 0], b[None, :, 0]), 0, None)
    oy = np.clip(np.minimum(cand[:, None, 1] + side, b[None, :, 1] + b[None, :, 3])
                 - np.maximum(cand[:, None, 1], b[None, :, 1]), 0, None)
    best = int(np.argmin((ox * oy).sum(1)))
    return int(cand[best, 0]), int(cand[best, 1])


def _compose(rng, digits: np.ndarray, pool: dict, classes: list[int], size: int):
    """One image: float RGB array and (class, digit index, bbox) per placed digit."""
    img = _background(rng, size)
    placed = []
    base = 3.0 if len(classes) <= 3 else 2.4
    for cls in classes:
        d, c = divmod(cls, len(COLOURS))
        idx = int(rng.choice(pool[d]))
        side = int(round(8 * base * rng.uniform(0.85, 1.15)))
        side = min(side, size)
        alpha = Image.fromarray((digits[idx] / 16.0 * 255).astype(np.uint8)).resize((side, side),
                                                                                    Image.Resampling.BILINEAR)
        a = np.asarray(alpha, np.float32)[..., None] / 255.0
        x, y = _place(rng, side, size, [p[2] for p in placed])
        colour = np.asarray(list(COLOURS.values())[c], np.float32) * rng.uniform(0.85, 1.0)
        region = img[y:y + side, x:x + side]
        img[y:y + side, x:x + side] = region * (1 - a) + colour * a
        placed.append((cls, idx, [x, y, side, side]))
    return np.clip(img, 0, 255).astype(np.uint8), placed


def make_demo_coco(work, *, seed: int = 0, n_train: int = 2400, n_test: int = 800, size: int = 64,
                   quality: int = 90) -> dict:
    """Write ``work/{split}2017/*.jpg`` and ``work/annotations/instances_{split}2017.json``.

    Each image entry also records the ``load_digits`` indices it used (``"digits"``), so the
    train/test writer separation can be checked. Returns {split: (json path, image folder)}."""
    from sklearn.datasets import load_digits

    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an integer >= 32 (digits are ~24 px), got {size!r}")
    data = load_digits()
    digits, targets = data.images, data.target
    rng = np.random.default_rng(seed)
    weights = class_weights(rng)
    work = Path(work)
    (work / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": category_id(k), "name": n, "supercategory": n.split("-")[0]} for k, n in enumerate(class_names())]
    out = {}
    for split, n, lo, hi in (("train", n_train, 0, DIGIT_SPLIT), ("test", n_test, DIGIT_SPLIT, len(digits))):
        idir = work / f"{split}2017"
        idir.mkdir(exist_ok=True)
        pool = {d: np.flatnonzero(targets[lo:hi] == d) + lo for d in range(NUM_DIGITS)}
        srng = np.random.default_rng([seed, 1 if split == "train" else 2])
        imgs, anns = [], []
        for i in range(n):
            k = min(MAX_DIGITS, 1 + int(srng.poisson(EXTRA_DIGITS_MEAN)))
            classes = srng.choice(NUM_CLASSES, size=k, replace=False, p=weights).tolist()
            pixels, placed = _compose(srng, digits, pool, classes, size)
            iid = i + 1
            name = f"{iid:012d}.jpg"
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
            (idir / name).write_bytes(buf.getvalue())
            imgs.append({"id": iid, "file_name": name, "width": size, "height": size,
                         "digits": [p[1] for p in placed]})
            for cls, _, box in placed:
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": category_id(cls), "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0})
        jpath = work / "annotations" / f"instances_{split}2017.json"
        jpath.write_text(json.dumps({"info": {"description": "pml-scale demo digits", "seed": seed},
                                     "images": imgs, "annotations": anns, "categories": cats}))
        out[split] = (jpath, idir)
    return out


def build_demo(out, *, seed: int = 0, n_train: int = 2400, n_test: int = 800, size: int = 64,
               shard_size: int = 400, workers: int = 1, quality: int = 90, progress: bool = False) -> dict:
    """Build the demo shard folder ``out``: COCO files generated in ``out/.demo-src`` (removed
    afterwards), then the real ``coco`` converter. Deterministic in ``seed``; rerunning on a
    finished folder is a no-op. Returns the manifest."""
    from .convert import convert
    from .sources import parse_coco

    out = Path(out)
    work = out / ".demo-src"
    try:
        files = make_demo_coco(work, seed=seed, n_train=n_train, n_test=n_test, size=size, quality=quality)
        source = parse_coco(*files["train"], *files["test"])
        source.args = {"demo": {"generator": "pml_scale.data.demo", "seed": seed, "n_train": n_train,
                                "n_test": n_test, "size": size, "quality": quality}}
        return convert(source, out, workers=workers, shard_size=shard_size, quality=quality, progress=progress,
                       log=lambda *_: None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

"""The embedded demo datasets: real handwritten digits composed into multi-label colour images.

Why: every part of the system (sharding, loaders, loss, training, mAP) needs real datasets
that ship with the code, train on 2 CPU cores in minutes, and have the statistics that make
the paper's problem hard. Two of them, so that no conclusion rests on one dataset:

* ``digits`` (COCO-like): 10 digits x 8 colours = 80 classes (``"7-red"``), ~2.9 positives per
  image (1 + Poisson(1.95), truncated to 1..6), Zipf(1.0) class frequencies; 2400 / 800 images.
* ``longtail`` (NUS/Open-Images-like): 10 digits x 8 colours x 3 orientations = 240 classes
  (``"7-red-left"``: upright, or turned 90 degrees left or right), ~1.5 positives per image
  (1 + Poisson(0.5), truncated to 1..4), a steeper Zipf(1.2) tail; 3000 / 1500 images.

Classes are drawn per image without replacement with Zipf weights over a seeded class ranking.
Digits are scikit-learn's ``load_digits`` (1797 real 8x8 scans): indices [0, 898) feed train,
[898, 1797) test, so no scan appears in both. Each digit is upscaled ~3x with random scale and
placement on a textured background; JPEG quality 90. The images are written as a COCO
instances JSON + JPEG folder and converted through the same ``coco`` path as real data; the
build also pretrains the demo backbone (``demo_backbone``: the stand-in for ImageNet weights).
Time and memory grow linearly with ``n_train + n_test`` (one image at a time).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (70, 100, 255), "yellow": (240, 220, 40),
           "cyan": (40, 220, 230), "magenta": (225, 60, 225), "orange": (255, 140, 0), "white": (240, 240, 240)}
NUM_DIGITS = 10
DIGIT_SPLIT = 898  # load_digits indices below: train writers; from here: test
ORIENTATIONS = {"up": 0, "left": 1, "right": 3}  # quarter turns counter-clockwise (np.rot90)


@dataclass(frozen=True)
class DemoSpec:
    """The statistics of one embedded dataset (see the module docstring)."""

    name: str
    orientations: tuple[str, ...]  # () = upright only, no orientation in the class name
    zipf_s: float  # class frequency ∝ 1 / rank^zipf_s
    extra_digits_mean: float  # digits per image = 1 + Poisson(mean), truncated to max_digits
    max_digits: int
    n_train: int
    n_test: int

    @property
    def num_classes(self) -> int:
        return NUM_DIGITS * len(COLOURS) * max(len(self.orientations), 1)

    def class_names(self) -> list[str]:
        base = [f"{d}-{c}" for d in range(NUM_DIGITS) for c in COLOURS]
        return [f"{b}-{o}" for b in base for o in self.orientations] if self.orientations else base

    def decode(self, cls: int) -> tuple[int, int, int]:
        """(digit, colour index, quarter turns) of class ``cls``."""
        n_or = max(len(self.orientations), 1)
        base, o = divmod(int(cls), n_or)
        d, c = divmod(base, len(COLOURS))
        return d, c, (ORIENTATIONS[self.orientations[o]] if self.orientations else 0)


DATASETS = {
    "digits": DemoSpec("digits", (), zipf_s=1.0, extra_digits_mean=1.95, max_digits=6, n_train=4800, n_test=1600),
    "longtail": DemoSpec("longtail", ("up", "left", "right"), zipf_s=1.0, extra_digits_mean=0.5, max_digits=4,
                         n_train=6000, n_test=2000),
}
DIGITS = DATASETS["digits"]
NUM_CLASSES = DIGITS.num_classes
ZIPF_S = DIGITS.zipf_s
EXTRA_DIGITS_MEAN = DIGITS.extra_digits_mean
MAX_DIGITS = DIGITS.max_digits


def get_spec(dataset: str) -> DemoSpec:
    if dataset not in DATASETS:
        raise ValueError(f"unknown demo dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def class_names(dataset: str = "digits") -> list[str]:
    return get_spec(dataset).class_names()


def category_id(cls: int) -> int:
    """COCO-style sparse category ids (a gap after every 8 classes, like COCO's 1..90)."""
    return 1 + int(cls) + 2 * (int(cls) // len(COLOURS))


def class_weights(rng: np.random.Generator, num_classes: int = NUM_CLASSES, zipf_s: float = ZIPF_S) -> np.ndarray:
    """Zipf weights 1/rank^s over a seeded permutation of the classes (the long tail)."""
    ranks = rng.permutation(num_classes) + 1
    w = 1.0 / ranks.astype(np.float64) ** zipf_s
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


def _compose(rng, digits: np.ndarray, pool: dict, classes: list[int], size: int, spec: DemoSpec = DIGITS,
             digit_scale: float | None = None):
    """One image: float RGB array and (class, digit index, bbox) per placed digit. Digits are
    ~``digit_scale`` x 8 px (default: 3.0 for up to 3 digits, 2.4 for more, on a 64 px canvas)."""
    img = _background(rng, size)
    placed = []
    base = digit_scale if digit_scale is not None else (3.0 if len(classes) <= 3 else 2.4) * size / 64
    for cls in classes:
        d, c, turns = spec.decode(cls)
        idx = int(rng.choice(pool[d]))
        side = int(round(8 * base * rng.uniform(0.85, 1.15)))
        side = min(side, size)
        alpha = Image.fromarray((digits[idx] / 16.0 * 255).astype(np.uint8)).resize((side, side),
                                                                                    Image.Resampling.BILINEAR)
        a = np.rot90(np.asarray(alpha, np.float32), turns)[..., None] / 255.0
        x, y = _place(rng, side, size, [p[2] for p in placed])
        colour = np.asarray(list(COLOURS.values())[c], np.float32) * rng.uniform(0.85, 1.0)
        region = img[y:y + side, x:x + side]
        img[y:y + side, x:x + side] = region * (1 - a) + colour * a
        placed.append((cls, idx, [x, y, side, side]))
    return np.clip(img, 0, 255).astype(np.uint8), placed


def _check_sizes(n_train, n_test, size) -> None:
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an integer >= 32 (digits are ~3/8 of the side), got {size!r}")


def writer_pools(targets: np.ndarray, split: str) -> dict[int, np.ndarray]:
    """``load_digits`` indices of each digit for a split: train writers [0, 898), test the rest."""
    lo, hi = (0, DIGIT_SPLIT) if split == "train" else (DIGIT_SPLIT, len(targets))
    return {d: np.flatnonzero(targets[lo:hi] == d) + lo for d in range(NUM_DIGITS)}


def make_demo_coco(work, *, dataset: str = "digits", seed: int = 0, n_train: int | None = None,
                   n_test: int | None = None, size: int = 64, quality: int = 90) -> dict:
    """Write ``work/{split}2017/*.jpg`` and ``work/annotations/instances_{split}2017.json``.

    Each image entry also records the ``load_digits`` indices it used (``"digits"``), so the
    train/test writer separation can be checked. Returns {split: (json path, image folder)}."""
    from sklearn.datasets import load_digits

    spec = get_spec(dataset)
    n_train = spec.n_train if n_train is None else n_train
    n_test = spec.n_test if n_test is None else n_test
    _check_sizes(n_train, n_test, size)
    data = load_digits()
    digits, targets = data.images, data.target
    rng = np.random.default_rng(seed)
    weights = class_weights(rng, spec.num_classes, spec.zipf_s)
    work = Path(work)
    (work / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": category_id(k), "name": n, "supercategory": n.split("-")[0]}
            for k, n in enumerate(spec.class_names())]
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        idir = work / f"{split}2017"
        idir.mkdir(exist_ok=True)
        pool = writer_pools(targets, split)
        srng = np.random.default_rng([seed, 1 if split == "train" else 2])
        imgs, anns = [], []
        for i in range(n):
            k = min(spec.max_digits, 1 + int(srng.poisson(spec.extra_digits_mean)))
            classes = srng.choice(spec.num_classes, size=k, replace=False, p=weights).tolist()
            pixels, placed = _compose(srng, digits, pool, classes, size, spec)
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
        jpath.write_text(json.dumps({"info": {"description": f"pml-scale demo {spec.name}", "seed": seed},
                                     "images": imgs, "annotations": anns, "categories": cats}))
        out[split] = (jpath, idir)
    return out


def build_demo(out, *, dataset: str = "digits", seed: int = 0, n_train: int | None = None,
               n_test: int | None = None, size: int = 64, shard_size: int = 400, workers: int = 1,
               quality: int = 90, pretrain: bool = True, progress: bool = False) -> dict:
    """Build the demo shard folder ``out``: the pretrained demo backbone first (``pretrain``;
    ``out/pretrained/``, see ``demo_backbone``), then COCO files generated in ``out/.demo-src``
    (removed afterwards) and the real ``coco`` converter, whose manifest is written last.
    Deterministic in ``seed``; rerunning on a finished folder is a no-op. Returns the manifest."""
    from .convert import convert
    from .sources import parse_coco

    spec = get_spec(dataset)
    n_train = spec.n_train if n_train is None else n_train
    n_test = spec.n_test if n_test is None else n_test
    _check_sizes(n_train, n_test, size)
    out = Path(out)
    if pretrain:
        from .demo_backbone import ensure_backbone

        ensure_backbone(out, size=size, seed=seed, progress=progress)
    work = out / ".demo-src"
    try:
        files = make_demo_coco(work, dataset=dataset, seed=seed, n_train=n_train, n_test=n_test, size=size,
                               quality=quality)
        source = parse_coco(*files["train"], *files["test"])
        source.args = {"demo": {"generator": "pml_scale.data.demo", "dataset": spec.name, "seed": seed,
                                "n_train": n_train, "n_test": n_test, "size": size, "quality": quality}}
        return convert(source, out, workers=workers, shard_size=shard_size, quality=quality, progress=progress,
                       log=lambda *_: None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

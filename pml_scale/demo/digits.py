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
build also pretrains the demo backbone (``demo.backbone``: the stand-in for ImageNet weights).
Time and memory grow linearly with ``n_train + n_test`` (one image at a time).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .scenes import category_id, class_weights, compose, get_spec, writer_pools

# The generator's name as manifests record it (and fingerprint it) since the first build; kept
# when the module moved to pml_scale.demo, so that folders built before stay valid (not re-converted).
GENERATOR = "pml_scale.data.demo"


def _check_sizes(n_train, n_test, size) -> None:
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an integer >= 32 (digits are ~3/8 of the side), got {size!r}")


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
            pixels, placed = compose(srng, digits, pool, classes, size, spec)
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
    ``out/pretrained/``, see ``demo.backbone``), then COCO files generated in ``out/.demo-src``
    (removed afterwards) and the real ``coco`` converter, whose manifest is written last.
    Deterministic in ``seed``; rerunning on a finished folder is a no-op. Returns the manifest."""
    from ..data.shards.convert import convert
    from ..data.shards.sources import parse_coco

    spec = get_spec(dataset)
    n_train = spec.n_train if n_train is None else n_train
    n_test = spec.n_test if n_test is None else n_test
    _check_sizes(n_train, n_test, size)
    out = Path(out)
    if pretrain:
        from .backbone import ensure_backbone

        ensure_backbone(out, size=size, seed=seed, progress=progress)
    work = out / ".demo-src"
    try:
        files = make_demo_coco(work, dataset=dataset, seed=seed, n_train=n_train, n_test=n_test, size=size,
                               quality=quality)
        source = parse_coco(*files["train"], *files["test"])
        source.args = {"demo": {"generator": GENERATOR, "dataset": spec.name, "seed": seed,
                                "n_train": n_train, "n_test": n_test, "size": size, "quality": quality}}
        return convert(source, out, workers=workers, shard_size=shard_size, quality=quality, progress=progress,
                       log=lambda *_: None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

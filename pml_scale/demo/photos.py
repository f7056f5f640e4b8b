"""The ``photos`` embedded dataset: real photographs of objects composed into multi-label scenes.

Why: the method has to be judged in a regime like the paper's (an ImageNet backbone on real
photographs), and no real multi-label photo dataset ships offline. Debian's
``tuxpaint-stamps-default`` ships a few hundred photographic cut-outs with alpha masks (plus
cartoons and line art, which we leave out), sorted into category folders. A scene is 1-4 of
those objects (random scale, position, flip, colour jitter) pasted on a random crop of a real
background photograph (scikit-learn's ``china.jpg``, matplotlib's ``grace_hopper.jpg`` and,
when scikit-image is installed, its sample photographs without our classes in them).

* Classes: stamp subcategories with enough photographs (``PHOTO_CLASSES``, first match wins:
  ``bovines`` before ``mammals``); 14 classes.
* Frequencies: long-tailed, Zipf(``zipf_s``) over a seeded class ranking, drawn per image
  without replacement, as the digit datasets do; rare classes exist (a few % of images).
* Exemplars are split per class three ways before any image is made: about 30% to test (at
  least 2), then about 20% of the rest to validation (at least 1), the rest to fitting (at least
  2). Test images show object photographs never seen in training, so the test measures
  generalisation, not memory of a cut-out; the last ``VAL_SHARE`` of the training split's images
  are made from the validation exemplars only and their sample ids are written to
  ``val_ids.npy``, which the trainer uses as the validation split (``data.val_fraction > 0``).
  A validation split of random training images would share their cut-outs and measure memory:
  a linear head scored 72 mAP on such a split and 48 on test.
* "Photograph" is decided from the pixels: line art and cartoons have flat fills, so a stamp
  whose opaque interior has more than ``MAX_FLAT_SHARE`` of pixels equal to their right and
  lower neighbours (within 3 levels summed over RGB) is left out, as is one under
  ``MIN_PIXELS`` opaque pixels.

The images go through the same COCO path as real data (``make_photos_coco`` writes COCO files,
``build_photos`` converts them). Time and memory grow with ``n_train + n_test`` (one image at a
time) plus the exemplars held in memory (a few MB).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from .scenes import class_weights

DEFAULT_STAMPS = "/usr/share/tuxpaint/stamps"
STAMPS_ENV = "PML_STAMPS_DIR"
# The generator's name as manifests record it (and fingerprint it) since the first build; kept
# when the module moved to pml_scale.demo, so that folders built before stay valid (not re-converted).
GENERATOR = "pml_scale.data.demo_photos"
MAX_FLAT_SHARE = 0.15
MIN_PIXELS = 200
TEST_SHARE = 0.3  # of each class's exemplars
VAL_EXEMPLAR_SHARE = 0.2  # of the remaining exemplars
VAL_SHARE = 0.2  # of the training split's images (made from the validation exemplars)
VAL_IDS_FILE = "val_ids.npy"
# (class, folder prefixes under the stamps root); first match wins, so specific before general
PHOTO_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bovines", ("animals/mammals/bovines",)),
    ("mammals", ("animals/mammals", "animals/marsupials")),
    ("birds", ("animals/birds",)),
    ("fish", ("animals/fish",)),
    ("insects", ("animals/insects",)),
    ("fruit", ("food/fruit",)),
    ("vegetables", ("food/vegetables",)),
    ("flowers", ("plants/flowers",)),
    ("trees", ("plants/trees",)),
    ("tools", ("household/tools",)),
    ("instruments", ("hobbies/music",)),
    ("balls", ("sports",)),
    ("vehicles", ("vehicles", "military/vehicles")),
    ("planets", ("space/planets",)),
)
MIN_EXEMPLARS = 5  # a class needs 2 photographs for test, 1 for validation, 2 for fitting
# scikit-image sample photographs that show none of our classes (astronaut.png has a space shuttle)
SKIMAGE_BACKGROUNDS = ("brick.png", "coffee.png", "grass.png", "gravel.png")
N_TRAIN, N_TEST, SIZE = 4000, 1600, 224
ZIPF_S = 1.0
EXTRA_OBJECTS_MEAN = 0.9  # objects per image = 1 + Poisson(mean), truncated to MAX_OBJECTS
MAX_OBJECTS = 4


class StampsMissing(FileNotFoundError):
    """The photographs are not installed: the message says how to get them."""


def stamps_dir(path: str | os.PathLike | None = None) -> Path:
    """The stamps folder: ``path``, else $PML_STAMPS_DIR, else Debian's install location."""
    root = Path(path or os.environ.get(STAMPS_ENV) or DEFAULT_STAMPS)
    if not root.is_dir():
        raise StampsMissing(
            f"the 'photos' dataset is made from the photographs of Debian's tuxpaint-stamps-default package, "
            f"which are not at {root}. Install them (as root: apt-get install tuxpaint-stamps-default), or "
            f"point ${STAMPS_ENV} (or --stamps) at a copy of that 'stamps' folder")
    return root


def is_photograph(rgba: np.ndarray) -> bool:
    """True for a photographic cut-out, False for line art, cartoons and tiny stamps (see module doc)."""
    a = np.asarray(rgba, np.int32)
    opaque = a[..., 3] > 200
    inner = opaque[1:, 1:] & opaque[:-1, 1:] & opaque[1:, :-1]
    if inner.sum() < MIN_PIXELS:
        return False
    dx = np.abs(a[1:, 1:, :3] - a[1:, :-1, :3]).sum(-1)
    dy = np.abs(a[1:, 1:, :3] - a[:-1, 1:, :3]).sum(-1)
    return float(((dx <= 3) & (dy <= 3))[inner].mean()) <= MAX_FLAT_SHARE


def class_of(relative: Path) -> str | None:
    """The class of a stamp at ``relative`` (to the stamps root), or None."""
    if "cartoon" in relative.parts:
        return None
    folder = "/".join(relative.parts[:-1])
    for name, prefixes in PHOTO_CLASSES:
        if any(folder == p or folder.startswith(p + "/") for p in prefixes):
            return name
    return None


def collect_exemplars(root: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """{class: sorted photograph paths} for the classes with at least ``MIN_EXEMPLARS`` photographs."""
    root = stamps_dir(root)
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.png")):
        name = class_of(path.relative_to(root))
        if name is None:
            continue
        with Image.open(path) as im:
            if is_photograph(np.asarray(im.convert("RGBA"))):
                found.setdefault(name, []).append(path)
    order = [n for n, _ in PHOTO_CLASSES]
    kept = {n: found[n] for n in order if len(found.get(n, ())) >= MIN_EXEMPLARS}
    if len(kept) < 2:
        raise StampsMissing(f"{root}: found photographs for {len(kept)} class(es) "
                            f"({', '.join(f'{k}: {len(v)}' for k, v in found.items()) or 'none'}); "
                            f"need at least 2 classes with {MIN_EXEMPLARS} photographs each")
    return kept


def split_exemplars(exemplars: dict[str, list[Path]], seed: int) -> dict[str, dict[str, list[Path]]]:
    """{"train"|"val"|"test": {class: paths}}: a seeded per-class split, disjoint; test ≥ 2,
    val ≥ 1, train ≥ 2 photographs per class."""
    out: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}, "test": {}}
    for k, (name, paths) in enumerate(exemplars.items()):
        order = np.random.default_rng([seed, 0x5EED, k]).permutation(len(paths))
        n = len(paths)
        n_test = min(max(2, int(round(TEST_SHARE * n))), n - 3)
        n_val = min(max(1, int(round(VAL_EXEMPLAR_SHARE * (n - n_test)))), n - n_test - 2)
        parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        for split, idx in parts.items():
            out[split][name] = [paths[i] for i in sorted(idx)]
    return out


def background_photos() -> list[np.ndarray]:
    """Real background photographs (RGB uint8) from packages we depend on, plus scikit-image's
    when installed. None shows an object of our classes."""
    import matplotlib
    import sklearn

    paths = [Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
             Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    try:
        import skimage.data

        paths += [Path(skimage.data.__file__).parent / n for n in SKIMAGE_BACKGROUNDS]
    except ImportError:
        pass
    out = []
    for p in paths:
        if p.is_file():
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("RGB")))
    if not out:
        raise FileNotFoundError("no background photograph found (scikit-learn's china.jpg, matplotlib's "
                                "grace_hopper.jpg): is the installation complete?")
    return out


def _load_cutout(path: Path) -> Image.Image:
    """The stamp cropped to its opaque box (RGBA)."""
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    box = rgba.getchannel("A").point(lambda v: 255 if v > 16 else 0).getbbox()
    return rgba.crop(box) if box else rgba


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> Image.Image:
    """A random crop (30-100% of the short side) of a random photograph, flipped at random, with
    brightness, colour and tint jitter (grey textures get a colour)."""
    src = photos[int(rng.integers(len(photos)))]
    h, w = src.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    bg = Image.fromarray(src[y:y + side, x:x + side]).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        bg = bg.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(bg, np.float32) * rng.uniform(0.6, 1.2) * rng.uniform(0.8, 1.2, size=3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _place(rng, w: int, h: int, size: int, boxes: list) -> tuple[int, int]:
    """Best of 8 random positions: least overlap with the objects already placed."""
    cand = np.stack([rng.integers(0, size - w + 1, 8), rng.integers(0, size - h + 1, 8)], 1)
    if not boxes:
        return int(cand[0, 0]), int(cand[0, 1])
    b = np.asarray(boxes)
    ox = np.clip(np.minimum(cand[:, None, 0] + w, b[None, :, 0] + b[None, :, 2])
                 - np.maximum(cand[:, None, 0], b[None, :, 0]), 0, None)
    oy = np.clip(np.minimum(cand[:, None, 1] + h, b[None, :, 1] + b[None, :, 3])
                 - np.maximum(cand[:, None, 1], b[None, :, 1]), 0, None)
    best = int(np.argmin((ox * oy).sum(1)))
    return int(cand[best, 0]), int(cand[best, 1])


def compose(rng, background: Image.Image, cutouts: list[Image.Image], size: int) -> tuple[Image.Image, list]:
    """Paste ``cutouts`` on ``background``: longest side 35-60% of the canvas (30-50% when
    crowded), random flip, brightness/contrast/colour jitter; returns the image and the boxes."""
    canvas = background.copy()
    boxes = []
    lo, hi = (0.35, 0.6) if len(cutouts) <= 2 else (0.3, 0.5)
    for cut in cutouts:
        scale = rng.uniform(lo, hi) * size / max(cut.size)
        w, h = max(8, int(cut.size[0] * scale)), max(8, int(cut.size[1] * scale))
        obj = cut.resize((min(w, size), min(h, size)), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        rgb, alpha = obj.convert("RGB"), obj.getchannel("A")
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            rgb = enhance(rgb).enhance(float(rng.uniform(0.75, 1.25)))
        x, y = _place(rng, obj.size[0], obj.size[1], size, boxes)
        canvas.paste(rgb, (x, y), alpha)
        boxes.append([x, y, obj.size[0], obj.size[1]])
    return canvas, boxes


def make_photos_coco(work, *, stamps=None, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST,
                     size: int = SIZE, quality: int = 90, progress: bool = False) -> dict:
    """Write ``work/{split}2017/*.jpg`` and ``work/annotations/instances_{split}2017.json``.

    Each image entry records its exemplar pool (``"pool"``: train, val or test) and the stamp
    files it used (``"stamps"``, relative paths), so the separation can be checked. Returns
    {split: (json path, image folder), "val_ids": sample ids of the validation images}."""
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size!r}")
    root = stamps_dir(stamps)
    exemplars = collect_exemplars(root)
    names = list(exemplars)
    splits = split_exemplars(exemplars, seed)
    photos = background_photos()
    weights = class_weights(np.random.default_rng(seed), len(names), ZIPF_S)
    work = Path(work)
    (work / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": k + 1, "name": n, "supercategory": n} for k, n in enumerate(names)]
    out = {}
    n_val = int(round(VAL_SHARE * n_train))
    for split, n in (("train", n_train), ("test", n_test)):
        pools = ("train", "val") if split == "train" else ("test",)
        cut = {p: {c: [_load_cutout(x) for x in splits[p][c]] for c in names} for p in pools}
        rel = {p: {c: [str(x.relative_to(root)) for x in splits[p][c]] for c in names} for p in pools}
        idir = work / f"{split}2017"
        idir.mkdir(exist_ok=True)
        rng = np.random.default_rng([seed, 1 if split == "train" else 2])
        imgs, anns = [], []
        bar = _bar(n, f"photos {split}", progress)
        for i in range(n):
            pool = "val" if split == "train" and i >= n - n_val else pools[0]
            k = min(MAX_OBJECTS, len(names), 1 + int(rng.poisson(EXTRA_OBJECTS_MEAN)))
            classes = rng.choice(len(names), size=k, replace=False, p=weights).tolist()
            picks = [int(rng.integers(len(cut[pool][names[c]]))) for c in classes]
            image, boxes = compose(rng, _background(rng, photos, size),
                                   [cut[pool][names[c]][j] for c, j in zip(classes, picks)], size)
            iid = i + 1
            name = f"{iid:012d}.jpg"
            image.save(idir / name, format="JPEG", quality=quality)
            imgs.append({"id": iid, "file_name": name, "width": size, "height": size, "pool": pool,
                         "stamps": [rel[pool][names[c]][j] for c, j in zip(classes, picks)]})
            for c, box in zip(classes, boxes):
                anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": c + 1, "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0})
            bar.update(1)
        bar.close()
        jpath = work / "annotations" / f"instances_{split}2017.json"
        jpath.write_text(json.dumps({"info": {"description": "pml-scale demo photos", "seed": seed,
                                              "exemplars": rel},
                                     "images": imgs, "annotations": anns, "categories": cats}))
        out[split] = (jpath, idir)
    # sample ids follow the order of the images in the file (every image has a label)
    out["val_ids"] = np.arange(n_train - n_val, n_train, dtype=np.int64)
    return out


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def build_photos(out, *, stamps=None, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST,
                 size: int = SIZE, shard_size: int = 400, workers: int = 1, quality: int = 90,
                 progress: bool = False) -> dict:
    """Build the ``photos`` shard folder ``out`` through the real ``coco`` converter (manifest
    written last). Deterministic in ``seed``; rerunning on a finished folder is a no-op."""
    from ..atomic import atomic_save_npy
    from ..data.shards.convert import convert
    from ..data.shards.format import read_manifest
    from ..data.shards.sources import parse_coco

    out = Path(out)
    if (out / "manifest.json").exists():
        return read_manifest(out)
    work = out / ".photos-src"
    try:
        files = make_photos_coco(work, stamps=stamps, seed=seed, n_train=n_train, n_test=n_test, size=size,
                                 quality=quality, progress=progress)
        source = parse_coco(*files["train"], *files["test"])
        source.args = {"demo": {"generator": GENERATOR, "dataset": "photos", "seed": seed,
                                "n_train": n_train, "n_test": n_test, "size": size, "quality": quality}}
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(out / VAL_IDS_FILE, files["val_ids"])  # before the manifest, which marks the end
        return convert(source, out, workers=workers, shard_size=shard_size, quality=quality, progress=progress,
                       log=lambda *_: None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

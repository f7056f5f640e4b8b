"""What a demo image is: the two embedded datasets' statistics (``DemoSpec``) and how an image is
composed from real handwritten digits on a textured background.

Why a module of its own: the demo datasets (``demo.digits``) and the demo backbone's pretraining
task (``demo.backbone``) draw their images the same way; both import it, neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (70, 100, 255), "yellow": (240, 220, 40),
           "cyan": (40, 220, 230), "magenta": (225, 60, 225), "orange": (255, 140, 0), "white": (240, 240, 240)}
NUM_DIGITS = 10
DIGIT_SPLIT = 898  # load_digits indices below: train writers; from here: test
ORIENTATIONS = {"up": 0, "left": 1, "right": 3}  # quarter turns counter-clockwise (np.rot90)


@dataclass(frozen=True)
class DemoSpec:
    """The statistics of one embedded dataset (the two are described in ``demo.digits``)."""

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


def compose(rng, digits: np.ndarray, pool: dict, classes: list[int], size: int, spec: DemoSpec = DIGITS,
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


def writer_pools(targets: np.ndarray, split: str) -> dict[int, np.ndarray]:
    """``load_digits`` indices of each digit for a split: train writers [0, 898), test the rest."""
    lo, hi = (0, DIGIT_SPLIT) if split == "train" else (DIGIT_SPLIT, len(targets))
    return {d: np.flatnonzero(targets[lo:hi] == d) + lo for d in range(NUM_DIGITS)}

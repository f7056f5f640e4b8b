"""The demo's stand-in for ImageNet weights: a ``tiny_resnet`` pretrained on a related task
with other labels, so that the demo fine-tunes a pretrained backbone as the paper does.

Why: the paper fine-tunes an ImageNet ResNet-50, so its predictions (and hence its pseudo
labels) are informative from the first epoch. A backbone trained from scratch for a few CPU
epochs is not, and a comparison of partial-label methods on it says little.

The pretraining task: single-label images, one upright digit each, labelled with its digit
(10-way) and its colour (8-way) as two softmax heads (one 18-wide Linear). It never sees the
demo's target labels (digit x colour [x orientation] conjunctions, several per image), never
a turned digit, and only the training writers' scans (``load_digits`` indices < 898), so no
test scan is seen. The head's shape differs from any demo label space, so ``model.pretrained``
loads the backbone and keeps a fresh head, as for any user's weights.

Cost (2 idle CPU cores): ~8,000 images generated in ~4 s, 6 epochs in ~60 s; the result is
cached beside the dataset as ``pretrained/tiny_resnet-digits.pth`` + ``.json`` (recipe and
held-out accuracy on the test writers' scans), written atomically, reused when the recipe matches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_bytes, atomic_write_json
from ..imagenet import uint8_mean_std
from ..model import TinyResNet
from .scenes import COLOURS, DIGITS, NUM_DIGITS, compose, writer_pools

BACKBONE_FILE = "pretrained/tiny_resnet-digits.pth"
RECIPE = {"task": "digit+colour, single upright digit", "model": "tiny_resnet", "n_images": 16000, "epochs": 6,
          "batch_size": 128, "lr": 3e-3, "weight_decay": 1e-4, "schedule": "onecycle(pct_start=0.15)",
          "zero_init_residual": False, "n_val": 1000, "canvas": 32, "version": 2}
_MEAN, _STD = uint8_mean_std()  # the loaders' ImageNet normalisation


def backbone_path(root) -> Path:
    return Path(root) / BACKBONE_FILE


def single_digit_images(n: int, *, split: str, canvas: int, size: int, seed: int):
    """(uint8 N×3×C×C images, digit labels, colour labels) of one upright digit per image, at
    the pixel scale digits have in the demo's ``size``-px images (either of its two scales)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pool = writer_pools(data.target, split)
    rng = np.random.default_rng([seed, 101 if split == "train" else 102])
    images = np.empty((n, canvas, canvas, 3), np.uint8)
    classes = rng.integers(0, NUM_DIGITS * len(COLOURS), size=n)
    scales = rng.choice([3.0, 2.4], size=n) * size / 64
    for i, (cls, scale) in enumerate(zip(classes, scales)):
        images[i], _ = compose(rng, data.images, pool, [int(cls)], canvas, DIGITS, digit_scale=float(scale))
    digit, colour = np.divmod(classes, len(COLOURS))
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(digit),
            torch.from_numpy(colour))


def _accuracy(model, images, digit, colour, batch: int = 500) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = torch.cat([model((images[i:i + batch].float() - _MEAN) / _STD) for i in range(0, len(images), batch)])
    model.train()
    return (float((out[:, :NUM_DIGITS].argmax(1) == digit).float().mean()),
            float((out[:, NUM_DIGITS:].argmax(1) == colour).float().mean()))


def pretrain_backbone(path, *, size: int = 64, seed: int = 0, progress: bool = False, recipe: dict = RECIPE) -> dict:
    """Train the backbone and write ``path`` (state dict) and ``path.json`` (recipe, accuracy)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    path = Path(path)
    canvas = max(32, size * recipe["canvas"] // 64)
    images, digit, colour = single_digit_images(recipe["n_images"], split="train", canvas=canvas, size=size, seed=seed)
    val = single_digit_images(recipe["n_val"], split="test", canvas=canvas, size=size, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyResNet(NUM_DIGITS + len(COLOURS), zero_init_residual=recipe["zero_init_residual"])
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
        bs = recipe["batch_size"]
        steps_per_epoch = len(images) // bs
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=recipe["epochs"] * steps_per_epoch,
                                                    pct_start=0.15)
        g = torch.Generator().manual_seed(seed)
        bar = tqdm(total=recipe["epochs"] * steps_per_epoch, desc="pretraining the demo backbone", disable=not progress,
                   leave=False)
        for _ in range(recipe["epochs"]):
            perm = torch.randperm(len(images), generator=g)
            for s in range(steps_per_epoch):
                idx = perm[s * bs:(s + 1) * bs]
                out = model((images[idx].float() - _MEAN) / _STD)
                loss = F.cross_entropy(out[:, :NUM_DIGITS], digit[idx]) + F.cross_entropy(out[:, NUM_DIGITS:], colour[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
        bar.close()
    acc_digit, acc_colour = _accuracy(model, *val)
    info = {"recipe": recipe, "size": size, "seed": seed, "heldout_digit_accuracy": acc_digit,
            "heldout_colour_accuracy": acc_colour, "seconds": round(time.time() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_json(path.with_name(path.name + ".json"), info)  # written last: marks the file complete
    return info


def ensure_backbone(root, *, size: int = 64, seed: int = 0, progress: bool = False) -> Path:
    """The cached backbone of dataset folder ``root``, pretrained first if absent or stale."""
    path = backbone_path(root)
    side = path.with_name(path.name + ".json")
    if path.exists() and side.exists():
        try:
            info = json.loads(side.read_text())
        except json.JSONDecodeError:
            info = {}
        if info.get("recipe") == RECIPE and info.get("size") == size and info.get("seed") == seed:
            return path
    if progress:
        print(f"[pml-scale] pretraining the demo backbone (digit + colour task) into {path} ...", flush=True)
    info = pretrain_backbone(path, size=size, seed=seed, progress=progress)
    if progress:
        print(f"[pml-scale] demo backbone: held-out digit accuracy {100 * info['heldout_digit_accuracy']:.1f}%, "
              f"colour {100 * info['heldout_colour_accuracy']:.1f}% ({info['seconds']:.0f} s)", flush=True)
    return path

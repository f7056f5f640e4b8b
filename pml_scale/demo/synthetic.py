"""Synthetic shard folders for benchmarks: textured JPEGs of a chosen size with random sparse
labels, written with the real shard writer, in parallel.

Why: the benchmarks must finish in seconds on a 16-core machine; generating 4,096 JPEGs in one
process took 38 s. Each shard is one task of a process pool; every image is a pure function of
(seed, split, sample id), so the folder does not depend on the number of workers. Default
images are 640x480, ~85 KB at quality 90 (smooth gradients plus 4x4-pixel noise: close to the
size of real photos, so decode cost is realistic).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
import multiprocessing
from pathlib import Path

import numpy as np

from ..atomic import atomic_save_npy, atomic_write_json
from ..data.shards import format as fmt

SPLIT_CODES = {"train": 0, "test": 1}


def synthetic_jpeg(seed: int, split: int, sid: int, size: tuple[int, int], quality: int = 90) -> bytes:
    """One image: per-channel gradients of random strength plus 4x4-pixel Gaussian noise."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng([seed, split, sid])
    a, b, c = rng.uniform(0, 255, 3)
    gx = np.arange(w, dtype=np.float32) / w
    gy = np.arange(h, dtype=np.float32) / h
    noise = rng.normal(0, 14, (h // 4 + 1, w // 4 + 1, 3)).astype(np.float32).repeat(4, 0).repeat(4, 1)[:h, :w]
    px = np.empty((h, w, 3), np.uint8)
    px[..., 0] = np.clip(a * gx[None, :] + noise[..., 0], 0, 255)
    px[..., 1] = np.clip(b * gy[:, None] + noise[..., 1], 0, 255)
    px[..., 2] = np.clip(c * (gx[None, :] * w + gy[:, None] * h) / (w + h) + noise[..., 2], 0, 255)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_shard(task) -> dict:
    path, split_code, start, stop, size, seed, positives = task
    writer = fmt.ShardWriter(Path(path))
    try:
        for sid, pos in zip(range(start, stop), positives):
            writer.add(sid, synthetic_jpeg(seed, split_code, sid, size), {"src": f"synthetic-{sid}.jpg", "pos": pos,
                                                                          "neg": []})
        return writer.close().to_json()
    except BaseException:
        writer.abort()
        raise


def make_synthetic_dataset(root, *, images: int, test_images: int = 0, classes: int = 1,
                           size: tuple[int, int] = (640, 480), shard_size: int = 512, seed: int = 0,
                           workers: int | None = None, progress: bool = True) -> dict:
    """Write ``root`` (manifest last, so a half-written folder is never mistaken for a dataset):
    ``images`` train and ``test_images`` test samples, ~2.4 positives per image over ``classes``
    labels (at least one), full labels in ``{split}-labels.npy``. Returns the manifest."""
    for name, v, lo in (("images", images, 1), ("test_images", test_images, 0), ("classes", classes, 1),
                        ("shard_size", shard_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    workers = max(1, workers or os.cpu_count() or 1)
    splits, tasks, labels = {}, [], {}
    for split, n in (("train", images), ("test", test_images)):
        if n == 0:
            continue
        lab = (rng.random((n, classes)) < 2.4 / classes).astype(np.int8)
        lab[np.arange(n), rng.integers(0, classes, n)] = 1
        labels[split] = lab
        for k, start in enumerate(range(0, n, shard_size)):
            stop = min(n, start + shard_size)
            pos = [np.flatnonzero(lab[i]).tolist() for i in range(start, stop)]
            tasks.append((split, k, (str(root / fmt.shard_name(split, k)), SPLIT_CODES[split], start, stop,
                                     tuple(size), seed, pos)))
    infos: dict[str, list] = {s: [None] * sum(1 for t in tasks if t[0] == s) for s in labels}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=images + test_images, desc="synthetic JPEGs", unit="img", mininterval=1.0)
    # fork: the workers need no re-import (the caller has not touched CUDA yet in our benchmarks)
    ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx) as pool:
        futures = {pool.submit(_write_shard, t[2]): t for t in tasks}
        for fut, (split, k, t) in futures.items():
            infos[split][k] = fut.result()
            if bar is not None:
                bar.update(t[3] - t[2])
    if bar is not None:
        bar.close()
    for split, lab in labels.items():
        atomic_save_npy(root / fmt.labels_name(split), lab)
        splits[split] = {"num_samples": int(lab.shape[0]), "shards": infos[split]}
    manifest = {"format_version": fmt.FORMAT_VERSION, "num_classes": classes,
                "classes": [f"c{i}" for i in range(classes)], "splits": splits, "source": {"format": "synthetic"}}
    atomic_write_json(root / fmt.MANIFEST, manifest)
    return manifest

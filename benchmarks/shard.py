"""Sharding throughput: img/s per worker for passthrough and re-encode, and an extrapolation.

Generates ``--count`` 640x480 JPEGs (smooth colour fields + texture + noise, quality 90: sizes
near real photos, unlike pure noise), lists them in a csv, and times the real converter
(``pml_scale.data.shards.convert.convert``: check phase = PIL verify + full decode, then write)
for each worker count, in two modes:

    passthrough   original JPEG bytes copied into the shards
    re-encode     --max-side (default 448) resize + JPEG re-encode at --quality

It prints a table (img/s, img/s per worker, output MB per 1k images) and the projected wall
time and disk for ``--project`` images (default 5.6M, Open Images) at ``--project-workers``.

    python benchmarks/shard.py                      # 96 images, workers 1 and 2
    python benchmarks/shard.py --count 512 --workers 1,4,8
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pml_scale.data.shards.convert import convert
from pml_scale.data.shards.sources import parse_list


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` 640x480 JPEGs and a csv listing them (5 classes, 1-2 positives each)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,positives"]
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((640, 480), Image.Resampling.BICUBIC), np.float32)
        freq = rng.uniform(0.02, 0.2, size=2)
        texture = 25 * np.sin(xx * freq[0] + yy * freq[1])[..., None]
        img = np.clip(base + texture + rng.normal(0, 6, size=base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        pos = ";".join(sorted({f"c{rng.integers(5)}" for _ in range(rng.integers(1, 3))}))
        rows.append(f"{i:06d}.jpg,{pos}")
    listing = folder / "list.csv"
    listing.write_text("\n".join(rows) + "\n")
    return listing


def run(listing: Path, out: Path, workers: int, max_side: int | None, quality: int) -> tuple[float, float]:
    """(seconds, output bytes) of one full conversion into a fresh folder."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    m = convert(parse_list("csv", listing), out, workers=workers, shard_size=64, max_side=max_side,
                quality=quality, progress=False, log=lambda *_: None)
    dt = time.perf_counter() - t0
    size = sum(s["bytes"] for sp in m["splits"].values() for s in sp["shards"])
    return dt, size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=96, help="images to generate (default 96)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--max-side", type=int, default=448, help="re-encode mode: longer side (default 448)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--project", type=int, default=5_600_000, help="images to extrapolate to (default 5.6M)")
    ap.add_argument("--project-workers", type=int, default=32, help="workers of the projection (default 32)")
    ap.add_argument("--src-kb", type=float, default=None,
                    help="mean source image size in KB for the disk projection (default: the generated ones)")
    a = ap.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",")]
    if a.count < 1 or any(w < 1 for w in workers):
        ap.error("--count and --workers must be >= 1")
    root = Path(tempfile.mkdtemp(prefix="pml-shard-bench-"))
    try:
        listing = make_images(root / "src", a.count)
        src_bytes = sum(p.stat().st_size for p in (root / "src").glob("*.jpg"))
        print(f"{a.count} generated 640x480 JPEGs, mean {src_bytes / a.count / 1024:.1f} KB")
        print(f"{'mode':<22} {'workers':>7} {'seconds':>8} {'img/s':>8} {'img/s/worker':>13} {'MB/1k img':>10}")
        results = {}
        for mode, max_side in (("passthrough", None), (f"re-encode {a.max_side}px q{a.quality}", a.max_side)):
            for w in workers:
                dt, size = run(listing, root / "out", w, max_side, a.quality)
                rate = a.count / dt
                results[(mode, w)] = (rate, size)
                mb_per_1k = size / a.count / 1e3
                print(f"{mode:<22} {w:>7} {dt:>8.2f} {rate:>8.1f} {rate / w:>13.1f} {mb_per_1k:>10.1f}")
        n, pw = a.project, a.project_workers
        print(f"\nprojection: {n:,} images, {pw} workers (best measured img/s per worker, linear in workers: "
              f"assumes storage keeps up and one core per worker)")
        for mode in dict.fromkeys(m for m, _ in results):
            per_worker = max(results[(mode, w)][0] / w for w in workers)
            size = results[(mode, workers[0])][1]
            per_img = size / a.count
            if mode == "passthrough" and a.src_kb:
                per_img = a.src_kb * 1024 + 1536  # bytes copied + 3 tar headers + padding
            hours = n / (per_worker * pw) / 3600
            print(f"  {mode:<22} {hours:6.2f} h   {n * per_img / 1e9:8.1f} GB of shards")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

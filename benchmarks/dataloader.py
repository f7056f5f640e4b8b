"""Input-pipeline throughput: img/s of each backend, and (GPU) whether it starves a ResNet-50.

Generates shards of 640x480 JPEGs (textured, ~realistic sizes) unless ``--root`` names an
existing dataset, then measures, per available backend, decoded+resized+normalised images per
second at ``--image-size`` (the first batch of each epoch, which includes pipeline start-up, is
not timed). With CUDA it also times a ResNet-50 bf16 channels_last train step fed by the loader
against the same step on one synthetic in-memory batch (the DESIGN.md target: >= 95%).

    python benchmarks/dataloader.py --images 2048 --workers 8
    python benchmarks/dataloader.py --root /data/oi-shards --split train --batches 200
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_shards(root: Path, images: int, shard_size: int, seed: int = 0) -> None:
    """``images`` 640x480 JPEGs (smooth gradient + noise + blocks) in shards of ``shard_size``."""
    from PIL import Image

    from pml_scale.atomic import atomic_write_json
    from pml_scale.data import format as fmt

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    infos = []
    for k, start in enumerate(range(0, images, shard_size)):
        w = fmt.ShardWriter(root / fmt.shard_name("train", k))
        for sid in range(start, min(images, start + shard_size)):
            a, b, c = rng.uniform(0, 255, 3)
            base = np.stack([a * xx / 640, b * yy / 480, c * (xx + yy) / 1120], -1)
            noise = rng.normal(0, 12, (480 // 8, 640 // 8, 3)).repeat(8, 0).repeat(8, 1)
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=90)
            w.add(sid, buf.getvalue(), {"src": f"synthetic-{sid}.jpg", "pos": [], "neg": []})
        infos.append(w.close().to_json())
    atomic_write_json(root / fmt.MANIFEST, {"format_version": fmt.FORMAT_VERSION, "num_classes": 1,
                                            "classes": ["x"], "splits": {"train": {"num_samples": images,
                                                                                   "shards": infos}}})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(loader, batches: int, step=None) -> tuple[float, int]:
    """img/s over ``batches`` timed batches (the first batch of every epoch is untimed)."""
    device = loader.device
    timed, images, seconds, epoch = 0, 0, 0.0, 0
    while timed < batches:
        loader.set_epoch(epoch)
        t0 = None
        n = 0
        for i, batch in enumerate(loader):
            if step is not None:
                step(batch.images)
            if i == 0:
                sync(device)
                t0 = time.perf_counter()
                continue
            n += batch.images.shape[0]
            timed += 1
            if timed >= batches:
                break
        sync(device)
        if t0 is not None and n:
            seconds += time.perf_counter() - t0
            images += n
        epoch += 1
        if len(loader) < 2:
            raise SystemExit("need at least 2 batches per epoch: add --images or lower --batch-size")
    return images / seconds, images


def resnet_step(device: torch.device, classes: int = 600):
    """A bf16-autocast, channels_last ResNet-50 SGD step; returns step(images)."""
    import torchvision

    model = torchvision.models.resnet50(num_classes=classes).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    target = None

    def step(images: torch.Tensor) -> None:
        nonlocal target
        if target is None or target.shape[0] != images.shape[0]:
            target = torch.rand(images.shape[0], classes, device=device).round()
        x = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def synthetic_rate(step, device, batch_size: int, size: int, batches: int) -> float:
    x = torch.randn(batch_size, 3, size, size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        step(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        step(x)
    sync(device)
    return batch_size * batches / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", help="existing dataset folder (default: generate one in a temp folder)")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=512, help="images to generate (640x480 JPEG)")
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--batches", type=int, default=20, help="timed batches per backend")
    p.add_argument("--backends", default="all", help="comma list of dali,dali_cpu,pil or 'all' available")
    p.add_argument("--no-model", action="store_true", help="skip the ResNet-50 comparison (GPU only anyway)")
    args = p.parse_args(argv)

    from pml_scale.data.loaders import LoaderConfig, build_loader, dali_importable

    cuda = torch.cuda.is_available()
    if args.backends == "all":
        backends = (["dali"] if cuda and dali_importable() else []) + (["dali_cpu"] if dali_importable() else [])
        backends.append("pil")
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="pml-bench-")
        root = tmp.name
        t0 = time.perf_counter()
        make_shards(Path(root), args.images, args.shard_size)
        print(f"generated {args.images} 640x480 JPEGs in {time.perf_counter() - t0:.1f} s under {root}")
    device = torch.device("cuda" if cuda else "cpu")
    gpu_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    rows = []
    for backend in backends:
        cfg = LoaderConfig(root=root, split=args.split, backend=backend, image_size=args.image_size,
                           batch_size=args.batch_size, workers=args.workers, dtype="bf16")
        loader = build_loader(cfg, device=device)
        rate, n = loader_rate(loader, args.batches)
        rows.append((f"loader {backend}", rate, n))
        loader.close()
    if cuda and not args.no_model:
        step = resnet_step(device)
        syn = synthetic_rate(step, device, args.batch_size, args.image_size, args.batches)
        rows.append(("resnet50 bf16 synthetic", syn, args.batch_size * args.batches))
        for backend in [b for b in backends if b != "dali_cpu" or len(backends) == 1]:
            cfg = LoaderConfig(root=root, split=args.split, backend=backend, image_size=args.image_size,
                               batch_size=args.batch_size, workers=args.workers, dtype="bf16")
            loader = build_loader(cfg, device=device)
            rate, n = loader_rate(loader, args.batches, step=step)
            rows.append((f"resnet50 bf16 fed by {backend} ({100 * rate / syn:.0f}% of synthetic)", rate, n))
            loader.close()
    print(f"\ndevice: {gpu_name}; image_size {args.image_size}, batch {args.batch_size}, workers {args.workers}")
    print(f"{'what':<58} {'img/s':>10} {'images':>8}")
    for name, rate, n in rows:
        print(f"{name:<58} {rate:>10.1f} {n:>8}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Full training step vs the bare model: img/s end to end (loader, label gathers, loss, DeepSpeed
step, pseudo-label store) against the same model and DeepSpeed engine on one synthetic in-memory
batch, plus the time share of each part of the step (from the trainer's own `time_share` log).

    python benchmarks/train_step.py                                   # CPU: tiny_resnet, 64 px, 80 labels
    python benchmarks/train_step.py --model resnet50 --image-size 448 --classes 600 \\
        --batch-size 128 --images 8192 --dtype bf16 --backend dali --compile   # one GPU (DESIGN.md target)

Targets (issue: training engine): end-to-end >= 95% of the bare compiled model on synthetic input;
pseudo-store and label traffic ('labels' + 'stores' shares) under 1% of step time at 600 labels.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_dataset(root: Path, *, images: int, test_images: int, classes: int, size: tuple[int, int],
                 shard_size: int = 512, seed: int = 0) -> None:
    """Shards of synthetic JPEGs of ``size`` (w, h) with random sparse labels (~2.4 per image)."""
    from PIL import Image

    from pml_scale.atomic import atomic_save_npy, atomic_write_json
    from pml_scale.data import format as fmt

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    splits = {}
    for split, n in (("train", images), ("test", test_images)):
        labels = (rng.random((n, classes)) < 2.4 / classes).astype(np.int8)
        labels[np.arange(n), rng.integers(0, classes, n)] = 1
        infos = []
        for k, start in enumerate(range(0, n, shard_size)):
            writer = fmt.ShardWriter(root / fmt.shard_name(split, k))
            for sid in range(start, min(n, start + shard_size)):
                a, b, c = rng.uniform(0, 255, 3)
                base = np.stack([a * xx / w, b * yy / h, c * (xx + yy) / (w + h)], -1)
                noise = rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
                buf = io.BytesIO()
                Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
                pos = np.flatnonzero(labels[sid]).tolist()
                writer.add(sid, buf.getvalue(), {"src": f"synthetic-{sid}.jpg", "pos": pos, "neg": np.flatnonzero(labels[sid] == 0).tolist()})
            infos.append(writer.close().to_json())
        atomic_save_npy(root / fmt.labels_name(split), labels)
        splits[split] = {"num_samples": n, "shards": infos}
    atomic_write_json(root / fmt.MANIFEST, {"format_version": fmt.FORMAT_VERSION, "num_classes": classes,
                                            "classes": [f"c{i}" for i in range(classes)], "splits": splits,
                                            "source": {"format": "synthetic"}})


def bare_rate(cfg, *, steps: int, warmup: int = 3) -> float:
    """img/s of the same model + DeepSpeed engine + BCE on one synthetic batch (no data, no stores)."""
    import deepspeed

    from pml_scale.config import deepspeed_config
    from pml_scale.distributed import disable_deepspeed_cpu_shm_op, setup_distributed
    from pml_scale.model import build_model
    from pml_scale.train import DTYPES

    info = setup_distributed()
    disable_deepspeed_cpu_shm_op()
    model = build_model(cfg.model.name, cfg._classes, channels_last=cfg.model.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world_size=1))
    if cfg.model.compile:
        engine.compile()
    b, s = cfg.data.batch_size, cfg.data.image_size
    x = torch.randn(b, 3, s, s, device=info.device).to(DTYPES[cfg.model.dtype])
    if cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(b, cfg._classes, device=info.device) < 0.01).float()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(engine(x).float(), y)
        engine.backward(loss)
        engine.step()

    for _ in range(warmup):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    return b * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny_resnet")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--source-size", default="96x72", help="generated JPEG size WxH (GPU runs: 640x480)")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="the first epoch is warmup; the last is reported")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backend", default="pil")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loss", default="paper")
    p.add_argument("--root", help="existing dataset folder (default: generate one in a temp folder)")
    p.add_argument("--out", help="write the table (Markdown) to this file too")
    args = p.parse_args(argv)

    from pml_scale.config import load_config
    from pml_scale.train import run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "data"
        if not args.root:
            w, h = (int(v) for v in args.source_size.lower().split("x"))
            print(f"generating {args.images} synthetic {w}x{h} JPEGs ...", flush=True)
            make_dataset(root, images=args.images, test_images=max(args.batch_size, args.images // 8),
                         classes=args.classes, size=(w, h))
        overrides = [f"data.root={root}", "data.setting=PAL_0.3", f"data.backend={args.backend}",
                     f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
                     f"data.eval_batch_size={args.batch_size}", f"data.workers={args.workers}",
                     f"model.name={args.model}", f"model.dtype={args.dtype}", f"model.compile={str(args.compile).lower()}",
                     f"model.channels_last={'true' if torch.cuda.is_available() else 'false'}",
                     f"loss.name={args.loss}", f"run.epochs={args.epochs}", "run.eval_every=0",
                     f"run.out_dir={tmp}/runs", "run.name=bench", "run.log_every=1000000", "run.tensorboard=false",
                     "run.time_shares=true"]
        cfg = load_config(None, overrides)
        run(cfg)
        lines = [json.loads(l) for l in (Path(tmp) / "runs" / "bench" / "metrics.jsonl").read_text().splitlines()]
        last_epoch = args.epochs - 1
        e2e = [l["img_s"] for l in lines if l["kind"] == "train" and l["epoch"] == last_epoch]
        shares = [l for l in lines if l["kind"] == "time_share" and l["epoch"] == last_epoch][-1]
        cfg._classes = args.classes
        steps = max(len(e2e), 10)
        bare = bare_rate(cfg, steps=min(steps, 50))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = [f"| device | {device} |", "|---|---|",
            f"| model / size / batch / dtype | {args.model} / {args.image_size} / {args.batch_size} / {args.dtype} |",
            f"| loss / backend | {args.loss} / {args.backend} |",
            f"| end-to-end img/s (last epoch) | {e2e[-1]:.1f} |", f"| bare model img/s (synthetic) | {bare:.1f} |",
            f"| end-to-end / bare | {100 * e2e[-1] / bare:.1f}% |"]
    for k in ("loader", "labels", "forward", "loss", "backward_step", "stores"):
        rows.append(f"| share: {k} | {100 * shares.get(k, 0):.2f}% |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

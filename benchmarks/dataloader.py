"""Input-pipeline throughput: per backend, the first-batch latency of epochs 1 and 2, the steady
img/s, and (with a model) the model fed by the loader against the bare model on one synthetic
batch in the same precision and memory format.

Rows (``--backends``, comma list or ``all``):
  dali / dali_cpu / pil   our loader (``build_loader``): exact plan order, bad-sample handling;
  dali_reader             DALI's own ``fn.readers.webdataset`` with the same decode, resize and
                          normalisation on the same shards (the reference the DALI loader must match);
  passthrough             our DALI source with no decode: bytes in, bytes out (the source's ceiling);
  reader_passthrough      DALI's reader, bytes out (the same ceiling for DALI's own C++ reader).
The device follows CUDA: ``dali_reader``/``dali``/``passthrough`` decode on the GPU when there is
one (``dali_cpu`` and the reader's CPU variant otherwise).

    python benchmarks/dataloader.py                                  # CPU: small defaults
    python benchmarks/dataloader.py --root data/demo --image-size 64 --backends dali_cpu,dali_reader,passthrough
    python benchmarks/dataloader.py --images 8192 --batch-size 128 --workers 8     # GPU: 448 px, ResNet-50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

OURS = ("dali", "dali_cpu", "pil")
REFERENCE = ("dali_reader", "passthrough", "reader_passthrough")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReaderLoader:
    """DALI's own webdataset reader in the same graph as our loader, driven the same way (one
    persistent pipeline, ``reset`` per epoch); ``decode=False`` gives the bytes-out variant."""

    def __init__(self, root: str, split: str, *, gpu: bool, image_size: int, batch_size: int, workers: int,
                 decode: bool = True, device: torch.device, hw_decoder_load: float | None = None):
        from nvidia.dali import fn, pipeline_def, types

        from pml_scale.data.shards.format import index_name_for, read_manifest, split_shards
        from pml_scale.imagenet import UINT8_MEAN, UINT8_STD

        shards = [str(p) for p in split_shards(root, read_manifest(root), split)]
        self.device, self.batch_size, self.decode = device, batch_size, decode
        S = image_size

        @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=0 if gpu else None, seed=0,
                      prefetch_queue_depth=2, exec_dynamic=True)
        def graph():
            jpeg, sid = fn.readers.webdataset(paths=shards, index_paths=[str(index_name_for(s)) for s in shards],
                                              ext=["jpg", "id"], dtypes=[types.UINT8, types.INT64],
                                              random_shuffle=False, name="reader", pad_last_batch=False)
            if not decode:
                return jpeg, sid
            hw = {"hw_decoder_load": hw_decoder_load} if gpu and hw_decoder_load is not None else {}
            img = fn.decoders.image(jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB, **hw)
            img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_LINEAR, antialias=True)
            img = fn.crop_mirror_normalize(img, dtype=types.FLOAT16, output_layout="CHW",
                                           mirror=fn.random.coin_flip(probability=0.5),
                                           mean=UINT8_MEAN, std=UINT8_STD)
            return img, sid

        self.pipe = graph()
        self.pipe.build()
        self.epoch_size = self.pipe.epoch_size("reader") // batch_size
        self.pipeline_builds = 1
        self._started = False

    def __len__(self) -> int:
        return self.epoch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __iter__(self):
        """``epoch_size`` batches; the reader wraps around by itself, so an epoch is a count."""
        from pml_scale.data.input.loaders import _dali_to_torch

        pipe = self.pipe
        if not self._started:
            pipe.schedule_run()
            self._started = True
        for _ in range(self.epoch_size):
            outs = pipe.share_outputs()
            x = _dali_to_torch(outs[0], self.device).to(torch.bfloat16) if self.decode else outs[0]
            pipe.release_outputs()
            pipe.schedule_run()
            yield x

    def close(self) -> None:
        self.pipe = None


class PassthroughLoader:
    """Our batch-mode source with no decode: the pipeline returns the fed bytes and ids."""

    def __init__(self, root: str, split: str, *, batch_size: int, workers: int, device: torch.device):
        from nvidia.dali import fn, pipeline_def, types

        from pml_scale.data.input.batch_source import PlanSource
        from pml_scale.data.input.loaders import source_threads
        from pml_scale.data.input.plan import make_plan
        from pml_scale.data.shards.index import SampleIndex

        self.index = SampleIndex.load(root, split)
        self.shard_ids = self.index.shard_ids()
        self.batch_size = batch_size
        threads = source_threads(workers)
        self.source = PlanSource(threads=threads, read_ahead=max(2, threads + 1), seed=0, hflip=0.0, train=True)
        self.make_plan = make_plan
        self.epoch = 0

        @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=None, seed=0,
                      prefetch_queue_depth=2, exec_dynamic=True)
        def graph():
            jpeg, ids = fn.external_source(source=self.source, num_outputs=2, batch=True, batch_info=True,
                                           parallel=False, dtype=[types.UINT8, types.INT64], no_copy=True)
            return jpeg, ids

        self.pipe = graph()
        self.pipe.build()
        self.pipeline_builds = 1
        self.device = device

    def __len__(self) -> int:
        return self.index.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch

    def __iter__(self):
        from pml_scale.data.input.loaders import drain_pipeline

        plan = self.make_plan(self.shard_ids, seed=0, epoch=self.epoch, rank=0, world_size=1,
                              batch_size=self.batch_size, train=True)
        loc = self.index.locate(plan.ids)
        self.source.start(loc, plan.valid, epoch=self.epoch, start_batch=0)
        pipe = self.pipe
        pipe.schedule_run()
        try:
            while True:
                try:
                    outs = pipe.share_outputs()
                except StopIteration:
                    break
                fed = self.source.fed.popleft()
                pipe.release_outputs()
                self.source.release(fed)
                pipe.schedule_run()
                yield outs
        finally:  # left early: drain as the loader does
            drain_pipeline(pipe, self.source)

    def close(self) -> None:
        self.pipe = None
        self.source.close()


def measure_epoch(loader, *, epoch: int, batches: int, batch_size: int, device: torch.device, step=None):
    """(first-batch latency: iter() to the first batch on the device, steady img/s over the next
    ``batches`` batches) of one epoch."""
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    n, t1, first = 0, None, float("nan")
    it = iter(loader)
    for i, item in enumerate(it):
        if step is not None:
            step(item.images if hasattr(item, "images") else item)
        if i == 0:
            sync(device)
            t1 = time.perf_counter()
            first = t1 - t0
            continue
        n += batch_size
        if i >= batches:
            break
    sync(device)
    rate = n / (time.perf_counter() - t1) if n else float("nan")
    if hasattr(it, "close"):
        it.close()  # an epoch left early is drained now, outside the timing
    return first, rate


def model_step(name: str, classes: int, device: torch.device, channels_last: bool):
    """A bf16-autocast training step of ``name`` (fp32 master weights, channels_last weights and
    inputs on CUDA): the trainer's default recipe; returns step(images)."""
    from pml_scale.model import build_model

    torch.backends.cudnn.benchmark = True  # as the trainer does
    model = build_model(name, classes, channels_last=channels_last).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    target = None

    def step(images: torch.Tensor) -> None:
        nonlocal target
        if target is None or target.shape[0] != images.shape[0]:
            target = (torch.rand(images.shape[0], classes, device=device) < 0.01).float()
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bare_rate(step, device, batch_size: int, size: int, steps: int) -> float:
    x = torch.randn(batch_size, 3, size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        step(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x)
    sync(device)
    return batch_size * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", help="existing dataset folder (default: generate one in a temp folder)")
    p.add_argument("--split", default="train")
    p.add_argument("--images", type=int, default=8192 if cuda else 1024, help="images to generate")
    p.add_argument("--source-size", default="640x480" if cuda else "320x240", help="generated JPEG size WxH")
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--image-size", type=int, default=448 if cuda else 224)
    p.add_argument("--batch-size", type=int, default=128 if cuda else 64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batches", type=int, default=60 if cuda else 12, help="timed batches per epoch (at most)")
    p.add_argument("--pil-batches", type=int, default=12, help="timed batches per epoch for pil (slow)")
    p.add_argument("--backends", default="all", help=f"comma list of {OURS + REFERENCE} or 'all'")
    p.add_argument("--model", default="resnet50" if cuda else "none",
                   help="model fed by each decoding backend and run bare ('none': skip)")
    p.add_argument("--model-batches", type=int, default=30, help="timed model steps (bare and fed)")
    p.add_argument("--classes", type=int, default=600)
    p.add_argument("--hw-decoder-load", type=float, default=None,
                   help="dali (GPU): share of JPEGs for the hardware decoder (default: DALI's)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from pml_scale.data.input import LoaderConfig, build_loader, dali_importable

    have_dali = dali_importable()
    if args.backends == "all":
        backends = ((["dali"] if cuda else ["dali_cpu"]) + list(REFERENCE) if have_dali else []) + ["pil"]
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = sorted(set(backends) - set(OURS + REFERENCE))
        if unknown:
            p.error(f"--backends: unknown {unknown}; choose from {OURS + REFERENCE}")
    tmp = None
    root = args.root
    gen_s = 0.0
    if root is None:
        from pml_scale.demo.synthetic import make_synthetic_dataset

        tmp = tempfile.TemporaryDirectory(prefix="pml-bench-")
        root = tmp.name
        w, h = (int(v) for v in args.source_size.lower().split("x"))
        t0 = time.perf_counter()
        make_synthetic_dataset(root, images=args.images, size=(w, h), shard_size=args.shard_size)
        gen_s = time.perf_counter() - t0
        print(f"generated {args.images} {w}x{h} JPEGs in {gen_s:.1f} s ({os.cpu_count()} processes)", flush=True)
    tars = sorted(Path(root).glob(f"{args.split}-*.tar"))
    from pml_scale.data.shards.format import read_manifest

    samples = read_manifest(root)["splits"][args.split]["num_samples"]
    jpeg_kb = sum(t.stat().st_size for t in tars) / 1024 / max(1, samples)
    device = torch.device("cuda" if cuda else "cpu")
    where = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    step = bare = None
    if args.model != "none":
        step = model_step(args.model, args.classes, device, channels_last=cuda)
        bare = bare_rate(step, device, args.batch_size, args.image_size, args.model_batches)
        print(f"bare {args.model} bf16-autocast{' channels_last' if cuda else ''}: {bare:.1f} img/s", flush=True)

    loaders, rows = {}, []
    for name in backends:
        t_build = time.perf_counter()
        if name in OURS:
            cfg = LoaderConfig(root=root, split=args.split, backend=name, image_size=args.image_size,
                               batch_size=args.batch_size, workers=args.workers, dtype="bf16",
                               hw_decoder_load=args.hw_decoder_load)
            loader = build_loader(cfg, device=device)
        elif name in ("dali_reader", "reader_passthrough"):
            loader = ReaderLoader(root, args.split, gpu=cuda, image_size=args.image_size, batch_size=args.batch_size,
                                  workers=args.workers, decode=name == "dali_reader", device=device,
                                  hw_decoder_load=args.hw_decoder_load)
        else:
            loader = PassthroughLoader(root, args.split, batch_size=args.batch_size, workers=args.workers,
                                       device=device)
        batches = min(args.pil_batches if name == "pil" else args.batches, len(loader) - 1)
        if batches < 1:
            raise SystemExit("need at least 2 batches per epoch: add --images or lower --batch-size")
        loaders[name] = loader
        rows.append({"backend": name, "build_s": round(time.perf_counter() - t_build, 3), "batches": batches,
                     "first_batch_s": [], "rates": []})
    # epochs outer, backends inner: on a shared machine every backend sees the same load
    for epoch in range(args.epochs):
        for row in rows:
            first, rate = measure_epoch(loaders[row["backend"]], epoch=epoch, batches=row["batches"],
                                        batch_size=args.batch_size, device=device)
            row["first_batch_s"].append(round(first, 4))
            row["rates"].append(rate)
    for row in rows:
        rates = row.pop("rates")
        row["steady_img_s"] = max(rates[1:]) if len(rates) > 1 else rates[0]  # best epoch after the first
        row["pipeline_builds"] = getattr(loaders[row["backend"]], "pipeline_builds", None)
        if step is not None and row["backend"] in ("dali", "dali_cpu", "pil", "dali_reader"):
            _, fed = measure_epoch(loaders[row["backend"]], epoch=args.epochs, step=step, device=device,
                                   batches=min(row["batches"], args.model_batches), batch_size=args.batch_size)
            row.update(model_fed_img_s=fed, bare_model_img_s=bare, fed_over_bare=fed / bare)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row: a time limit keeps what was measured
            done = [r for r in rows if "steady_img_s" in r]
            Path(args.json).write_text(json.dumps({"device": where, "args": vars(args), "generate_s": gen_s,
                                                   "mean_jpeg_kb": jpeg_kb, "rows": done}, indent=1) + "\n")
    for loader in loaders.values():
        loader.close()

    print(f"\ndevice: {where}; image_size {args.image_size}, batch {args.batch_size}, workers {args.workers}, "
          f"{len(tars)} shards, mean JPEG {jpeg_kb:.1f} KB (incl. tar overhead)")
    ref = {r["backend"]: r["steady_img_s"] for r in rows}
    head = f"{'backend':<20} {'1st batch e1':>12} {'1st batch e2':>12} {'steady img/s':>13} {'vs reader':>10}"
    if step is not None:
        head += f" {'model fed':>10} {'bare':>8} {'fed/bare':>9}"
    print(head)
    for r in rows:
        fb = r["first_batch_s"] + [float("nan")] * 2
        versus = ""
        if r["backend"] in ("dali", "dali_cpu") and "dali_reader" in ref:
            versus = f"{100 * r['steady_img_s'] / ref['dali_reader']:.0f}%"
        if r["backend"] == "passthrough" and "reader_passthrough" in ref:
            versus = f"{100 * r['steady_img_s'] / ref['reader_passthrough']:.0f}%"
        line = f"{r['backend']:<20} {fb[0]:>11.3f}s {fb[1]:>11.3f}s {r['steady_img_s']:>13.1f} {versus:>10}"
        if "model_fed_img_s" in r:
            line += f" {r['model_fed_img_s']:>10.1f} {r['bare_model_img_s']:>8.1f} {100 * r['fed_over_bare']:>8.1f}%"
        print(line)
    if args.json:
        out = {"device": where, "args": vars(args), "generate_s": gen_s, "mean_jpeg_kb": jpeg_kb, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

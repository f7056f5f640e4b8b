"""Full training step vs the bare model: the real trainer (loader, label gathers, loss, DeepSpeed
step, pseudo-label store) for two epochs, against the same model and DeepSpeed engine, in the
same precision recipe and memory format, on one synthetic in-memory batch.

Per precision recipe, eager and compiled (``--compile both``, the default: ``model.compile``,
torch.compile through DeepSpeed's engine.compile), it prints the first-batch latency of epochs 1
and 2, the steady img/s and the epoch-average img/s of the last epoch (from the trainer's own
``epoch`` records: CUDA events, one sync per epoch), the bare model's img/s (eager or compiled
like the column) and the ratios, the warm-up (compile) time of both, kept out of the steady
figures, and the host-time shares of the step (``labels`` + ``stores`` is the label traffic left
on the main thread).

    python benchmarks/train_step.py                                   # CPU: tiny_resnet, 64 px, 80 labels
    python benchmarks/train_step.py --model resnet50 --image-size 448 --classes 600 --batch-size 128 \\
        --images 6144 --source-size 640x480 --dtype bf16 --backend dali --workers 8 \\
        --precision autocast,deepspeed                                  # one GPU: 48-batch epochs

Targets: steady >= 95% and epoch average >= 90% of the bare model in the same precision; first
batch of epoch 2 <= 0.5 s; label traffic < 1% of the step; compiled trainer steady >= 95% of the
compiled bare model and >= 1.3x the eager trainer (ResNet-50, 448 px, batch 128, bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def bare_rate(cfg, classes: int, *, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(img/s, warm-up s) of the same model + DeepSpeed engine (same precision recipe, memory
    format, compile) + BCE on one synthetic batch: no data, no stores. The warm-up steps (where a
    compiled model compiles) are timed apart."""
    import deepspeed

    from pml_scale.deepspeed_config import deepspeed_config
    from pml_scale.distributed import disable_deepspeed_cpu_shm_op, setup_distributed
    from pml_scale.model import build_model
    from pml_scale.engine import DTYPES, engine_config, finish_engine

    info = setup_distributed()
    disable_deepspeed_cpu_shm_op()
    model = build_model(cfg.model.name, classes, channels_last=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=engine_config(deepspeed_config(cfg, world_size=1), cfg))
    finish_engine(engine, cfg)
    b, s = cfg.data.batch_size, cfg.data.image_size
    x = torch.randn(b, 3, s, s, device=info.device).to(DTYPES[cfg.model.dtype])
    if cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(b, classes, device=info.device) < 0.01).float()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(engine(x).float(), y)
        engine.backward(loss)
        engine.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    return b * steps / (time.perf_counter() - t0), warm_s


def run_trainer(args, root: Path, out: Path, precision: str, compiled: bool) -> dict:
    from pml_scale.config import load_config
    from pml_scale.train import run

    cuda = torch.cuda.is_available()
    overrides = [f"data.root={root}", "data.setting=PAL_0.3", f"data.backend={args.backend}",
                 f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
                 f"data.eval_batch_size={args.batch_size}", f"data.workers={args.workers}",
                 f"model.name={args.model}", f"model.dtype={args.dtype}", f"model.precision={precision}",
                 f"model.compile={str(compiled).lower()}", f"model.compile_mode={args.compile_mode}",
                 f"model.channels_last={str(cuda).lower()}",
                 f"loss.name={args.loss}", f"run.epochs={args.epochs}", "run.eval_every=0",
                 f"run.out_dir={out}", f"run.name=bench-{precision}-{int(compiled)}", "run.log_every=1000000",
                 "run.tensorboard=false", "run.resume=false"]
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    metrics = out / f"bench-{precision}-{int(compiled)}" / "metrics.jsonl"
    lines = [json.loads(l) for l in metrics.read_text().splitlines()]
    epochs = [l for l in lines if l["kind"] == "epoch"]
    shares = [l for l in lines if l["kind"] == "time_share"][-1]
    bare, bare_warm_s = bare_rate(cfg, args.classes, steps=args.bare_steps)
    last = epochs[-1]
    # the first epoch pays the compile: its time beyond a steady epoch's is the warm-up
    warm_s = epochs[0]["images"] / epochs[0]["epoch_img_s"] - last["images"] / last["epoch_img_s"]
    return {"precision": precision, "compiled": compiled,
            "first_batch_s": [round(e["first_batch_s"], 4) for e in epochs],
            "warmup_s": warm_s, "bare_warmup_s": bare_warm_s,
            "steady_img_s": last.get("steady_img_s"), "epoch_img_s": last["epoch_img_s"],
            "steps_per_epoch": last["steps"], "bare_img_s": bare,
            "steady_over_bare": last.get("steady_img_s", float("nan")) / bare,
            "epoch_over_bare": last["epoch_img_s"] / bare, "trainer_wall_s": wall,
            "shares": {k: shares.get(k, 0.0) for k in ("loader", "labels", "forward", "loss", "backward_step",
                                                          "stores")}}


def label_traffic_bench(rows: int, labels: int, batch: int, world: int, steps: int, step_ms: float) -> dict:
    """Label traffic at scale, without a model. Per step a rank gathers the observed states and
    stored ỹ of its ``batch`` random ids of a ``rows`` x ``labels`` store and scatters the ŷ of the
    whole global batch (``world`` x ``batch`` rows: every node's store holds every row). Rows are
    warm in the page cache, as after the first epoch (a cold sparse file costs whatever the disk
    costs, with or without this module). Inline (the old trainer) vs through ``LabelTraffic``
    while a simulated step of ``step_ms`` runs (a sleep, which frees the host as a GPU step does):
    the main thread's time is what the step pays."""
    import numpy as np

    from pml_scale.labels.traffic import BatchLabels, LabelTraffic
    from pml_scale.labels import ObservedLabels
    from pml_scale.labels.stores import PseudoLabelStore
    from pml_scale.losses import build_training_loss

    class Rows:  # what LabelTraffic reads of a batch
        def __init__(self, ids):
            self.ids_host, self.valid_host = ids, np.ones(ids.size, bool)

    G = world * batch
    with tempfile.TemporaryDirectory() as tmp:
        obs_path = Path(tmp) / "observed.npy"
        header = np.lib.format.open_memmap(obs_path, mode="w+", dtype=np.int8, shape=(rows, labels))
        del header  # a sparse file: zeros (negatives) except where written
        observed = ObservedLabels.load(obs_path, validate=False)
        store = PseudoLabelStore(Path(tmp) / "pseudo.f16", rows, labels)
        ids = np.random.default_rng(0).choice(rows, size=G * (2 * steps + 1), replace=False)
        observed.gather(np.sort(ids))
        store.gather_numpy(np.sort(ids))
        yhat = torch.rand(G, labels)
        glob = [ids[s * G:(s + 1) * G] for s in range(2 * steps + 1)]  # global batch s; this rank: first B

        t0 = time.perf_counter()
        for s in range(steps):  # inline, as the old trainer did
            own = glob[s][:batch]
            observed.gather(own)
            store.gather(torch.from_numpy(own))
            store.scatter(glob[s], yhat, mask=observed.gather(glob[s]) == -1)
        inline = (time.perf_counter() - t0) / steps
        traffic = LabelTraffic(observed=observed, pseudo_store=store, estimates_store=None, device=torch.device("cpu"),
                               counts_fn=build_training_loss("paper", {}, seed=0).host_counts, global_counts=False, group=None, world_size=1, rank=0,
                               writer=True, per_node=False, momentum=0.0)
        main_thread = 0.0
        t = time.perf_counter()
        pending = traffic.gather(Rows(glob[steps][:batch]), 0)
        main_thread += time.perf_counter() - t
        for s in range(steps, 2 * steps):
            t = time.perf_counter()
            nxt = traffic.gather(Rows(glob[s + 1][:batch]), 0)
            traffic.to_device(pending.result())
            main_thread += time.perf_counter() - t
            time.sleep(step_ms / 1000)  # the step: the GPU works, the host is free
            t = time.perf_counter()
            everyone = BatchLabels(None, None, None, None, None, (0.0, 0.0), glob[s], G)  # after the all-gather
            traffic.scatter(Rows(glob[s]), everyone, yhat, None)
            main_thread += time.perf_counter() - t
            pending = nxt
        t = time.perf_counter()
        traffic.close()
        drain = time.perf_counter() - t
    return {"rows": rows, "labels": labels, "batch": batch, "world": world, "inline_ms_per_step": 1000 * inline,
            "main_thread_ms_per_step": 1000 * main_thread / steps, "simulated_step_ms": step_ms,
            "share_of_step": main_thread / steps / (step_ms / 1000), "final_drain_ms": 1000 * drain}


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
    p.add_argument("--precision", default="autocast", help="comma list of autocast,deepspeed (bf16/fp16 only)")
    p.add_argument("--backend", default="pil")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--compile", default="both", choices=["off", "on", "both"],
                   help="model.compile for the trainer and the bare model; both: eager and compiled columns")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    p.add_argument("--loss", default="paper")
    p.add_argument("--bare-steps", type=int, default=30)
    p.add_argument("--root", help="existing dataset folder (default: generate one in a temp folder)")
    p.add_argument("--out", help="write the table (Markdown) to this file too")
    p.add_argument("--json", help="write the results (JSON) here")
    p.add_argument("--label-traffic", type=int, metavar="ROWS", default=0,
                   help="instead: label traffic alone on a ROWS x --classes store, --batch-size ids per step")
    p.add_argument("--step-ms", type=float, default=105.0, help="--label-traffic: simulated step time "
                   "(105 ms: ResNet-50 448 bf16 at batch 128 on an H200)")
    p.add_argument("--world", type=int, default=8, help="--label-traffic: ranks whose rows every store receives")
    args = p.parse_args(argv)
    if args.label_traffic:
        res = label_traffic_bench(args.label_traffic, args.classes, args.batch_size, args.world, steps=20,
                                  step_ms=args.step_ms)
        print(json.dumps(res))
        print(f"label traffic, {res['rows']:,} x {res['labels']} store, gather {res['batch']} + scatter "
              f"{res['world'] * res['batch']} random rows per step: inline {res['inline_ms_per_step']:.2f} ms/step "
              f"({100 * res['inline_ms_per_step'] / res['simulated_step_ms']:.1f}% of a {res['simulated_step_ms']:.0f} ms "
              f"step); through LabelTraffic the main thread pays {res['main_thread_ms_per_step']:.3f} ms/step = "
              f"{100 * res['share_of_step']:.2f}%")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        return 0
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    bad = sorted(set(precisions) - {"autocast", "deepspeed"})
    if bad or not precisions:
        p.error(f"--precision: expected a comma list of autocast,deepspeed, got {args.precision!r}")
    if args.dtype == "fp32":
        precisions = precisions[:1]  # the recipe only matters for bf16/fp16

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "data"
        gen_s = 0.0
        if not args.root:
            from pml_scale.demo.synthetic import make_synthetic_dataset

            w, h = (int(v) for v in args.source_size.lower().split("x"))
            t0 = time.perf_counter()
            make_synthetic_dataset(root, images=args.images, test_images=max(args.batch_size, args.images // 8),
                                   classes=args.classes, size=(w, h))
            gen_s = time.perf_counter() - t0
            print(f"generated {args.images} synthetic {w}x{h} JPEGs in {gen_s:.1f} s", flush=True)
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        for precision, compiled in ((p_, c) for p_ in precisions for c in modes):
            results.append(run_trainer(args, root, Path(tmp) / "runs", precision, compiled))
            print(json.dumps(results[-1]), flush=True)
            if args.json:  # after every recipe: a time limit keeps what was measured
                Path(args.json).write_text(json.dumps({"device": _device(), "args": vars(args), "generate_s": gen_s,
                                                       "results": results}, indent=1) + "\n")

    device = _device()
    rows = [f"| {device} | " + " | ".join(r["precision"] + (" compiled" if r["compiled"] else " eager")
                                         for r in results) + " |",
            "|---|" + "---|" * len(results),
            f"| model / size / batch / dtype / loss / backend | {args.model} / {args.image_size} / {args.batch_size} / "
            f"{args.dtype} / {args.loss} / {args.backend} ({args.workers} workers) |" + " |" * (len(results) - 1)]

    def row(name, fmt):
        rows.append(f"| {name} | " + " | ".join(fmt(r) for r in results) + " |")

    row("first batch, epoch 1 / 2 (s)", lambda r: " / ".join(f"{x:.3f}" for x in r["first_batch_s"][:2]))
    row(f"steady img/s (epoch {args.epochs}, {results[0]['steps_per_epoch']} batches)",
        lambda r: f"{r['steady_img_s']:.1f}")
    row(f"epoch-average img/s (epoch {args.epochs})", lambda r: f"{r['epoch_img_s']:.1f}")
    row("bare model img/s (same engine, precision, memory format)", lambda r: f"{r['bare_img_s']:.1f}")
    row("steady / bare", lambda r: f"{100 * r['steady_over_bare']:.1f}%")
    row("epoch average / bare", lambda r: f"{100 * r['epoch_over_bare']:.1f}%")
    row("warm-up: trainer epoch 1 beyond a steady epoch / bare (s)",
        lambda r: f"{r['warmup_s']:.1f} / {r['bare_warmup_s']:.1f}")
    eager = {r["precision"]: r for r in results if not r["compiled"]}
    if any(r["compiled"] for r in results) and eager:
        row("steady / eager trainer, same precision",
            lambda r: f"{r['steady_img_s'] / eager[r['precision']]['steady_img_s']:.2f}x"
            if r["precision"] in eager else "—")
    row("host time: label traffic (labels + stores)",
        lambda r: f"{100 * (r['shares']['labels'] + r['shares']['stores']):.2f}%")
    row("host time: loader / forward / loss / backward+step",
        lambda r: " / ".join(f"{100 * r['shares'][k]:.1f}%" for k in ("loader", "forward", "loss", "backward_step")))
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    raise SystemExit(main())

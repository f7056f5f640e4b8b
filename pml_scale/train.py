"""The training engine: shards + loaders + loss + label stores joined into a DeepSpeed
data-parallel run that can be killed at any moment and resumed without losing anything.

Per step, on every rank:
  1. the loader yields images and sample ids (its epoch plan gives every rank an equal slice);
  2. observed states and stored pseudo labels are gathered by id (host memmaps -> device);
  3. global batch counts (P positives, T label slots) are summed over ranks: one tiny all-reduce,
     so α/β do not depend on the number of GPUs;
  4. forward, loss (the fused Triton kernel on GPUs), DeepSpeed backward/step;
  5. ŷ of this step goes to the pseudo-label store: all-gathered so every node-local store holds
     every row (traffic B·L·2 bytes × world per step), or kept local with shard affinity.

What grows with what: host memory-maps of N×L int8 (observed) and N×L fp16 (pseudo) per node;
per-step traffic B·L per rank; checkpoint size = model + optimizer + N×L×2 bytes of pseudo labels.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .atomic import atomic_write_json
from .config import deepspeed_config, load_config, parse_cli, save_resolved
from .data.format import labels_name, read_manifest
from .data.loaders import LoaderConfig, build_loader
from .distributed import all_reduce_sum, barrier, broadcast_object, disable_deepspeed_cpu_shm_op, setup_distributed
from .evaluate import predict, score
from .data.shard import make_mask, observed_name
from .labels import MISSING, POS, ObservedLabels, class_prior, label_stats, parse_setting
from .losses import LossInputs, PaperOptions, alpha_beta_counts, build_loss
from .model import build_model
from .stores import PseudoLabelStore, RoleEstimates, allgather_updates
from .tracking import Tracker

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------- data
def ensure_dataset(cfg, dist_info) -> dict:
    """Read the manifest; build the embedded demo dataset first if asked and absent (rank 0 only)."""
    root = Path(cfg.data.root)
    # decided once (rank 0) for all ranks: a per-rank check would race with rank 0's writes and
    # leave the ranks with different numbers of barriers
    if cfg.data.build_demo and broadcast_object(not (root / "manifest.json").exists()):
        if dist_info.is_local_main and not (root / "manifest.json").exists():
            from .data.demo import build_demo

            print(f"[pml-scale] building the embedded demo dataset '{cfg.data.demo_dataset}' in {root} ...", flush=True)
            build_demo(root, dataset=cfg.data.demo_dataset, seed=0, progress=True)
        barrier()
    return read_manifest(root)


def observed_path(cfg) -> Path:
    """The observed-label file of the configured setting (made once per seed, then reused); the
    CSR form (.npz) is used when `pml-shard mask --csr` made one."""
    if cfg.data.observed:
        return Path(cfg.data.observed)
    name, ratio = parse_setting(cfg.data.setting)
    root = Path(cfg.data.root)
    if name in ("FAL", "NATIVE"):
        return root / labels_name(cfg.data.train_split)
    stem = root / "observed" / observed_name(name, ratio, cfg.data.setting_seed)
    csr = stem.with_name(stem.name + ".npz")
    return csr if csr.exists() else stem.with_name(stem.name + ".npy")


def ensure_observed(cfg, dist_info) -> ObservedLabels:
    path = observed_path(cfg)
    if broadcast_object(not path.exists()):  # one decision for all ranks (see ensure_dataset)
        if cfg.data.observed:
            raise FileNotFoundError(f"data.observed={cfg.data.observed!r} does not exist")
        if dist_info.is_local_main and not path.exists():
            print(f"[pml-scale] drawing observed labels {path.name} ({cfg.data.setting}, seed "
                  f"{cfg.data.setting_seed}) from {labels_name(cfg.data.train_split)}", flush=True)
            make_mask(cfg.data.root, cfg.data.setting, seed=cfg.data.setting_seed, split=cfg.data.train_split)
        barrier()
    return ObservedLabels.load(path)


def expected_positives(full_train: np.ndarray, chunk: int = 65536) -> float:
    total = 0
    for start in range(0, full_train.shape[0], chunk):
        total += int((np.asarray(full_train[start:start + chunk]) == POS).sum())
    return total / max(full_train.shape[0], 1)


def make_loader(cfg, split: str, *, train: bool, dist_info, batch_size: int):
    lc = LoaderConfig(root=cfg.data.root, split=split, backend=cfg.data.backend, image_size=cfg.data.image_size,
                      batch_size=batch_size, train=train, augment=cfg.data.augment, hflip=cfg.data.hflip,
                      workers=cfg.data.workers, dtype=cfg.model.dtype if cfg.model.dtype != "fp32" else "float32",
                      on_error=cfg.data.on_error, affinity=cfg.data.affinity if train else "none",
                      seed=cfg.run.seed)
    return build_loader(lc, rank=dist_info.rank, world_size=dist_info.world_size, local_rank=dist_info.local_rank,
                        device=dist_info.device)


# ------------------------------------------------------------------------------------- schedule
def lr_lambda(cfg, steps_per_epoch: int):
    """Warmup (linear) then cosine / one-cycle / constant: the paper's dynamic training scheme."""
    total = max(cfg.run.epochs * steps_per_epoch, 1)
    warm = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    floor = cfg.optim.min_lr_ratio
    kind = cfg.optim.schedule

    def f(step: int) -> float:
        if kind == "onecycle":
            peak = max(int(0.3 * total), 1)
            if step < peak:
                return floor + (1 - floor) * step / peak
            t = (step - peak) / max(total - peak, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        t = (step - warm) / max(total - warm, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def make_optimizer(cfg, params):
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                 betas=tuple(cfg.optim.betas))
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                               momentum=cfg.optim.momentum, nesterov=True)
    raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {cfg.optim.name!r}")


# ----------------------------------------------------------------------------------------- run
def run(cfg) -> dict:
    """Train and evaluate one configuration; returns the summary written to summary.json."""
    t_start = time.time()
    if not cfg.data.root:
        raise ValueError("data.root is not set: point it at a dataset folder made by `pml-shard convert` "
                         "(or set data.build_demo=true to build the embedded demo dataset there)")
    dist_info = setup_distributed()
    disable_deepspeed_cpu_shm_op()
    import deepspeed

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    ckpt_dir = run_dir / "checkpoints"
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
    barrier()

    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    manifest = ensure_dataset(cfg, dist_info)
    root = Path(cfg.data.root)
    num_labels = int(manifest["num_classes"])
    full_train = np.load(root / labels_name(cfg.data.train_split), mmap_mode="r")
    test_labels = np.load(root / labels_name(cfg.data.test_split), mmap_mode="r")
    observed = ensure_observed(cfg, dist_info)
    num_train = observed.num_samples
    if observed.num_labels != num_labels:
        raise ValueError(f"{observed_path(cfg)}: {observed.num_labels} labels, but the manifest has {num_labels}")

    train_loader = make_loader(cfg, cfg.data.train_split, train=True, dist_info=dist_info,
                               batch_size=cfg.data.batch_size)
    eval_loader = make_loader(cfg, cfg.data.test_split, train=False, dist_info=dist_info,
                              batch_size=cfg.data.eval_batch_size)
    steps_per_epoch = train_loader.batches_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} × {dist_info.world_size} ranks exceeds the "
                         f"{num_train} training samples: no full batch per epoch")

    # ---- loss and the stores it needs
    loss_options = dict(cfg.loss.options)
    batch_stats = loss_options.pop("batch_stats", "global")
    if batch_stats not in ("global", "local"):
        raise ValueError(f"loss.options.batch_stats must be 'global' or 'local', got {batch_stats!r}")
    if cfg.loss.name == "paper":
        loss_options.setdefault("seed", cfg.run.seed)
    loss_fn = build_loss(cfg.loss.name, **loss_options)
    store_dir = Path(cfg.pseudo.dir) if cfg.pseudo.dir else run_dir
    per_node = cfg.pseudo.sync == "affinity"
    if per_node and cfg.data.affinity != "shard":
        raise ValueError("pseudo.sync=affinity needs data.affinity=shard (each shard always trained on one node)")
    k_expected = expected_positives(full_train)  # EPR/ROLE's k and the class prior's scale
    resuming = broadcast_object(cfg.run.resume and (ckpt_dir / checkpoint.LATEST).exists())
    stores = {}
    if dist_info.is_local_main:
        store_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:  # a fresh run starts from ỹ = 0.5, whatever an earlier run left in the folder
            for name in ("pseudo.f16", "role.f32"):
                for leftover in (store_dir / name, store_dir / f"{name}.json"):
                    leftover.unlink(missing_ok=True)
        init = None
        if cfg.pseudo.init == "prior":
            init = class_prior(label_stats(observed), k_expected)
        PseudoLabelStore(store_dir / "pseudo.f16", num_train, num_labels, create=True, init=init)
    barrier()
    pseudo_store = PseudoLabelStore(store_dir / "pseudo.f16", num_train, num_labels, create=False)
    stores["pseudo"] = pseudo_store
    role_store = None
    if cfg.loss.name == "role":
        if dist_info.is_local_main:
            RoleEstimates(store_dir / "role.f32", num_train, num_labels, init_observed=observed, seed=cfg.run.seed)
        barrier()
        role_store = RoleEstimates(store_dir / "role.f32", num_train, num_labels, seed=cfg.run.seed)
        stores["role"] = role_store

    # ---- model and engine
    # Weights stay NCHW-contiguous: DeepSpeed's bf16 path broadcasts and flattens parameters as raw
    # bytes, which channels_last weights break. channels_last inputs alone make cuDNN pick the
    # channels_last kernels (model.channels_last applies to the inputs, see prepare_images).
    model = build_model(cfg.model.name, num_labels, pretrained=cfg.model.pretrained, channels_last=False,
                        head_dropout=cfg.model.head_dropout)
    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    ds_config = deepspeed_config(cfg, world_size=dist_info.world_size)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    if cfg.model.compile:
        engine.compile()
    in_dtype = DTYPES[cfg.model.dtype]
    if in_dtype != torch.float32:  # DeepSpeed casts parameters only; BatchNorm statistics must follow
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(in_dtype)

    # ---- resume
    state = {"epoch": 0, "batch": 0, "global_step": 0, "best_map": -1.0, "best_epoch": -1, "last_map": None}
    if resuming:
        client = checkpoint.load(engine, ckpt_dir, stores=stores, dist_info=dist_info, per_node=per_node)
        state.update({k: client[k] for k in state if k in client})
        if dist_info.is_main:
            print(f"[pml-scale] resumed from {ckpt_dir} at epoch {state['epoch']} batch {state['batch']}", flush=True)

    tracker = Tracker(run_dir, enabled=dist_info.is_main, tensorboard=cfg.run.tensorboard)
    ckpt_every = cfg.run.checkpoint_every_steps
    summary = None
    try:
        for epoch in range(state["epoch"], cfg.run.epochs):
            start_batch = state["batch"] if epoch == state["epoch"] else 0
            train_loader.set_epoch(epoch, start_batch=start_batch)
            bar = tracker.progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.run.epochs}", initial=start_batch)
            t_last, n_imgs = time.perf_counter(), 0
            shares = {"_sync": cfg.run.time_shares and dist_info.device.type == "cuda"}
            t_prev = time.perf_counter()
            for batch in train_loader:
                _share(shares, "loader", t_prev)
                stats = train_step(engine, batch, loss_fn, observed=observed, pseudo_store=pseudo_store,
                                   role_store=role_store, cfg=cfg, epoch=epoch, in_dtype=in_dtype,
                                   batch_stats=batch_stats, k_expected=k_expected, per_node=per_node,
                                   writer=per_node or dist_info.is_local_main, shares=shares,
                                   debug_tag=f"{state['global_step'] + 1}-{dist_info.rank}")
                state["global_step"] += 1
                state["batch"] = batch.index + 1
                n_imgs += int(batch.valid.sum()) * dist_info.world_size
                bar.update(1)
                if state["global_step"] % cfg.run.log_every == 0 or state["batch"] == steps_per_epoch:
                    now = time.perf_counter()
                    img_s = n_imgs / max(now - t_last, 1e-9)
                    t_last, n_imgs = now, 0
                    lr = scheduler.get_last_lr()[0]
                    own = {{"alpha": "a", "beta": "b", "p2_share": "p2"}.get(k, k): f"{v:.3g}"
                           for k, v in stats.items() if k != "loss"}  # the statistics this loss returned, only
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", **own, img_s=f"{img_s:.0f}", refresh=False)
                    tracker.log("train", state["global_step"], epoch=epoch, lr=lr, img_s=img_s,
                                skipped=train_loader.skipped, **stats)
                if ckpt_every and state["global_step"] % ckpt_every == 0 and state["batch"] < steps_per_epoch:
                    checkpoint.save(engine, ckpt_dir, f"step{state['global_step']}", dict(state),
                                    stores=stores, dist_info=dist_info, per_node=per_node,
                                    keep=cfg.run.keep_checkpoints)
                t_prev = time.perf_counter()
            bar.close()
            state["epoch"], state["batch"] = epoch + 1, 0
            parts = {k: v for k, v in shares.items() if not k.startswith("_")}
            total_time = sum(parts.values())
            if total_time > 0:
                tracker.log("time_share", state["global_step"], epoch=epoch,
                            **{k: v / total_time for k, v in parts.items()})

            if epoch + 1 == cfg.run.epochs or (cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0):
                state["last_map"] = evaluate_epoch(engine, eval_loader, test_labels, full_train, manifest, cfg,
                                                   epoch, num_labels, tracker, run_dir, dist_info, state)
            checkpoint.save(engine, ckpt_dir, f"epoch{epoch + 1}", dict(state), stores=stores,
                            dist_info=dist_info, per_node=per_node, keep=cfg.run.keep_checkpoints)

        summary = {"final_map": state["last_map"], "best_map": state["best_map"], "best_epoch": state["best_epoch"],
                   "epochs": cfg.run.epochs, "loss": cfg.loss.name, "setting": cfg.data.setting, "seed": cfg.run.seed,
                   "dataset": Path(cfg.data.root).name,
                   "world_size": dist_info.world_size, "skipped_samples": train_loader.skipped,
                   "wall_s": time.time() - t_start}
        if dist_info.is_main:
            atomic_write_json(run_dir / "summary.json", summary)
            print(f"[pml-scale] {cfg.run.name}: final mAP {100 * (summary['final_map'] or 0):.2f}  "
                  f"best {100 * summary['best_map']:.2f} (epoch {summary['best_epoch']})  "
                  f"{summary['wall_s']:.0f} s", flush=True)
    finally:
        tracker.close()
        train_loader.close()
        eval_loader.close()
    return summary


def train_step(engine, batch, loss_fn, *, observed, pseudo_store, role_store, cfg, epoch, in_dtype, batch_stats,
               k_expected, per_node, writer, shares, debug_tag: str = "") -> dict:
    """One optimisation step; returns scalar stats for logging. Rows with valid=False (replacements of
    corrupt samples) take no part in the loss, the batch statistics or the stores."""
    tick = time.perf_counter()
    device = batch.images.device
    ids_cpu = batch.ids.cpu().numpy()
    valid_cpu = batch.valid.cpu().numpy()
    states_cpu = observed.gather(ids_cpu)
    states = torch.from_numpy(states_cpu).to(device, non_blocking=True)
    pseudo_cpu = pseudo_store.gather(torch.from_numpy(ids_cpu))
    pseudo = pseudo_cpu.to(device, non_blocking=True)
    valid = batch.valid
    # α/β counts on the host from the gathered labels: no device sync before the all-reduce
    counts = alpha_beta_host_counts(loss_fn, states_cpu[valid_cpu], pseudo_cpu[valid_cpu], ids_cpu[valid_cpu],
                                    epoch=epoch)
    if counts is not None:
        counts = counts.to(device)
        if batch_stats == "global":
            counts = all_reduce_sum(counts)
        counts = (float(counts[0]), float(counts[1]))
    estimates = None
    if role_store is not None:
        estimates = role_store.gather(batch.ids)[valid].detach().requires_grad_(True)
    tock = _share(shares, "labels", tick)

    logits = engine(prepare_images(batch.images, in_dtype, cfg.model.channels_last))
    tock = _share(shares, "forward", tock)
    out = loss_fn(LossInputs(logits=logits[valid], states=states[valid], sample_ids=batch.ids[valid], epoch=epoch,
                             total_epochs=cfg.run.epochs, pseudo=pseudo[valid], estimates=estimates,
                             batch_counts=counts, expected_positives=k_expected))
    tock = _share(shares, "loss", tock)
    engine.backward(out.loss)
    engine.step()
    tock = _share(shares, "backward_step", tock)

    # store updates: missing entries only; every rank writes every rank's rows unless shard affinity
    yhat = torch.zeros(states.shape, dtype=torch.float32, device=device)
    yhat[valid] = out.yhat.float()
    if per_node:
        upd_ids, upd_yhat = batch.ids[valid], yhat[valid]
    else:
        upd_ids, upd_yhat = allgather_updates(batch.ids, yhat, valid)
    _debug_dump(debug_tag, batch.ids[valid], yhat[valid])
    upd_states = torch.from_numpy(observed.gather(upd_ids.cpu().numpy())).to(upd_yhat.device)
    pseudo_store.scatter(upd_ids, upd_yhat, mask=upd_states == MISSING, momentum=cfg.pseudo.momentum)
    if role_store is not None and estimates.grad is not None:
        lr = engine.get_lr()[0] * cfg.optim.role_lr_multiplier
        new_rows = torch.zeros(states.shape, dtype=torch.float32, device=device)
        new_rows[valid] = (estimates - lr * estimates.grad).detach()
        if per_node:
            r_ids, r_rows = batch.ids[valid], new_rows[valid]
        else:
            r_ids, r_rows = allgather_updates(batch.ids, new_rows, valid)
        if writer:
            role_store.scatter(r_ids, r_rows)
    _share(shares, "stores", tock)
    stats = {"loss": float(out.loss.detach())}
    stats.update({k: float(v) for k, v in out.stats.items()})
    return stats


def alpha_beta_host_counts(loss_fn, states: np.ndarray, pseudo: torch.Tensor, ids: np.ndarray, *, epoch: int):
    """(P, T) of this rank's counted rows for the paper loss's α/β reading (float64 CPU tensor), computed on
    the host from the gathered labels (no device sync); None when the loss needs none."""
    opts = getattr(loss_fn, "options", None)
    if not isinstance(opts, PaperOptions) or opts.reading == "none":
        return None
    return alpha_beta_counts(opts.reading, torch.from_numpy(states), pseudo, torch.from_numpy(ids),
                             seed=loss_fn.seed, epoch=epoch, q=opts.q_used)


def prepare_images(images: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """The model's input dtype (bf16 under DeepSpeed bf16) and memory format."""
    images = images.to(dtype)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _debug_dump(tag: str, ids: torch.Tensor, yhat: torch.Tensor) -> None:
    """Test hook: with PML_DEBUG_DUMP_UPDATES=dir, each rank saves the (ids, ŷ) it computed per step,
    so a test can check the pseudo-label store against what every rank really produced."""
    folder = os.environ.get("PML_DEBUG_DUMP_UPDATES")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        np.savez(Path(folder) / f"step-{tag}.npz", ids=ids.cpu().numpy(), yhat=yhat.cpu().numpy())


def _share(shares: dict, name: str, since: float) -> float:
    """Add the time since ``since`` to part ``name`` of the step. GPU work is asynchronous, so with
    ``run.time_shares`` on a GPU we synchronise at each boundary (off by default: it costs overlap)."""
    if shares.get("_sync"):
        torch.cuda.synchronize()
    now = time.perf_counter()
    shares[name] = shares.get(name, 0.0) + (now - since)
    return now


def evaluate_epoch(engine, eval_loader, test_labels, full_train, manifest, cfg, epoch, num_labels, tracker, run_dir,
                   dist_info, state) -> float:
    bar = tracker.progress(eval_loader.batches_per_epoch, "eval")
    scores, ids = predict(engine, eval_loader, epoch=0, num_labels=num_labels, progress=bar,
                          prepare=lambda x: prepare_images(x, DTYPES[cfg.model.dtype], cfg.model.channels_last))
    bar.close()
    result = None
    if dist_info.is_main:
        (m_ap, per_class), n = score(scores, ids, test_labels, partial=cfg.eval.partial)
        tracker.log("eval", state["global_step"], epoch=epoch, map=float(m_ap),
                    num_classes_scored=int(np.isfinite(per_class).sum()), num_images=n)
        print(f"[pml-scale] epoch {epoch + 1}: mAP {100 * m_ap:.2f} on {n} test images", flush=True)
        if cfg.eval.save_per_class:
            freq = np.zeros(num_labels, np.int64)
            for start in range(0, full_train.shape[0], 65536):
                freq += (np.asarray(full_train[start:start + 65536]) == POS).sum(0)
            atomic_write_json(run_dir / "per_class_ap.json", {
                "epoch": epoch, "ap": [None if not np.isfinite(a) else float(a) for a in per_class],
                "class_freq": freq.tolist(), "classes": manifest["classes"]})
        if m_ap > state["best_map"]:
            state["best_map"], state["best_epoch"] = float(m_ap), epoch
            tmp = run_dir / ".best.pt.tmp"
            torch.save(engine.module.state_dict(), tmp)
            os.replace(tmp, run_dir / "best.pt")
        result = float(m_ap)
    result = broadcast_object(result)
    state.update(broadcast_object({"best_map": state["best_map"], "best_epoch": state["best_epoch"]}))
    return result


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(config_path, overrides)
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The training engine: shards + loaders + loss + label stores joined into a DeepSpeed
data-parallel run that can be killed at any moment and resumed without losing anything.

Per step, on every rank, with the host never waiting for the GPU:
  1. the loader yields images (on the device) and the batch's sample ids and validity on the
     host; the next batch is fetched before this step is launched;
  2. the next batch's observed states, stored pseudo labels and α/β counts (P, T) are gathered
     on a background thread from host memmaps into pinned memory (``data.label_traffic``); the
     counts are summed over ranks on a gloo group, so α/β do not depend on the number of GPUs;
  3. this step's labels go to the device with non-blocking copies; invalid rows are dropped with
     a host-built index (no boolean-mask indexing of device tensors);
  4. forward, loss (the fused Triton kernel on GPUs), DeepSpeed backward/step;
  5. ŷ goes back to pinned memory asynchronously (all-gathered first, fixed size, when every
     node's store must hold every row) and the thread writes the pseudo-label store once it landed.
Loss statistics are read (a sync) only every ``run.log_every`` steps. SIGTERM (preemption) is
handled at step boundaries: a checkpoint at the current step, then exit 143 (``preemption``). Ordering of store reads and
writes across epochs, checkpoints and resumes: ``LabelTraffic.fence`` (see its module).

Precision (``model.precision``, for ``model.dtype`` bf16/fp16): ``autocast`` (default) runs
torch.autocast inside DeepSpeed's forward (its ``torch_autocast`` section) with fp32 master
weights in channels_last; ``deepspeed`` runs DeepSpeed's bf16/fp16 mode (half-precision weights,
NCHW because DeepSpeed broadcasts and flattens parameters as raw bytes).

What grows with what: host memory-maps of N×L int8 (observed, dense) or its listed entries (CSR,
13 B each) and N×L fp16 (pseudo) per node; per-step traffic B·L per rank; checkpoint size =
model + optimizer + 2 bitmaps of N bits per rank (``pseudo.snapshot=versioned``: two N×L fp16 stores
by epoch parity instead of one) or + N×L×2 bytes of pseudo labels (``copy``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint
from .atomic import atomic_path, atomic_write_json
from .config import load_config, parse_cli, save_resolved
from .deepspeed_config import deepspeed_config
from .data.shards.format import labels_path, open_labels, read_manifest
from .data.shards.drift import changed_shards, record_shards, shard_change_error
from .labels.traffic import LabelTraffic, debug_dump_dir
from .data.input import LoaderConfig, build_loader
from .distributed import barrier, broadcast_buffers, broadcast_object, disable_deepspeed_cpu_shm_op, setup_distributed
from .evaluate import predict, score
from .data.shards.masks import make_mask, observed_name
from .labels import ObservedLabels, class_prior, label_stats, parse_setting
from .losses import LossInputs, PaperOptions, alpha_beta_counts, build_loss, loss_options
from .model import build_model
from .preemption import EXIT_PREEMPTED, PreemptionGuard, Preempted
from .labels.stores import PseudoLabelStore, RoleEstimates, VersionedPseudoStore, pseudo_store_class
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
            print(f"[pml-scale] building the embedded demo dataset '{cfg.data.demo_dataset}' in {root} ...", flush=True)
            if cfg.data.demo_dataset == "photos":
                from .demo.photos import build_photos

                build_photos(root, seed=0, progress=True)
            else:
                from .demo.digits import build_demo

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
        return labels_path(root, cfg.data.train_split)
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
                  f"{cfg.data.setting_seed}) from {labels_path(cfg.data.root, cfg.data.train_split).name}",
                  flush=True)
            make_mask(cfg.data.root, cfg.data.setting, seed=cfg.data.setting_seed, split=cfg.data.train_split)
        barrier()
    return ObservedLabels.load(path)


def expected_positives(full_train: ObservedLabels) -> float:
    """Positives per training image (dense: block by block; CSR: from the listed entries)."""
    return int(full_train.positives_per_class().sum()) / max(full_train.num_samples, 1)


def val_seed(cfg) -> int:
    return cfg.run.seed if cfg.data.val_seed is None else cfg.data.val_seed


def loader_config(cfg, split: str, *, train: bool, batch_size: int, subset: str = "all",
                  features: str | None = None) -> LoaderConfig:
    return LoaderConfig(root=cfg.data.root, split=split, backend=cfg.data.backend, image_size=cfg.data.image_size,
                        batch_size=batch_size, train=train, augment=cfg.data.augment, hflip=cfg.data.hflip,
                        workers=cfg.data.workers, dtype=cfg.model.dtype if cfg.model.dtype != "fp32" else "float32",
                        on_error=cfg.data.on_error, affinity=cfg.data.affinity if train else "none",
                        seed=cfg.run.seed, subset=subset, val_fraction=cfg.data.val_fraction,
                        val_seed=val_seed(cfg), val_ids=dataset_val_ids(cfg), features=features)


def dataset_val_ids(cfg) -> str | None:
    """The dataset's own validation ids (``val_ids.npy`` in data.root, e.g. the photos dataset's
    held-out exemplars), used instead of a random carve when data.val_fraction > 0."""
    path = Path(cfg.data.root) / "val_ids.npy"
    return str(path) if cfg.data.val_fraction > 0 and path.exists() else None


def make_loader(cfg, split: str, *, train: bool, dist_info, batch_size: int, subset: str = "all",
                features: Path | None = None):
    lc = loader_config(cfg, split, train=train, batch_size=batch_size, subset=subset,
                       features=str(features / f"{split}.npy") if features is not None else None)
    return build_loader(lc, rank=dist_info.rank, world_size=dist_info.world_size, local_rank=dist_info.local_rank,
                        device=dist_info.device)


def ensure_features(cfg, dist_info, num_labels: int) -> Path | None:
    """The frozen trunk's feature cache (``data.feature_cache``), built by one process per node.
    The trunk is built under a fixed seed, so a random-init trunk is the same on every rank."""
    if not cfg.data.feature_cache:
        return None
    from .data.input.features import ensure_cache

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model.name, num_labels, pretrained=cfg.model.pretrained, channels_last=False)
    if cfg.model.frozen_stages < 1:
        raise ValueError("data.feature_cache=true needs model.frozen_stages >= 1 (the units to cache)")
    splits = {cfg.data.train_split: 2 if cfg.data.hflip > 0 else 1, cfg.data.test_split: 1}
    lc = loader_config(cfg, cfg.data.train_split, train=False, batch_size=cfg.data.eval_batch_size)
    folder = None
    if dist_info.is_local_main:
        folder = ensure_cache(cfg.data.root, model, cfg.model.name, cfg.model.frozen_stages, lc, splits,
                              progress=dist_info.is_main)
    folder = broadcast_object(str(folder) if folder is not None else None)
    barrier()
    return Path(folder)


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
# ``run`` is a row of phases, each with one job and a face that names what it reads and what it
# hands on: start_run, build_data, build_loss_and_stores, build_engine, restore,
# build_label_traffic, then per epoch train_epoch and end_epoch, and finish. Their order is part
# of the behaviour, not only of the layout: every rank must issue the same collectives (barriers,
# broadcasts, the gloo group) in the same order, and the seeded RNG draws (model init after
# start_run's seeds) fix the run's numbers.
def run(cfg) -> dict:
    """Train and evaluate one configuration; returns the summary written to summary.json."""
    t_start = time.time()
    guard = PreemptionGuard(cfg.run.preempt_grace_s).install()  # first: a SIGTERM during startup counts
    try:
        dist_info, run_dir = start_run(cfg)
        data = build_data(cfg, dist_info)
        losses = build_loss_and_stores(cfg, dist_info, run_dir, data)
        engine, scheduler = build_engine(cfg, dist_info, data)
        state = restore(cfg, dist_info, run_dir, engine, losses)
        traffic = build_label_traffic(cfg, dist_info, data, losses)
        guard.group, guard.world_size = control_group(cfg, dist_info), dist_info.world_size
        t = Trainer(cfg=cfg, dist_info=dist_info, run_dir=run_dir, data=data, losses=losses, engine=engine,
                    scheduler=scheduler, traffic=traffic, state=state, t_start=t_start,
                    tracker=Tracker(run_dir, enabled=dist_info.is_main, tensorboard=cfg.run.tensorboard),
                    sync_debug=sync_debug_mode(dist_info), preempt=guard)
        summary = None
        try:
            for epoch in range(state["epoch"], cfg.run.epochs):
                train_epoch(t, epoch)
                end_epoch(t, epoch)
            summary = finish(t)
        finally:
            t.close()
    finally:
        guard.uninstall()
    return summary


@dataclass
class RunData:
    """What build_data hands on: the label arrays (host memmaps), the observed labels and the two
    loaders, already checked against each other."""
    manifest: dict
    num_labels: int
    full_train: ObservedLabels  # dense memmap or CSR: never N × L in memory
    test_labels: ObservedLabels
    observed: ObservedLabels
    train_loader: Any
    eval_loader: Any
    steps_per_epoch: int
    eval_labels: ObservedLabels  # rows by id of the split eval_loader reads (the train labels for "val")
    eval_name: str  # "val" (carved from train: every choice is made on it) or "test"
    features: Path | None = None  # the feature cache folder (data.feature_cache)

    @property
    def num_train(self) -> int:
        return self.observed.num_samples


@dataclass
class LossAndStores:
    """What build_loss_and_stores hands on: the loss, its check-free twin for the hot loop, and the
    host stores it reads and writes (saved and restored with every checkpoint)."""
    loss_fn: Any
    fast_loss_fn: Any
    batch_stats: str  # "global": α/β counts summed over ranks; "local": this rank's
    k_expected: float  # EPR/ROLE's k and the class prior's scale
    stores: dict  # "pseudo" (and "role" for ROLE)
    per_node: bool  # pseudo.sync=affinity: each node's store holds only its own shards' rows
    resuming: bool  # decided once for all ranks, before a fresh run wipes the store folder

    @property
    def pseudo_store(self) -> PseudoLabelStore:
        return self.stores["pseudo"]

    @property
    def role_store(self) -> RoleEstimates | None:
        return self.stores.get("role")


@dataclass
class Trainer:
    """What the epoch loop, evaluation and the summary share, built by the phases before them.
    ``state`` is the resumable part (saved in every checkpoint); the rest is rebuilt at start."""
    cfg: Any
    dist_info: Any
    run_dir: Path
    data: RunData
    losses: LossAndStores
    engine: Any
    scheduler: Any
    traffic: LabelTraffic
    state: dict
    t_start: float
    tracker: Tracker
    sync_debug: str
    preempt: PreemptionGuard

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint_dir(self.run_dir)

    @property
    def in_dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.model.dtype]

    def save_checkpoint(self, tag: str) -> None:
        """One place for the step and epoch checkpoints: engine, resumable state and the stores."""
        checkpoint.save(self.engine, self.ckpt_dir, tag, dict(self.state), stores=self.losses.stores,
                        dist_info=self.dist_info, per_node=self.losses.per_node, keep=self.cfg.run.keep_checkpoints)

    def close(self) -> None:
        """Stop the tracker, the loaders' workers and the label thread (also on errors)."""
        self.tracker.close()
        self.data.train_loader.close()
        self.data.eval_loader.close()
        self.traffic.close()


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def start_run(cfg):
    """Distributed setup, the run folder with its resolved config, then the seeds: the first phase,
    so that every later one may talk to other ranks and draws its random numbers after seeding.
    Returns (dist_info, run_dir)."""
    if not cfg.data.root:
        raise ValueError("data.root is not set: point it at a dataset folder made by `pml-shard convert` "
                         "(or set data.build_demo=true to build the embedded demo dataset there)")
    dist_info = setup_distributed(cfg.run.dist_timeout_s)
    disable_deepspeed_cpu_shm_op()
    import deepspeed  # noqa: F401  (imported once the shm op is disabled; build_engine uses it)

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
    barrier()

    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.run.deterministic  # fixed input shapes: let cuDNN pick kernels
    return dist_info, run_dir


def build_data(cfg, dist_info) -> RunData:
    """The dataset (built first if asked), its label arrays, the observed labels of the setting and
    the train/eval loaders; fails early when they disagree or no full batch fits an epoch."""
    manifest = ensure_dataset(cfg, dist_info)
    root = Path(cfg.data.root)
    num_labels = int(manifest["num_classes"])
    full_train = open_labels(root, cfg.data.train_split, manifest)
    test_labels = open_labels(root, cfg.data.test_split, manifest)
    observed = ensure_observed(cfg, dist_info)
    num_train = observed.num_samples
    if observed.num_labels != num_labels:
        raise ValueError(f"{observed_path(cfg)}: {observed.num_labels} labels, but the manifest has {num_labels}")

    features = ensure_features(cfg, dist_info, num_labels)
    has_val = cfg.data.val_fraction > 0
    train_loader = make_loader(cfg, cfg.data.train_split, train=True, dist_info=dist_info,
                               batch_size=cfg.data.batch_size, subset="fit" if has_val else "all", features=features)
    eval_split = cfg.data.train_split if has_val else cfg.data.test_split
    eval_loader = make_loader(cfg, eval_split, train=False, dist_info=dist_info, batch_size=cfg.data.eval_batch_size,
                              subset="val" if has_val else "all", features=features)
    steps_per_epoch = train_loader.batches_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} × {dist_info.world_size} ranks exceeds the "
                         f"{num_train} training samples: no full batch per epoch")
    return RunData(manifest=manifest, num_labels=num_labels, full_train=full_train, test_labels=test_labels,
                   observed=observed, train_loader=train_loader, eval_loader=eval_loader,
                   steps_per_epoch=steps_per_epoch, eval_labels=full_train if has_val else test_labels,
                   eval_name="val" if has_val else "test", features=features)


def build_loss_and_stores(cfg, dist_info, run_dir: Path, data: RunData) -> LossAndStores:
    """The loss and the stores it needs. Whether this run resumes is decided here, because a fresh
    run must wipe what an earlier one left in the store folder before the stores are made."""
    loss_fn, fast_loss_fn, batch_stats = build_loss_fns(cfg)
    store_dir = Path(cfg.pseudo.dir) if cfg.pseudo.dir else run_dir
    per_node = cfg.pseudo.sync == "affinity"
    if per_node and cfg.data.affinity != "shard":
        raise ValueError("pseudo.sync=affinity needs data.affinity=shard (each shard always trained on one node)")
    k_expected = expected_positives(data.full_train)  # EPR/ROLE's k and the class prior's scale
    resuming = broadcast_object(cfg.run.resume and (checkpoint_dir(run_dir) / checkpoint.LATEST).exists())
    stores = open_stores(cfg, dist_info, store_dir, data, resuming=resuming, k_expected=k_expected)
    return LossAndStores(loss_fn=loss_fn, fast_loss_fn=fast_loss_fn, batch_stats=batch_stats, k_expected=k_expected,
                         stores=stores, per_node=per_node, resuming=resuming)


def build_loss_fns(cfg):
    """(loss_fn, fast_loss_fn, batch_stats): the configured loss and, where the loss checks its
    inputs, a twin without the checks: they read device values (host syncs), so the checking one
    runs on the first step and on logging steps (which sync anyway) only, unless
    loss.options.validate says otherwise."""
    loss_options_cfg = dict(cfg.loss.options)
    batch_stats = loss_options_cfg.pop("batch_stats", "global")
    if batch_stats not in ("global", "local"):
        raise ValueError(f"loss.options.batch_stats must be 'global' or 'local', got {batch_stats!r}")
    if cfg.loss.name == "paper":
        loss_options_cfg.setdefault("seed", cfg.run.seed)
    loss_fn = build_loss(cfg.loss.name, **loss_options_cfg)
    fast_loss_fn = loss_fn
    if "validate" not in loss_options_cfg and "validate" in loss_options(cfg.loss.name):
        fast_loss_fn = build_loss(cfg.loss.name, **loss_options_cfg, validate=False)
    return loss_fn, fast_loss_fn, batch_stats


def open_stores(cfg, dist_info, store_dir: Path, data: RunData, *, resuming: bool, k_expected: float) -> dict:
    """The pseudo-label store (and ROLE's estimates): created by one process per node, then opened
    by every rank after a barrier."""
    num_train, num_labels = data.num_train, data.num_labels
    stores = {}
    if dist_info.is_local_main:
        store_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:  # a fresh run starts from ỹ = 0.5, whatever an earlier run left in the folder
            for name in ("pseudo.f16", "role.f32", "pseudo.v0.f16", "pseudo.v1.f16"):
                for leftover in (store_dir / name, store_dir / f"{name}.json"):
                    leftover.unlink(missing_ok=True)
        init = None
        if cfg.pseudo.init == "prior":
            init = class_prior(label_stats(data.observed), k_expected)
        make_pseudo_store(cfg, store_dir, num_train, num_labels, create=True, init=init)
    barrier()
    stores["pseudo"] = make_pseudo_store(cfg, store_dir, num_train, num_labels, create=False)
    if cfg.loss.name == "role":
        if dist_info.is_local_main:
            RoleEstimates(store_dir / "role.f32", num_train, num_labels, init_observed=data.observed,
                          seed=cfg.run.seed)
        barrier()
        stores["role"] = RoleEstimates(store_dir / "role.f32", num_train, num_labels, seed=cfg.run.seed)
    return stores


def make_pseudo_store(cfg, store_dir: Path, num_train: int, num_labels: int, *, create: bool, init=None):
    """``pseudo.snapshot``: versioned (two stores by epoch parity: checkpoints copy nothing) or copy."""
    if cfg.pseudo.snapshot == "versioned":
        return VersionedPseudoStore(store_dir, num_train, num_labels, create=create, init=init, dtype=cfg.pseudo.dtype)
    cls = pseudo_store_class(cfg.pseudo.dtype)
    return cls(store_dir / "pseudo.f16", num_train, num_labels, create=create, init=init)


def build_engine(cfg, dist_info, data: RunData):
    """Model, optimizer and LR schedule wrapped by DeepSpeed, then the precision recipe's memory
    format and dtypes. Returns (engine, scheduler)."""
    import deepspeed

    # weights are built NCHW: DeepSpeed broadcasts parameters as raw bytes at initialisation, which
    # channels_last weights break (finish_engine converts them afterwards where the recipe allows)
    model = build_model(cfg.model.name, data.num_labels, pretrained=cfg.model.pretrained, channels_last=False,
                        head_dropout=cfg.model.head_dropout)
    if cfg.model.frozen_stages or data.features is not None:
        if not hasattr(model, "freeze"):
            raise ValueError(f"model.frozen_stages needs a model with units (efficientnet_lite0), not {cfg.model.name!r}")
        model.freeze(cfg.model.frozen_stages, from_features=data.features is not None)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])  # frozen units: none
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, data.steps_per_epoch))
    ds_config = engine_config(deepspeed_config(cfg, world_size=dist_info.world_size), cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    finish_engine(engine, cfg)
    return engine, scheduler


def restore(cfg, dist_info, run_dir: Path, engine, losses: LossAndStores) -> dict:
    """The resumable state: fresh, or the latest checkpoint's (engine and stores loaded in place),
    so that a killed run goes on at the batch after its last checkpoint."""
    state = {"epoch": 0, "batch": 0, "global_step": 0, "best_map": -1.0, "best_epoch": -1, "last_map": None}
    check_shards(cfg, dist_info, run_dir, resuming=losses.resuming)
    if losses.resuming:
        ckpt_dir = checkpoint_dir(run_dir)
        client = checkpoint.load(engine, ckpt_dir, stores=losses.stores, dist_info=dist_info, per_node=losses.per_node)
        state.update({k: client[k] for k in state if k in client})
        if dist_info.is_main:
            print(f"[pml-scale] resumed from {ckpt_dir} at epoch {state['epoch']} batch {state['batch']}", flush=True)
    return state


def check_shards(cfg, dist_info, run_dir: Path, *, resuming: bool) -> None:
    """Fresh run: record the shards it reads; resumed run: fail naming every shard whose bytes
    changed since (``data.drift``). Rank 0 looks, every rank gets the verdict."""
    problems = None
    if dist_info.is_main:
        manifest = read_manifest(cfg.data.root)
        splits = (cfg.data.train_split, cfg.data.test_split)
        if resuming:
            problems = changed_shards(run_dir, cfg.data.root, manifest, splits)
        else:
            record_shards(run_dir, cfg.data.root, manifest, splits)
    problems = broadcast_object(problems)
    if problems:
        raise shard_change_error(problems, cfg.data.root)


def build_label_traffic(cfg, dist_info, data: RunData, losses: LossAndStores) -> LabelTraffic:
    """Label gathers and store writes on a background thread. Made after restore, so its first
    gather reads the restored stores; its collectives (α/β counts, fences) use their own gloo group,
    so they never interleave with the main thread's."""
    label_group = gloo_group(cfg) if dist_info.world_size > 1 else None
    per_node = losses.per_node
    return LabelTraffic(observed=data.observed, pseudo_store=losses.pseudo_store, role_store=losses.role_store,
                        device=dist_info.device, counts_fn=batch_label_counts(losses.loss_fn),
                        global_counts=losses.batch_stats == "global", group=label_group,
                        world_size=dist_info.world_size, rank=dist_info.rank,
                        writer=per_node or dist_info.is_local_main, per_node=per_node,
                        momentum=cfg.pseudo.momentum, debug_dir=debug_dump_dir())


def control_group(cfg, dist_info):
    """A gloo group of its own for the preemption flag's per-step all-reduce (None for one rank):
    the main thread's collectives must not interleave with the label thread's on its group."""
    return gloo_group(cfg) if dist_info.world_size > 1 else None


def gloo_group(cfg):
    """A new gloo group (a collective: every rank calls it in the same order), its collectives
    bounded by run.dist_timeout_s like the default group's (new groups otherwise wait 30 min)."""
    import datetime

    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=cfg.run.dist_timeout_s))


def sync_debug_mode(dist_info) -> str:
    """Test hook: PML_SYNC_DEBUG=warn|error turns on torch's sync debug mode around every hot-loop
    iteration (not the first step, logging steps or checkpoints, which sync on purpose); CUDA only."""
    return os.environ.get("PML_SYNC_DEBUG", "") if dist_info.device.type == "cuda" else ""


@dataclass
class EpochMeters:
    """Per-epoch bookkeeping the steps of one epoch share: the progress bar, the host time shares,
    the throughput clock and image counters (``n_imgs``/``t_last`` since the last log line)."""
    bar: Any
    shares: dict
    clock: EpochClock
    t_last: float
    t_prev: float
    n_imgs: int = 0
    epoch_images: int = 0


def train_epoch(t: Trainer, epoch: int) -> None:
    """One epoch of steps (from the restored batch when resuming mid-epoch), then its timing records.
    The next batch and its labels are always requested before the current step is launched."""
    cfg, state = t.cfg, t.state
    start_batch = state["batch"] if epoch == state["epoch"] else 0
    t.data.train_loader.set_epoch(epoch, start_batch=start_batch)
    # explicit ordering: every store write of the previous epoch (or the restored snapshot) is in
    # every rank's store before this epoch's first gather reads it
    t.traffic.fence(barrier=True)
    pseudo = t.losses.pseudo_store
    if hasattr(pseudo, "begin_epoch"):  # versioned: read last epoch's version, write this one's
        pseudo.begin_epoch(epoch)
    bar = t.tracker.progress(t.data.steps_per_epoch, f"epoch {epoch + 1}/{cfg.run.epochs}", initial=start_batch)
    t_last = time.perf_counter()
    shares = {"_sync": cfg.run.time_shares and t.dist_info.device.type == "cuda"}
    clock = EpochClock(t.dist_info.device)
    m = EpochMeters(bar=bar, shares=shares, clock=clock, t_last=t_last, t_prev=time.perf_counter())
    batches = iter(t.data.train_loader)
    batch = next(batches, None)
    clock.first_batch()
    pending = t.traffic.gather(batch, epoch) if batch is not None else None
    while batch is not None:
        batch, pending = epoch_step(t, m, epoch, batch, pending, batches)
    bar.close()
    t.traffic.fence(barrier=False)
    if hasattr(pseudo, "end_epoch"):  # complete this epoch's version (rows not visited) before its checkpoint
        pseudo.end_epoch(link=t.dist_info.is_local_main)
    record_epoch(t, m, epoch)


def epoch_step(t: Trainer, m: EpochMeters, epoch: int, batch, pending, batches):
    """The loop's side of one step: queue the next batch and its labels, run ``train_step``, count,
    log on logging steps, checkpoint on the step cadence. Returns the next (batch, pending)."""
    cfg, state = t.cfg, t.state
    step_no = state["global_step"] + 1
    log_now = step_no % cfg.run.log_every == 0 or batch.index + 1 == t.data.steps_per_epoch
    check = state["global_step"] == 0 or log_now  # the loss checks its inputs (a sync) here only
    hot = t.sync_debug and m.clock.steps >= 1 and not check
    if hot:
        torch.cuda.set_sync_debug_mode(t.sync_debug)
    # the next batch and its labels are on their way before this step is launched
    nxt = next(batches, None)
    nxt_pending = t.traffic.gather(nxt, epoch) if nxt is not None else None  # ids disjoint within an epoch
    _share(m.shares, "loader", m.t_prev)
    if m.clock.steps == 1:
        m.clock.steady_start(m.epoch_images)
    losses = t.losses
    stats = train_step(t.engine, batch, pending, losses.loss_fn if check else losses.fast_loss_fn,
                       traffic=t.traffic, cfg=cfg, epoch=epoch, in_dtype=t.in_dtype, k_expected=losses.k_expected,
                       shares=m.shares, tag=f"{step_no}-{t.dist_info.rank}")
    if hot:
        torch.cuda.set_sync_debug_mode(0)
    m.clock.steps += 1
    state["global_step"] = step_no
    state["batch"] = batch.index + 1
    valid_images = int(batch.valid_host.sum()) * t.dist_info.world_size
    m.n_imgs += valid_images
    m.epoch_images += valid_images
    m.bar.update(1)
    if log_now:
        log_step(t, m, epoch, stats)
    ckpt_every = cfg.run.checkpoint_every_steps
    mid_epoch = state["batch"] < t.data.steps_per_epoch  # the epoch's last step checkpoints in end_epoch
    saved = bool(ckpt_every and state["global_step"] % ckpt_every == 0 and mid_epoch)
    if saved:
        t.traffic.fence(barrier=False)  # the snapshot must hold every ŷ up to this step
        t.save_checkpoint(f"step{state['global_step']}")
    if t.preempt.should_stop() and mid_epoch:
        tag = f"step{state['global_step']}"
        if not saved:
            t.traffic.fence(barrier=False)
            t.save_checkpoint(tag)
        raise t.preempt.committed(tag)
    m.t_prev = time.perf_counter()
    return nxt, nxt_pending


def log_step(t: Trainer, m: EpochMeters, epoch: int, stats: dict) -> None:
    """The only place loss statistics are read back (a host sync): progress bar and metrics.jsonl."""
    values = {k: float(v) for k, v in stats.items()}
    now = time.perf_counter()
    img_s = m.n_imgs / max(now - m.t_last, 1e-9)
    m.t_last, m.n_imgs = now, 0
    lr = t.scheduler.get_last_lr()[0]
    own = {{"alpha": "a", "beta": "b", "p2_share": "p2"}.get(k, k): f"{v:.3g}"
           for k, v in values.items() if k != "loss"}  # the statistics this loss returned, only
    m.bar.set_postfix(loss=f"{values['loss']:.4f}", **own, img_s=f"{img_s:.0f}", refresh=False)
    t.tracker.log("train", t.state["global_step"], epoch=epoch, lr=lr, img_s=img_s,
                  skipped=t.data.train_loader.skipped, **values)


def record_epoch(t: Trainer, m: EpochMeters, epoch: int) -> None:
    """After the epoch's last fence: its throughput and time-share records, and the resumable state
    moved to the start of the next epoch."""
    state = t.state
    timing = m.clock.end(m.epoch_images)
    if timing:
        t.tracker.log("epoch", state["global_step"], epoch=epoch, **timing)
    state["epoch"], state["batch"] = epoch + 1, 0
    parts = {k: v for k, v in m.shares.items() if not k.startswith("_")}
    total_time = sum(parts.values())
    if total_time > 0:
        t.tracker.log("time_share", state["global_step"], epoch=epoch,
                      **{k: v / total_time for k, v in parts.items()})


def end_epoch(t: Trainer, epoch: int) -> None:
    """Evaluate when due (every run.eval_every epochs and after the last), then the epoch's
    checkpoint, which thus holds the evaluation's best_map/last_map."""
    cfg = t.cfg
    if epoch + 1 == cfg.run.epochs or (cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0):
        broadcast_buffers(t.engine.module)  # one set of BatchNorm statistics for every rank's share
        t.state["last_map"] = evaluate_epoch(t, epoch)
    t.save_checkpoint(f"epoch{epoch + 1}")
    if t.preempt.should_stop() and epoch + 1 < cfg.run.epochs:  # after the last epoch: finish instead
        raise t.preempt.committed(f"epoch{epoch + 1}")


def finish(t: Trainer) -> dict:
    """The run's summary: written last (summary.json marks a finished run) and printed, by rank 0."""
    cfg, state, dist_info = t.cfg, t.state, t.dist_info
    test_map = test_once(t)
    summary = {"final_map": state["last_map"], "best_map": state["best_map"], "best_epoch": state["best_epoch"],
               "eval_split": t.data.eval_name, "test_map": test_map if t.data.eval_name == "val" else state["last_map"],
               "epochs": cfg.run.epochs, "loss": cfg.loss.name, "setting": cfg.data.setting, "seed": cfg.run.seed,
               "dataset": Path(cfg.data.root).name,
               "world_size": dist_info.world_size, "skipped_samples": t.data.train_loader.skipped,
               "wall_s": time.time() - t.t_start}
    if dist_info.is_main:
        atomic_write_json(t.run_dir / "summary.json", summary)
        print(f"[pml-scale] {cfg.run.name}: final {t.data.eval_name} mAP {100 * (summary['final_map'] or 0):.2f}  "
              f"best {100 * summary['best_map']:.2f} (epoch {summary['best_epoch']})  "
              f"{summary['wall_s']:.0f} s", flush=True)
    return summary


def batch_label_counts(loss_fn):
    """The host function the label thread calls per batch: (states, pseudo, ids) of the valid rows
    as host arrays and the epoch -> (P, T) of the loss's α/β reading (``alpha_beta_host_counts``),
    or None when the loss needs none. Host-side and sync-free; summed over ranks afterwards when
    loss.options.batch_stats is global."""
    def counts(states: np.ndarray, pseudo: np.ndarray, ids: np.ndarray, epoch: int):
        c = alpha_beta_host_counts(loss_fn, states, torch.from_numpy(pseudo), ids, epoch=epoch)
        return None if c is None else (float(c[0]), float(c[1]))

    return counts


def engine_config(ds: dict, cfg) -> dict:
    """The generated DeepSpeed config, adjusted for a loop that never waits on the device:

    * DeepSpeed's throughput timer (on by default when DeepSpeed has no dataloader of its own)
      calls ``synchronize()`` twice per step; it is switched off unless the config sets ``timers``;
    * ``model.precision=autocast`` (bf16/fp16) replaces DeepSpeed's bf16/fp16 mode by its
      ``torch_autocast`` section: fp32 master weights, autocast in the engine's forward;
      ``deepspeed`` keeps DeepSpeed's own bf16/fp16 mode as generated.
    """
    ds = dict(ds)
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    if cfg.model.dtype != "fp32" and cfg.model.precision == "autocast":
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if cfg.model.dtype == "bf16" else "float16"}
    return ds


def finish_engine(engine, cfg) -> None:
    """After ``deepspeed.initialize``: the recipe's memory format and buffer dtypes, then compile.
    With fp32 master weights (autocast, or fp32) the weights go channels_last in place (same Parameter
    objects, so the optimizer follows). DeepSpeed's bf16/fp16 mode keeps NCHW weights (it
    flattens them) and needs the BatchNorm statistics cast like the parameters; channels_last
    inputs still make cuDNN pick its channels_last kernels there."""
    ds_half = DTYPES[cfg.model.dtype] != torch.float32 and cfg.model.precision == "deepspeed"
    if cfg.model.channels_last and not ds_half:
        engine.module.to(memory_format=torch.channels_last)
    if ds_half:
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(DTYPES[cfg.model.dtype])
    if cfg.model.compile:
        engine.compile()


def train_step(engine, batch, pending, loss_fn, *, traffic, cfg, epoch, in_dtype, k_expected, shares,
               tag: str = "") -> dict:
    """One optimisation step, launched without waiting for the device. ``pending`` is the batch's
    queued label gather. Returns the step's statistics as they come (device tensors or floats):
    the caller reads them only when it logs. Rows with valid=False (padding, replacements of
    corrupt samples) take no part in the loss, the batch statistics or the stores."""
    tick = time.perf_counter()
    labels = traffic.to_device(traffic.collect(pending))
    estimates = labels.estimates.requires_grad_(True) if labels.estimates is not None else None
    tock = _share(shares, "labels", tick)

    logits = engine(prepare_images(batch.images, in_dtype, cfg.model.channels_last))
    if labels.rows is not None:  # some rows invalid: a host-built index, no boolean mask on the device
        logits = logits.index_select(0, labels.rows)
    tock = _share(shares, "forward", tock)
    out = loss_fn(LossInputs(logits=logits, states=labels.states, sample_ids=labels.ids, epoch=epoch,
                             total_epochs=cfg.run.epochs, pseudo=labels.pseudo, estimates=estimates,
                             batch_counts=labels.counts, expected_positives=k_expected))
    tock = _share(shares, "loss", tock)
    engine.backward(out.loss)
    engine.step()
    tock = _share(shares, "backward_step", tock)

    role_rows = None
    if estimates is not None and estimates.grad is not None:
        lr = engine.get_lr()[0] * cfg.optim.role_lr_multiplier
        role_rows = (estimates - lr * estimates.grad).detach()
    traffic.scatter(batch, labels, out.yhat, role_rows, tag)  # written behind the next steps
    _share(shares, "stores", tock)
    stats = {"loss": out.loss.detach()}
    stats.update(out.stats)
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
    """The model's input dtype and memory format (under autocast the convolutions cast anyway)."""
    images = images.to(dtype)
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images


def _share(shares: dict, name: str, since: float) -> float:
    """Add the host time since ``since`` to part ``name`` of the step. GPU work is asynchronous, so
    these are host (launch and wait) times; with ``run.time_shares`` on a GPU we synchronise at
    each boundary for device-time shares (off by default: it costs the overlap)."""
    if shares.get("_sync"):
        torch.cuda.synchronize()
    now = time.perf_counter()
    shares[name] = shares.get(name, 0.0) + (now - since)
    return now


class EpochClock:
    """Per-epoch throughput without per-step syncs: host time to the first batch, CUDA events (host
    time on CPU) from the second step to the end of the epoch, read after one sync at its end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()
        self.first_s = None
        self.steps = 0
        self._start = None
        self._start_images = 0

    def first_batch(self) -> None:
        self.first_s = time.perf_counter() - self.t0

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def steady_start(self, images_so_far: int) -> None:
        self._start, self._start_images = self._mark(), images_so_far

    def end(self, images: int) -> dict:
        """{first_batch_s, epoch_img_s, steady_img_s, images} (one device sync), or {} if empty."""
        if self.steps == 0:
            return {}
        stop = self._mark()
        if self.cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - self.t0
        out = {"first_batch_s": self.first_s, "epoch_img_s": images / max(total, 1e-9), "images": images,
               "steps": self.steps}
        if self._start is not None:
            span = self._start.elapsed_time(stop) / 1000 if self.cuda else stop - self._start
            out["steady_img_s"] = (images - self._start_images) / max(span, 1e-9)
        return out


def evaluate_epoch(t: Trainer, epoch: int) -> float:
    """Score the evaluation split (validation if carved, else test; every rank predicts its share,
    rank 0 scores) and keep best.pt; returns the mAP, with best_map/best_epoch in ``t.state`` the
    same on every rank."""
    state, dist_info, run_dir = t.state, t.dist_info, t.run_dir
    m_ap, per_class, n = score_split(t, t.data.eval_loader, t.data.eval_labels)
    result = None
    if dist_info.is_main:
        t.tracker.log("eval", state["global_step"], epoch=epoch, map=float(m_ap), split=t.data.eval_name,
                      num_classes_scored=int(np.isfinite(per_class).sum()), num_images=n)
        print(f"[pml-scale] epoch {epoch + 1}: mAP {100 * m_ap:.2f} on {n} {t.data.eval_name} images", flush=True)
        if t.cfg.eval.save_per_class:
            save_per_class(t, run_dir / "per_class_ap.json", epoch, per_class)
        if m_ap > state["best_map"]:
            state["best_map"], state["best_epoch"] = float(m_ap), epoch
            with atomic_path(run_dir / "best.pt") as tmp:
                torch.save(t.engine.module.state_dict(), tmp)
        result = float(m_ap)
    result = broadcast_object(result)
    state.update(broadcast_object({"best_map": state["best_map"], "best_epoch": state["best_epoch"]}))
    return result


def score_split(t: Trainer, loader, labels: ObservedLabels):
    """(mAP, per-class AP, images) of the current model on ``loader``'s split (on rank 0; None
    elsewhere): every rank predicts its share, rank 0 scores against ``labels`` (rows by id)."""
    cfg = t.cfg
    bar = t.tracker.progress(loader.batches_per_epoch, "eval")
    scores, ids = predict(t.engine, loader, epoch=0, num_labels=t.data.num_labels, progress=bar,
                          prepare=lambda x: prepare_images(x, DTYPES[cfg.model.dtype], cfg.model.channels_last))
    bar.close()
    if not t.dist_info.is_main:
        return None, None, None
    (m_ap, per_class), n = score(scores, ids, labels, partial=cfg.eval.partial)
    return m_ap, per_class, n


def save_per_class(t: Trainer, path: Path, epoch: int, per_class: np.ndarray) -> None:
    """Per-class AP beside the training-set frequency of each class (for the long-tail plots)."""
    freq = t.data.full_train.positives_per_class()  # dense: block by block; CSR: from the listed entries
    atomic_write_json(path, {"epoch": epoch, "ap": [None if not np.isfinite(a) else float(a) for a in per_class],
                             "class_freq": freq.tolist(), "classes": t.data.manifest["classes"]})


def test_once(t: Trainer) -> float | None:
    """With a validation split: the test split scored once, after the last epoch (eval.test)."""
    if t.data.eval_name != "val" or not t.cfg.eval.test:
        return None
    loader = make_loader(t.cfg, t.cfg.data.test_split, train=False, dist_info=t.dist_info,
                         batch_size=t.cfg.data.eval_batch_size, features=t.data.features)
    try:
        m_ap, per_class, n = score_split(t, loader, t.data.test_labels)
    finally:
        loader.close()
    if t.dist_info.is_main:
        print(f"[pml-scale] test (read once): mAP {100 * m_ap:.2f} on {n} test images", flush=True)
        if t.cfg.eval.save_per_class:
            save_per_class(t, t.run_dir / "per_class_ap_test.json", t.cfg.run.epochs - 1, per_class)
    return broadcast_object(float(m_ap) if m_ap is not None else None)


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(config_path, overrides)
    try:
        run(cfg)
    except Preempted as e:
        print(f"[pml-scale] {e}; exit code {EXIT_PREEMPTED}", flush=True)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

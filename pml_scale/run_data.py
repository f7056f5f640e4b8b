"""The run's data: the dataset (built first if asked), its label arrays, the observed labels of
the setting, the feature cache and the train/evaluation loaders, checked against each other.
Host memory: the label arrays are memory-maps (dense int8) or their listed entries (CSR, 13 B
each), never N × L in memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.shards.drift import changed_shards, record_shards, shard_change_error
from .data.shards.format import labels_path, open_labels, read_manifest
from .data.input import LoaderConfig, build_loader
from .data.shards.masks import make_mask, observed_name
from .distributed import barrier, broadcast_object
from .labels import ObservedLabels, parse_setting
from .model import build_model


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
    k_expected: float  # positives per training image: EPR/ROLE's k and the class prior's scale
    features: Path | None = None  # the feature cache folder (data.feature_cache)

    @property
    def num_train(self) -> int:
        return self.observed.num_samples


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
                   eval_name="val" if has_val else "test", k_expected=expected_positives(full_train),
                   features=features)


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


def make_loader(cfg, split: str, *, train: bool, dist_info, batch_size: int, subset: str = "all",
                features: Path | None = None):
    lc = loader_config(cfg, split, train=train, batch_size=batch_size, subset=subset,
                       features=str(features / f"{split}.npy") if features is not None else None)
    return build_loader(lc, rank=dist_info.rank, world_size=dist_info.world_size, local_rank=dist_info.local_rank,
                        device=dist_info.device)


def loader_config(cfg, split: str, *, train: bool, batch_size: int, subset: str = "all",
                  features: str | None = None) -> LoaderConfig:
    return LoaderConfig(root=cfg.data.root, split=split, backend=cfg.data.backend, image_size=cfg.data.image_size,
                        batch_size=batch_size, train=train, augment=cfg.data.augment, hflip=cfg.data.hflip,
                        workers=cfg.data.workers, dtype=cfg.model.dtype,
                        on_error=cfg.data.on_error, affinity=cfg.data.affinity if train else "none",
                        seed=cfg.run.seed, subset=subset, val_fraction=cfg.data.val_fraction,
                        val_seed=val_seed(cfg), val_ids=dataset_val_ids(cfg), features=features)


def dataset_val_ids(cfg) -> str | None:
    """The dataset's own validation ids (``val_ids.npy`` in data.root, e.g. the photos dataset's
    held-out exemplars), used instead of a random carve when data.val_fraction > 0."""
    path = Path(cfg.data.root) / "val_ids.npy"
    return str(path) if cfg.data.val_fraction > 0 and path.exists() else None


def val_seed(cfg) -> int:
    return cfg.run.seed if cfg.data.val_seed is None else cfg.data.val_seed


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

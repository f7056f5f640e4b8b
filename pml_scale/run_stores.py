"""The run's per-sample stores: the pseudo labels and whatever state the loss keeps (ROLE's
estimates), made by one process per node and opened by every rank; the resumable state restored
from the latest checkpoint into them; and the label thread that gathers and writes their rows.

What grows with what: the pseudo store is N × L fp16 (uint8 with ``pseudo.dtype``) per node, two
of them with ``pseudo.snapshot=versioned`` (by epoch parity, so a checkpoint keeps 2 bitmaps of N
bits per rank instead of a copy); per-step label traffic is B·L per rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from .labels.traffic import LabelTraffic, debug_dump_dir
from .distributed import barrier, broadcast_object
from .labels import class_prior, label_stats
from .losses import TrainingLoss
from .run_data import RunData, check_shards
from .labels.stores import PseudoLabelStore, VersionedPseudoStore, pseudo_store_class

PSEUDO_FILES = ("pseudo.f16", "pseudo.v0.f16", "pseudo.v1.f16")


@dataclass
class RunStores:
    """The stores the loss reads and writes by sample id ("pseudo", and the loss's own), saved and
    restored with every checkpoint."""
    stores: dict
    estimates_name: str | None  # the store whose rows the loss gets as LossInputs.estimates
    per_node: bool  # pseudo.sync=affinity: each node's store holds only its own shards' rows
    resuming: bool  # decided once for all ranks, before a fresh run wipes the store folder

    @property
    def pseudo(self) -> PseudoLabelStore:
        return self.stores["pseudo"]

    @property
    def estimates(self):
        return self.stores.get(self.estimates_name) if self.estimates_name else None


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def build_stores(cfg, dist_info, run_dir: Path, data: RunData, loss: TrainingLoss) -> RunStores:
    """The stores. Whether this run resumes is decided here, because a fresh run must wipe what an
    earlier one left in the store folder before the stores are made."""
    store_dir = Path(cfg.pseudo.dir) if cfg.pseudo.dir else run_dir
    per_node = cfg.pseudo.sync == "affinity"
    if per_node and cfg.data.affinity != "shard":
        raise ValueError("pseudo.sync=affinity needs data.affinity=shard (each shard always trained on one node)")
    resuming = broadcast_object(cfg.run.resume and (checkpoint_dir(run_dir) / checkpoint.LATEST).exists())
    stores = open_stores(cfg, dist_info, store_dir, data, loss, resuming=resuming)
    return RunStores(stores=stores, estimates_name=loss.ESTIMATES, per_node=per_node, resuming=resuming)


def open_stores(cfg, dist_info, store_dir: Path, data: RunData, loss: TrainingLoss, *, resuming: bool) -> dict:
    """The pseudo-label store, then the loss's own: created by one process per node, then opened by
    every rank after a barrier."""
    num_train, num_labels = data.num_train, data.num_labels
    if dist_info.is_local_main:
        store_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:  # a fresh run starts from ỹ = 0.5, whatever an earlier run left in the folder
            for name in (*PSEUDO_FILES, *loss.STATE_FILES):
                for leftover in (store_dir / name, store_dir / f"{name}.json"):
                    leftover.unlink(missing_ok=True)
        init = None
        if cfg.pseudo.init == "prior":
            init = class_prior(label_stats(data.observed), data.k_expected)
        make_pseudo_store(cfg, store_dir, num_train, num_labels, create=True, init=init)
    barrier()
    stores = {"pseudo": make_pseudo_store(cfg, store_dir, num_train, num_labels, create=False)}
    if not loss.STATE_FILES:
        return stores
    if dist_info.is_local_main:
        loss.open_state(store_dir, num_train, num_labels, observed=data.observed, create=True)
    barrier()
    stores.update(loss.open_state(store_dir, num_train, num_labels, observed=data.observed, create=False))
    return stores


def make_pseudo_store(cfg, store_dir: Path, num_train: int, num_labels: int, *, create: bool, init=None):
    """``pseudo.snapshot``: versioned (two stores by epoch parity: checkpoints copy nothing) or copy."""
    if cfg.pseudo.snapshot == "versioned":
        return VersionedPseudoStore(store_dir, num_train, num_labels, create=create, init=init, dtype=cfg.pseudo.dtype)
    cls = pseudo_store_class(cfg.pseudo.dtype)
    return cls(store_dir / "pseudo.f16", num_train, num_labels, create=create, init=init)


def restore(cfg, dist_info, run_dir: Path, engine, stores: RunStores) -> dict:
    """The resumable state: fresh, or the latest checkpoint's (engine and stores loaded in place),
    so that a killed run goes on at the batch after its last checkpoint."""
    state = {"epoch": 0, "batch": 0, "global_step": 0, "best_map": -1.0, "best_epoch": -1, "last_map": None}
    check_shards(cfg, dist_info, run_dir, resuming=stores.resuming)
    if stores.resuming:
        ckpt_dir = checkpoint_dir(run_dir)
        client = checkpoint.load(engine, ckpt_dir, stores=stores.stores, dist_info=dist_info, per_node=stores.per_node)
        state.update({k: client[k] for k in state if k in client})
        if dist_info.is_main:
            print(f"[pml-scale] resumed from {ckpt_dir} at epoch {state['epoch']} batch {state['batch']}", flush=True)
    return state


def build_label_traffic(cfg, dist_info, stores: RunStores, data: RunData, loss: TrainingLoss) -> LabelTraffic:
    """Label gathers and store writes on a background thread. Made after restore, so its first
    gather reads the restored stores; its collectives (α/β counts, fences) use their own gloo group,
    so they never interleave with the main thread's."""
    label_group = gloo_group(cfg) if dist_info.world_size > 1 else None
    per_node = stores.per_node
    return LabelTraffic(observed=data.observed, pseudo_store=stores.pseudo, estimates_store=stores.estimates,
                        device=dist_info.device, counts_fn=loss.host_counts,
                        global_counts=loss.batch_stats == "global", group=label_group,
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

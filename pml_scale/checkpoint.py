"""Checkpoints that lose nothing: DeepSpeed's model/optimizer/scheduler state, our client state
(epoch, position in the epoch, best mAP, RNG) and the pseudo-label store, committed together.

Commit protocol: DeepSpeed writes the tag folder with ``save_latest=False``; we add the pseudo-label
snapshot(s) into that folder; after a barrier rank 0 atomically rewrites ``latest``. A kill at any
moment leaves ``latest`` pointing at a complete checkpoint (the older one if the new one was cut).

Pseudo labels: a ``VersionedPseudoStore`` (``pseudo.snapshot=versioned``, the default) is not
copied: each rank saves its store bitmaps (``pseudo-state-rank{r}.npz``, 2 x N bits) and the
versions stay where they are (see its docstring: only ``latest`` is restorable). Other stores
(``pseudo.snapshot=copy``, ROLE's estimates) are copied whole (sparse copy) by the writer.

A write that fails (disk full, file size limit) raises :class:`CheckpointWriteError` naming the
file, the bytes the checkpoint needs and the bytes free; the cut tag folder is deleted (its space
given back) and ``latest`` still names the previous checkpoint, from which a rerun resumes.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .atomic import WriteFailed, atomic_save_npz, atomic_write_text, human_bytes
from .distributed import barrier

LATEST = "latest"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; nothing was committed (see the module docstring)."""

    def __str__(self) -> str:
        return self.args[0]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(ckpt_dir: Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.exists():
        return None
    tag = path.read_text().strip()
    if not (Path(ckpt_dir) / tag).is_dir():
        raise FileNotFoundError(f"{path} names checkpoint {tag!r}, but {Path(ckpt_dir) / tag} does not exist")
    return tag


def store_snapshot_name(node_index: int | None) -> str:
    """Shared store (all-gather sync): one snapshot. Node-local stores (affinity): one per node."""
    return "pseudo.f16" if node_index is None else f"pseudo-node{node_index}.f16"


def buffers_name(rank: int) -> str:
    """This rank's module buffers (BatchNorm running statistics: each data-parallel rank keeps its own,
    from its own batches, and evaluates with them; DeepSpeed's checkpoint holds rank 0's only)."""
    return f"buffers-rank{int(rank)}.pt"


def _save_buffers(engine, path: Path) -> None:
    from .atomic import atomic_path

    state = {k: v.detach().cpu() for k, v in engine.module.named_buffers()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_buffers(engine, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = dict(engine.module.named_buffers())
    if set(state) != set(own):
        raise ValueError(f"{path}: buffers {sorted(set(state) ^ set(own))[:5]} do not match the model")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def state_name(store: str, rank: int) -> str:
    """A versioned store's per-rank checkpoint state (bitmaps of the rows written)."""
    return f"{store}-state-rank{int(rank)}.npz"


def save(engine, ckpt_dir: Path, tag: str, client_state: dict, *, stores: dict, dist_info, per_node: bool,
         keep: int = 2) -> None:
    """Save everything under ``ckpt_dir/tag`` and then point ``latest`` at it.

    ``stores`` maps a name ("pseudo", "role") to an object with ``snapshot(path)``.
    """
    ckpt_dir = Path(ckpt_dir)
    client_state = dict(client_state, rng=rng_state())
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        node = _node_index(dist_info) if per_node else None
        writer = dist_info.is_local_main if per_node else dist_info.is_main
        if dist_info.world_size > 1:  # DeepSpeed saves rank 0's module only: other ranks' BN statistics differ
            _save_buffers(engine, ckpt_dir / tag / buffers_name(dist_info.rank))
        for name, store in stores.items():
            if hasattr(store, "checkpoint_state"):  # versioned: this rank's bitmaps, no copy of N x L
                atomic_save_npz(ckpt_dir / tag / state_name(name, dist_info.rank), **store.checkpoint_state())
            elif writer:
                store.flush()
                store.snapshot(ckpt_dir / tag / store_snapshot_name(node).replace("pseudo", name))
    except (OSError, RuntimeError) as e:
        if not _is_write_error(e):
            raise
        raise _write_failed(ckpt_dir, tag, e) from e
    barrier()
    if dist_info.is_main:
        atomic_write_text(ckpt_dir / LATEST, tag + "\n")
        _prune(ckpt_dir, keep=keep, protect={tag, "best"})
    barrier()


def load(engine, ckpt_dir: Path, *, stores: dict, dist_info, per_node: bool) -> dict | None:
    """Restore the newest committed checkpoint; returns its client state, or None if there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    buffers = Path(ckpt_dir) / tag / buffers_name(dist_info.rank)
    if buffers.exists():
        _load_buffers(engine, buffers)
    node = _node_index(dist_info) if per_node else None
    for name, store in stores.items():
        if hasattr(store, "load_checkpoint_state"):
            src = Path(ckpt_dir) / tag / state_name(name, dist_info.rank)
            if not src.exists():
                raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} has no {src.name}: it was written with "
                                        f"pseudo.snapshot=copy or another world size; resume with the same settings")
            with np.load(src) as z:
                store.load_checkpoint_state({k: z[k] for k in z.files}, where=str(src))
    if dist_info.is_local_main:
        for name, store in stores.items():
            if hasattr(store, "load_checkpoint_state"):
                continue
            src = Path(ckpt_dir) / tag / store_snapshot_name(node).replace("pseudo", name)
            if not src.exists():
                raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} has no {src.name}: cannot restore the {name} store")
            store.restore(src)
    barrier()
    if not dist_info.is_local_main:
        for store in stores.values():
            if not hasattr(store, "load_checkpoint_state"):
                store.reopen()
    set_rng_state(client_state["rng"])
    return client_state


def _write_failed(ckpt_dir: Path, tag: str, err: BaseException) -> CheckpointWriteError:
    """The error for a checkpoint cut by a failed write, after deleting what it had written: which
    file, how many bytes the checkpoint needs (the previous one's size: same model, same stores),
    how many are free, and what to do."""
    import shutil

    tag_dir = ckpt_dir / tag
    prev = _committed_tag(ckpt_dir)
    if isinstance(err, WriteFailed):
        where = str(err)
    else:  # the file cut, and what the same file took in the previous checkpoint
        cut = _newest_file(tag_dir)
        same = ckpt_dir / prev / cut.relative_to(tag_dir) if prev and cut else None
        needed = same.stat().st_size if same is not None and same.is_file() else None
        where = str(WriteFailed(cut or tag_dir, needed, err, "writing"))
    if prev:
        where += f"; the whole checkpoint needs about {human_bytes(_tree_bytes(ckpt_dir / prev))} (as {prev})"
    if tag != prev:
        shutil.rmtree(tag_dir, ignore_errors=True)
    keep = (f"the last committed checkpoint {ckpt_dir / prev} is intact: free space (or raise the file size "
            f"limit) and rerun the same command to resume from it") if prev else \
        "no checkpoint was committed before: the rerun starts from the beginning"
    return CheckpointWriteError(f"checkpoint {tag} not written: {where}; {keep}")


def _is_write_error(e: BaseException) -> bool:
    """OSErrors, and the RuntimeErrors torch's zip writer raises when a write fails (a full disk
    shows as "unexpected pos" or "file write failed" from inline_container.cc)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return any(s in text for s in ("inline_container", "PytorchStreamWriter", "write failed"))


def _committed_tag(ckpt_dir: Path) -> str | None:
    try:
        return latest_tag(ckpt_dir)
    except (OSError, ValueError):
        return None


def _newest_file(folder: Path) -> Path | None:
    """The file written last under ``folder`` (the one a failed write cut), if any."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()] if Path(folder).is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _node_index(dist_info) -> int:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world_size))
    return dist_info.rank // max(local_world, 1)


def _prune(ckpt_dir: Path, *, keep: int, protect: set) -> None:
    """Keep the newest ``keep`` step/epoch checkpoints (and 'best'); delete older ones."""
    import shutil

    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name not in protect]
    tags.sort(key=lambda p: p.stat().st_mtime)
    for old in tags[: max(len(tags) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)

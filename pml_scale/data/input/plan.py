"""Epoch plans: which sample ids each rank reads, in which order, in which batch.

We own the sample order instead of leaving it to a reader, so order, rank split, resume and
skipping are exact and the same for every backend (DALI GPU, DALI CPU, PIL).

Rules (per split, sample ids as listed by the shard indexes):

* ``affinity="none"``, training: a permutation of all ids (sorted first, so the order depends
  on the set of ids only, not on how they were sharded) from
  ``numpy.random.Generator(PCG64(SeedSequence([seed, epoch])))``; its first
  ``nb * world_size * batch_size`` entries are used, global batch ``j`` being the slice
  ``[j*W*B, (j+1)*W*B)`` cut into ``W`` rank batches of ``B`` (rank ``r`` gets the ``r``-th).
  ``nb = N // (W*B)``: every rank has the same number of full batches, and the remainder
  (fewer than ``W*B`` samples) is dropped. The dropped ids differ every epoch because the
  permutation does. With the same global batch ``W*B`` the sequence of global batches does
  not depend on ``W``.
* ``affinity="none"``, evaluation: ids in increasing order (sequential reads, no randomness),
  same global-batch layout, ``nb = ceil(N / (W*B))``; the tail is padded with repeats of the
  first ids marked ``valid=False``, so every id is seen exactly once over all ranks.
* ``affinity="shard"``: shard ``k`` belongs to rank ``k % W`` for the whole run (a node-local
  pseudo-label store then needs no traffic). Each rank permutes its own ids with
  ``SeedSequence([seed, epoch, rank])`` (training) or keeps id order (evaluation). All ranks use
  the same batch count: training takes the minimum over ranks of ``n_r // B`` (each rank drops
  its own remainder), evaluation the maximum of ``ceil(n_r / B)`` and pads with repeats of the
  rank's own first ids, ``valid=False``. Ranks learn the other ranks' sizes from the shard
  counts alone, no communication.
* Resume: ``start_batch=k`` drops the first ``k`` batches of the plan; nothing is read for them.

Memory: a plan holds ``8 * nb * B`` bytes of ids per rank, plus a transient permutation of all
``N`` ids (``8 N`` bytes; 45 MB at 5.6M images) in the non-affinity mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AFFINITIES = ("none", "shard")


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: ``ids[b, i]`` is sample ``i`` of batch ``start_batch + b``."""

    ids: np.ndarray  # (nb - start_batch, B) int64
    valid: np.ndarray  # (nb - start_batch, B) bool; False marks padding repeats
    start_batch: int
    batches_per_epoch: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def shard_owner(num_shards: int, world_size: int) -> np.ndarray:
    """(num_shards,) owning rank of each shard in affinity mode: ``k % world_size``."""
    return np.arange(num_shards, dtype=np.int64) % world_size


def batches_per_epoch(shard_counts, *, batch_size: int, world_size: int, train: bool,
                      affinity: str = "none") -> int:
    """Batches every rank runs per epoch; equal on all ranks and independent of the epoch."""
    counts = np.asarray(shard_counts, dtype=np.int64)
    batch_size = _check_int("batch_size", batch_size, 1)
    world_size = _check_int("world_size", world_size, 1)
    if affinity not in AFFINITIES:
        raise ValueError(f"affinity must be one of {AFFINITIES}, got {affinity!r}")
    n = int(counts.sum())
    if n == 0:
        raise ValueError("the split has no samples")
    if affinity == "none":
        per_step = world_size * batch_size
        nb = n // per_step if train else -(-n // per_step)
        if nb == 0:
            raise ValueError(f"the split has {n} samples, fewer than world_size*batch_size = "
                             f"{world_size}*{batch_size}: no full training batch")
        return nb
    if len(counts) < world_size:
        raise ValueError(f"affinity='shard' needs at least one shard per rank: {len(counts)} shards "
                         f"for world_size {world_size}")
    per_rank = np.bincount(shard_owner(len(counts), world_size), weights=counts,
                           minlength=world_size).astype(np.int64)
    nb = int((per_rank // batch_size).min()) if train else int((-(-per_rank // batch_size)).max())
    if nb == 0:
        raise ValueError(f"affinity='shard': the smallest rank holds {int(per_rank.min())} samples, "
                         f"fewer than batch_size {batch_size}: no full training batch")
    return nb


def make_plan(shard_ids: list[np.ndarray], *, seed: int, epoch: int, rank: int, world_size: int,
              batch_size: int, train: bool, affinity: str = "none", start_batch: int = 0) -> RankPlan:
    """The plan of ``rank`` for ``epoch``; ``shard_ids[k]`` lists the sample ids of shard ``k``.

    In affinity mode only the own shards' id lists are read (the others only for their length),
    so a caller may pass ``np.empty(count)`` placeholders of the right length for foreign shards.
    """
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    counts = [len(s) for s in shard_ids]
    nb = batches_per_epoch(counts, batch_size=batch_size, world_size=world_size, train=train,
                           affinity=affinity)
    start_batch = _check_int("start_batch", start_batch, 0)
    if start_batch > nb:
        raise ValueError(f"start_batch must be in [0, {nb}] (batches per epoch), got {start_batch}")
    B = batch_size
    if affinity == "none":
        ids = np.sort(np.concatenate([np.asarray(s, dtype=np.int64) for s in shard_ids]))
        order = _rng(seed, epoch).permutation(ids) if train else ids
        total = nb * world_size * B
        valid = np.ones(total, dtype=bool)
        if total > len(order):  # evaluation only: pad with repeats of the first ids
            pad = total - len(order)
            order = np.concatenate([order, np.resize(order, pad)])
            valid[len(ids):] = False
        rows = order[:total].reshape(nb, world_size, B)[:, rank]
        vrows = valid.reshape(nb, world_size, B)[:, rank]
    else:
        own = [np.asarray(shard_ids[k], dtype=np.int64) for k in range(rank, len(shard_ids), world_size)]
        ids = np.sort(np.concatenate(own))
        order = _rng(seed, epoch, rank).permutation(ids) if train else ids
        total = nb * B
        valid = np.ones(total, dtype=bool)
        if total > len(order):
            valid[len(order):] = False
            order = np.concatenate([order, np.resize(order, total - len(order))])
        rows = order[:total].reshape(nb, B)
        vrows = valid.reshape(nb, B)
    return RankPlan(np.ascontiguousarray(rows[start_batch:]), np.ascontiguousarray(vrows[start_batch:]),
                    start_batch, nb)


SUBSETS = ("all", "fit", "val")


def validation_ids(all_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted ids of a validation split carved from a training split: a seeded choice of
    round(fraction · N) of ``all_ids``, a pure function of (ids, fraction, seed), so every rank,
    backend and resume sees the same split. Model choices are made on it; the test split is
    read once, at the end."""
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction!r}")
    ids = np.sort(np.asarray(all_ids, dtype=np.int64))
    n_val = int(round(float(fraction) * len(ids)))
    if fraction > 0 and not 0 < n_val < len(ids):
        raise ValueError(f"validation fraction {fraction} of {len(ids)} samples leaves an empty side")
    pick = _rng(_check_int("val_seed", seed, 0), 0x7A11D).permutation(len(ids))[:n_val]
    return np.sort(ids[pick])


def restrict(shard_ids: list[np.ndarray], subset: str, fraction: float, seed: int,
             val_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """``shard_ids`` cut to a subset: "all", "fit" (training minus validation) or "val". The
    validation ids are ``val_ids`` when the dataset defines them, else a seeded carve."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if subset == "all":
        return shard_ids
    if val_ids is None:
        val = validation_ids(np.concatenate(shard_ids), fraction, seed)
    else:
        val = np.unique(np.asarray(val_ids, dtype=np.int64))
    keep_val = subset == "val"
    return [s[np.isin(s, val, assume_unique=True) == keep_val] for s in shard_ids]

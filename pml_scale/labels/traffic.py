"""Label traffic off the training step's critical path: gathers of the next batch's labels and
scatters of this batch's ŷ run on one background thread, in a FIFO order the trainer controls.

Why: gathering and scattering 1,024 random rows of a 5.6M x 600 store takes 16 / 13 ms on 2
cores (page faults in memory maps), 3-4% of a ResNet-50 step at batch 128 if done inline, and
the inline ŷ scatter needed a device->host copy that stalled the host on the GPU. Here:

* ``gather(batch)`` (host ids and validity from the loader, no device tensor read) reads the
  observed states, the stored ỹ and ROLE rows of the valid rows into pinned memory and computes
  the α/β counts with the trainer's host function (all-reduced on a gloo group when the batch
  statistics are global): no GPU involvement at all.
* ``to_device`` issues non-blocking copies from that pinned memory.
* ``scatter(...)`` issues ŷ's copy to pinned memory (non-blocking, after a fixed-size all-gather
  when every node's store must hold every row) and records a CUDA event; the thread waits for
  the event, then writes the store. Nothing on the main thread waits for the GPU.

Ordering, the pseudo-label hazard (a sample's ỹ must come from its previous visit): the thread
runs tasks in submission order. Within an epoch a rank's batches hold disjoint ids (and so do
different ranks' batches), so the trainer may submit the gather of batch b+1 before the
scatter of batch b. Across an epoch boundary, a checkpoint or a resume it must not: ``fence()``
waits until every queued task is done (and, with several ranks sharing a node's store, for the
others too); the trainer calls it before the first gather of every epoch and before every
checkpoint. Only the store's writer ranks write (each node's local main rank, or every rank for
its own rows under shard affinity), so momentum updates apply once.

Failures: an exception inside a task (an unreadable store page, a failed write) is raised on the
main thread as :class:`LabelTrafficError` (the task's own traceback chained as its cause) at the
first of: the next submission, the next ``collect`` (the step after the one that queued the task
at the latest, since tasks run in order) or ``fence`` (so no checkpoint is ever taken after it:
rows a failed scatter half wrote stay in the live store only, which a resume replaces with the
last committed snapshot). It is raised once; ``close`` after it only stops the thread.

Memory: a few pinned (B, L) buffers in flight (float32 ỹ, int8 states, ŷ); nothing grows with N.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .states import MISSING


class LabelTrafficError(RuntimeError):
    """A background gather or scatter failed; ``__cause__`` holds the thread's exception."""


@dataclass
class BatchLabels:
    """Labels of a batch's valid rows (pinned host tensors, or their device copies)."""

    ids: torch.Tensor  # (V,) int64 sample ids of the valid rows
    states: torch.Tensor  # (V, L) int8
    pseudo: torch.Tensor  # (V, L) float32 ỹ from the store
    estimates: torch.Tensor | None  # (V, L) float32 rows of the loss's estimate store (ROLE), or None
    rows: torch.Tensor | None  # (V,) int64 positions of the valid rows in the batch; None: all valid
    counts: tuple[float, float] | None  # (P, T) for α/β (global sums when global); None: not needed
    ids_host: np.ndarray  # (V,) the valid ids on the host
    batch_size: int


class LabelTraffic:
    """Background gathers and deferred scatters for one rank (see the module docstring)."""

    def __init__(self, *, observed, pseudo_store, estimates_store, device: torch.device,
                 counts_fn: Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[float, float] | None],
                 global_counts: bool, group, world_size: int, rank: int, writer: bool, per_node: bool,
                 momentum: float, debug_dir: str | None = None):
        self.observed, self.pseudo_store, self.estimates_store = observed, pseudo_store, estimates_store
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.counts_fn = counts_fn
        self.global_counts = bool(global_counts) and world_size > 1
        self.group, self.world_size, self.rank = group, int(world_size), int(rank)
        self.writer, self.per_node, self.momentum = bool(writer), bool(per_node), float(momentum)
        self.debug_dir = debug_dir
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pml-labels")
        self._queued: list[tuple[Future, str]] = []  # (task, what it does) in submission order
        self._failed: BaseException | None = None  # raised once; later calls only refuse new work

    # ------------------------------------------------------------------ helpers
    def _pinned(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.cuda)

    def _upload(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(self.device, non_blocking=True) if self.cuda else t

    def _download(self, t: torch.Tensor) -> torch.Tensor:
        """Start a device->host copy without waiting (CPU tensors pass through)."""
        t = t.detach()
        if not self.cuda:
            return t
        host = self._pinned(t.shape, t.dtype)
        host.copy_(t, non_blocking=True)
        return host

    def _submit(self, what: str, fn, *args) -> Future:
        self._raise_failed()
        fut = self._pool.submit(fn, *args)
        self._queued.append((fut, what))
        return fut

    def _raise_failed(self, wait: bool = False) -> None:
        """Surface the error of a finished background task on the main thread (and forget finished
        ones); with ``wait``, wait for every queued task first."""
        if self._failed is not None:
            raise LabelTrafficError(f"the label thread failed earlier ({self._failed!r}); it takes no more work")
        keep = []
        for fut, what in self._queued:
            if not (wait or fut.done()):
                keep.append((fut, what))
                continue
            exc = fut.exception()
            if exc is not None:
                self._failed = exc
                self._queued = []
                raise LabelTrafficError(f"the label thread failed in {what}: {type(exc).__name__}: {exc} "
                                        "(its traceback is above)") from exc
        self._queued = keep

    # ------------------------------------------------------------------ gather
    def gather(self, batch, epoch: int) -> Future:
        """Queue the label gather of ``batch`` (uses only its host ids and validity)."""
        return self._submit(f"the gather of epoch {epoch} batch {getattr(batch, 'index', '?')}", self._gather, batch.ids_host,
                            batch.valid_host, int(epoch))

    def collect(self, pending: Future) -> BatchLabels:
        """The result of a queued gather; raises an earlier task's failure too (tasks run in order,
        so every task queued before this gather is finished once it is)."""
        try:
            result = pending.result()
        finally:
            self._raise_failed()
        return result

    def _gather(self, ids: np.ndarray, valid: np.ndarray, epoch: int) -> BatchLabels:
        B = int(ids.shape[0])
        all_valid = bool(valid.all())
        rows = None if all_valid else np.flatnonzero(valid)
        vids = ids if all_valid else ids[rows]
        V, L = int(vids.shape[0]), int(self.observed.num_labels)
        states = self._pinned((V, L), torch.int8)
        states.numpy()[...] = self.observed.gather(vids)
        pseudo = self._pinned((V, L), torch.float32)
        self.pseudo_store.gather_numpy(vids, out=pseudo.numpy())
        estimates = None
        if self.estimates_store is not None:
            estimates = self._pinned((V, L), torch.float32)
            self.estimates_store.gather_numpy(vids, out=estimates.numpy())
        counts = self.counts_fn(states.numpy(), pseudo.numpy(), vids, epoch)  # None: the loss needs none
        if counts is not None and self.global_counts:  # a tiny host all-reduce on our own gloo group
            import torch.distributed as dist

            both = torch.tensor([float(counts[0]), float(counts[1])], dtype=torch.float64)
            dist.all_reduce(both, group=self.group)
            counts = (float(both[0]), float(both[1]))
        ids_t = self._pinned((V,), torch.int64)
        ids_t.numpy()[...] = vids
        rows_t = None
        if rows is not None:
            rows_t = self._pinned((V,), torch.int64)
            rows_t.numpy()[...] = rows
        return BatchLabels(ids_t, states, pseudo, estimates, rows_t, counts, vids, B)

    def to_device(self, host: BatchLabels) -> BatchLabels:
        """Non-blocking copies of a finished gather to the device (from pinned memory)."""
        return BatchLabels(self._upload(host.ids), self._upload(host.states), self._upload(host.pseudo),
                           self._upload(host.estimates), self._upload(host.rows), host.counts, host.ids_host,
                           host.batch_size)

    # ------------------------------------------------------------------ scatter
    def scatter(self, batch, labels: BatchLabels, yhat: torch.Tensor, estimate_rows: torch.Tensor | None,
                tag: str = "") -> None:
        """Queue the store updates of this step: ŷ (V, L) of the valid rows (and ROLE's new rows).
        The device work is only enqueued here; the thread writes once the copies have landed."""
        pseudo = self._rows_for_store(batch, labels, yhat, torch.float16)
        estimates = self._rows_for_store(batch, labels, estimate_rows, None) if estimate_rows is not None else None
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        step = tag.split("-")[0] if tag else "?"
        self._submit(f"the store update of step {step} (rank {self.rank})", self._scatter, event, pseudo, estimates,
                     tag)

    def _rows_for_store(self, batch, labels: BatchLabels, values: torch.Tensor, wire):
        """(ids, rows) on the host (still landing) of the rows this rank's store must receive."""
        values = values.detach()
        if self.per_node or self.world_size == 1:
            return labels.ids_host, self._download(values)
        B, L = labels.batch_size, values.shape[1]
        if labels.rows is None:
            full = values
        else:  # invalid rows travel as zeros with id -1 (fixed size: no count exchange, no sync)
            full = torch.zeros((B, L), dtype=values.dtype, device=values.device).index_copy_(0, labels.rows, values)
        send_ids = torch.from_numpy(np.where(batch.valid_host, batch.ids_host, -1).astype(np.int64))
        send_ids = send_ids.pin_memory().to(self.device, non_blocking=True) if self.cuda else send_ids
        all_ids, all_rows = allgather_rows(send_ids, full.to(wire) if wire is not None else full)
        return self._download(all_ids), self._download(all_rows)

    def _scatter(self, event, pseudo, estimates, tag: str) -> None:
        if event is not None:
            while not event.query():  # polling, not synchronize(): never holds the GIL while waiting
                time.sleep(2e-4)
        ids, rows = _host_rows(*pseudo)
        if self.debug_dir:
            self._debug_dump(tag, *pseudo)
        if self.writer and ids.size:
            mask = np.asarray(self.observed.gather(ids)) == MISSING
            self.pseudo_store.scatter(ids, rows, mask=mask, momentum=self.momentum)
        if estimates is not None and self.writer:
            r_ids, r_rows = _host_rows(*estimates)
            if r_ids.size:
                self.estimates_store.scatter(r_ids, r_rows)

    def _debug_dump(self, tag: str, ids, rows) -> None:
        """Test hook (PML_DEBUG_DUMP_UPDATES=dir): the (ids, ŷ) this rank itself computed."""
        ids = ids if isinstance(ids, np.ndarray) else ids.numpy()
        rows = rows.float().numpy()
        if not (self.per_node or self.world_size == 1):
            B = ids.size // self.world_size
            ids, rows = ids[self.rank * B:(self.rank + 1) * B], rows[self.rank * B:(self.rank + 1) * B]
        keep = ids >= 0
        Path(self.debug_dir).mkdir(parents=True, exist_ok=True)
        np.savez(Path(self.debug_dir) / f"step-{tag}.npz", ids=ids[keep], yhat=rows[keep])

    # ------------------------------------------------------------------ ordering
    def fence(self, *, barrier: bool = True) -> None:
        """Wait until every queued gather and scatter is done; with ``barrier`` and several ranks,
        also until every rank got there (a node's writer rank serves the others' next reads)."""
        self._raise_failed(wait=True)
        if barrier and self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        """Finish queued work (a failure not raised yet is raised now) and stop the thread."""
        try:
            if self._failed is None:
                self.fence(barrier=False)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _host_rows(ids, rows) -> tuple[np.ndarray, np.ndarray]:
    """Landed host copies -> (ids, float32 rows) of the rows that count (id >= 0)."""
    ids = ids if isinstance(ids, np.ndarray) else ids.numpy()
    rows = rows.float().numpy() if rows.dtype != torch.float32 else rows.numpy()
    keep = ids >= 0
    if not keep.all():
        ids, rows = ids[keep], rows[keep]
    return ids, rows


def debug_dump_dir() -> str | None:
    """The folder of PML_DEBUG_DUMP_UPDATES (README, Environment switches), None when unset."""
    return os.environ.get("PML_DEBUG_DUMP_UPDATES") or None


def allgather_rows(ids: torch.Tensor, rows: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (B,) ids and (B, L) rows, concatenated in rank order, on every rank, with no
    host synchronisation: all ranks send the same fixed B (the plan gives every rank equal
    batches), so no sizes are exchanged first. Rows a rank did not train are marked by id -1;
    the receiver drops them after copying to the host. Returns the local tensors unchanged
    without an initialised process group. Traffic: world x B x (8 + L x itemsize) per call.
    """
    import torch.distributed as dist

    if ids.ndim != 1 or rows.ndim != 2 or rows.shape[0] != ids.shape[0]:
        raise ValueError(f"allgather_rows: need ids (B,) and rows (B, L); got {tuple(ids.shape)}, {tuple(rows.shape)}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return ids, rows
    world = dist.get_world_size(group)
    ids, rows = ids.to(torch.int64).contiguous(), rows.contiguous()
    all_ids = torch.empty(world * ids.shape[0], dtype=torch.int64, device=ids.device)
    all_rows = torch.empty((world * rows.shape[0], rows.shape[1]), dtype=rows.dtype, device=rows.device)
    if dist.get_backend(group) == "nccl":
        dist.all_gather_into_tensor(all_ids, ids, group=group)
        dist.all_gather_into_tensor(all_rows, rows, group=group)
    else:  # gloo: list form (views into the flat outputs, no extra copy)
        dist.all_gather(list(all_ids.view(world, -1)), ids, group=group)
        dist.all_gather(list(all_rows.view(world, rows.shape[0], rows.shape[1])), rows, group=group)
    return all_ids, all_rows

"""Distributed evaluation: every rank scores its slice of the split, rank 0 gathers the rows by
sample id and computes mAP (full, or masked on a partially labelled test set); per epoch on the
validation split (or test when none is carved, keeping best.pt), and the test split once at the
end when a validation split made the choices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path, atomic_write_json
from .distributed import all_gather_rows, broadcast_object
from .engine import DTYPES, prepare_images
from .metrics import listed_average_precision, mean_average_precision
from .run_data import make_loader


def _batches_with_logits(engine, loader, *, epoch: int, prepare, progress):
    """(batch, logits) of every batch of ``loader`` with the model in eval mode (train mode again
    after, also on errors). The loader keeps its pipeline between calls (one per eval loader for
    the whole run); ``prepare`` puts images in the model's dtype and memory format."""
    engine.eval()
    loader.set_epoch(epoch)
    try:
        for batch in loader:
            yield batch, engine(prepare(batch.images))
            if progress is not None:
                progress.update(1)
    finally:
        engine.train()


@torch.no_grad()
def predict(engine, loader, *, epoch: int, num_labels: int, prepare=lambda images: images, progress=None):
    """Scores (sigmoid) and ids of the valid rows this rank saw, gathered from all ranks (rank order).

    Eval loaders pad with repeats marked valid=False so all ranks run the same number of batches;
    those rows are dropped here, after the gather and on the host, so every test id counts exactly
    once.
    """
    scores, ids, valid = [], [], []
    # no host sync per batch: scores stay on the device until the end
    for batch, logits in _batches_with_logits(engine, loader, epoch=epoch, prepare=prepare, progress=progress):
        scores.append(torch.sigmoid(logits.float()))
        ids.append(batch.ids)
        valid.append(batch.valid)
    if not scores:
        return np.zeros((0, num_labels), np.float32), np.zeros((0,), np.int64)
    s = all_gather_rows(torch.cat(scores)).cpu().numpy()
    i = all_gather_rows(torch.cat(ids)).cpu().numpy()
    v = all_gather_rows(torch.cat(valid)).cpu().numpy()
    return s[v], i[v]


def score(scores: np.ndarray, ids: np.ndarray, test_labels, *, partial: bool | None):
    """mAP and per-class AP of the gathered predictions against the full test labels (rows by id).

    ``test_labels``: an (N, L) int8 array/memmap, or an ``ObservedLabels`` (dense or CSR), whose
    rows are then read a class block at a time: the states never exist as len(ids) x L."""
    from .labels import ObservedLabels

    order = np.argsort(ids, kind="stable")
    ids, scores = ids[order], scores[order]
    unique, first = np.unique(ids, return_index=True)
    if len(unique) != len(ids):  # a sample seen twice (should not happen): keep its first score
        ids, scores = unique, scores[first]
    if isinstance(test_labels, ObservedLabels):  # partial=None: mAP detects a -1 block by block
        states = test_labels.columns(ids)
    else:
        states = np.asarray(test_labels[ids])
        if partial is None:
            partial = bool((states < 0).any())
    return mean_average_precision(scores, states, partial=partial), len(ids)


def listed_entries_suffice(labels, partial: bool | None) -> bool:
    """Masked mAP reads only the observed entries, so a CSR split whose unlisted entries are missing
    (native partial labels, Open Images) is scored from the scores at its listed entries alone."""
    from .labels import MISSING, ObservedLabels

    return (isinstance(labels, ObservedLabels) and labels.form == "csr" and labels.fill == MISSING
            and partial is not False)


@torch.no_grad()
def predict_listed(engine, loader, labels, *, epoch: int, prepare=lambda images: images, progress=None):
    """(rows, ids, classes, scores, states): the ids of the valid rows every rank saw, and the
    sample id, class, score and state of each of their observed entries, gathered to every rank.
    Per batch only the scores at the rows' listed entries are kept (picked on the device by a
    host-built index): memory grows with the observed entries, never with rows × L, so a 10k-label
    test set of any size fits."""
    import torch.distributed as dist

    from .labels import MISSING

    keep, host = [], []
    for batch, logits in _batches_with_logits(engine, loader, epoch=epoch, prepare=prepare, progress=progress):
        states = labels.gather(batch.ids_host)  # (B, L) int8 on the host: one batch, no more
        states[~batch.valid_host] = MISSING
        r, c = np.nonzero(states != MISSING)
        flat = torch.from_numpy(r * logits.shape[1] + c).to(logits.device, non_blocking=True)
        keep.append(torch.sigmoid(logits.float()).flatten().index_select(0, flat))
        host.append((batch.ids_host[r], c.astype(np.int32), states[r, c], batch.ids_host[batch.valid_host]))
    scores = torch.cat(keep).cpu().numpy() if keep else np.zeros(0, np.float32)
    mine = tuple(np.concatenate([h[k] for h in host]) if host else np.zeros(0) for k in range(4)) + (scores,)
    parts = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    ids, classes, states, rows, scores = (np.concatenate([p[k] for p in parts]) for k in range(5))
    return rows, ids, classes, scores, states


def score_listed(rows, ids, classes, scores, states, num_labels: int):
    """((mAP, per-class AP), images) from ``predict_listed``'s entries (each (id, class) once)."""
    _, first = np.unique(ids.astype(np.int64) * num_labels + classes, return_index=True)
    n = int(np.unique(rows).size)
    return listed_average_precision(classes[first], scores[first], states[first], num_labels, num_samples=n), n


def evaluate_epoch(trainer, epoch: int) -> float:
    """Score the evaluation split (validation if carved, else test; every rank predicts its share,
    rank 0 scores) and keep best.pt; returns the mAP, with best_map/best_epoch in ``trainer.state`` the
    same on every rank."""
    state, dist_info, run_dir = trainer.state, trainer.dist_info, trainer.run_dir
    m_ap, per_class, n = score_split(trainer, trainer.data.eval_loader, trainer.data.eval_labels)
    result = None
    if dist_info.is_main:
        trainer.tracker.log("eval", state["global_step"], epoch=epoch, map=float(m_ap), split=trainer.data.eval_name,
                            num_classes_scored=int(np.isfinite(per_class).sum()), num_images=n)
        print(f"[pml-scale] epoch {epoch + 1}: mAP {100 * m_ap:.2f} on {n} {trainer.data.eval_name} images", flush=True)
        if trainer.cfg.eval.save_per_class:
            save_per_class(trainer, run_dir / "per_class_ap.json", epoch, per_class)
        if m_ap > state["best_map"]:
            state["best_map"], state["best_epoch"] = float(m_ap), epoch
            with atomic_path(run_dir / "best.pt") as tmp:
                torch.save(trainer.engine.module.state_dict(), tmp)
        result = float(m_ap)
    result = broadcast_object(result)
    state.update(broadcast_object({"best_map": state["best_map"], "best_epoch": state["best_epoch"]}))
    return result


def test_once(trainer) -> float | None:
    """With a validation split: the test split scored once, after the last epoch (eval.test)."""
    if trainer.data.eval_name != "val" or not trainer.cfg.eval.test:
        return None
    loader = make_loader(trainer.cfg, trainer.cfg.data.test_split, train=False, dist_info=trainer.dist_info,
                         batch_size=trainer.cfg.data.eval_batch_size, features=trainer.data.features)
    try:
        m_ap, per_class, n = score_split(trainer, loader, trainer.data.test_labels)
    finally:
        loader.close()
    if trainer.dist_info.is_main:
        print(f"[pml-scale] test (read once): mAP {100 * m_ap:.2f} on {n} test images", flush=True)
        if trainer.cfg.eval.save_per_class:
            save_per_class(trainer, trainer.run_dir / "per_class_ap_test.json", trainer.cfg.run.epochs - 1, per_class)
    return broadcast_object(float(m_ap) if m_ap is not None else None)


def score_split(trainer, loader, labels):
    """(mAP, per-class AP, images) of the current model on ``loader``'s split (on rank 0; None
    elsewhere): every rank predicts its share, rank 0 scores against ``labels`` (rows by id)."""
    cfg = trainer.cfg
    bar = trainer.tracker.progress(loader.batches_per_epoch, "eval")
    prepare = lambda x: prepare_images(x, DTYPES[cfg.model.dtype], cfg.model.channels_last)  # noqa: E731
    if listed_entries_suffice(labels, cfg.eval.partial):
        entries = predict_listed(trainer.engine, loader, labels, epoch=0, progress=bar, prepare=prepare)
        bar.close()
        if not trainer.dist_info.is_main:
            return None, None, None
        (m_ap, per_class), n = score_listed(*entries, num_labels=trainer.data.num_labels)
        return m_ap, per_class, n
    scores, ids = predict(trainer.engine, loader, epoch=0, num_labels=trainer.data.num_labels, progress=bar,
                          prepare=prepare)
    bar.close()
    if not trainer.dist_info.is_main:
        return None, None, None
    (m_ap, per_class), n = score(scores, ids, labels, partial=cfg.eval.partial)
    return m_ap, per_class, n


def save_per_class(trainer, path: Path, epoch: int, per_class: np.ndarray) -> None:
    """Per-class AP beside the training-set frequency of each class (for the long-tail plots)."""
    freq = trainer.data.full_train.positives_per_class()  # dense: block by block; CSR: from the listed entries
    atomic_write_json(path, {"epoch": epoch, "ap": [None if not np.isfinite(a) else float(a) for a in per_class],
                             "class_freq": freq.tolist(), "classes": trainer.data.manifest["classes"]})

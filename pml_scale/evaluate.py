"""Distributed evaluation: every rank scores its slice of the test split, rank 0 gathers the rows
by sample id and computes mAP (full, or masked on a partially labelled test set)."""

from __future__ import annotations

import numpy as np
import torch

from .distributed import all_gather_rows
from .metrics import mean_average_precision


@torch.no_grad()
def predict(engine, loader, *, epoch: int, num_labels: int, prepare=lambda images: images, progress=None):
    """Scores (sigmoid) and ids of the valid rows this rank saw, gathered from all ranks (rank order).

    Eval loaders pad with repeats marked valid=False so all ranks run the same number of batches;
    those rows are dropped here, after the gather and on the host, so every test id counts exactly
    once. The loader keeps its pipeline between calls (one per eval loader for the whole run).
    ``prepare`` puts images in the model's dtype and memory format.
    """
    engine.eval()
    loader.set_epoch(epoch)
    scores, ids, valid = [], [], []
    for batch in loader:  # no host sync per batch: scores stay on the device until the end
        logits = engine(prepare(batch.images))
        scores.append(torch.sigmoid(logits.float()))
        ids.append(batch.ids)
        valid.append(batch.valid)
        if progress is not None:
            progress.update(1)
    engine.train()
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

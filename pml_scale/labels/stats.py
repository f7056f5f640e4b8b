"""Label statistics: per-class and per-image counts of positives, negatives and missing entries,
and the class prior drawn from them."""

from __future__ import annotations

import numpy as np

from .counts import positive_counts
from .observed import ObservedLabels, block_rows
from .states import MISSING, NEG, POS, check_states, check_values


def label_stats(states, *, chunk_rows: int | None = None) -> dict:
    """Per-image means and per-class counts of positives, negatives and missing entries.

    ``states`` is an int8 (N, L) array/memmap (read chunk by chunk) or an ``ObservedLabels``
    (CSR is counted without densifying). Memory: O(chunk_rows x L + L).
    """
    if isinstance(states, ObservedLabels) and states.form == "csr":
        n, num_labels = states.shape
        ptr, idx, val = states.indptr, states.indices, states.values
        pos_c = np.bincount(idx[val == POS], minlength=num_labels).astype(np.int64)
        if states.fill == NEG:  # negatives implied: every entry not listed as positive or missing
            neg_c = n - pos_c - np.bincount(idx[val == MISSING], minlength=num_labels).astype(np.int64)
        else:
            neg_c = np.bincount(idx[val == NEG], minlength=num_labels).astype(np.int64)
        row_pos = np.diff(np.concatenate([[0], np.cumsum(val == POS)])[ptr])  # positives per row
        no_pos = int((row_pos == 0).sum())
    else:
        if isinstance(states, ObservedLabels):
            states = states.dense
        check_states(states, "states")
        n, num_labels = states.shape
        chunk_rows = int(chunk_rows or block_rows(num_labels))
        pos_c = np.zeros(num_labels, np.int64)
        neg_c = np.zeros(num_labels, np.int64)
        no_pos = 0
        for a in range(0, n, chunk_rows):
            chunk = np.asarray(states[a:a + int(chunk_rows)])
            check_values(chunk, a, "states")
            class_pos, row_pos = positive_counts(chunk)
            pos_c += class_pos
            neg_c += (chunk == NEG).sum(0)
            no_pos += int((row_pos == 0).sum())
    miss_c = n - pos_c - neg_c
    per = (lambda c: float(c.sum()) / n) if n else (lambda c: float("nan"))
    return {
        "num_images": n, "num_labels": num_labels,
        "pos_per_image": per(pos_c), "neg_per_image": per(neg_c), "missing_per_image": per(miss_c),
        "pos_per_class": pos_c, "neg_per_class": neg_c, "missing_per_class": miss_c,
        "images_without_positive": no_pos,
    }


def class_prior(stats: dict, expected_positives: float, *, floor: float = 1e-3, ceil: float = 0.5) -> np.ndarray:
    """(L,) float32 estimate of P(y_j = 1) from observed labels (``label_stats``): the initial
    pseudo labels of ours+ (``pseudo.init=prior``) instead of the paper's 0.5.

    A class with observed negatives: its observed positive rate. A class without (PPL, SPL: only
    positives are observed): ``expected_positives`` (k per image, as EPR/ROLE use) times its share
    of the observed positives. Clipped to [floor, ceil]: a prior is a soft start, never certain.
    """
    pos = np.asarray(stats["pos_per_class"], np.float64)
    neg = np.asarray(stats["neg_per_class"], np.float64)
    if not (np.isfinite(expected_positives) and expected_positives >= 0):
        raise ValueError(f"expected_positives must be a finite number >= 0, got {expected_positives!r}")
    from_ratio = pos / np.maximum(pos + neg, 1.0)
    from_share = float(expected_positives) * pos / max(pos.sum(), 1.0)
    return np.clip(np.where(neg > 0, from_ratio, from_share), floor, ceil).astype(np.float32)

"""Mean average precision over classes, equal to scikit-learn's step-wise ``average_precision_score``.

AP of a class = (1/P) * sum over its observed positives of the precision at the end of the
positive's tie group (scores sorted descending; equal scores form one threshold, as sklearn's
distinct thresholds do). Missing entries (-1) carry no weight: they neither add a step nor
change precision, which is the same as dropping them.

Vectorised over classes: each class chunk is sorted once (torch.sort, on the scores' device,
so a CUDA tensor is sorted on the GPU), then cumulative sums give tp/fp and a reverse
cumulative min carries each element to its tie group's end. Memory: ~10 x 8 bytes per
element of a chunk of ``chunk_elems`` (N x classes), whatever L is.
"""

from __future__ import annotations

import numpy as np
import torch

from .labels.counts import positives_per_class, row_blocks


def _column_block(x, a: int, b: int, device) -> torch.Tensor:
    """Columns a:b of a (N, L) numpy/torch array as a contiguous (b-a, N) torch tensor."""
    if hasattr(x, "column_block"):  # labels.SparseColumns: states of a CSR store, by class block
        return torch.from_numpy(x.column_block(a, b)).to(device)
    if isinstance(x, torch.Tensor):
        return x[:, a:b].T.to(device).contiguous()
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x[:, a:b]).T)).to(device)


def _check_inputs(scores, states) -> tuple[int, int]:
    for name, x in (("scores", scores), ("states", states)):
        if name == "states" and hasattr(x, "column_block"):
            continue
        if not isinstance(x, (np.ndarray, torch.Tensor)):
            raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N samples, L classes), got shape {tuple(x.shape)}")
    if tuple(scores.shape) != tuple(states.shape):
        raise ValueError(f"scores {tuple(scores.shape)} and states {tuple(states.shape)} differ in shape")
    sdt = scores.dtype if isinstance(scores, torch.Tensor) else torch.from_numpy(np.zeros(0, scores.dtype)).dtype
    if sdt == torch.bool or sdt.is_complex:
        raise TypeError(f"scores must be real numbers, got {scores.dtype}")
    ydt = states.dtype
    if hasattr(states, "column_block"):
        return tuple(int(s) for s in scores.shape)
    is_int = (not ydt.is_floating_point and not ydt.is_complex and ydt != torch.bool) \
        if isinstance(states, torch.Tensor) else states.dtype.kind in "iu"
    if not is_int:
        raise TypeError(f"states must be an integer array (int8 advised) with values -1 (missing), 0, 1; "
                        f"got {states.dtype}")
    return tuple(int(s) for s in scores.shape)


def _first_bad(mask: torch.Tensor, a: int) -> tuple[int, int]:
    c, r = (int(v) for v in mask.nonzero()[0])  # mask is (classes, N)
    return r, a + c


def _ap_block(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AP of each row of (C, N) scores/states; rows without a positive give NaN."""
    num = s.shape[1]
    ss, order = torch.sort(s, dim=1, descending=True)
    yy = torch.gather(y, 1, order)
    pos = yy == 1
    tp = torch.cumsum(pos, dim=1, dtype=torch.int64)
    fp = torch.cumsum(yy == 0, dim=1, dtype=torch.int64)
    # index of the end of each element's tie group: next position where the score changes
    end = torch.ones_like(pos)
    end[:, :-1] = ss[:, :-1] != ss[:, 1:]
    idx = torch.arange(num, device=s.device).expand_as(tp)
    nxt = torch.where(end, idx, torch.full_like(idx, num))
    group_end = torch.flip(torch.cummin(torch.flip(nxt, [1]), dim=1).values, [1])
    tp_e = torch.gather(tp, 1, group_end).to(torch.float64)
    fp_e = torch.gather(fp, 1, group_end).to(torch.float64)
    prec = torch.where(pos, tp_e / (tp_e + fp_e).clamp_min(1.0), torch.zeros_like(tp_e))
    n_pos = tp[:, -1].to(torch.float64)
    return torch.where(n_pos > 0, prec.sum(1) / n_pos.clamp_min(1.0), torch.full_like(n_pos, float("nan")))


def mean_average_precision(scores, states, *, partial: bool | None = None,
                           chunk_elems: int = 1 << 21) -> tuple[float, np.ndarray]:
    """(mAP in [0, 1], per-class AP float64 (L,) with NaN for skipped classes).

    ``scores``: (N, L) numpy or torch (any device), higher = more positive. ``states``: int
    (N, L) with 1 positive, 0 negative, -1 missing (ignored), or a ``labels.SparseColumns``
    (rows of a CSR label file read a class block at a time: no N x L states). Classes with no observed
    positive are skipped; in partial mode (default: whenever a -1 is present; force with
    ``partial=True``/``False``) classes with no observed negative are skipped too.
    """
    n, num_labels = _check_inputs(scores, states)
    if n == 0 or num_labels == 0:
        raise ValueError(f"mAP needs at least one sample and one class, got shape {(n, num_labels)}")
    device = scores.device if isinstance(scores, torch.Tensor) else torch.device("cpu")
    step = max(1, int(chunk_elems) // n)
    ap = np.full(num_labels, np.nan)
    n_pos = np.zeros(num_labels, np.int64)
    n_neg = np.zeros(num_labels, np.int64)
    any_missing = False
    for a in range(0, num_labels, step):
        b = min(a + step, num_labels)
        s = _column_block(scores, a, b, device)
        y = _column_block(states, a, b, device)
        bad = (y < -1) | (y > 1)
        if bool(bad.any()):
            r, c = _first_bad(bad, a)
            raise ValueError(f"states[{r}, {c}] = {int(y[c - a, r])}; accepted values -1 (missing), 0, 1")
        if not s.is_floating_point():
            s = s.to(torch.float64)
        bad = ~torch.isfinite(s)
        if bool(bad.any()):
            r, c = _first_bad(bad, a)
            raise ValueError(f"scores[{r}, {c}] = {float(s[c - a, r])}; scores must be finite")
        y = y.to(torch.int8)
        any_missing |= bool((y == -1).any())
        n_pos[a:b] = (y == 1).sum(1).cpu().numpy()
        n_neg[a:b] = (y == 0).sum(1).cpu().numpy()
        ap[a:b] = _ap_block(s, y).cpu().numpy()
    valid = n_pos > 0
    partial_mode = any_missing if partial is None else bool(partial)
    if partial_mode:
        valid &= n_neg > 0
    if not valid.any():
        need = "an observed positive and an observed negative (partial mode)" if partial_mode \
            else "an observed positive"
        raise ValueError(f"no class can be scored: none of the {num_labels} classes has {need} "
                         f"among {n} samples; check the test labels")
    ap[~valid] = np.nan
    return float(np.nanmean(ap)), ap


def class_frequencies(states, *, chunk_rows: int = 65536) -> np.ndarray:
    """int64 (L,) observed positives per class (for AP-vs-frequency plots); reads rows in chunks."""
    if not isinstance(states, (np.ndarray, torch.Tensor)) or states.ndim != 2:
        raise ValueError(f"states must be a 2-D numpy array or torch tensor, got "
                         f"{type(states).__name__} {tuple(getattr(states, 'shape', ()))}")
    return positives_per_class(row_blocks(states, chunk_rows), states.shape[1])


def listed_average_precision(classes: np.ndarray, scores: np.ndarray, states: np.ndarray, num_labels: int,
                             *, num_samples: int | None = None) -> tuple[float, np.ndarray]:
    """Masked (partial-label) mAP from the observed entries only, given as parallel arrays
    (class index, score, state 0/1) — what ``mean_average_precision(..., partial=True)`` computes
    from (N, L) arrays, since missing entries carry no weight. Memory grows with the observed
    entries, not N × L (Open Images' test set: ~5 per image instead of 9,605).

    Vectorised: entries sorted by (class, score descending); tp/fp counted per class segment; each
    entry carried to the end of its tie group (equal class and score), as sklearn's thresholds do.
    """
    c = np.asarray(classes, np.int64)
    s = np.asarray(scores, np.float64)
    y = np.asarray(states)
    if not (c.shape == s.shape == y.shape) or c.ndim != 1:
        raise ValueError(f"classes, scores, states must be 1-D of one length, got {c.shape}, {s.shape}, {y.shape}")
    if c.size and (c.min() < 0 or c.max() >= num_labels):
        raise ValueError(f"class index out of range [0, {num_labels}): {int(c.min())}..{int(c.max())}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores[{int(np.flatnonzero(~np.isfinite(s))[0])}] is not finite; scores must be finite")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("states of listed entries must be 0 or 1 (missing entries are not listed)")
    order = np.lexsort((-s, c))
    c, s, pos = c[order], s[order], y[order] == 1
    n = c.size
    seg_start = np.r_[True, c[1:] != c[:-1]] if n else np.zeros(0, bool)
    tp_all, fp_all = np.cumsum(pos), np.cumsum(~pos)
    starts = np.flatnonzero(seg_start)
    base_tp = np.repeat(np.r_[0, tp_all][starts], np.diff(np.r_[starts, n]))
    base_fp = np.repeat(np.r_[0, fp_all][starts], np.diff(np.r_[starts, n]))
    tp, fp = tp_all - base_tp, fp_all - base_fp
    end = np.r_[(c[1:] != c[:-1]) | (s[1:] != s[:-1]), True] if n else np.zeros(0, bool)
    nxt = np.where(end, np.arange(n), n)
    group_end = np.minimum.accumulate(nxt[::-1])[::-1]
    prec = tp[group_end] / np.maximum(tp[group_end] + fp[group_end], 1)
    n_pos = np.bincount(c, weights=pos, minlength=num_labels)
    n_neg = np.bincount(c, weights=~pos, minlength=num_labels)
    sums = np.bincount(c, weights=np.where(pos, prec, 0.0), minlength=num_labels)
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        raise ValueError(f"no class can be scored: none of the {num_labels} classes has an observed positive and "
                         f"an observed negative among {num_samples if num_samples is not None else '?'} samples; "
                         f"check the test labels")
    ap = np.full(num_labels, np.nan)
    ap[valid] = sums[valid] / n_pos[valid]
    return float(np.nanmean(ap)), ap

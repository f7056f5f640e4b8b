"""mAP against scikit-learn's average_precision_score and a hand-computed case."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from conftest import requires_cuda
from pml_scale.metrics import class_frequencies, mean_average_precision


def _sklearn_ap(scores, states, partial):
    """Reference: per class, drop missing entries, skip classes as docs/design.md §1 says."""
    out = []
    for j in range(states.shape[1]):
        keep = states[:, j] != -1
        y, s = states[keep, j], scores[keep, j]
        if (y == 1).sum() == 0 or (partial and (y == 0).sum() == 0):
            out.append(np.nan)
        else:
            out.append(average_precision_score(y, s))
    return np.array(out)


def _data(n=300, num_labels=25, missing=0.0, seed=0):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((n, num_labels)), 1)  # many ties
    states = (rng.random((n, num_labels)) < 0.15).astype(np.int8)
    states[rng.random((n, num_labels)) < missing] = -1
    states[:, 3] = 0  # no positive: skipped
    return scores, states


def test_hand_computed():
    # sorted: 0.9(+) | 0.8(-), 0.8(+) tie | 0.1(-): AP = (1 + 2/3) / 2
    scores = np.array([[0.1], [0.8], [0.9], [0.8]])
    states = np.array([[0], [0], [1], [1]], np.int8)
    m, ap = mean_average_precision(scores, states)
    assert m == pytest.approx(5 / 6, abs=1e-15) and ap[0] == pytest.approx(5 / 6, abs=1e-15)
    assert average_precision_score(states[:, 0], scores[:, 0]) == pytest.approx(5 / 6)


@pytest.mark.parametrize("chunk_elems", [1, 1000, 1 << 21])
def test_full_labels_match_sklearn(chunk_elems):
    scores, states = _data()
    m, ap = mean_average_precision(scores, states, chunk_elems=chunk_elems)
    ref = _sklearn_ap(scores, states, partial=False)
    assert np.array_equal(np.isnan(ap), np.isnan(ref)) and np.isnan(ap[3])
    np.testing.assert_allclose(ap, ref, rtol=0, atol=1e-12)
    assert m == pytest.approx(np.nanmean(ref), abs=1e-12)


def test_all_positive_class_counts_when_not_partial():
    scores, states = _data()
    states[:, 5] = 1  # no negatives: sklearn gives AP 1, kept when no -1 is present
    _, ap = mean_average_precision(scores, states)
    assert ap[5] == 1.0
    _, ap_partial = mean_average_precision(scores, states, partial=True)
    assert np.isnan(ap_partial[5])
    np.testing.assert_allclose(ap_partial, _sklearn_ap(scores, states, partial=True), atol=1e-12)


def test_missing_entries_are_ignored_and_partial_mode():
    scores, states = _data(missing=0.5, seed=1)
    states[:, 7] = np.where(states[:, 7] == 0, -1, states[:, 7])  # observed positives only
    states[0, 7] = 1
    m, ap = mean_average_precision(scores, states, chunk_elems=900)
    ref = _sklearn_ap(scores, states, partial=True)
    assert np.isnan(ap[7]) and np.isnan(ap[3])
    np.testing.assert_allclose(ap, ref, atol=1e-12)
    assert m == pytest.approx(np.nanmean(ref), abs=1e-12)
    _, ap_nonpartial = mean_average_precision(scores, states, partial=False)
    np.testing.assert_allclose(ap_nonpartial, _sklearn_ap(scores, states, partial=False), atol=1e-12)
    assert ap_nonpartial[7] == 1.0


def test_torch_inputs_and_dtypes():
    scores, states = _data(missing=0.3, seed=2)
    ref_m, ref_ap = mean_average_precision(scores, states)
    m, ap = mean_average_precision(torch.from_numpy(scores).float(), torch.from_numpy(states))
    np.testing.assert_allclose(ap, ref_ap, atol=1e-12)  # rounded scores: float32 keeps the same ties
    assert m == pytest.approx(ref_m, abs=1e-12)
    m64, _ = mean_average_precision(scores.astype(np.float32), states.astype(np.int64))
    assert m64 == pytest.approx(ref_m, abs=1e-12)
    mi, _ = mean_average_precision((scores * 10).astype(np.int32), states)  # integer scores: same order
    assert mi == pytest.approx(ref_m, abs=1e-12)


def test_errors():
    scores, states = _data(n=20, num_labels=4)
    with pytest.raises(ValueError, match="no class can be scored"):
        mean_average_precision(scores, np.zeros_like(states))
    with pytest.raises(ValueError, match="observed negative"):
        mean_average_precision(scores, np.where(states == 1, 1, -1).astype(np.int8))
    bad = states.copy()
    bad[5, 2] = 3
    with pytest.raises(ValueError, match=r"states\[5, 2\] = 3"):
        mean_average_precision(scores, bad, chunk_elems=1)
    s = scores.copy()
    s[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"scores\[4, 1\] = nan"):
        mean_average_precision(s, states)
    with pytest.raises(ValueError, match="differ in shape"):
        mean_average_precision(scores[:, :3], states)
    with pytest.raises(TypeError, match="integer"):
        mean_average_precision(scores, states.astype(np.float32))
    with pytest.raises(ValueError, match="2-D"):
        mean_average_precision(scores[:, 0], states[:, 0])


def test_class_frequencies():
    states = np.array([[1, 0, -1], [1, 1, 0], [-1, 1, 1], [1, -1, 0]], np.int8)
    assert class_frequencies(states, chunk_rows=3).tolist() == [3, 2, 1]
    assert class_frequencies(torch.from_numpy(states)).tolist() == [3, 2, 1]


@requires_cuda
def test_cuda_matches_cpu():
    scores, states = _data(n=2000, num_labels=64, missing=0.3, seed=3)
    ref_m, ref_ap = mean_average_precision(scores, states)
    m, ap = mean_average_precision(torch.from_numpy(scores).cuda(), torch.from_numpy(states).cuda())
    np.testing.assert_allclose(ap, ref_ap, atol=1e-12)
    assert m == pytest.approx(ref_m, abs=1e-12)

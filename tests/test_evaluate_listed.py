"""Evaluation from the observed entries only (native partial labels in CSR): the same mAP as the
dense path, without a rows × L score matrix."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from pml_scale.evaluate import listed_entries_suffice, predict, predict_listed, score, score_listed
from pml_scale.labels import ObservedLabels
from pml_scale.metrics import listed_average_precision, mean_average_precision


def _partial(rng, n, num_labels, p_missing=0.6):
    states = rng.choice([-1, 0, 1], size=(n, num_labels), p=[p_missing, (1 - p_missing) * 0.6, (1 - p_missing) * 0.4])
    return states.astype(np.int8)


@pytest.mark.parametrize("seed", range(6))
def test_listed_ap_equals_masked_dense_ap_with_ties(seed):
    rng = np.random.default_rng(seed)
    states = _partial(rng, 70, 9)
    scores = np.round(rng.random(states.shape), 1).astype(np.float32)  # many ties
    r, c = np.nonzero(states != -1)
    got_map, got = listed_average_precision(c, scores[r, c], states[r, c], 9)
    want_map, want = mean_average_precision(scores, states, partial=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
    assert got_map == pytest.approx(want_map, rel=1e-12)


def test_listed_ap_of_one_class_is_sklearns():
    y = np.array([1, 0, 1, 1, 0, 0, 1], np.int8)
    s = np.array([0.9, 0.9, 0.3, 0.5, 0.1, 0.5, 0.2], np.float32)
    _, ap = listed_average_precision(np.zeros(7, np.int32), s, y, 1)
    assert ap[0] == pytest.approx(average_precision_score(y, s))


def test_listed_ap_rejects_what_it_cannot_score():
    with pytest.raises(ValueError, match="no class can be scored"):
        listed_average_precision(np.array([0, 1]), np.array([0.5, 0.5]), np.array([1, 1]), 2)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        listed_average_precision(np.array([0]), np.array([0.5]), np.array([-1]), 1)
    with pytest.raises(ValueError, match="out of range"):
        listed_average_precision(np.array([3]), np.array([0.5]), np.array([1]), 2)


class _Loader:
    """An eval loader's face: full batches, the last padded with repeats marked invalid."""

    def __init__(self, images, batch):
        self.images, self.batch = images, batch

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        n = self.images.shape[0]
        for a in range(0, n, self.batch):
            ids = np.arange(a, a + self.batch) % n
            valid = np.arange(a, a + self.batch) < n
            yield SimpleNamespace(images=self.images[ids], ids=torch.from_numpy(ids), valid=torch.from_numpy(valid),
                                  ids_host=ids, valid_host=valid)


def test_predict_listed_scores_as_the_dense_path():
    rng = np.random.default_rng(0)
    n, num_labels = 53, 17
    states = _partial(rng, n, num_labels, p_missing=0.8)
    csr = ObservedLabels.from_dense(states).as_csr()
    assert listed_entries_suffice(csr, None) and not listed_entries_suffice(csr, False)
    assert not listed_entries_suffice(ObservedLabels.from_dense(states), None)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, num_labels)
    model.train()
    loader = _Loader(torch.randn(n, 8), batch=16)
    entries = predict_listed(model, loader, csr, epoch=0)
    assert entries[2].size == int((states != -1).sum())  # the observed entries, nothing more
    got_map_ap, got_n = score_listed(*entries, num_labels)
    dense_scores, dense_ids = predict(model, loader, epoch=0, num_labels=num_labels)
    (want_map, want_ap), want_n = score(dense_scores, dense_ids, csr, partial=None)
    assert got_n == want_n == n and model.training
    assert got_map_ap[0] == pytest.approx(want_map, rel=1e-12)
    np.testing.assert_allclose(got_map_ap[1], want_ap, rtol=1e-12, equal_nan=True)

"""Label-missing settings, label statistics and the observed-label store."""

import math

import numpy as np
import pytest
import torch

from pml_scale.labels import observed as L
from pml_scale.labels import ObservedLabels, label_stats, make_observed, parse_setting


def _full(n=400, num_labels=30, p=0.15, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, num_labels)) < p).astype(np.int8)


def _observed_states(n=50, num_labels=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([-1, 0, 1], np.int8), size=(n, num_labels), p=[0.6, 0.3, 0.1])


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("text,expected", [
    ("FAL", ("FAL", None)), ("fal", ("FAL", None)), ("PAL_0.3", ("PAL", 0.3)), ("ppl_1", ("PPL", 1.0)),
    ("SPL", ("SPL", None)), ("Native", ("NATIVE", None)), ("PPL_0.05", ("PPL", 0.05)),
])
def test_parse_setting(text, expected):
    assert parse_setting(text) == expected


@pytest.mark.parametrize("text,match", [
    ("XYZ", "unknown setting"), ("PAL", "needs a ratio"), ("PAL_0", "ratio"), ("PAL_1.5", "ratio"),
    ("PAL_nan", "ratio"), ("PPL_abc", "ratio"), ("SPL_0.3", "takes no ratio"), ("", "unknown setting"),
])
def test_parse_setting_errors(text, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_setting(text)
    if match == "unknown setting":
        assert "PAL_<r>" in str(e.value)  # lists the accepted forms


def test_pal_exact_counts_and_values():
    full = _full()
    k = round(0.3 * full.shape[1])  # 9
    obs = make_observed(full, "PAL", 0.3, seed=3)
    kept = obs != -1
    assert obs.dtype == np.int8 and obs.shape == full.shape
    assert (kept.sum(1) == k).all()
    assert (obs[kept] == full[kept]).all()  # kept entries carry their true value
    # per-slot keep frequency is uniform: 400 rows, sd ~ 0.023
    assert np.abs(kept.mean(0) - k / full.shape[1]).max() < 0.12
    assert abs(kept.mean() - 0.3) < 1e-12


def test_pal_keeps_existing_missing():
    full = _full()
    full[::3, ::2] = -1
    obs = make_observed(full, "PAL_0.5", seed=1)
    assert (obs[full == -1] == -1).all()
    assert (np.count_nonzero(obs != -1, axis=1) <= 15).all()
    # the same slots are drawn as for the fully labelled image
    obs_full = make_observed(np.where(full == -1, 0, full).astype(np.int8), "PAL_0.5", seed=1)
    assert ((obs != -1) == ((obs_full != -1) & (full != -1))).all()


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 1.0])
def test_ppl_counts(ratio):
    full = _full(p=0.3)
    obs = make_observed(full, f"PPL_{ratio}", seed=5)
    n_pos = (full == 1).sum(1)
    expected = np.array([max(1, round(ratio * int(n))) if n else 0 for n in n_pos])
    assert ((obs == 1).sum(1) == expected).all()
    assert not (obs == 0).any()  # no negatives
    assert (full[obs == 1] == 1).all()  # subset of true positives


def test_spl_one_positive_uniform():
    full = _full(p=0.2)
    full[:5] = 0  # images without positives keep nothing
    obs = make_observed(full, "SPL", seed=2)
    n_kept = (obs == 1).sum(1)
    assert (n_kept == ((full == 1).sum(1) > 0)).all()
    assert (n_kept[:5] == 0).all() and (obs[:5] == -1).all()
    assert (full[obs == 1] == 1).all() and not (obs == 0).any()
    # uniform among the image's positives: 3000 images, positives at labels 0, 4, 7
    tri = np.zeros((3000, 8), np.int8)
    tri[:, [0, 4, 7]] = 1
    share = (make_observed(tri, "SPL", seed=9) == 1).mean(0)[[0, 4, 7]]
    assert np.abs(share - 1 / 3).max() < 0.04  # sd ~ 0.009


def test_fal_and_native_copy():
    full = _observed_states()
    for name in ("FAL", "NATIVE"):
        obs = make_observed(full, name)
        assert (obs == full).all() and obs is not full


def test_determinism_seed_and_chunks():
    full = _full(n=257)
    for setting in ("PAL_0.3", "PPL_0.5", "SPL"):
        ref = make_observed(full, setting, seed=11)
        assert (make_observed(full, setting, seed=11) == ref).all()
        for chunk in (1, 7, 100, 1000):
            assert (make_observed(full, setting, seed=11, chunk_rows=chunk) == ref).all(), (setting, chunk)
        assert (make_observed(full, setting, seed=12) != ref).any()


def test_nested_across_ratios_and_out_memmap(tmp_path):
    full = _full()
    small = make_observed(full, "PAL_0.3", seed=4) != -1
    large = make_observed(full, "PAL_0.6", seed=4) != -1
    assert (small <= large).all()
    assert ((make_observed(full, "SPL", seed=4) == 1) <= (make_observed(full, "PPL_0.5", seed=4) == 1)).all()
    out = np.lib.format.open_memmap(tmp_path / "o.npy", mode="w+", dtype=np.int8, shape=full.shape)
    got = make_observed(full, "PAL_0.3", seed=4, out=out, chunk_rows=64)
    assert got is out and ((out != -1) == small).all()


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(setting="PAL", ratio=0), ValueError, "ratio"),
    (dict(setting="PAL", ratio=1.5), ValueError, "ratio"),
    (dict(setting="PPL", ratio=math.nan), ValueError, "ratio"),
    (dict(setting="PAL"), ValueError, "needs ratio"),
    (dict(setting="SPL", ratio=0.5), ValueError, "takes no ratio"),
    (dict(setting="PAL_0.3", ratio=0.5), ValueError, "contradicts"),
    (dict(setting="PAL", ratio=0.01), ValueError, "0 labels per image"),
    (dict(setting="MAYBE"), ValueError, "unknown setting"),
    (dict(setting="SPL", seed=-1), ValueError, "seed"),
    (dict(setting="SPL", chunk_rows=0), ValueError, "chunk_rows"),
])
def test_make_observed_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_observed(_full(n=10), **kwargs)


def test_make_observed_bad_arrays():
    full = _full(n=10)
    with pytest.raises(TypeError, match="int8"):
        make_observed(full.astype(np.float32), "FAL")
    with pytest.raises(ValueError, match="2-D"):
        make_observed(full[None], "FAL")
    bad = full.copy()
    bad[6, 4] = 2
    with pytest.raises(ValueError, match=r"full\[6, 4\] = 2"):
        make_observed(bad, "SPL", chunk_rows=4)


def test_label_stats_hand_computed():
    s = np.array([[1, 0, -1], [1, 1, 0], [-1, -1, 0], [0, -1, -1]], np.int8)
    st = label_stats(s, chunk_rows=3)
    assert st["num_images"] == 4 and st["num_labels"] == 3
    assert st["pos_per_image"] == 3 / 4 and st["neg_per_image"] == 4 / 4 and st["missing_per_image"] == 5 / 4
    assert st["pos_per_class"].tolist() == [2, 1, 0]
    assert st["neg_per_class"].tolist() == [1, 1, 2]
    assert st["missing_per_class"].tolist() == [1, 2, 2]
    assert st["images_without_positive"] == 2
    csr = label_stats(ObservedLabels.from_dense(s).as_csr())
    for key, val in st.items():
        assert np.array_equal(csr[key], val), key


# ----------------------------------------------------------------------------- store


def _reference_csr(dense):
    indptr, indices, values = [0], [], []
    for row in dense:
        for j, v in enumerate(row):
            if v != -1:
                indices.append(j)
                values.append(v)
        indptr.append(len(indices))
    return indptr, indices, values


def test_csr_matches_reference_and_round_trips():
    dense = _observed_states()
    dense[7] = -1  # an empty row
    indptr, indices, values, shape = ObservedLabels.from_dense(dense).to_csr()
    ref = _reference_csr(dense)
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and values.dtype == np.int8
    assert (indptr.tolist(), indices.tolist(), values.tolist()) == ref and shape == dense.shape
    back = ObservedLabels.from_csr(indptr, indices, values, shape)
    assert np.array_equal(back.to_dense(), dense)
    again = back.to_csr()
    assert all(np.array_equal(x, y) for x, y in zip(again[:3], (indptr, indices, values)))


@pytest.mark.parametrize("stream", [False, True])
def test_store_save_load_gather(tmp_path, monkeypatch, stream):
    if stream:
        monkeypatch.setattr(L, "_STREAM_BYTES", 0)
    dense = _observed_states(n=300, num_labels=17)
    obj = ObservedLabels.from_dense(dense)
    d = ObservedLabels.load(obj.save(tmp_path / "obs.npy"))
    c = ObservedLabels.load(obj.save_csr(tmp_path / "obs.npz"))
    assert d.form == "dense" and c.form == "csr"
    assert isinstance(d.dense, np.memmap)  # never read in whole
    assert d.num_samples == c.num_samples == 300 and d.num_labels == c.num_labels == 17
    ids = np.random.default_rng(1).integers(0, 300, size=64)
    ids[:3] = [299, 0, 299]
    for store in (d, c):
        assert np.array_equal(store.gather(ids), dense[ids])
        assert np.array_equal(store.gather(torch.from_numpy(ids)), dense[ids])
        assert store.gather(np.array([], np.int64)).shape == (0, 17)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left
    # dense saved from a CSR store is identical
    ObservedLabels.load(tmp_path / "obs.npz").save(tmp_path / "back.npy")
    assert np.array_equal(np.load(tmp_path / "back.npy"), dense)


def test_gather_bad_ids():
    obj = ObservedLabels.from_dense(_observed_states(n=10))
    with pytest.raises(IndexError, match=r"ids\[1\] = 10 out of range \[0, 10\)"):
        obj.gather([3, 10])
    with pytest.raises(ValueError, match="1-D integer"):
        obj.gather(np.array([0.5]))


def test_validation_catches_corrupt_files(tmp_path):
    dense = _observed_states(n=20)
    bad = dense.copy()
    bad[13, 2] = 5
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"bad\.npy.*\[13, 2\] = 5"):
        ObservedLabels.load(tmp_path / "bad.npy")
    np.save(tmp_path / "float.npy", dense.astype(np.float32))
    with pytest.raises(ValueError, match=r"float\.npy.*int8"):
        ObservedLabels.load(tmp_path / "float.npy")
    good = ObservedLabels.from_dense(dense).save(tmp_path / "ok.npy")
    (tmp_path / "trunc.npy").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"trunc\.npy"):
        ObservedLabels.load(tmp_path / "trunc.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"junk\.npz"):
        ObservedLabels.load(tmp_path / "junk.npz")

    indptr, indices, values, shape = ObservedLabels.from_dense(dense).to_csr()
    row = 9
    a, b = indptr[row], indptr[row + 1]
    assert b - a >= 2
    cases = {
        "unsorted": dict(indices=np.concatenate([indices[:a], indices[a:b][::-1], indices[b:]]),
                         match=f"row {row}: label indices not strictly increasing"),
        "range": dict(indices=np.where(np.arange(indices.size) == a, 99, indices).astype(np.int32),
                      match=f"row {row}: label index 99 out of range"),
        "values": dict(values=np.where(np.arange(values.size) == a, -1, values).astype(np.int8),
                       match=f"row {row}: value -1"),
        "indptr": dict(indptr=np.where(np.arange(indptr.size) == row + 1, indptr[row] - 1, indptr),
                       match=f"indptr decreases at row {row}"),
        "dtype": dict(indices=indices.astype(np.int64), match="indices must be 1-D int32"),
    }
    for name, case in cases.items():
        arrays = dict(indptr=indptr, indices=indices, values=values, shape=np.array(shape))
        match = case.pop("match")
        arrays.update(case)
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=match) as e:
            ObservedLabels.load(tmp_path / f"{name}.npz")
        assert f"{name}.npz" in str(e.value)
    np.savez(tmp_path / "nokey.npz", indptr=indptr, values=values, shape=np.array(shape))
    with pytest.raises(ValueError, match=r"nokey\.npz.*'indices'"):
        ObservedLabels.load(tmp_path / "nokey.npz")
    with pytest.raises(ValueError, match=r"\.txt.*accepted"):
        ObservedLabels.load(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="gone.npy"):
        ObservedLabels.load(tmp_path / "gone.npy")
    with pytest.raises(ValueError, match="save_csr"):
        ObservedLabels.from_dense(dense).save(tmp_path / "x.npz")


def test_class_prior_from_observed_rates_or_positive_shares():
    from pml_scale.labels import class_prior, label_stats

    # PAL-like: class 0 observed 1 pos / 4 entries, class 1 never positive (floor), class 2 all positive (ceil)
    pal = np.array([[1, 0, 1], [0, -1, 1], [0, 0, -1], [0, 0, 1]], np.int8)
    assert class_prior(label_stats(pal), 2.0).tolist() == pytest.approx([0.25, 1e-3, 0.5])
    # PPL/SPL-like (no negatives observed): k times each class's share of the observed positives
    ppl = np.array([[1, -1, -1], [1, 1, -1], [-1, -1, 1], [1, -1, -1]], np.int8)
    assert class_prior(label_stats(ppl), 1.0).tolist() == pytest.approx([0.5, 0.2, 0.2])
    assert class_prior(label_stats(ppl), 0.01).tolist() == pytest.approx([0.006, 0.002, 0.002])
    with pytest.raises(ValueError, match="expected_positives"):
        class_prior(label_stats(ppl), float("nan"))

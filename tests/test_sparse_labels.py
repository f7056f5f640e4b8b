"""Sparse (CSR) label files end to end, against the dense path as the reference: the same
conversion in both forms must give the same labels, statistics, settings, batches and mAP; the
Open Images-like generator goes through the real ``convert openimages`` path; verify catches
broken CSR; and a 5.6M x 9,605 label space stays far from N x L in memory."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pml_scale.data.shards import convert as convert_mod
from pml_scale.data.shards.convert import choose_labels_form, convert
from pml_scale.data.shards.format import labels_path, open_labels, read_manifest
from pml_scale.demo.openimages_like import write_openimages_like
from pml_scale.data.shards.cli import main
from pml_scale.data.shards.masks import make_mask
from pml_scale.data.shards.verify import verify
from pml_scale.data.shards.sources import parse_list, parse_openimages
from pml_scale.evaluate import score
from pml_scale.labels import ObservedLabels, label_stats, make_observed, save_csr
from pml_scale.labels.stores import PseudoLabelStore

L_OI = 300


@pytest.fixture(scope="module")
def oi_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("oi") / "raw"
    return write_openimages_like(raw, num_classes=L_OI, n_train=150, n_test=60, size=16, seed=1)


@pytest.fixture(scope="module")
def oi_pair(oi_raw, tmp_path_factory):
    """The same Open Images-like inputs converted with CSR and with dense label files."""
    base = tmp_path_factory.mktemp("oi-out")
    out = {}
    for form in ("csr", "dense"):
        src = parse_openimages(oi_raw["train_labels"], oi_raw["train_images"], oi_raw["test_labels"],
                               oi_raw["test_images"], class_descriptions=oi_raw["class_descriptions"],
                               trainable=oi_raw["trainable"])
        out[form] = (base / form, convert(src, base / form, shard_size=64, progress=False, labels_form=form))
    return out


def test_generator_writes_open_images_files_natively_partial(oi_raw):
    with open(oi_raw["train_labels"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageID", "Source", "LabelName", "Confidence"]
    assert {r[3] for r in rows[1:]} == {"0", "1"} and [r[0] for r in rows[1:]] == sorted(r[0] for r in rows[1:])
    trainable = oi_raw["trainable"].read_text().split()
    assert len(trainable) == L_OI and len(set(trainable)) == L_OI
    with open(oi_raw["class_descriptions"], newline="") as f:
        desc = list(csv.reader(f))
    assert desc[0] == ["LabelName", "DisplayName"] and set(trainable) < {r[0] for r in desc[1:]}
    images = {r[0] for r in rows[1:]}
    assert len(images) == 150 and all((oi_raw["train_images"] / f"{i}.jpg").is_file() for i in images)
    pos = sum(r[3] == "1" and r[2] in set(trainable) for r in rows[1:]) / 150
    neg = sum(r[3] == "0" for r in rows[1:]) / 150
    assert 1.8 < pos < 3.0 and 1.8 < neg < 3.4  # ~2.4 / ~2.6 per image, as Open Images


def test_csr_and_dense_conversions_agree(oi_pair):
    (c_dir, c_man), (d_dir, d_man) = oi_pair["csr"], oi_pair["dense"]
    for split in ("train", "test"):
        assert c_man["splits"][split]["labels"] == f"{split}-labels.npz"
        assert d_man["splits"][split]["labels"] == f"{split}-labels.npy"
        assert c_man["splits"][split]["label_stats"] == d_man["splits"][split]["label_stats"]
        csr, dense = open_labels(c_dir, split), np.load(d_dir / f"{split}-labels.npy")
        assert csr.form == "csr" and csr.fill == -1
        np.testing.assert_array_equal(csr.to_dense(), dense)
        # label file target: <= 2 x (observed entries x 5 B) + N x 8 B (here the zip headers count too)
        n, nnz = dense.shape[0], int((dense != -1).sum())
        assert labels_path(c_dir, split).stat().st_size <= 2 * nnz * 5 + n * 8
        stats_c, stats_d = label_stats(csr), label_stats(dense)
        for k in stats_d:
            np.testing.assert_array_equal(np.asarray(stats_c[k]), np.asarray(stats_d[k]))
    for p in sorted(d_dir.glob("*.tar")):  # shards do not depend on the label form
        assert (c_dir / p.name).read_bytes() == p.read_bytes()
    assert verify(c_dir) == [] and verify(d_dir) == []


@pytest.mark.parametrize("setting", ["PAL_0.3", "PPL_0.5", "SPL", "NATIVE"])
def test_masks_from_csr_equal_the_dense_draw(oi_pair, setting, tmp_path):
    (c_dir, _), (d_dir, _) = oi_pair["csr"], oi_pair["dense"]
    full = np.load(d_dir / "train-labels.npy")
    ref = make_observed(full, setting, seed=5)
    for folder, csr in ((c_dir, True), (c_dir, False), (d_dir, True), (d_dir, False)):
        path = make_mask(folder, setting, seed=5, csr=csr)
        np.testing.assert_array_equal(ObservedLabels.load(path).to_dense(), ref)
        assert not path.with_suffix(".npy" if csr else ".npz").exists()  # one form per setting: no stale twin
    path = make_mask(c_dir, setting, seed=5)
    assert path.suffix == (".npy" if setting.startswith("PAL") else ".npz")  # auto: CSR unless PAL
    np.testing.assert_array_equal(ObservedLabels.load(path).to_dense(), ref)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["source_labels"] == "train-labels.npz"


def test_evaluation_and_expected_positives_match_dense(oi_pair):
    from pml_scale.run_data import expected_positives

    (c_dir, _), (d_dir, _) = oi_pair["csr"], oi_pair["dense"]
    csr, dense = open_labels(c_dir, "test"), np.load(d_dir / "test-labels.npy")
    rng = np.random.default_rng(0)
    ids = rng.permutation(dense.shape[0])
    scores = rng.random((ids.size, L_OI)).astype(np.float32)
    (m_c, ap_c), n_c = score(scores, ids, csr, partial=None)
    (m_d, ap_d), n_d = score(scores, ids, dense, partial=None)
    assert m_c == m_d and n_c == n_d and np.array_equal(ap_c, ap_d, equal_nan=True)
    # a per-class block at a time: a chunk smaller than one class column still agrees
    from pml_scale.metrics import mean_average_precision

    assert mean_average_precision(scores, csr.columns(ids), chunk_elems=7)[0] == pytest.approx(m_d, abs=1e-12)
    train_c, train_d = open_labels(c_dir, "train"), open_labels(d_dir, "train")
    assert expected_positives(train_c) == expected_positives(train_d) == (np.load(d_dir / "train-labels.npy") == 1
                                                                          ).sum() / train_d.num_samples


class _Batch:
    def __init__(self, ids, valid):
        self.ids_host, self.valid_host = np.asarray(ids, np.int64), np.asarray(valid, bool)


def test_label_thread_gives_the_same_batches_and_store(oi_pair, tmp_path):
    from pml_scale.labels.traffic import LabelTraffic

    stores = {}
    for form, (folder, _) in oi_pair.items():
        obs = open_labels(folder, "train")
        n = obs.num_samples
        store = PseudoLabelStore(tmp_path / f"{form}.f16", n, L_OI)
        traffic = LabelTraffic(observed=obs, pseudo_store=store, estimates_store=None, device="cpu",
                               counts_fn=lambda s, p, i, e: (float((s == 1).sum()), float((s != -1).sum())),
                               global_counts=False, group=None, world_size=1, rank=0, writer=True,
                               per_node=False, momentum=0.0)
        rng = np.random.default_rng(3)
        got = []
        for step, ids in enumerate(np.array_split(rng.permutation(n), 6)):
            batch = _Batch(ids, np.arange(ids.size) % 5 != 0)
            host = traffic.gather(batch, epoch=0).result()
            got.append((host.states.numpy().copy(), host.counts))
            yhat = torch.rand(host.ids_host.size, L_OI, generator=torch.Generator().manual_seed(step))
            traffic.scatter(batch, traffic.to_device(host), yhat, None)
        traffic.close()
        stores[form] = (got, np.fromfile(tmp_path / f"{form}.f16", np.float16))
    (g_c, s_c), (g_d, s_d) = stores["csr"], stores["dense"]
    for (a, ca), (b, cb) in zip(g_c, g_d):
        np.testing.assert_array_equal(a, b)
        assert ca == cb
    np.testing.assert_array_equal(s_c, s_d)  # the same ŷ written on the same (missing) entries


def _full_list(tmp_path, n=12):
    """A generic CSV of full labels (unlisted = negative): CSR then lists positives only (fill 0)."""
    from PIL import Image

    (tmp_path / "im").mkdir()
    classes = [f"c{k}" for k in range(9)]
    rows = []
    for k in range(n):
        Image.new("RGB", (12, 12), (20 * k, 0, 0)).save(tmp_path / "im" / f"{k}.jpg")
        rows.append(f"im/{k}.jpg,{';'.join(classes[(k * j) % 9] for j in range(1, 1 + k % 3 + 1))}\n")
    (tmp_path / "l.csv").write_text("path,positives\n" + "".join(rows))
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    return parse_list("csv", tmp_path / "l.csv", classes=tmp_path / "classes.txt")


def test_full_labels_as_csr_imply_negatives(tmp_path):
    src = _full_list(tmp_path)
    c = convert(src, tmp_path / "c", shard_size=5, progress=False, labels_form="csr")
    d = convert(src, tmp_path / "d", shard_size=5, progress=False, labels_form="dense")
    assert c["splits"]["train"]["label_stats"] == d["splits"]["train"]["label_stats"]
    csr = open_labels(tmp_path / "c", "train")
    dense = np.load(tmp_path / "d" / "train-labels.npy")
    assert csr.fill == 0 and set(np.unique(csr.values)) == {1} and (dense == -1).sum() == 0
    np.testing.assert_array_equal(csr.to_dense(), dense)
    assert verify(tmp_path / "c") == []
    for setting in ("FAL", "PAL_0.5", "PPL_0.5"):
        np.testing.assert_array_equal(ObservedLabels.load(make_mask(tmp_path / "c", setting, seed=2)).to_dense(),
                                      make_observed(dense, setting, seed=2))


def test_auto_form_is_decided_by_size(oi_raw, tmp_path, monkeypatch):
    assert choose_labels_form(10**6, 9605, 5 * 10**6) == "csr"  # 9.6 GB dense vs 33 MB CSR
    assert choose_labels_form(10**6, 20, 15 * 10**6) == "dense"  # CSR would be bigger
    assert choose_labels_form(1000, 9605, 5000) == "dense"  # 9.6 MB: under AUTO_DENSE_MAX, stays dense
    with pytest.raises(ValueError, match="labels_form"):
        choose_labels_form(1, 1, 1, "sparse")
    monkeypatch.setattr(convert_mod, "AUTO_DENSE_MAX", 0)
    src = parse_openimages(oi_raw["train_labels"], oi_raw["train_images"], class_descriptions=oi_raw[
        "class_descriptions"], trainable=oi_raw["trainable"])
    m = convert(src, tmp_path / "auto", shard_size=64, progress=False)
    assert m["splits"]["train"]["labels"] == "train-labels.npz" and "labels_form" not in m["options"]


def _break(folder, **change):
    path = folder / "train-labels.npz"
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    for k, f in change.items():
        arrays[k] = f(arrays[k])
    save_csr(path, arrays["indptr"], arrays["indices"], arrays["values"], arrays["shape"], fill=int(arrays["fill"]))


def _set(i, v):
    def f(a):
        a[i] = v
        return a
    return f


@pytest.mark.parametrize("change, message", [
    ({"indptr": _set(3, 10**6)}, "indptr decreases"),
    ({"indices": _set(0, L_OI)}, "out of range"),
    ({"indices": lambda a: np.concatenate([a[:1][::-1] * 0 + a[1], a[1:2] * 0 + a[0], a[2:]])}, "not strictly increasing"),
    ({"values": _set(0, 2)}, "value 2"),
    ({"values": _set(0, -1)}, "value -1"),  # fill -1: a listed entry must be observed
])
def test_verify_checks_csr_consistency(oi_pair, tmp_path, change, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(oi_pair["csr"][0], folder)
    _break(folder, **change)
    problems = verify(folder, decode=False)
    assert any("train-labels.npz" in p and message in p for p in problems), problems
    assert main(["verify", str(folder), "-q", "-j", "1", "--no-decode"]) == 1


def test_demo_cli_openimages_like_and_native_training(tmp_path):
    """`pml-shard demo --dataset openimages-like`, then one NATIVE epoch on its CSR labels."""
    from test_train import run_train, write_config

    out = tmp_path / "oil"
    assert main(["demo", str(out), "--dataset", "openimages-like", "--classes", "400", "--n-train", "64",
                 "--n-test", "32", "--size", "16", "--shard-size", "32", "--labels-form", "csr", "-q"]) == 0
    assert read_manifest(out)["splits"]["train"]["labels"] == "train-labels.npz" and verify(out) == []
    cfg = write_config(tmp_path / "c.yaml", out, tmp_path / "runs", run={"epochs": 1},
                       data={"setting": "NATIVE", "image_size": 16, "eval_batch_size": 32},
                       eval={"partial": True})
    run_train(cfg)
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert 0.0 < summary["final_map"] <= 1.0
    obs = open_labels(out, "train").to_dense()
    pseudo = np.fromfile(tmp_path / "runs" / "t" / "pseudo.f16", np.float16).reshape(obs.shape)
    assert (pseudo[obs != -1] == 0).all() and (pseudo[obs == -1] != 0).mean() > 0.5  # only missing entries move


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import numpy as np
    import torch
    from pml_scale.data.shards.format import open_labels
    from pml_scale.labels.traffic import LabelTraffic
    from pml_scale.data.shards.masks import make_mask
    from pml_scale.labels import ObservedLabels, label_stats
    from pml_scale.labels.stores import PseudoLabelStore

    folder, batches = Path(sys.argv[1]), int(sys.argv[2])
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {}
    full = open_labels(folder, "train"); out["open"] = rss()
    label_stats(full); out["stats"] = rss()
    obs = ObservedLabels.load(make_mask(folder, "PPL_0.5", seed=0)); out["mask"] = rss()
    n, L = obs.shape
    store = PseudoLabelStore(folder / "pseudo.f16", n, L)  # sparse N x L: the one N x L allowed
    t = LabelTraffic(observed=obs, pseudo_store=store, estimates_store=None, device="cpu", counts_fn=lambda *a: None,
                     global_counts=False, group=None, world_size=1, rank=0, writer=True, per_node=False,
                     momentum=0.0)
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)
    class B:
        def __init__(self, ids): self.ids_host, self.valid_host = ids, np.ones(ids.size, bool)
    for b in range(batches):
        batch = B(perm[b * 64:(b + 1) * 64])
        h = t.gather(batch, 0).result()
        t.scatter(batch, h, torch.full(tuple(h.states.shape), 0.25), None)
    t.close(); out["traffic"] = rss()
    ids = perm[:batches * 64]
    g, o = store.gather_numpy(ids), obs.gather(ids)
    out["written_as_expected"] = bool(np.all(np.where(o == -1, g == 0.25, g == 0.5)))  # missing entries only
    print(json.dumps(out))
""")


def test_open_images_size_labels_stay_far_below_n_by_l(tmp_path):
    """N = 5.6M, L = 9,605 (a 54 GB dense label file): load, statistics, a PPL setting drawn from
    the CSR labels and label-thread traffic (a sample of batches: a whole epoch takes minutes on 2
    cores, see benchmarks/scale.py) keep the process under 2 GB."""
    n, L, per = 5_600_000, 9605, 5
    rng = np.random.default_rng(0)
    step = L // per  # `per` sorted, distinct classes per row, one in each fifth of the classes
    indices = (np.arange(per, dtype=np.int32) * step + rng.integers(0, step, (n, per), dtype=np.int32)).ravel()
    values = (rng.random(n * per) < 0.48).astype(np.int8)
    indptr = np.arange(0, n * per + 1, per, dtype=np.int64)
    save_csr(tmp_path / "train-labels.npz", indptr, indices, values, (n, L), fill=-1)
    del indices, values, indptr
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format_version": 1, "num_classes": L, "classes": [str(k) for k in range(L)],
        "splits": {"train": {"num_samples": n, "labels": "train-labels.npz", "shards": []}}}))
    size = (tmp_path / "train-labels.npz").stat().st_size
    assert size <= 2 * n * per * 5 + n * 8  # the target: ~300 MB here, dense would be 54 GB
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path), "10"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rss.pop("written_as_expected")
    assert max(rss.values()) < 2 * 2 ** 30, rss

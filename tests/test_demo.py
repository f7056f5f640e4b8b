"""The embedded demo dataset: COCO-like statistics, long tail, disjoint writers, determinism,
and that it goes through the real converter (verify passes on it)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pml_scale.data import demo
from pml_scale.data.format import read_manifest
from pml_scale.data.shard import main, verify


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "ds"
    t0 = time.perf_counter()
    rc = main(["demo", str(out), "-q"])  # the default size, through the CLI
    return out, rc, time.perf_counter() - t0


def test_default_build(built):
    out, rc, seconds = built
    assert rc == 0
    print(f"demo build: {seconds:.1f} s")
    assert seconds < 60  # target < 30 s on 2 idle cores; slack for a shared machine
    m = read_manifest(out)
    assert m["num_classes"] == 80 and m["classes"][:9] == ["0-red", "0-green", "0-blue", "0-yellow", "0-cyan",
                                                            "0-magenta", "0-orange", "0-white", "1-red"]
    assert m["source"]["format"] == "coco" and m["source"]["args"]["demo"]["seed"] == 0
    assert m["splits"]["train"]["num_samples"] == 2400 and m["splits"]["test"]["num_samples"] == 800
    assert m["rejected"]["count"] == 0 and m["converted"]["count"] == 0
    assert not (out / ".demo-src").exists()
    for split in ("train", "test"):
        lab = np.load(out / f"{split}-labels.npy")
        per_image = (lab == 1).sum(1)
        assert abs(per_image.mean() - 2.9) < 0.15  # COCO: 2.9 positives of 80
        assert per_image.min() >= 1 and per_image.max() <= 6 and set(np.unique(lab)) <= {0, 1}
        assert m["splits"][split]["label_stats"]["class_positives"] == (lab == 1).sum(0).tolist()
    counts = np.sort((np.load(out / "train-labels.npy") == 1).sum(0))[::-1]
    # long tail: the 8 most frequent classes (10%) hold > 35% of positives; head/tail ratio > 20
    assert counts[:8].sum() / counts.sum() > 0.35 and counts[0] / max(counts[-1], 1) > 20 and counts[-1] > 0
    assert verify(out, workers=2) == []


def test_class_frequencies_follow_the_zipf_weights(built):
    out, _, _ = built
    weights = demo.class_weights(np.random.default_rng(0))  # the generator's first draw (seed 0)
    counts = (np.load(out / "train-labels.npy") == 1).sum(0)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    rho = np.corrcoef(rank(weights), rank(counts))[0, 1]  # Spearman
    assert rho > 0.9


def test_writers_disjoint_and_deterministic(tmp_path):
    a = demo.make_demo_coco(tmp_path / "a", seed=1, n_train=60, n_test=30)
    b = demo.make_demo_coco(tmp_path / "b", seed=1, n_train=60, n_test=30)
    train = json.loads(a["train"][0].read_text())
    test = json.loads(a["test"][0].read_text())
    tr = {d for im in train["images"] for d in im["digits"]}
    te = {d for im in test["images"] for d in im["digits"]}
    assert tr and te and max(tr) < demo.DIGIT_SPLIT <= min(te)
    assert {c["id"] for c in train["categories"]} == {demo.category_id(k) for k in range(80)}
    # annotations agree with the digits drawn, and the bytes are identical for the same seed
    assert len(train["annotations"]) == sum(len(im["digits"]) for im in train["images"])
    for split in ("train", "test"):
        assert a[split][0].read_bytes() == b[split][0].read_bytes()
        for p in sorted(a[split][1].iterdir()):
            assert p.read_bytes() == (b[split][1] / p.name).read_bytes()
    c = demo.make_demo_coco(tmp_path / "c", seed=2, n_train=60, n_test=30)
    assert c["train"][0].read_bytes() != a["train"][0].read_bytes()


def test_build_demo_small_is_reproducible(tmp_path):
    m1 = demo.build_demo(tmp_path / "x", seed=3, n_train=50, n_test=20, size=48, shard_size=16)
    m2 = demo.build_demo(tmp_path / "y", seed=3, n_train=50, n_test=20, size=48, shard_size=16)
    s1 = [s["sha256"] for sp in m1["splits"].values() for s in sp["shards"]]
    s2 = [s["sha256"] for sp in m2["splits"].values() for s in sp["shards"]]
    assert s1 == s2 and len(s1) == 4 + 2
    assert m1["splits"]["train"]["label_stats"] == m2["splits"]["train"]["label_stats"]
    # rerunning on the finished folder is a no-op
    assert demo.build_demo(tmp_path / "x", seed=3, n_train=50, n_test=20, size=48, shard_size=16) == m1
    with pytest.raises(ValueError, match="n_train"):
        demo.build_demo(tmp_path / "z", n_train=0)

"""The embedded demo datasets: COCO-like and long-tailed statistics, disjoint writers,
determinism, that they go through the real converter (verify passes on them), and that the
demo backbone's pretraining learns its task and loads as ``model.pretrained``."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pml_scale.demo import digits as demo, scenes
from pml_scale.data.shards.format import read_manifest
from pml_scale.data.shards.cli import main
from pml_scale.data.shards.verify import verify


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "ds"
    t0 = time.perf_counter()
    rc = main(["demo", str(out), "-q", "--no-pretrain"])  # the default size, through the CLI
    return out, rc, time.perf_counter() - t0


def test_default_build(built):
    out, rc, seconds = built
    assert rc == 0
    print(f"demo build: {seconds:.1f} s")
    assert seconds < 120  # target < 40 s on 2 idle cores; slack for a shared machine
    m = read_manifest(out)
    assert m["num_classes"] == 80 and m["classes"][:9] == ["0-red", "0-green", "0-blue", "0-yellow", "0-cyan",
                                                            "0-magenta", "0-orange", "0-white", "1-red"]
    assert m["source"]["format"] == "coco" and m["source"]["args"]["demo"]["seed"] == 0
    assert m["splits"]["train"]["num_samples"] == 4800 and m["splits"]["test"]["num_samples"] == 1600
    assert m["rejected"]["count"] == 0 and m["converted"]["count"] == 0
    assert not (out / ".demo-src").exists() and not (out / "pretrained").exists()
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
    weights = scenes.class_weights(np.random.default_rng(0))  # the generator's first draw (seed 0)
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
    assert tr and te and max(tr) < scenes.DIGIT_SPLIT <= min(te)
    assert {c["id"] for c in train["categories"]} == {scenes.category_id(k) for k in range(80)}
    # annotations agree with the digits drawn, and the bytes are identical for the same seed
    assert len(train["annotations"]) == sum(len(im["digits"]) for im in train["images"])
    for split in ("train", "test"):
        assert a[split][0].read_bytes() == b[split][0].read_bytes()
        for p in sorted(a[split][1].iterdir()):
            assert p.read_bytes() == (b[split][1] / p.name).read_bytes()
    c = demo.make_demo_coco(tmp_path / "c", seed=2, n_train=60, n_test=30)
    assert c["train"][0].read_bytes() != a["train"][0].read_bytes()


def test_build_demo_small_is_reproducible(tmp_path):
    small = dict(seed=3, n_train=50, n_test=20, size=48, shard_size=16, pretrain=False)
    m1 = demo.build_demo(tmp_path / "x", **small)
    m2 = demo.build_demo(tmp_path / "y", **small)
    s1 = [s["sha256"] for sp in m1["splits"].values() for s in sp["shards"]]
    s2 = [s["sha256"] for sp in m2["splits"].values() for s in sp["shards"]]
    assert s1 == s2 and len(s1) == 4 + 2
    assert m1["splits"]["train"]["label_stats"] == m2["splits"]["train"]["label_stats"]
    # rerunning on the finished folder is a no-op
    assert demo.build_demo(tmp_path / "x", **small) == m1
    with pytest.raises(ValueError, match="n_train"):
        demo.build_demo(tmp_path / "z", n_train=0)


def test_longtail_statistics_and_orientations(tmp_path):
    spec = scenes.get_spec("longtail")
    assert spec.num_classes == 240 and spec.class_names()[:4] == ["0-red-up", "0-red-left", "0-red-right", "0-green-up"]
    assert spec.decode(spec.class_names().index("7-cyan-right")) == (7, 4, 3)
    files = demo.make_demo_coco(tmp_path / "lt", dataset="longtail", seed=0, n_train=3000, n_test=40)
    train = json.loads(files["train"][0].read_text())
    cats = {c["id"]: c["name"] for c in train["categories"]}
    assert len(cats) == 240 and len(set(cats)) == 240
    per_image = np.bincount([a["image_id"] for a in train["annotations"]])[1:]
    assert abs(per_image.mean() - 1.5) < 0.1 and per_image.min() >= 1 and per_image.max() <= 4
    counts = np.sort(np.bincount([a["category_id"] for a in train["annotations"]], minlength=max(cats) + 1)[
        sorted(cats)])[::-1]
    # long tail over 240 classes: the 24 most frequent (10%) hold > 40% of positives
    assert counts[:24].sum() / counts.sum() > 0.4 and counts[0] > 20 * max(counts[-1], 1)
    with pytest.raises(ValueError, match="unknown demo dataset"):
        scenes.get_spec("mnist")


def test_turned_digits_are_turned():
    """A class with orientation 'left' draws the scan turned a quarter counter-clockwise."""
    from sklearn.datasets import load_digits

    digits = load_digits().images
    spec = scenes.get_spec("longtail")
    pool = {d: np.array([d]) for d in range(10)}  # scan index d is a digit d in load_digits
    cls = spec.class_names().index("1-white-left")
    up = spec.class_names().index("1-white-up")
    imgs = []
    for c in (cls, up):
        img, placed = scenes.compose(np.random.default_rng(3), digits, pool, [c], 64, spec)
        x, y, w, h = placed[0][2]
        imgs.append(img[y:y + h, x:x + w].astype(float).mean(2))
    # same placement draw, so the 'left' crop is the 'up' crop turned (up to the background grain)
    turned = np.rot90(imgs[1], 1)
    assert np.corrcoef(imgs[0].ravel(), turned.ravel())[0, 1] > 0.8
    assert np.corrcoef(imgs[0].ravel(), imgs[1].ravel())[0, 1] < 0.8


def test_backbone_pretraining_learns_and_loads(tmp_path):
    import torch

    from pml_scale.demo import backbone as demo_backbone
    from pml_scale.model import build_model

    recipe = {**demo_backbone.RECIPE, "n_images": 4096, "epochs": 3, "n_val": 256}
    path = tmp_path / "bb.pth"
    info = demo_backbone.pretrain_backbone(path, size=64, seed=0, recipe=recipe)
    assert path.exists() and json.loads(path.with_name("bb.pth.json").read_text()) == info
    assert info["heldout_colour_accuracy"] > 0.9  # colour: easy; digits: better than chance (0.1)
    assert info["heldout_digit_accuracy"] > 0.3
    model = build_model("tiny_resnet", 80, pretrained=str(path), channels_last=False)
    state = torch.load(path, weights_only=True)
    assert torch.equal(model.state_dict()["stem.0.weight"], state["stem.0.weight"])
    assert model.fc.out_features == 80  # a fresh head: the 18-way pretraining head is not loaded
    # ensure_backbone reuses a file whose recipe matches and retrains a stale one
    cached = demo_backbone.backbone_path(tmp_path / "ds")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    side = cached.with_name(cached.name + ".json")
    side.write_text(json.dumps({**info, "recipe": demo_backbone.RECIPE}))
    mtime = cached.stat().st_mtime_ns
    assert demo_backbone.ensure_backbone(tmp_path / "ds", size=64, seed=0) == cached
    assert cached.stat().st_mtime_ns == mtime

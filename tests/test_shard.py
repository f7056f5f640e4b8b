"""pml-shard: every input format, bad inputs, resume, DALI index, verify, mask.

Inputs are tiny and generated here (real JPEG/PNG bytes made with PIL); expected labels are
written out by hand from the generated annotation files."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pml_scale.data.shards import convert as convert_mod
from pml_scale.data.shards.convert import ConvertError, StrictError, convert
from pml_scale.data.shards.format import decode_id, read_manifest
from pml_scale.data.shards.cli import main
from pml_scale.data.shards.verify import verify
from pml_scale.data.shards.sources import InputError, parse_coco, parse_cub, parse_list, parse_nuswide, parse_openimages

# ----------------------------------------------------------------------------------------------
# helpers


def jpeg(seed: int, size=(24, 16), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)  # smooth content: JPEG keeps it close, so pixels can be compared
    arr = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
    im = Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC)
    if mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def read_split(out: Path, manifest: dict, split: str):
    """(ids, image bytes, metas) of a split, in file order, read with tarfile (independent of
    the writer) and cross-checked against the manifest's shard list."""
    ids, imgs, metas = [], [], []
    for info in manifest["splits"][split]["shards"]:
        with tarfile.open(out / info["name"]) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        keys = sorted({n.split(".")[0] for n in members})
        for k in keys:
            sid = decode_id(members[f"{k}.id"])
            assert k == f"{sid:010d}"
            ids.append(sid)
            imgs.append(members[f"{k}.jpg"])
            metas.append(json.loads(members[f"{k}.json"]))
    return ids, imgs, metas


def shard_digests(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx", ".npy")}


def strip_created(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "created"}


def codes(block: dict) -> dict:
    return block["by_reason"]


# ----------------------------------------------------------------------------------------------
# formats


@pytest.fixture
def coco(tmp_path):
    imgs = tmp_path / "img"
    for i in range(1, 7):
        write(imgs / f"{i:04d}.jpg", jpeg(i))
    cats = [{"id": 11, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}]
    images = [{"id": i, "file_name": f"{i:04d}.jpg"} for i in (5, 2, 1, 3, 4, 6)]
    images.append({"id": 2, "file_name": "dup.jpg"})        # duplicate id -> rejected, key images[6]
    images.append({"file_name": "noid.jpg"})                # malformed -> images[7]
    anns = [(1, 3), (1, 11), (2, 7), (3, 3), (3, 3), (4, 11), (5, 7), (5, 3), (1, 99), (42, 3)]
    ann = [{"id": k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(anns)]
    j = write(tmp_path / "inst.json", json.dumps({"images": images, "annotations": ann, "categories": cats}))
    return j, imgs


def test_coco_roundtrip(coco, tmp_path):
    j, imgs = coco
    src = parse_coco(j, imgs)
    m = convert(src, tmp_path / "out", shard_size=2, progress=False)
    # class order = sorted category ids; names from the categories
    assert m["classes"] == ["car", "dog", "kite"] and m["class_ids"] == [3, 7, 11] and m["num_classes"] == 3
    # image 6 has no annotation: skipped; ids follow sorted file names 0001..0005
    expect = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0]], np.int8)
    out = tmp_path / "out"
    labels = np.load(out / "train-labels.npy")
    assert labels.dtype == np.int8 and np.array_equal(labels, expect)
    ids, data, metas = read_split(out, m, "train")
    assert ids == [0, 1, 2, 3, 4]
    assert [x["src"] for x in metas] == [f"{i:04d}.jpg" for i in range(1, 6)]
    assert all(d == (imgs / f"{i:04d}.jpg").read_bytes() for i, d in zip(range(1, 6), data))  # passthrough
    for row, meta in zip(expect, metas):
        assert meta["pos"] == np.flatnonzero(row == 1).tolist() and meta["neg"] == np.flatnonzero(row == 0).tolist()
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [2, 2, 1]
    rej = {(r.get("key"), r["code"]) for r in m["rejected"]["items"]}
    assert rej == {("images[6]", "duplicate"), ("images[7]", "malformed_row"), ("annotations[8]", "unknown_class"),
                   ("annotations[9]", "unknown_image")}
    assert all(r["file"] == str(j) for r in m["rejected"]["items"])
    assert m["skipped"]["count"] == 1 and m["skipped"]["items"][0]["key"] == "0006.jpg"
    st = m["splits"]["train"]["label_stats"]
    assert st["class_positives"] == expect.sum(0).tolist() and st["positives_per_image"] == pytest.approx(7 / 5)
    assert verify(out) == []
    cli = tmp_path / "cli"
    assert main(["convert", "coco", "--train-json", str(j), "--train-images", str(imgs), "--shard-size", "2",
                 "-j", "1", "-q", str(cli)]) == 0
    assert shard_digests(cli) == shard_digests(out)


def test_openimages_native_partial(tmp_path):
    imgs = tmp_path / "img"
    for name in ("b2", "a1", "c3"):
        write(imgs / f"{name}.jpg", jpeg(len(name) + ord(name[0])))
    desc = write(tmp_path / "desc.csv", "LabelName,DisplayName\n/m/cat,Cat\n/m/dog,Dog\n/m/car,Car\n/m/x,Other\n")
    train = write(tmp_path / "trainable.txt", "/m/dog\n/m/cat\n/m/car\n")
    rows = ["ImageID,Source,LabelName,Confidence",
            "b2,human,/m/cat,1",      # 2
            "a1,human,/m/dog,0",      # 3
            "a1,human,/m/car,1",      # 4
            "b2,human,/m/x,1",        # 5 outside the trainable list: ignored, counted
            "b2,human,/m/zzz,1",      # 6 unknown class: rejected
            "c3,human,/m/dog,0.5",    # 7 bad confidence: rejected
            "a1,human,/m/car,0",      # 8 duplicate (a1, car): rejected, first kept
            "c3,human,/m/cat",        # 9 too few fields
            "c3,human,/m/dog,1"]      # 10
    lab = write(tmp_path / "labels.csv", "\n".join(rows) + "\n")
    m = convert(parse_openimages(lab, imgs, class_descriptions=desc, trainable=train), tmp_path / "out",
                shard_size=10, progress=False)
    assert m["classes"] == ["Dog", "Cat", "Car"] and m["class_ids"] == ["/m/dog", "/m/cat", "/m/car"]
    # rows by sorted ImageID a1, b2, c3; unlisted = missing (-1)
    expect = np.array([[0, -1, 1], [-1, 1, -1], [1, -1, -1]], np.int8)
    assert np.array_equal(np.load(tmp_path / "out" / "train-labels.npy"), expect)
    assert {(r["line"], r["code"]) for r in m["rejected"]["items"]} == {
        (6, "unknown_class"), (7, "malformed_row"), (8, "duplicate"), (9, "malformed_row")}
    assert m["source"]["notes"]["label_rows_outside_class_list"] == {"train": 1}
    ids, _, metas = read_split(tmp_path / "out", m, "train")
    assert metas[0] == {"src": "a1.jpg", "pos": [2], "neg": [0]}
    assert m["splits"]["train"]["label_stats"]["missing_per_image"] == pytest.approx(5 / 3)
    assert main(["convert", "openimages", "--train-labels", str(lab), "--train-images", str(imgs),
                 "--class-descriptions", str(desc), "--trainable", str(train), "--shard-size", "10", "-j", "1", "-q",
                 str(tmp_path / "cli")]) == 0
    assert shard_digests(tmp_path / "cli") == shard_digests(tmp_path / "out")


def test_nuswide(tmp_path):
    root = tmp_path / "Flickr"
    names = ["actor/0001_11.jpg", "actor/0002_12.jpg", "beach/0003_13.jpg", "beach/0004_14.jpg", "cat/0005_15.jpg"]
    for k, n in enumerate(names):
        write(root / n, jpeg(100 + k))
    write(tmp_path / "Imagelist.txt", "".join(f"C:\\ImageData\\Flickr\\{n.replace('/', chr(92))}\n" for n in names))
    concepts = ["sky", "animal", "person"]
    cols = {"sky": "0 1 1 0 0", "animal": "0 0 0 0 1", "person": "1 0 x 0 0"}  # line 3 of person is bad
    for c, v in cols.items():
        write(tmp_path / "labels" / f"Labels_{c}.txt", "\n".join(v.split()) + "\n")
    write(tmp_path / "Concepts81.txt", "\n".join(concepts) + "\n")
    write(tmp_path / "Train.txt", "actor\\0001_11.jpg\nbeach\\0003_13.jpg\nbeach\\0004_14.jpg\n")
    write(tmp_path / "Test.txt", "actor\\0002_12.jpg\ncat\\0005_15.jpg\n")
    src = parse_nuswide(tmp_path / "Imagelist.txt", tmp_path / "labels", tmp_path / "Train.txt", tmp_path / "Test.txt",
                        root, concepts=tmp_path / "Concepts81.txt")
    m = convert(src, tmp_path / "out", shard_size=2, progress=False)
    assert m["classes"] == concepts
    # train: 0001 (person), 0003 (bad line -> rejected), 0004 (no positive -> skipped)
    assert np.array_equal(np.load(tmp_path / "out" / "train-labels.npy"), [[0, 0, 1]])
    assert np.array_equal(np.load(tmp_path / "out" / "test-labels.npy"), [[1, 0, 0], [0, 1, 0]])
    (bad,) = m["rejected"]["items"]
    assert bad["file"].endswith("Labels_person.txt") and bad["line"] == 3
    assert m["skipped"]["items"][0]["key"] == "beach/0004_14.jpg"
    _, data, _ = read_split(tmp_path / "out", m, "test")
    assert data[1] == (root / "cat/0005_15.jpg").read_bytes()
    assert main(["convert", "nuswide", "--image-list", str(tmp_path / "Imagelist.txt"), "--labels-dir",
                 str(tmp_path / "labels"), "--train-list", str(tmp_path / "Train.txt"), "--test-list",
                 str(tmp_path / "Test.txt"), "--images", str(root), "--concepts", str(tmp_path / "Concepts81.txt"),
                 "--shard-size", "2", "-j", "1", "-q", str(tmp_path / "cli")]) == 0
    assert shard_digests(tmp_path / "cli") == shard_digests(tmp_path / "out")


def test_cub(tmp_path):
    root = tmp_path / "CUB_200_2011"
    rels = ["001.Albatross/a.jpg", "001.Albatross/b.jpg", "002.Auklet/c.jpg"]
    for k, r in enumerate(rels):
        write(root / "images" / r, jpeg(200 + k))
    write(root / "images.txt", "".join(f"{k + 1} {r}\n" for k, r in enumerate(rels)))
    write(root / "train_test_split.txt", "1 1\n2 0\n3 1\n")
    write(tmp_path / "attributes.txt", "1 has_bill_shape::curved\n2 has_wing_color::blue\n3 has_size::small\n")
    lines = ["1 1 1 3 10.0", "1 2 0 1 2.0", "1 3 1 4 3.1 extra", "2 2 1 3 1.0", "3 3 1 2 0.5", "3 9 1 2 0.5",
             "bad line"]
    write(root / "attributes" / "image_attribute_labels.txt", "\n".join(lines) + "\n")
    m = convert(parse_cub(root), tmp_path / "out", progress=False)
    assert m["classes"] == ["has_bill_shape::curved", "has_wing_color::blue", "has_size::small"]
    assert np.array_equal(np.load(tmp_path / "out" / "train-labels.npy"), [[1, 0, 1], [0, 0, 1]])
    assert np.array_equal(np.load(tmp_path / "out" / "test-labels.npy"), [[0, 1, 0]])
    assert {(r["line"], r["code"]) for r in m["rejected"]["items"]} == {(6, "unknown_class"), (7, "malformed_row")}
    assert main(["convert", "cub", "--root", str(root), "-j", "1", "-q", str(tmp_path / "cli")]) == 0
    assert shard_digests(tmp_path / "cli") == shard_digests(tmp_path / "out")


def test_csv_and_jsonl(tmp_path):
    for k in range(4):
        write(tmp_path / "im" / f"{k}.jpg", jpeg(300 + k))
    csv = write(tmp_path / "train.csv", "path,positives,negatives\nim/2.jpg,a;b,c\nim/0.jpg,c,\n"
                "im/1.jpg,zz,\nim/2.jpg,a,\nim/3.jpg,a,a\nim/3.jpg\n")
    src = parse_list("csv", csv, classes=write(tmp_path / "classes.txt", "c\nb\na\n"))
    m = convert(src, tmp_path / "o1", progress=False)
    # negatives column present -> unlisted = missing; sorted by path: im/0, im/2
    assert np.array_equal(np.load(tmp_path / "o1" / "train-labels.npy"), [[1, -1, -1], [0, 1, 1]])
    assert {(r["line"], r["code"]) for r in m["rejected"]["items"]} == {
        (4, "unknown_class"), (5, "duplicate"), (6, "malformed_row"), (7, "malformed_row")}
    jl = write(tmp_path / "l.jsonl", '{"path": "im/1.jpg", "positives": ["y"]}\n{"path": "im/0.jpg", '
               '"positives": ["x", "y"]}\nnot json\n{"path": 3}\n')
    m = convert(parse_list("jsonl", jl), tmp_path / "o2", progress=False)
    assert m["classes"] == ["x", "y"]  # inferred, sorted
    assert np.array_equal(np.load(tmp_path / "o2" / "train-labels.npy"), [[1, 1], [0, 1]])
    assert sorted(r["line"] for r in m["rejected"]["items"]) == [3, 4]
    with pytest.raises(InputError, match=r"train.csv:1: header"):
        parse_list("csv", write(tmp_path / "train.csv", "file,labels\n"))


# ----------------------------------------------------------------------------------------------
# bad images


@pytest.fixture
def messy(tmp_path):
    d = tmp_path / "im"
    good = jpeg(1, (40, 30))
    files = {"good.jpg": good, "good2.jpg": jpeg(2), "empty.jpg": b"", "trunc.jpg": good[: len(good) // 2],
             "garbage.jpg": b"not an image at all" * 10, "png.jpg": jpeg(3, fmt="PNG"),
             "cmyk.jpg": jpeg(4, mode="CMYK"), "gray.jpg": jpeg(5, mode="L"), "pal.jpg": jpeg(6, mode="P", fmt="PNG")}
    for n, b in files.items():
        write(d / n, b)
    listing = "path,positives\n" + "".join(f"im/{n},a\n" for n in [*files, "missing.jpg"])
    return write(tmp_path / "list.csv", listing), files


def test_bad_images_recorded_and_valid_kept(messy, tmp_path):
    lst, files = messy
    m = convert(parse_list("csv", lst), tmp_path / "out", shard_size=3, progress=False)
    assert codes(m["rejected"]) == {"empty_file": 1, "missing_file": 1, "not_an_image": 1, "truncated": 1}
    bykey = {r["key"]: r for r in m["rejected"]["items"]}
    assert bykey["im/trunc.jpg"]["file"].endswith("trunc.jpg") and "truncated" in bykey["im/trunc.jpg"]["reason"]
    assert set(bykey) == {"im/empty.jpg", "im/missing.jpg", "im/garbage.jpg", "im/trunc.jpg"}
    conv = {r["key"]: r["reason"] for r in m["converted"]["items"]}
    assert set(conv) == {"im/png.jpg", "im/cmyk.jpg", "im/gray.jpg", "im/pal.jpg"} and "PNG" in conv["im/png.jpg"]
    ids, data, metas = read_split(tmp_path / "out", m, "train")
    assert ids == list(range(6)) and m["splits"]["train"]["num_samples"] == 6
    for blob, meta in zip(data, metas):
        name = meta["src"].split("/")[1]
        with Image.open(io.BytesIO(blob)) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            got = np.asarray(im, np.float32)
        if name.startswith("good"):
            assert blob == files[name]
        else:  # converted: same picture (JPEG-lossy) as PIL's own RGB view of the original
            with Image.open(io.BytesIO(files[name])) as orig:
                ref = np.asarray(orig.convert("RGB"), np.float32)
            assert got.shape == ref.shape and np.abs(got - ref).mean() < 12  # wrong colours would be ~100
    assert verify(tmp_path / "out") == []
    # --no-convert rejects the non-RGB-JPEG ones instead
    m2 = convert(parse_list("csv", lst), tmp_path / "out2", allow_convert=False, progress=False)
    assert codes(m2["rejected"])["not_rgb_jpeg"] == 4 and m2["splits"]["train"]["num_samples"] == 2


def test_strict_stops_with_clear_message(messy, tmp_path, capsys):
    lst, _ = messy
    with pytest.raises(StrictError, match=r"empty\.jpg.*empty file"):
        convert(parse_list("csv", lst), tmp_path / "out", strict=True, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    rc = main(["convert", "csv", "--train", str(lst), "--strict", "-q", "-j", "1", str(tmp_path / "o2")])
    assert rc == 2 and "--strict" in capsys.readouterr().err
    bad = write(tmp_path / "bad.csv", "path,positives\nim/good.jpg,a\nim/good2.jpg,a,b\n")
    rc = main(["convert", "csv", "--train", str(bad), "--strict", "-q", "-j", "1", str(tmp_path / "o3")])
    assert rc == 2 and "bad.csv:3: 3 fields" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# resume, determinism, parallel


@pytest.fixture
def seven(tmp_path):
    for k in range(7):
        write(tmp_path / "im" / f"{k}.jpg", jpeg(400 + k, (64, 48)))
    write(tmp_path / "im" / "p.jpg", jpeg(9, fmt="PNG"))
    rows = "".join(f"im/{k}.jpg,{'a;b' if k % 2 else 'c'}\n" for k in range(7))
    return write(tmp_path / "l.csv", "path,positives\n" + rows + "im/p.jpg,a\nim/none.jpg,b\n")


def test_resume_after_interruption_is_identical(seven, tmp_path, monkeypatch):
    clean = convert(parse_list("csv", seven), tmp_path / "clean", shard_size=2, progress=False)
    out = tmp_path / "out"
    real, calls = convert_mod._write_shard, []

    def dies_on_third(*a):
        calls.append(a[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(convert_mod, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert(parse_list("csv", seven), out, shard_size=2, progress=False)
    monkeypatch.setattr(convert_mod, "_write_shard", real)
    assert not (out / "manifest.json").exists() and (out / ".progress.jsonl").exists()
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    (out / "train-000000.tar").unlink()                              # a journaled shard lost
    write(out / ".train-000002.tar.tmp-99999", b"half a shard")      # a killed writer's temp file
    kept_inode = (out / "train-000001.tar").stat().st_ino
    resumed = convert(parse_list("csv", seven), out, shard_size=2, progress=False)
    assert strip_created(resumed) == strip_created(clean)
    assert shard_digests(out) == shard_digests(tmp_path / "clean")
    assert (out / "train-000001.tar").stat().st_ino == kept_inode     # complete shard kept, not redone
    assert not list(out.glob(".*tmp*")) and not (out / ".progress.jsonl").exists()
    # finished folder: rerun is a no-op; other inputs are refused
    again = convert(parse_list("csv", seven), out, shard_size=2, progress=False, log=lambda *_: None)
    assert again == resumed
    with pytest.raises(ConvertError, match="other inputs or options"):
        convert(parse_list("csv", seven), out, shard_size=3, progress=False)
    (out / "manifest.json").unlink()  # stray shards without journal or manifest are not silently reused
    with pytest.raises(ConvertError, match="--restart"):
        convert(parse_list("csv", seven), out, shard_size=2, progress=False)
    restarted = convert(parse_list("csv", seven), out, shard_size=2, progress=False, restart=True)
    assert strip_created(restarted) == strip_created(clean)
    # parallel workers give the same bytes
    par = convert(parse_list("csv", seven), tmp_path / "par", shard_size=2, workers=2, progress=False)
    assert shard_digests(tmp_path / "par") == shard_digests(tmp_path / "clean")
    assert strip_created(par) == strip_created(clean)


def test_max_side_reencodes(seven, tmp_path):
    m = convert(parse_list("csv", seven), tmp_path / "out", max_side=32, quality=80, progress=False)
    _, data, metas = read_split(tmp_path / "out", m, "train")
    for blob, meta in zip(data, metas):
        with Image.open(io.BytesIO(blob)) as im:  # 64x48 -> 32x24; the 24x16 PNG is converted, never upscaled
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == ((24, 16) if meta["src"] == "im/p.jpg" else (32, 24))


def test_bad_options(seven, tmp_path):
    for kw, match in (({"shard_size": 0}, "shard_size"), ({"workers": 0}, "workers"),
                      ({"quality": 101}, "quality"), ({"max_side": 2}, "max_side")):
        with pytest.raises(ValueError, match=match):
            convert(parse_list("csv", seven), tmp_path / "x", progress=False, **kw)
    with pytest.raises(InputError, match="--train-images"):
        parse_coco(tmp_path / "l.csv", tmp_path / "nope")


# ----------------------------------------------------------------------------------------------
# DALI, verify, mask


def test_dali_reads_our_index(seven, tmp_path):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    m = convert(parse_list("csv", seven), tmp_path / "out", shard_size=3, progress=False)
    out = tmp_path / "out"
    shards = [str(out / s["name"]) for s in m["splits"]["train"]["shards"]]
    n = m["splits"]["train"]["num_samples"]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, sid = fn.readers.webdataset(paths=shards, index_paths=[str(Path(s).with_suffix(".idx")) for s in shards],
                                         ext=["jpg", "id"], dtypes=[types.UINT8, types.INT64],
                                         random_shuffle=False, name="r")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), sid

    p = pipe()
    p.build()
    images, ids = p.run()
    got = [int(np.asarray(ids.at(k)).reshape(-1)[0]) for k in range(n)]
    assert got == list(range(n)) and dali.__version__
    assert all(np.asarray(images.at(k)).shape == (48, 64, 3) for k in range(n - 1))


def test_verify_catches_corruption(seven, tmp_path, capsys):
    m = convert(parse_list("csv", seven), tmp_path / "out", shard_size=3, progress=False)
    out = tmp_path / "out"
    assert main(["verify", str(out), "-q", "-j", "1"]) == 0
    # flip bytes inside the first image of shard 1 (offset from our index)
    idx = (out / "train-000001.idx").read_text().splitlines()[1].split()
    off = int(idx[1])
    tar = out / "train-000001.tar"
    blob = bytearray(tar.read_bytes())
    blob[off + 200: off + 260] = bytes(60)
    tar.write_bytes(bytes(blob))
    problems = verify(out)
    assert any("train-000001.tar: sha256" in p for p in problems)
    # labels store edited: json members disagree
    lab = np.load(out / "train-labels.npy")
    lab[0, 0] = 1 - lab[0, 0]
    np.save(out / "train-labels.npy", lab)
    problems = verify(out)
    assert any("json labels differ" in p and "row 0" in p for p in problems)
    assert main(["verify", str(out), "-q", "-j", "1"]) == 1
    assert "problem(s)" in capsys.readouterr().err
    assert m["splits"]["train"]["num_samples"] == 8


def test_mask_writes_observed_and_sidecar(seven, tmp_path):
    labels = pytest.importorskip("pml_scale.labels")
    out = tmp_path / "out"
    convert(parse_list("csv", seven), out, shard_size=3, progress=False)
    full = np.load(out / "train-labels.npy")
    assert main(["mask", str(out), "--setting", "PAL", "--ratio", "0.5", "--seed", "3", "-q"]) == 0
    assert main(["mask", str(out), "--setting", "PPL_0.5", "--seed", "3", "--csr", "-q"]) == 0
    got = np.load(out / "observed" / "PAL_0.5_s3.npy")
    assert np.array_equal(got, labels.make_observed(full, "PAL", 0.5, 3))
    assert ((got == -1).sum(1) == 3 - round(0.5 * 3)).all()  # PAL keeps round(r*L) per image
    side = json.loads((out / "observed" / "PAL_0.5_s3.json").read_text())
    assert side["pos_per_class"] == (got == 1).sum(0).tolist() and side["seed"] == 3
    assert side["missing_per_image"] == pytest.approx((got == -1).sum() / len(got))
    csr = labels.ObservedLabels.load(out / "observed" / "PPL_0.5_s3.npz")
    assert np.array_equal(csr.to_dense(), labels.make_observed(full, "PPL_0.5", seed=3))
    assert main(["mask", str(out), "--setting", "PAL_0.3", "--ratio", "0.6", "-q"]) == 2
    assert main(["mask", str(out), "--setting", "XYZ", "-q"]) == 2
    assert read_manifest(out)["num_classes"] == 3

"""atomic_path and the writers built on it: a failure at any point leaves the old file whole and
no temp file behind; success leaves exactly the new file."""

import json

import numpy as np
import pytest

from pml_scale import labels
from pml_scale.labels import observed, settings, stores
from pml_scale.atomic import atomic_path, atomic_save_npy, atomic_save_npz, atomic_write_json, atomic_write_text
from pml_scale.data.shards.masks import make_mask
from pml_scale.data.shards.sources import parse_list


def temps(folder):
    return sorted(p.name for p in folder.rglob(".*tmp*"))


class Boom(Exception):
    pass


def test_atomic_path_renames_on_success_and_removes_on_error(tmp_path):
    target = tmp_path / "f.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and temps(tmp_path) == []
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise Boom
    assert target.read_bytes() == b"new" and temps(tmp_path) == []
    with pytest.raises(FileNotFoundError):  # nothing written: nothing renamed over the target
        with atomic_path(target):
            pass
    assert target.read_bytes() == b"new" and temps(tmp_path) == []


def test_helpers_round_trip(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]})
    atomic_save_npy(tmp_path / "a.npy", np.arange(6, dtype=np.int8).reshape(2, 3))
    atomic_save_npz(tmp_path / "b.npz", x=np.ones(3), y=np.zeros((2, 2), np.int32))
    assert (tmp_path / "t.txt").read_text() == "héllo"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.arange(6).reshape(2, 3))
    with np.load(tmp_path / "b.npz") as z:
        assert np.array_equal(z["x"], np.ones(3)) and z["y"].dtype == np.int32
    assert temps(tmp_path) == []


def test_streamed_observed_save_fails_whole(tmp_path):
    target = tmp_path / "obs.npy"
    np.save(target, np.zeros((4, 3), np.int8))

    def blocks():
        yield 0, np.ones((2, 3), np.int8)
        raise Boom

    with pytest.raises(Boom):
        observed._atomic_save_npy_stream(target, (4, 3), blocks())
    assert np.array_equal(np.load(target), np.zeros((4, 3))) and temps(tmp_path) == []


def test_sparse_copy_fails_whole(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"\x01" * (3 * stores.COPY_CHUNK))
    dst.write_bytes(b"old")
    stores.sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes() and temps(tmp_path) == []
    dst.write_bytes(b"old")

    def extents(fd, size):
        yield 0, stores.COPY_CHUNK
        raise Boom

    monkeypatch.setattr(stores, "_data_extents", extents)
    with pytest.raises(Boom):
        stores.sparse_copy(src, dst)
    assert dst.read_bytes() == b"old" and temps(tmp_path) == []


@pytest.fixture
def dataset(tmp_path):
    from pml_scale.data.shards.convert import convert
    from PIL import Image

    (tmp_path / "im").mkdir()
    rows = []
    for k in range(6):
        Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(tmp_path / "im" / f"{k}.jpg")
        rows.append(f"im/{k}.jpg,{'a;b' if k % 2 else 'c'}\n")
    (tmp_path / "l.csv").write_text("path,positives\n" + "".join(rows))
    out = tmp_path / "out"
    convert(parse_list("csv", tmp_path / "l.csv"), out, shard_size=3, progress=False)
    return out


@pytest.mark.parametrize("csr", [False, True])
def test_make_mask_leaves_no_temp_and_no_half_file(dataset, monkeypatch, csr):
    final = make_mask(dataset, "PAL_0.5", seed=1, csr=csr)
    assert final.suffix == (".npz" if csr else ".npy") and temps(dataset) == []
    full = np.load(dataset / "train-labels.npy")
    assert np.array_equal(labels.ObservedLabels.load(final).to_dense(), labels.make_observed(full, "PAL", 0.5, 1))

    def dies(*a, **k):  # the draw of the first block fails after the output file was opened
        raise Boom

    monkeypatch.setattr(settings, "draw_block", dies)
    with pytest.raises(Boom):
        make_mask(dataset, "PAL_0.3", seed=1, csr=csr)
    assert not list((dataset / "observed").glob("PAL_0.3*")) and temps(dataset) == []

"""Input pipeline: plans, random access by index, PIL and DALI-CPU loaders (GPU DALI skips)."""

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import requires_cuda
from pml_scale.atomic import atomic_write_json
from pml_scale.data.shards import format as fmt
from pml_scale.data.shards.index import SampleError, SampleIndex, ShardReader, check_image_bytes
from pml_scale.data.input import LoaderConfig, build_loader, dali_importable
from pml_scale.imagenet import IMAGENET_MEAN, IMAGENET_STD
from pml_scale.data.input.plan import batches_per_epoch, make_plan

SHARD_SIZES = (12, 10, 11, 9, 8, 10)  # 60 samples, uneven shards
N = sum(SHARD_SIZES)
needs_dali = pytest.mark.skipif(not dali_importable(), reason="nvidia-dali not importable")


def colour(sid: int) -> tuple[int, int, int]:
    return (sid * 37 + 20) % 230 + 10, (sid * 91 + 60) % 230 + 10, (sid * 53 + 100) % 230 + 10


def jpeg(sid: int) -> bytes:
    """64x48 image: left half colour(sid), right half its complement; mean = average of the two."""
    im = Image.new("RGB", (64, 48), colour(sid))
    im.paste(tuple(255 - c for c in colour(sid)), (32, 0, 64, 48))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_dataset(root: Path, corrupt: dict | None = None) -> dict:
    """Shards with ids in a scrambled (not contiguous) order; ``corrupt`` maps id -> image bytes."""
    root.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(7).permutation(N)
    infos, start, shard_of = [], 0, {}
    for k, size in enumerate(SHARD_SIZES):
        w = fmt.ShardWriter(root / fmt.shard_name("train", k))
        for sid in ids[start:start + size]:
            shard_of[int(sid)] = k
            data = (corrupt or {}).get(int(sid), None) or jpeg(int(sid))
            w.add(int(sid), data, {"src": f"{sid}.jpg", "pos": [], "neg": []})
        infos.append(w.close().to_json())
        start += size
    manifest = {"format_version": fmt.FORMAT_VERSION, "num_classes": 2, "classes": ["a", "b"],
                "splits": {"train": {"num_samples": N, "shards": infos}}}
    atomic_write_json(root / fmt.MANIFEST, manifest)
    return {"root": root, "ids": ids, "shard_of": shard_of}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"))


def expected_mean(sid: int) -> np.ndarray:
    """Reference per-channel normalised mean of the image, from its two colours."""
    c = np.array(colour(sid), float)
    m = (c + (255 - c)) / 2 / 255  # mean of left and right halves
    return (m - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def run_epoch(loader, epoch=0, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return list(loader)


def cfg(data, **kw) -> LoaderConfig:
    base = dict(root=str(data["root"]), backend="pil", image_size=32, batch_size=4, workers=0, seed=3)
    base.update(kw)
    return LoaderConfig(**base)


# ------------------------------------------------------------------ plans (pure numpy)


def test_plan_train_matches_reference_permutation_and_drops_remainder():
    shard_ids = [np.arange(0, 6), np.arange(6, 10)]  # 10 ids
    plans = [make_plan(shard_ids, seed=5, epoch=2, rank=r, world_size=2, batch_size=2, train=True) for r in (0, 1)]
    perm = np.random.default_rng([5, 2]).permutation(10)  # independent reference
    assert plans[0].batches_per_epoch == plans[1].batches_per_epoch == 2  # 10 // (2*2)
    # global batch j = perm[4j:4j+4], rank 0 its first half, rank 1 the second
    np.testing.assert_array_equal(plans[0].ids, [perm[0:2], perm[4:6]])
    np.testing.assert_array_equal(plans[1].ids, [perm[2:4], perm[6:8]])
    assert all(p.valid.all() for p in plans)
    other = make_plan(shard_ids, seed=5, epoch=3, rank=0, world_size=2, batch_size=2, train=True)
    dropped = [set(range(10)) - set(np.concatenate([p.ids.ravel() for p in ps]))
               for ps in (plans, [other, make_plan(shard_ids, seed=5, epoch=3, rank=1, world_size=2, batch_size=2,
                                                   train=True)])]
    assert len(dropped[0]) == len(dropped[1]) == 2


def test_plan_eval_pads_and_covers_each_id_once():
    shard_ids = [np.arange(0, 7), np.arange(7, 11)]
    plans = [make_plan(shard_ids, seed=0, epoch=0, rank=r, world_size=3, batch_size=2, train=False) for r in range(3)]
    assert {p.batches_per_epoch for p in plans} == {2}  # ceil(11 / 6)
    seen = np.concatenate([p.ids[p.valid] for p in plans])
    np.testing.assert_array_equal(np.sort(seen), np.arange(11))
    assert sum((~p.valid).sum() for p in plans) == 12 - 11


def test_plan_affinity_and_batch_counts():
    shard_ids = [np.arange(0, 5), np.arange(5, 12), np.arange(12, 15)]
    owner = np.repeat([0, 1, 0], [5, 7, 3])
    for train in (True, False):
        plans = [make_plan(shard_ids, seed=1, epoch=0, rank=r, world_size=2, batch_size=3, train=train,
                           affinity="shard") for r in (0, 1)]
        # rank 0 holds 8 samples, rank 1 holds 7: train min(8//3, 7//3) = 2; eval max(ceil(8/3), ceil(7/3)) = 3
        assert {p.batches_per_epoch for p in plans} == {2 if train else 3}
        for r, p in enumerate(plans):
            assert (owner[p.ids.ravel()] == r).all()
        if not train:
            np.testing.assert_array_equal(np.sort(np.concatenate([p.ids[p.valid] for p in plans])), np.arange(15))
    with pytest.raises(ValueError, match="at least one shard per rank"):
        batches_per_epoch([5, 5], batch_size=2, world_size=3, train=True, affinity="shard")


def test_plan_bad_arguments():
    with pytest.raises(ValueError, match="rank must be in"):
        make_plan([np.arange(8)], seed=0, epoch=0, rank=2, world_size=2, batch_size=2, train=True)
    with pytest.raises(ValueError, match="fewer than world_size"):
        make_plan([np.arange(3)], seed=0, epoch=0, rank=0, world_size=2, batch_size=2, train=True)
    with pytest.raises(ValueError, match="affinity must be one of"):
        make_plan([np.arange(8)], seed=0, epoch=0, rank=0, world_size=1, batch_size=2, train=True, affinity="x")


# ------------------------------------------------------------------ index


def test_index_reads_exact_bytes_by_id(data):
    index = SampleIndex.load(data["root"], "train")
    assert index.num_samples == N
    ids = np.array([0, 17, 59, 33])
    loc = index.locate(ids)
    reader = ShardReader()
    for j, sid in enumerate(ids):
        assert reader.read(loc, j) == jpeg(int(sid))
        assert loc.where(j)[0] == fmt.shard_name("train", data["shard_of"][int(sid)])
    with pytest.raises(KeyError, match="sample id 99"):
        index.locate(np.array([99]))


def test_check_image_bytes():
    good = jpeg(1)
    assert check_image_bytes(good) is None
    assert "end-of-image" in check_image_bytes(good[: len(good) // 2])
    assert "not a readable image" in check_image_bytes(b"\x00" * 100)
    assert "start-of-scan" in check_image_bytes(good[:good.index(b"\xff\xda")] + b"\xff\xd9")
    assert check_image_bytes(bad_huffman(1)) is None  # only a full decode finds this one


def test_missing_and_truncated_shard_errors(tmp_path):
    make_dataset(tmp_path / "a")
    os.remove(tmp_path / "a" / fmt.shard_name("train", 2))
    with pytest.raises(FileNotFoundError, match="train-000002.tar: shard file is missing"):
        build_loader(LoaderConfig(root=str(tmp_path / "a"), backend="pil"))
    make_dataset(tmp_path / "b")
    tar = tmp_path / "b" / fmt.shard_name("train", 1)
    tar.write_bytes(tar.read_bytes()[:5000])
    with pytest.raises(ValueError, match="train-000001.tar: shard is 5000 bytes"):
        build_loader(LoaderConfig(root=str(tmp_path / "b"), backend="pil"))
    (tmp_path / "b" / fmt.shard_name("train", 3)).with_suffix(".idx").unlink()
    with pytest.raises(FileNotFoundError, match="train-000003.idx: missing DALI index"):
        SampleIndex.load(tmp_path / "b", "train", shards=[3])


# ------------------------------------------------------------------ loaders


def test_config_validation():
    with pytest.raises(ValueError, match="LoaderConfig.backend must be one of"):
        LoaderConfig(root="x", backend="tfrecord")
    with pytest.raises(ValueError, match="LoaderConfig.hflip"):
        LoaderConfig(root="x", hflip=1.5)
    with pytest.raises(ValueError, match="LoaderConfig.dtype"):
        LoaderConfig(root="x", dtype="int8")


def test_two_ranks_eval_once_train_disjoint(data):
    ev = [build_loader(cfg(data, train=False, batch_size=8), rank=r, world_size=2) for r in (0, 1)]
    assert len(ev[0]) == len(ev[1]) == 4  # ceil(60 / 16)
    got = [run_epoch(l) for l in ev]
    seen = torch.cat([b.ids[b.valid] for bs in got for b in bs])
    assert sorted(seen.tolist()) == list(range(N))
    assert all(b.images.shape == (8, 3, 32, 32) for bs in got for b in bs)
    tr = [build_loader(cfg(data, batch_size=8), rank=r, world_size=2) for r in (0, 1)]
    assert len(tr[0]) == len(tr[1]) == 3  # 60 // 16
    ids = [torch.cat([b.ids for b in run_epoch(l)]).tolist() for l in tr]
    assert len(ids[0]) == len(ids[1]) == 24 and not set(ids[0]) & set(ids[1])


def test_order_seed_epoch_and_resume(data):
    loader = build_loader(cfg(data, augment="rrc"))
    full = run_epoch(loader, epoch=1)
    again = run_epoch(loader, epoch=1)
    other = run_epoch(loader, epoch=2)
    order = lambda bs: torch.cat([b.ids for b in bs]).tolist()  # noqa: E731
    assert order(full) == order(again) and order(full) != order(other)
    assert torch.equal(torch.stack([b.images for b in full]), torch.stack([b.images for b in again]))
    tail = run_epoch(loader, epoch=1, start_batch=10)
    assert [b.index for b in tail] == list(range(10, 15))
    for a, b in zip(tail, full[10:]):  # PIL augmentation is per (seed, epoch, id): resume is exact
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)
    # an independent reference for the order: the documented permutation
    perm = np.random.default_rng([3, 1]).permutation(np.sort(data["ids"]))
    assert order(full) == perm[:60].tolist()


def test_pil_flip_is_mirror(data):
    kw = dict(train=True, augment="resize", batch_size=6)
    a = run_epoch(build_loader(cfg(data, hflip=0.0, **kw)))[0]
    b = run_epoch(build_loader(cfg(data, hflip=1.0, **kw)))[0]
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(b.images, a.images.flip(-1))


def test_affinity_keeps_shards_on_their_rank(data):
    for train in (True, False):
        loaders = [build_loader(cfg(data, affinity="shard", train=train), rank=r, world_size=2) for r in (0, 1)]
        assert len(loaders[0]) == len(loaders[1])
        for ep in (0, 1):
            for r, l in enumerate(loaders):
                for b in run_epoch(l, epoch=ep):
                    assert {data["shard_of"][i] % 2 for i in b.ids.tolist()} == {r}


@needs_dali
def test_dali_cpu_matches_pil_in_eval(data):
    out = {}
    for backend in ("pil", "dali_cpu"):
        loader = build_loader(cfg(data, backend=backend, train=False, batch_size=8, workers=1), world_size=1)
        bs = run_epoch(loader)
        assert loader.backend == backend and len(bs) == len(loader) == 8
        ids = torch.cat([b.ids[b.valid] for b in bs])
        means = torch.cat([b.images[b.valid].float().mean((2, 3)) for b in bs])
        out[backend] = (ids, means)
        assert sorted(ids.tolist()) == list(range(N))
        ref = torch.tensor(np.stack([expected_mean(int(i)) for i in ids]), dtype=torch.float32)
        torch.testing.assert_close(means, ref, atol=0.06, rtol=0)  # JPEG loss ~3/255 / std
    assert torch.equal(out["pil"][0], out["dali_cpu"][0])
    torch.testing.assert_close(out["pil"][1], out["dali_cpu"][1], atol=0.03, rtol=0)


@needs_dali
def test_dali_cpu_train_order_dtype_and_flip(data):
    kw = dict(train=True, batch_size=8, workers=1, dtype="bf16", augment="rrc")
    dali = run_epoch(build_loader(cfg(data, backend="dali_cpu", **kw)), epoch=4, start_batch=2)
    pil = run_epoch(build_loader(cfg(data, backend="pil", **kw)), epoch=4, start_batch=2)
    assert [b.index for b in dali] == [2, 3, 4, 5, 6]
    assert [b.ids.tolist() for b in dali] == [b.ids.tolist() for b in pil]  # order is backend-independent
    assert all(b.images.dtype == torch.bfloat16 and b.images.shape == (8, 3, 32, 32) for b in dali)
    flat = dict(train=True, batch_size=8, workers=1, augment="resize")
    a = run_epoch(build_loader(cfg(data, backend="dali_cpu", hflip=0.0, **flat)))[0]
    b = run_epoch(build_loader(cfg(data, backend="dali_cpu", hflip=1.0, **flat)))[0]
    torch.testing.assert_close(b.images, a.images.flip(-1))


def bad_huffman(sid: int) -> bytes:
    """Markers and header intact (passes the cheap checks), Huffman table garbage: decoding fails."""
    good = jpeg(sid)
    at = good.index(b"\xff\xc4") + 4
    return good[:at] + b"\xff" * 20 + good[at + 20:]


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory):
    good = jpeg(5)
    return make_dataset(tmp_path_factory.mktemp("bad"), corrupt={5: good[: len(good) // 2], 41: bad_huffman(41)})


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali_cpu", marks=needs_dali)])
def test_corrupt_samples_skipped_and_reported(corrupt_data, backend):
    """Sample 5 is truncated (caught before decoding), 41 fails only at decode (DALI: pipeline restart)."""
    bad = {5: ("end-of-image", fmt.shard_name("train", corrupt_data["shard_of"][5])),
           41: ("decode failed", fmt.shard_name("train", corrupt_data["shard_of"][41]))}
    loader = build_loader(cfg(corrupt_data, backend=backend, train=False, batch_size=8, workers=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bs = run_epoch(loader)
    msgs = sorted(str(w.message) for w in caught if "skipping bad sample" in str(w.message))
    assert len(msgs) == 2 and loader.skipped == 2
    for msg, (sid, (reason, shard)) in zip(msgs, sorted(bad.items())):
        assert f"shard {shard}, key {fmt.sample_key(sid)}: " in msg and reason in msg
    assert sorted(e[:2] for e in loader.errors) == sorted((shard, fmt.sample_key(s)) for s, (_, shard) in bad.items())
    assert len(bs) == len(loader) and all(b.images.shape == (8, 3, 32, 32) for b in bs)
    seen = sorted(torch.cat([b.ids[b.valid] for b in bs]).tolist())
    assert seen == [i for i in range(N) if i not in bad]  # eval: every other id exactly once
    for sid in bad:  # id order in eval: sid sits at batch sid // 8, slot sid % 8, replaced by the next slot
        b, j = divmod(sid, 8)
        hit = bs[b]
        assert not hit.valid[j] and int(hit.ids[j]) == sid + 1
        torch.testing.assert_close(hit.images[j], hit.images[j + 1])
    failing = build_loader(cfg(corrupt_data, backend=backend, train=False, batch_size=8, workers=1, on_error="fail"))
    with pytest.raises(SampleError, match=f"shard {bad[5][1]}, key 0000000005"):
        run_epoch(failing)


def test_dali_gpu_without_cuda_is_a_clear_error(data):
    if torch.cuda.is_available():
        pytest.skip("CUDA present; the GPU test below covers it")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        build_loader(cfg(data, backend="dali"))


@requires_cuda
@needs_dali
def test_dali_gpu_matches_pil(data):
    out = {}
    for backend in ("pil", "dali"):
        loader = build_loader(cfg(data, backend=backend, train=False, batch_size=8, workers=1, dtype="fp16"))
        bs = run_epoch(loader)
        assert all(b.images.device.type == "cuda" and b.images.dtype == torch.float16 for b in bs)
        out[backend] = (torch.cat([b.ids[b.valid] for b in bs]).cpu(),
                        torch.cat([b.images[b.valid].float().mean((2, 3)) for b in bs]).cpu())
    assert torch.equal(out["pil"][0], out["dali"][0])
    torch.testing.assert_close(out["pil"][1], out["dali"][1], atol=0.05, rtol=0)


@needs_dali
def test_dali_spawned_workers(corrupt_data, monkeypatch):
    """The GPU path starts DALI workers with spawn (CUDA is up): the source must pickle and run."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    loader = build_loader(cfg(corrupt_data, backend="dali_cpu", train=False, batch_size=8, workers=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bs = run_epoch(loader, start_batch=6)
    assert [b.index for b in bs] == [6, 7] and loader.skipped == 0
    assert torch.cat([b.ids for b in bs]).tolist() == list(range(48, 60)) + list(range(4))
    assert torch.cat([b.valid for b in bs]).tolist() == [True] * 12 + [False] * 4


# ------------------------------------------------------------------ persistent DALI pipeline, batch source


def halves_flipped(images: torch.Tensor, ids: torch.Tensor) -> list[bool]:
    """From pixels: is each image mirrored? (left half is colour(id), right half its complement)"""
    out = []
    for x, sid in zip(images.float(), ids.tolist()):
        left = x[:, :, : x.shape[2] // 2].mean((1, 2)).numpy()
        c = (np.array(colour(sid)) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        cc = ((255 - np.array(colour(sid))) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        out.append(bool(np.abs(left - cc).sum() < np.abs(left - c).sum()))
    return out


@needs_dali
def test_dali_pipeline_is_built_once_across_epochs_breaks_and_resume(data):
    """One pipeline for the loader's life: full epochs, an epoch left after two batches, a resume at
    start_batch; the order is the documented permutation and a resumed tail equals the same
    batches of the uninterrupted epoch, pixels included (resize + per-id flips are exact)."""
    loader = build_loader(cfg(data, backend="dali_cpu", batch_size=8, workers=2, hflip=0.5))
    full = run_epoch(loader, epoch=1)
    loader.set_epoch(2)
    for b, _ in zip(loader, range(2)):  # left early: drained at the next iter()
        pass
    tail = run_epoch(loader, epoch=1, start_batch=3)
    other = run_epoch(loader, epoch=2)
    assert loader.pipeline_builds == 1
    perm = np.random.default_rng([3, 1]).permutation(np.sort(data["ids"]))  # independent reference
    assert torch.cat([b.ids for b in full]).tolist() == perm[:56].tolist()
    assert [b.index for b in tail] == [3, 4, 5, 6]
    for a, b in zip(tail, full[3:]):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)
    assert torch.cat([b.ids for b in other]).tolist() == np.random.default_rng([3, 2]).permutation(N)[:56].tolist()
    for b in full + other:
        assert np.array_equal(b.ids_host, b.ids.numpy()) and np.array_equal(b.valid_host, b.valid.numpy())
    loader.close()


@needs_dali
def test_flips_are_per_sample_id_and_match_across_backends_and_ranks(data):
    """The flip of a sample depends on (seed, epoch, id) only: the same for dali_cpu and pil, for
    one rank or two, and what the pixels show."""
    kw = dict(train=True, augment="resize", hflip=0.5, batch_size=6, workers=1)
    flips = {}
    for backend in ("dali_cpu", "pil"):
        bs = run_epoch(build_loader(cfg(data, backend=backend, **kw)), epoch=3)
        ids = torch.cat([b.ids for b in bs])
        flips[backend] = dict(zip(ids.tolist(), halves_flipped(torch.cat([b.images for b in bs]), ids)))
    assert flips["dali_cpu"] == flips["pil"]
    assert 0.25 < np.mean(list(flips["pil"].values())) < 0.75
    two = [build_loader(cfg(data, backend="dali_cpu", **kw), rank=r, world_size=2) for r in (0, 1)]
    for r in (0, 1):
        bs = run_epoch(two[r], epoch=3)
        ids = torch.cat([b.ids for b in bs])
        got = dict(zip(ids.tolist(), halves_flipped(torch.cat([b.images for b in bs]), ids)))
        assert all(flips["pil"][i] == f for i, f in got.items() if i in flips["pil"])


@needs_dali
def test_eval_loader_keeps_its_pipeline(data):
    loader = build_loader(cfg(data, backend="dali_cpu", train=False, batch_size=8, workers=1))
    first = run_epoch(loader)
    second = run_epoch(loader)
    assert loader.pipeline_builds == 1
    assert [b.ids.tolist() for b in first] == [b.ids.tolist() for b in second]
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, second))


def _locations(root, ids):
    return SampleIndex.load(root, "train").locate(np.asarray(ids).reshape(1, -1))


def test_batch_reader_verdicts_match_the_sample_reader(tmp_path):
    """Vectorised batch checks give the per-sample reader's verdict (an independent reference)
    for each kind of damage, and replace bad samples by the next good one, marked invalid."""
    good = jpeg(3)
    no_sos = good[:good.index(b"\xff\xda")] + b"\xff\xd9"
    corrupt = {5: good[: len(good) // 2], 7: no_sos, 11: b"\x00" * 300, 13: b"GIF89a" + b"\x00" * 50,
               17: b"\xff\xd8\xff"}
    ds = make_dataset(tmp_path / "d", corrupt=corrupt)
    # id mismatch: overwrite the stored id bytes of sample 23 in place (same file size)
    loc = _locations(ds["root"], [23])
    path, at = loc.paths[int(loc.shard[0, 0])], int(loc.id_offset[0, 0])
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(fmt.encode_id(99))
    ids = np.array([5, 6, 7, 11, 13, 17, 23, 29, 2, 31])
    loc = _locations(ds["root"], ids)
    # a short read: point sample 31 past the end of its shard
    loc.offset[0, -1] += os.path.getsize(loc.paths[int(loc.shard[0, -1])])
    loc.id_offset[0, -1] += os.path.getsize(loc.paths[int(loc.shard[0, -1])])
    from pml_scale.data.input.batch_source import BatchReader

    _, views, out_ids, out_valid, bad = BatchReader().read(loc, 0, np.ones(len(ids), bool), {})
    reader = ShardReader()
    expect = {}
    for j, sid in enumerate(ids):
        try:
            assert bytes(views[j]) == reader.read(loc, (0, j))
        except SampleError as e:
            expect[int(sid)] = e.reason.split(":")[0].split(" (")[0]
    got = {sid: reason.split(":")[0].split(" (")[0] for sid, _, _, reason in bad}
    assert set(got) == set(expect) == {5, 7, 11, 13, 17, 23, 31}
    for sid in got:
        assert got[sid] == expect[sid] or (sid == 31 and got[sid].startswith("short read"))
    good_ids = [6, 29, 2]
    for j, sid in enumerate(ids):
        if int(sid) in got:  # replaced by the next good sample of the batch, cyclically
            nxt = next(int(ids[(j + k) % len(ids)]) for k in range(1, len(ids)) if int(ids[(j + k) % len(ids)]) in good_ids)
            assert not out_valid[j] and out_ids[j] == nxt and bytes(views[j]) == jpeg(nxt)
        else:
            assert out_valid[j] and out_ids[j] == sid

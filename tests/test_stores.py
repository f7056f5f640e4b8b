"""Label stores by sample id: sparse pseudo-label memmap, ROLE estimates; the label traffic and its all-gather."""

import json
import math
import os
import socket

import numpy as np
import pytest
import torch

from pml_scale.labels import ObservedLabels
from pml_scale.labels.stores import PseudoLabelStore, RoleEstimates
from pml_scale.labels.traffic import allgather_rows

FP16_TOL = 2.5e-4  # half an fp16 ulp of values in [-0.5, 0.5]


def disk_bytes(path) -> int:
    return os.stat(path).st_blocks * 512


def test_created_sparse_and_reads_one_half(tmp_path):
    n, num_l = 200_000, 600  # 240 MB logical
    store = PseudoLabelStore(tmp_path / "p.f16", n, num_l)
    assert os.path.getsize(tmp_path / "p.f16") == n * num_l * 2
    assert disk_bytes(tmp_path / "p.f16") < 1 << 20
    out = store.gather(torch.tensor([0, 7, n - 1, 7]))
    assert out.dtype == torch.float32 and out.shape == (4, num_l)
    assert torch.equal(out, torch.full((4, num_l), 0.5))
    header = json.loads((tmp_path / "p.f16.json").read_text())
    assert header["shape"] == [n, num_l] and header["dtype"] == "float16"
    # touching a few rows allocates a few pages, not the file
    store.scatter(torch.tensor([3, n // 2]), torch.rand(2, num_l))
    store.flush()
    assert disk_bytes(tmp_path / "p.f16") < 1 << 20


def test_scatter_gather_round_trip_momentum_mask_repeats(tmp_path):
    rng = np.random.default_rng(0)
    n, num_l = 50, 9
    store = PseudoLabelStore(tmp_path / "p.f16", n, num_l)
    ref = np.full((n, num_l), 0.5)
    ids = np.array([4, 17, 0, 49])
    y1 = rng.random((4, num_l))
    store.scatter(torch.from_numpy(ids), torch.from_numpy(y1).float())
    ref[ids] = y1
    np.testing.assert_allclose(store.gather(torch.from_numpy(ids)).numpy(), y1, atol=FP16_TOL)
    # momentum 0.75 and a mask: only masked entries blend, others keep their exact stored bits
    before = store.gather(torch.arange(n)).numpy()
    y2 = rng.random((4, num_l))
    mask = rng.random((4, num_l)) < 0.5
    store.scatter(torch.from_numpy(ids), torch.from_numpy(y2), mask=torch.from_numpy(mask), momentum=0.75)
    after = store.gather(torch.arange(n)).numpy()
    expect = before.copy()
    expect[ids] = np.where(mask, 0.75 * before[ids] + 0.25 * y2, before[ids])
    np.testing.assert_allclose(after, expect, atol=FP16_TOL)
    assert np.array_equal(after[ids][~mask], before[ids][~mask])  # bit-exact where untouched
    untouched = np.setdiff1d(np.arange(n), ids)
    assert np.all(after[untouched] == 0.5)
    # repeated ids: the last row wins
    y3 = np.stack([np.full(num_l, 0.1), np.full(num_l, 0.9), np.full(num_l, 0.3)])
    store.scatter(torch.tensor([20, 21, 20]), torch.from_numpy(y3))
    got = store.gather(torch.tensor([20, 21])).numpy()
    np.testing.assert_allclose(got, [[0.3] * num_l, [0.9] * num_l], atol=FP16_TOL)
    # gather keeps the requested order, repeats included
    np.testing.assert_allclose(store.gather(torch.tensor([21, 20, 21])).numpy()[:, 0], [0.9, 0.3, 0.9], atol=FP16_TOL)


def test_bad_arguments_raise_clear_errors(tmp_path):
    store = PseudoLabelStore(tmp_path / "p.f16", 10, 3)
    with pytest.raises(IndexError, match=r"ids\[1\] = 10 out of range \[0, 10\)"):
        store.gather(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"yhat must have shape \(2, 3\)"):
        store.scatter(torch.tensor([0, 1]), torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        store.scatter(torch.tensor([0]), torch.tensor([[0.5, 1.5, 0.2]]))
    with pytest.raises(ValueError, match="momentum"):
        store.scatter(torch.tensor([0]), torch.rand(1, 3), momentum=1.0)
    with pytest.raises(ValueError, match="mask must be bool"):
        store.scatter(torch.tensor([0]), torch.rand(1, 3), mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="1-D integer"):
        store.gather(torch.tensor([0.0, 1.0]))
    with pytest.raises(FileNotFoundError, match="create=False"):
        PseudoLabelStore(tmp_path / "absent.f16", 10, 3, create=False)


def test_header_mismatch_names_the_file(tmp_path):
    PseudoLabelStore(tmp_path / "p.f16", 10, 3)
    with pytest.raises(ValueError, match=r"p\.f16\.json.*shape \[10, 3\].*\[10, 4\]"):
        PseudoLabelStore(tmp_path / "p.f16", 10, 4)
    with pytest.raises(ValueError, match="kind"):
        RoleEstimates(tmp_path / "p.f16", 10, 3)
    (tmp_path / "p.f16.json").unlink()
    with pytest.raises(ValueError, match="header p.f16.json is missing"):
        PseudoLabelStore(tmp_path / "p.f16", 10, 3)
    PseudoLabelStore(tmp_path / "q.f16", 10, 3)
    with open(tmp_path / "q.f16", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="truncated"):
        PseudoLabelStore(tmp_path / "q.f16", 10, 3)


def test_snapshot_restore_keeps_values_and_sparsity(tmp_path):
    n, num_l = 100_000, 100
    store = PseudoLabelStore(tmp_path / "p.f16", n, num_l)
    ids = torch.tensor([1, 2, 99_999])
    vals = torch.rand(3, num_l)
    store.scatter(ids, vals)
    store.snapshot(tmp_path / "snap.f16")
    assert disk_bytes(tmp_path / "snap.f16") < 4 << 20  # two 1 MiB data chunks, the rest holes
    store.scatter(ids, torch.zeros(3, num_l))
    store.scatter(torch.tensor([500]), torch.ones(1, num_l))
    store.restore(tmp_path / "snap.f16")
    np.testing.assert_allclose(store.gather(ids).numpy(), vals.numpy(), atol=FP16_TOL)
    assert torch.equal(store.gather(torch.tensor([500])), torch.full((1, num_l), 0.5))
    # a fresh process sees the restored file
    again = PseudoLabelStore(tmp_path / "p.f16", n, num_l, create=False)
    assert torch.equal(again.gather(ids), store.gather(ids))
    other = PseudoLabelStore(tmp_path / "o.f16", n, num_l + 1)
    with pytest.raises(ValueError, match="snap.f16.json"):
        other.restore(tmp_path / "snap.f16")


def test_role_estimates_init_scatter_snapshot(tmp_path):
    n, num_l = 2100, 6  # three init blocks of 1024 rows
    rng = np.random.default_rng(1)
    states = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(n, num_l), p=[0.6, 0.3, 0.1])
    role = RoleEstimates(tmp_path / "r.f32", n, num_l, init_observed=states, seed=3)
    logits = role.gather(torch.arange(n)).numpy()
    assert logits.dtype == np.float32
    lo, hi = math.log(0.4 / 0.6), math.log(0.6 / 0.4)
    miss = logits[states == -1]
    assert miss.min() >= lo and miss.max() <= hi
    assert abs(miss.mean()) < 0.02 and abs(miss.std() - hi / math.sqrt(3)) < 0.02  # uniform on [lo, hi]
    np.testing.assert_allclose(logits[states == 1], math.log(0.995 / 0.005), rtol=1e-6)
    np.testing.assert_allclose(logits[states == 0], math.log(0.005 / 0.995), rtol=1e-6)
    # same seed -> same file; another seed -> another draw; no init_observed -> all missing-style
    same = RoleEstimates(tmp_path / "s.f32", n, num_l, init_observed=states, seed=3)
    assert torch.equal(same.gather(torch.arange(n)), role.gather(torch.arange(n)))
    plain = RoleEstimates(tmp_path / "t.f32", n, num_l, seed=4).gather(torch.arange(n)).numpy()
    assert plain.min() >= lo and plain.max() <= hi and not np.allclose(plain[states == -1], miss)
    # scatter: exact float32, repeated ids last wins; reopen keeps values (no re-init)
    role.scatter(torch.tensor([5, 9, 5]), torch.tensor([[1.0] * num_l, [2.0] * num_l, [3.0] * num_l]))
    assert role.gather(torch.tensor([9, 5]))[:, 0].tolist() == [2.0, 3.0]
    role.snapshot(tmp_path / "snap.f32")
    role.scatter(torch.tensor([5]), torch.full((1, num_l), -7.0))
    reopened = RoleEstimates(tmp_path / "r.f32", n, num_l, seed=99)
    assert reopened.gather(torch.tensor([5]))[0, 0].item() == -7.0
    reopened.restore(tmp_path / "snap.f32")
    assert reopened.gather(torch.tensor([5]))[0, 0].item() == 3.0
    with pytest.raises(ValueError, match="finite"):
        role.scatter(torch.tensor([0]), torch.full((1, num_l), float("nan")))
    with pytest.raises(ValueError, match="init_observed has shape"):
        RoleEstimates(tmp_path / "u.f32", n, num_l + 1, init_observed=states)


def test_role_init_from_observed_labels_equals_init_from_the_array(tmp_path):
    arr = np.random.default_rng(2).integers(-1, 2, size=(30, 5)).astype(np.int8)
    wrapped = ObservedLabels.from_dense(arr)
    a = RoleEstimates(tmp_path / "a.f32", 30, 5, init_observed=arr, seed=1).gather(torch.arange(30))
    b = RoleEstimates(tmp_path / "b.f32", 30, 5, init_observed=wrapped, seed=1).gather(torch.arange(30))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- two ranks

N, L = 40, 7


def _observed():
    return np.random.default_rng(9).choice(np.array([-1, 0, 1], dtype=np.int8), size=(N, L), p=[0.7, 0.2, 0.1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pseudo_store_with_a_per_label_init(tmp_path):
    """ours+ (pseudo.init=prior): a fresh store reads as the per-label init; writes round-trip;
    the init lives in the header, so another process, a snapshot and a restore all see it."""
    init = np.array([0.02, 0.5, 0.3, 0.999], np.float32)
    path = tmp_path / "p.f16"
    store = PseudoLabelStore(path, 5, 4, create=True, init=init)
    want = np.tile(init.astype(np.float16).astype(np.float32), (2, 1))
    assert np.array_equal(store.gather(torch.tensor([4, 0])).numpy(), want)
    assert os.stat(path).st_blocks == 0  # still a sparse file
    store.scatter(torch.tensor([1]), torch.tensor([[0.0, 1.0, 0.25, 0.5]]))
    got = store.gather(torch.tensor([1])).numpy()[0]
    assert np.allclose(got, [0.0, 1.0, 0.25, 0.5], atol=2 ** -11)
    other = PseudoLabelStore(path, 5, 4, create=False)  # another rank: init read from the header
    assert np.array_equal(other.gather(torch.tensor([1, 3])).numpy(), store.gather(torch.tensor([1, 3])).numpy())
    store.snapshot(tmp_path / "snap.f16")
    store.scatter(torch.tensor([1]), torch.full((1, 4), 0.9))
    store.restore(tmp_path / "snap.f16")
    assert np.allclose(store.gather(torch.tensor([1])).numpy()[0], got)
    # ŷ = 1 or 0 against an init that fp16 cannot pair exactly still reads back inside [0, 1]
    store.scatter(torch.tensor([2]), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    back = store.gather(torch.tensor([2])).numpy()[0]
    assert ((back >= 0) & (back <= 1)).all() and np.allclose(back, [1, 0, 1, 0], atol=2 ** -10)
    ids = np.array([2, 4, 1])  # the host gather of the label thread reads the same values
    np.testing.assert_array_equal(store.gather_numpy(ids), store.gather(torch.from_numpy(ids)).numpy())
    with pytest.raises(ValueError, match="initial pseudo labels differ"):
        PseudoLabelStore(path, 5, 4, create=True, init=init[::-1].copy())
    with pytest.raises(ValueError, match="init must be 4 values"):
        PseudoLabelStore(tmp_path / "q.f16", 5, 4, init=np.array([0.1, 1.2, 0.3, 0.3]))


# ----------------------------------------------------------------------------- host gathers, fixed-size all-gather


def test_gather_numpy_matches_gather_and_fills_out(tmp_path):
    store = PseudoLabelStore(tmp_path / "p.f16", N, L)
    store.scatter(torch.tensor([3, 8]), torch.rand(2, L, generator=torch.Generator().manual_seed(1)))
    ids = np.array([8, 0, 3, 8])
    out = np.empty((4, L), np.float32)
    got = store.gather_numpy(ids, out=out)
    assert got is out
    np.testing.assert_array_equal(out, store.gather(torch.from_numpy(ids)).numpy())
    with pytest.raises(ValueError, match="out must be float32 of shape"):
        store.gather_numpy(ids, out=np.empty((3, L), np.float32))
    role = RoleEstimates(tmp_path / "r.f32", N, L, seed=0)
    np.testing.assert_array_equal(role.gather_numpy(ids), role.gather(torch.from_numpy(ids)).numpy())


def _rows_worker(rank, world, port, folder):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ids = torch.tensor([[1, -1, 9], [4, 7, -1]][rank])
        rows = torch.arange(3 * L, dtype=torch.float16).view(3, L) + 100 * rank
        all_ids, all_rows = allgather_rows(ids, rows)
        np.savez(os.path.join(folder, f"r{rank}.npz"), ids=all_ids.numpy(), rows=all_rows.float().numpy())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_allgather_rows_fixed_size_in_rank_order(tmp_path):
    torch.multiprocessing.spawn(_rows_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    expect_ids = [1, -1, 9, 4, 7, -1]
    expect_rows = np.concatenate([np.arange(3 * L).reshape(3, L) + 100 * r for r in (0, 1)])
    for r in (0, 1):
        got = np.load(tmp_path / f"r{r}.npz")
        assert got["ids"].tolist() == expect_ids
        np.testing.assert_array_equal(got["rows"], expect_rows)
    ids, rows = allgather_rows(torch.tensor([2, 5]), torch.zeros(2, L))  # no process group: unchanged
    assert ids.tolist() == [2, 5] and rows.shape == (2, L)


# ----------------------------------------------------------------------------- label traffic


class _Batch:
    def __init__(self, ids, valid):
        self.ids_host, self.valid_host = np.asarray(ids, np.int64), np.asarray(valid, bool)


def _traffic(tmp_path, observed, **kw):
    from pml_scale.labels.traffic import LabelTraffic

    store = PseudoLabelStore(tmp_path / "p.f16", N, L)
    args = dict(observed=ObservedLabels.from_dense(observed), pseudo_store=store, estimates_store=None, device="cpu",
                counts_fn=lambda s, p, i, e: (float((s == 1).sum()), float(s.size)), global_counts=True,
                group=None, world_size=1, rank=0, writer=True, per_node=False, momentum=0.0)
    args.update(kw)
    return LabelTraffic(**args), store


def test_label_traffic_gathers_valid_rows_and_writes_behind_in_order(tmp_path):
    """The thread's FIFO order is the submission order: a gather queued after a scatter sees it; a
    gather queued before it (the next batch of the same epoch, other ids) does not need to."""
    observed = _observed()
    traffic, store = _traffic(tmp_path, observed)
    batch = _Batch([4, 9, 4, 17], [True, True, False, True])
    host = traffic.gather(batch, epoch=0).result()
    assert host.ids_host.tolist() == [4, 9, 17] and host.rows.tolist() == [0, 1, 3]
    np.testing.assert_array_equal(host.states.numpy(), observed[[4, 9, 17]])
    np.testing.assert_array_equal(host.pseudo.numpy(), np.full((3, L), 0.5, np.float32))
    assert host.counts == (float((observed[[4, 9, 17]] == 1).sum()), 3.0 * L)
    dev = traffic.to_device(host)
    yhat = torch.rand(3, L, generator=torch.Generator().manual_seed(2))
    traffic.scatter(batch, dev, yhat, None)
    again = traffic.gather(batch, epoch=1)  # queued after the scatter: sees it
    traffic.fence()
    missing = observed[[4, 9, 17]] == -1
    expect = np.where(missing, yhat.numpy(), 0.5)
    np.testing.assert_allclose(again.result().pseudo.numpy(), expect, atol=FP16_TOL)
    np.testing.assert_allclose(store.gather_numpy(np.array([4, 9, 17])), expect, atol=FP16_TOL)
    assert (store.gather_numpy(np.array([0, 1, 2])) == 0.5).all()  # nothing else written
    traffic.close()


def test_label_traffic_non_writer_and_task_errors(tmp_path):
    from pml_scale.labels.traffic import LabelTrafficError

    traffic, store = _traffic(tmp_path, _observed(), writer=False)
    batch = _Batch([1, 2], [True, True])
    dev = traffic.to_device(traffic.gather(batch, 0).result())
    traffic.scatter(batch, dev, torch.full((2, L), 0.9), None)
    traffic.fence()
    assert (store.gather_numpy(np.array([1, 2])) == 0.5).all()  # only the node's writer rank writes
    bad = _Batch([N + 5], [True])  # an id beyond the store: the thread fails, the main thread hears it
    traffic.gather(bad, 0)
    with pytest.raises(LabelTrafficError, match="out of range") as err:
        traffic.fence()
    assert isinstance(err.value.__cause__, IndexError)
    traffic.close()


@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_versioned_store_equals_in_place_and_resumes_from_bitmaps(tmp_path, momentum):
    """Three epochs of scatters (each epoch visits a different subset once, masks on): the versioned
    store reads and ends like one in-place store; a mid-epoch checkpoint (bitmaps only) restored
    after a killed run wrote further rows gives the same end state; checkpoints copy no N x L."""
    from pml_scale.labels.stores import VersionedPseudoStore

    n, L = 40, 6
    rng = np.random.default_rng(0)
    plan = [[rng.permutation(n)[:32].reshape(4, 8)] for _ in range(3)]  # 4 batches of 8, 8 rows left out
    yhat = [[rng.random((8, L), dtype=np.float32) for _ in range(4)] for _ in range(3)]
    masks = [[rng.random((8, L)) < 0.7 for _ in range(4)] for _ in range(3)]
    ref = PseudoLabelStore(tmp_path / "ref.f16", n, L)

    def run(store, epochs=range(3), start=0, stop=4, versioned=True):
        reads = []
        for e in epochs:
            if versioned:
                store.begin_epoch(e)
            for b in range(start if e == epochs[0] else 0, stop if e == epochs[-1] else 4):
                ids = plan[e][0][b]
                reads.append(store.gather_numpy(ids).copy())
                store.scatter(ids, yhat[e][b], mask=masks[e][b], momentum=momentum)
            if versioned and not (e == epochs[-1] and stop < 4):
                store.end_epoch()
        return reads

    ref_reads = run(ref, versioned=False)
    v = VersionedPseudoStore(tmp_path / "v", n, L)
    np.testing.assert_array_equal(np.stack(run(v)), np.stack(ref_reads))
    final = np.fromfile(tmp_path / "v" / "pseudo.f16", np.float16)  # the symlink: newest complete version
    np.testing.assert_array_equal(final, np.fromfile(tmp_path / "ref.f16", np.float16))
    # checkpoint in epoch 1 after 2 batches; the killed run goes on (2 more batches, epoch end, epoch 2 not started)
    k = VersionedPseudoStore(tmp_path / "k", n, L)
    run(k, epochs=range(0, 2), stop=2)
    state = k.checkpoint_state()
    assert sum(a.nbytes for a in state.values()) < 40  # bitmaps of N bits, not N x L
    run(k, epochs=range(1, 2), start=2)
    r = VersionedPseudoStore(tmp_path / "k", n, L, create=False)  # a new process
    r.load_checkpoint_state(state)
    run(r, epochs=range(1, 3), start=2)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "k" / "pseudo.f16", np.float16),
                                  np.fromfile(tmp_path / "ref.f16", np.float16))


@pytest.mark.parametrize("init", [None, "prior"])
def test_uint8_store_quantises_to_1_255_and_keeps_masked_bytes(tmp_path, init):
    """pseudo.dtype=uint8 against float64 arithmetic: every read within 1/510 of the value written
    (the fresh store: the initial value rounded to 1/255), masked entries keep their bytes, momentum
    works in value space; the versioned store takes it; a header of the other dtype is refused."""
    from pml_scale.labels.stores import PseudoLabelStore8, VersionedPseudoStore

    n, L = 30, 7
    rng = np.random.default_rng(4)
    prior = rng.uniform(0.001, 0.6, L).astype(np.float32) if init else None
    s = PseudoLabelStore8(tmp_path / "p.u8", n, L, init=prior)
    start = np.broadcast_to(np.float16(0.5) if prior is None else prior.astype(np.float16).astype(np.float32), (n, L))
    np.testing.assert_allclose(s.gather_numpy(np.arange(n)), start, atol=1 / 510 + 1e-6)
    assert os.stat(tmp_path / "p.u8").st_blocks == 0 and os.path.getsize(tmp_path / "p.u8") == n * L
    ref = s.gather_numpy(np.arange(n)).astype(np.float64)
    for momentum in (0.0, 0.7):
        ids = rng.permutation(n)[:12]
        y = rng.random((12, L), dtype=np.float32)
        mask = rng.random((12, L)) < 0.6
        before = np.fromfile(tmp_path / "p.u8", np.uint8).reshape(n, L)[ids].copy()
        s.scatter(ids, y, mask=mask, momentum=momentum)
        s.flush()
        ref[ids] = np.where(mask, momentum * ref[ids] + (1 - momentum) * y, ref[ids])
        got = s.gather_numpy(np.arange(n))
        np.testing.assert_allclose(got, ref, atol=1 / 510 + 1e-6)
        ref = got.astype(np.float64)  # the store's own rounding is the next step's "old"
        after = np.fromfile(tmp_path / "p.u8", np.uint8).reshape(n, L)[ids]
        np.testing.assert_array_equal(after[~mask], before[~mask])
    v = VersionedPseudoStore(tmp_path / "v", n, L, init=prior, dtype="uint8")
    v.begin_epoch(0)
    v.scatter(np.arange(5), np.full((5, L), 0.2, np.float32))
    v.end_epoch()
    v.begin_epoch(1)
    np.testing.assert_allclose(v.gather_numpy(np.arange(5)), np.full((5, L), 51 / 255, np.float32), atol=1e-6)
    with pytest.raises(ValueError, match="dtype|encoding"):
        PseudoLabelStore(tmp_path / "p.u8", n, L, create=False, init=prior)

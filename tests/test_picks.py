"""pick_mask: the counter-based q-picks of missing labels (docs/design.md §1, Eq. 12)."""

import math
import random

import pytest
import torch

from pml_scale.losses.picks import pick_mask, pick_threshold

M32 = (1 << 32) - 1


# An independent, pure-Python reading of the recipe in the docstring of picks.py.
def py_fmix32(h: int) -> int:
    h &= M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    h ^= h >> 16
    return h


def py_picked(seed: int, epoch: int, sample_id: int, j: int, q: float) -> bool:
    key = py_fmix32(py_fmix32(seed ^ 0x9E3779B9) ^ epoch)
    id_lo, id_hi = sample_id & M32, (sample_id >> 32) & M32
    row = py_fmix32(py_fmix32(key ^ id_lo) ^ id_hi)
    h = py_fmix32(row ^ (((j + 1) * 0x9E3779B9) & M32))
    return (h >> 8) < round(q * 2**24)


def test_fmix32_known_value():
    # murmur3 fmix32 reference values (MurmurHash3 finaliser): fmix32(0) = 0, fmix32(1) = 0x514E28B7
    assert py_fmix32(0) == 0
    assert py_fmix32(1) == 0x514E28B7


def test_matches_pure_python_recipe_including_large_ids():
    rng = random.Random(1234)
    ids = [rng.randrange(0, 2**20) for _ in range(20)] + [rng.randrange(2**32, 2**63) for _ in range(20)]
    ids += [0, 2**32 - 1, 2**32, 2**63 - 1]
    L = 97
    for seed, epoch, q in [(0, 0, 0.5), (7, 3, 0.3), (2**32 - 1, 41, 0.9)]:
        mask = pick_mask(torch.tensor(ids, dtype=torch.int64), L, seed=seed, epoch=epoch, q=q)
        for _ in range(300):
            r, j = rng.randrange(len(ids)), rng.randrange(L)
            assert bool(mask[r, j]) == py_picked(seed, epoch, ids[r], j, q), (seed, epoch, ids[r], j)


def test_deterministic():
    ids = torch.tensor([5, 17, 3, 2**40 + 9])
    a = pick_mask(ids, 50, seed=11, epoch=2, q=0.5)
    b = pick_mask(ids.clone(), 50, seed=11, epoch=2, q=0.5)
    assert torch.equal(a, b)


def test_row_independent_of_batch_order_and_composition():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2**40, (64,), generator=g)
    full = pick_mask(ids, 40, seed=3, epoch=5, q=0.4)
    perm = torch.randperm(64, generator=g)
    assert torch.equal(pick_mask(ids[perm], 40, seed=3, epoch=5, q=0.4), full[perm])
    for r in (0, 17, 63):
        alone = pick_mask(ids[r:r + 1], 40, seed=3, epoch=5, q=0.4)
        assert torch.equal(alone[0], full[r])
    other = torch.cat([torch.randint(0, 2**40, (10,), generator=g), ids[7:8]])
    assert torch.equal(pick_mask(other, 40, seed=3, epoch=5, q=0.4)[-1], full[7])
    # int32 ids give the same rows as int64
    small = torch.arange(100, 120)
    assert torch.equal(pick_mask(small.to(torch.int32), 40, seed=3, epoch=5, q=0.4),
                       pick_mask(small, 40, seed=3, epoch=5, q=0.4))


@pytest.mark.parametrize("q", [0.1, 0.5, 0.83])
def test_rate_close_to_q(q):
    n_rows, L = 400, 250
    mask = pick_mask(torch.arange(n_rows) * 7919 + 3, L, seed=2, epoch=1, q=q)
    n = n_rows * L
    tol = 5 * math.sqrt(q * (1 - q) / n)  # 5 binomial standard deviations
    assert abs(mask.float().mean().item() - q) < tol
    # per label and per row the rate holds too (no structure along either axis)
    assert (mask.float().mean(0) - q).abs().max() < 6 * math.sqrt(q * (1 - q) / n_rows)
    assert (mask.float().mean(1) - q).abs().max() < 6 * math.sqrt(q * (1 - q) / L)


def test_q_zero_and_one():
    ids = torch.arange(50)
    assert not pick_mask(ids, 30, seed=0, epoch=0, q=0.0).any()
    assert pick_mask(ids, 30, seed=0, epoch=0, q=1.0).all()
    assert pick_threshold(0.5) == 2**23


def test_epochs_and_seeds_differ():
    ids = torch.arange(200)
    base = pick_mask(ids, 100, seed=1, epoch=0, q=0.5)
    for other in (pick_mask(ids, 100, seed=1, epoch=1, q=0.5), pick_mask(ids, 100, seed=2, epoch=0, q=0.5)):
        agree = (base == other).float().mean().item()
        assert abs(agree - 0.5) < 0.02  # independent draws agree on q² + (1−q)² = 1/2 of the slots


def test_bad_arguments():
    ids = torch.arange(3)
    for q in (-0.1, 1.5):
        with pytest.raises(ValueError, match="q must be in"):
            pick_mask(ids, 4, seed=0, epoch=0, q=q)
    with pytest.raises(ValueError, match="seed"):
        pick_mask(ids, 4, seed=-1, epoch=0, q=0.5)
    with pytest.raises(ValueError, match="sample_ids"):
        pick_mask(ids[None], 4, seed=0, epoch=0, q=0.5)
    with pytest.raises(TypeError, match="sample_ids"):
        pick_mask(ids.float(), 4, seed=0, epoch=0, q=0.5)

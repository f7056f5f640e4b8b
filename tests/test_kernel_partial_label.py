"""Fused Triton loss kernel vs an independent float64 PyTorch reference of docs/design.md §1, and,
for the ours+ negative-side options (neg_gamma, neg_margin), vs the library's torch loss in float64.

Runs on CPU under TRITON_INTERPRET=1 (set by conftest.py before triton is imported).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pml_scale.kernels import (FusedPartialLabelLoss, fused_partial_label_loss, launch_key,
                               partial_label_forward, pick_threshold)
from pml_scale.losses import picks as picks_ref

SEED, EPOCH = 3_000_000_017, 4  # seed > 2**31 exercises the int32-bit-pattern key path


# ------------------------------------------------------------------ references (test-only)

def np_fmix32(h: np.ndarray) -> np.ndarray:
    h = h.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)  # wraps modulo 2**32
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def np_picks(ids: torch.Tensor, L: int, seed: int, epoch: int, q: float) -> torch.Tensor:
    """Second, numpy-uint32 implementation of the pick recipe in picks.py's docstring."""
    with np.errstate(over="ignore"):
        key = np_fmix32(np_fmix32(np.array([seed ^ 0x9E3779B9], np.uint32)) ^ np.uint32(epoch))
        i64 = ids.numpy().astype(np.int64)
        lo = (i64 & 0xFFFFFFFF).astype(np.uint32)
        hi = ((i64 >> 32) & 0xFFFFFFFF).astype(np.uint32)
        row = np_fmix32(np_fmix32(key ^ lo) ^ hi)
        col = np.arange(1, L + 1, dtype=np.uint32) * np.uint32(0x9E3779B9)
        h = np_fmix32(row[:, None] ^ col[None, :])
    return torch.from_numpy((h >> np.uint32(8)).astype(np.int64) < int(round(q * 2 ** 24)))


def ref_loss(logits, states, pseudo, ids, *, alpha, beta, d, q, seed, epoch, p_threshold=0.1,
             p_rule="text"):
    """docs/design.md §1 written literally in float64; returns (loss, grad wrt logits, p, |S|)."""
    s = logits.detach().double().requires_grad_(True)
    yt = pseudo.double()
    y = torch.sigmoid(s)
    log_y, log_1my = F.logsigmoid(s), F.logsigmoid(-s)
    pos, neg, miss = states == 1, states == 0, states == -1
    S = miss & picks_ref.pick_mask(ids, s.shape[1], seed=seed, epoch=epoch, q=q)
    n_e = (pos | neg).sum(1).double()
    n_s = S.sum(1).double()
    inv_ne = torch.where(n_e > 0, 1 / n_e.clamp(min=1), torch.zeros_like(n_e))
    ds = torch.where(n_s > 0, d / n_s.clamp(min=1), torch.zeros_like(n_s))
    zero = torch.zeros_like(s)
    A = inv_ne * torch.where(pos, log_y, zero).sum(1) + ds * torch.where(S, yt * log_y, zero).sum(1)
    Bt = inv_ne * torch.where(neg, log_1my, zero).sum(1) + ds * torch.where(S, (1 - yt) * log_1my, zero).sum(1)
    ymax = y.detach().max(1).values
    big = ymax >= p_threshold if p_rule == "printed" else ymax < p_threshold
    p = torch.where(big, 2.0, 1.0).double()
    loss = (-p * (alpha * A + beta * Bt)).mean()
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad, p, n_s


def make_inputs(B, L, *, gen_seed=0, dtype=torch.float32, pseudo_dtype=torch.float32, special_rows=True):
    """Random inputs; rows 0-2 (if present) are: no observed label, nothing missing, all ŷ < 0.1."""
    g = torch.Generator().manual_seed(gen_seed)
    logits = torch.randn(B, L, generator=g) * 3
    states = torch.randint(-1, 2, (B, L), generator=g).to(torch.int8)
    if special_rows:
        if B > 0:
            states[0] = -1
        if B > 1:
            states[1] = torch.randint(0, 2, (L,), generator=g).to(torch.int8)
        if B > 2:
            logits[2] = -3.0 - torch.rand(L, generator=g) * 4
    pseudo = torch.rand(B, L, generator=g)
    ids = torch.randint(0, 2 ** 40, (B,), generator=g)
    return logits.to(dtype), states, pseudo.to(pseudo_dtype), ids


def assert_yhat(yhat: torch.Tensor, logits: torch.Tensor) -> None:
    """ŷ is σ(s) rounded to fp16: within 1 fp16 ulp of the float64 sigmoid, equal on >= 99.8%.

    The kernel computes σ from t = e^-|s| as 1/(1+t) or t/(1+t) (no cancellation for either
    sign; on the GPU with ~2-ulp MUFU ex2/rcp), so its fp32 value can sit on the other side of a
    fp16 rounding boundary from the correctly rounded one on a few entries in 10^4.
    """
    assert yhat.dtype == torch.float16 and yhat.shape == logits.shape
    exact = torch.sigmoid(logits.detach().double()).half()
    ulps = (yhat.view(torch.int16).int() - exact.view(torch.int16).int()).abs()
    assert ulps.max() <= 1 and (ulps > 0).float().mean() <= 2e-3


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


KW = dict(alpha=0.3, beta=0.7, d=1.3, seed=SEED, epoch=EPOCH)


def run_both(logits, states, pseudo, ids, *, q=0.5, block_l=None, p_rule="text", p_threshold=0.1):
    params = dict(KW, q=q, p_rule=p_rule, p_threshold=p_threshold)
    x = logits.detach().clone().requires_grad_(True)
    loss, yhat, p = FusedPartialLabelLoss.apply(x, states, pseudo, ids, params, block_l)
    loss.backward()
    ref = ref_loss(logits, states, pseudo, ids, **params)
    return (loss, x.grad, yhat, p), ref


# ------------------------------------------------------------------ picks


def test_host_key_and_threshold_match_picks_module():
    for seed in (0, 1, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1):
        for epoch in (0, 1, 7, 2 ** 32 - 1):
            assert launch_key(seed, epoch) == picks_ref.launch_key(seed, epoch)
    for q in (0.0, 1e-9, 0.3, 0.5, 1.0):
        assert pick_threshold(q) == picks_ref.pick_threshold(q)


@pytest.mark.parametrize("L,block_l", [(1, None), (1025, None), (1025, 256)])
@pytest.mark.parametrize("q", [0.0, 0.37, 1.0])
def test_picks_bit_for_bit(L, block_l, q):
    ids = torch.tensor([0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 33 + 5, 987654321012345, 2 ** 62 + 3])
    logits, states, pseudo, _ = make_inputs(len(ids), L, special_rows=False)
    for seed, epoch in ((SEED, EPOCH), (0, 0), (2 ** 32 - 1, 2 ** 32 - 1)):
        out = partial_label_forward(logits, states, pseudo, ids, alpha=0.5, beta=0.5, d=1.0, q=q,
                                    seed=seed, epoch=epoch, block_l=block_l, return_picks=True)
        got = out[4].bool()
        assert torch.equal(got, picks_ref.pick_mask(ids, L, seed=seed, epoch=epoch, q=q))
        assert torch.equal(got, np_picks(ids, L, seed, epoch, q))


def test_picks_do_not_depend_on_batch_position_or_id_dtype():
    logits, states, pseudo, ids = make_inputs(6, 300, special_rows=False)
    ids = ids % 2 ** 31
    a = partial_label_forward(logits, states, pseudo, ids, alpha=1, beta=1, d=1, q=0.5, seed=9, epoch=2,
                              return_picks=True)[4]
    perm = torch.tensor([3, 5, 0, 1, 4, 2])
    b = partial_label_forward(logits[perm], states[perm], pseudo[perm], ids[perm].to(torch.int32), alpha=1,
                              beta=1, d=1, q=0.5, seed=9, epoch=2, return_picks=True)[4]
    assert torch.equal(a[perm], b)


# ------------------------------------------------------------------ loss, gradient, ŷ, p


@pytest.mark.parametrize("B,L,block_l", [(5, 1, None), (6, 7, None), (6, 600, None), (5, 600, 128),
                                          (4, 1025, None), (4, 1025, 256), (3, 9605, None)])
def test_fp32_matches_reference(B, L, block_l):
    logits, states, pseudo, ids = make_inputs(B, L, gen_seed=L)
    (loss, grad, yhat, p), (r_loss, r_grad, r_p, r_ns) = run_both(logits, states, pseudo, ids, block_l=block_l)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, r_loss) <= 1e-5
    assert rel_err(grad, r_grad) <= 1e-5
    assert torch.equal(p.double(), r_p)
    assert_yhat(yhat, logits)
    if B > 2 and L > 1:
        assert p[2] == 2.0  # the all-ŷ<0.1 row
        assert r_ns[0] > 0  # the no-observed row has picks and a nonzero gradient
        assert grad[0].abs().sum() > 0


@pytest.mark.parametrize("q", [0.0, 1.0])
@pytest.mark.parametrize("block_l", [None, 64])
def test_q_extremes(q, block_l):
    logits, states, pseudo, ids = make_inputs(5, 200, gen_seed=11)
    (loss, grad, _, _), (r_loss, r_grad, _, r_ns) = run_both(logits, states, pseudo, ids, q=q, block_l=block_l)
    assert rel_err(loss, r_loss) <= 1e-5 and rel_err(grad, r_grad) <= 1e-5
    miss = states == -1
    if q == 0.0:  # nothing picked: missing entries get no gradient; the no-observed row is all zero
        assert torch.all(grad[miss] == 0) and torch.all(grad[0] == 0) and loss.item() == pytest.approx(r_loss.item())
    else:
        assert torch.equal(r_ns, miss.sum(1).double())
        assert torch.all(grad[miss] != 0)


def test_hand_computed_single_row():
    # s = [0, 0, 0], states = [+, -, missing], q = 1 so S = {2}, ỹ = 0.25, max ŷ = 0.5 -> p = 1.
    # A = (1/2) log .5 + d * .25 log .5; B = (1/2) log .5 + d * .75 log .5; L = -(αA + βB).
    logits = torch.zeros(1, 3)
    states = torch.tensor([[1, 0, -1]], dtype=torch.int8)
    pseudo = torch.tensor([[0.9, 0.9, 0.25]])
    a, b, d, l2 = 0.3, 0.7, 2.0, np.log(0.5)
    expect = -(a * (0.5 * l2 + d * 0.25 * l2) + b * (0.5 * l2 + d * 0.75 * l2))
    x = logits.clone().requires_grad_(True)
    loss, yhat, p = fused_partial_label_loss(x, states, pseudo, torch.tensor([7]), alpha=a, beta=b, d=d, q=1.0,
                                             seed=1, epoch=0)
    loss.backward()
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    # closed form: E+: -α(1-ŷ)/N_e; E-: +βŷ/N_e; S: -d[αỹ(1-ŷ) - β(1-ỹ)ŷ]/|S|
    g = [-a * 0.5 / 2, b * 0.5 / 2, -d * (a * 0.25 * 0.5 - b * 0.75 * 0.5)]
    assert x.grad[0].tolist() == pytest.approx(g, rel=1e-6)
    assert p.tolist() == [1.0] and yhat.dtype == torch.float16


@pytest.mark.parametrize("p_rule", ["text", "printed"])
def test_p_rule(p_rule):
    logits, states, pseudo, ids = make_inputs(6, 50, gen_seed=5)
    logits[3] = -2.5  # ŷ ≈ 0.076 < 0.1 everywhere
    (loss, grad, _, p), (r_loss, r_grad, r_p, _) = run_both(logits, states, pseudo, ids, p_rule=p_rule)
    assert torch.equal(p.double(), r_p)
    assert p[3].item() == (2.0 if p_rule == "text" else 1.0) and p[4].item() == (1.0 if p_rule == "text" else 2.0)
    assert rel_err(loss, r_loss) <= 1e-5 and rel_err(grad, r_grad) <= 1e-5


@pytest.mark.parametrize("dtype,pseudo_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("block_l", [None, 128])
def test_low_precision_logits(dtype, pseudo_dtype, block_l):
    logits, states, pseudo, ids = make_inputs(5, 600, gen_seed=3, dtype=dtype, pseudo_dtype=pseudo_dtype)
    (loss, grad, yhat, p), (r_loss, r_grad, r_p, _) = run_both(logits, states, pseudo, ids, block_l=block_l)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    assert rel_err(loss, r_loss) <= 1e-2 and rel_err(grad, r_grad) <= 1e-2
    assert_yhat(yhat, logits)
    assert torch.equal(p.double(), r_p)


def test_extreme_logits_are_finite_and_accurate():
    logits = torch.tensor([[-120.0, -30.0, -5.0, 0.0, 5.0, 30.0, 120.0, 17.0]]).repeat(3, 1)
    states = torch.tensor([[1, 0, -1, 1, 0, -1, 1, 0], [0, 1, 0, -1, 1, 0, 0, 1], [-1] * 8], dtype=torch.int8)
    pseudo = torch.full((3, 8), 0.3)
    ids = torch.tensor([1, 2, 3])
    (loss, grad, _, _), (r_loss, r_grad, _, _) = run_both(logits, states, pseudo, ids, q=0.7)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, r_loss) <= 1e-5 and rel_err(grad, r_grad) <= 1e-5
    torch.testing.assert_close(grad.double(), r_grad, rtol=1e-5, atol=1e-12)  # elementwise, tiny entries too


def test_non_contiguous_inputs():
    B, L = 5, 300
    logits, states, pseudo, ids = make_inputs(B, L, gen_seed=8)
    lt = logits.t().contiguous().t()                      # column-major view, stride (1, B)
    st = torch.zeros(B, 2 * L, dtype=torch.int8)[:, ::2]  # stride (2L, 2)
    st.copy_(states)
    ps = torch.zeros(2 * B, L, dtype=torch.float16)[::2]  # row stride 2L
    ps.copy_(pseudo)
    idv = torch.stack([ids, ids], 1)[:, 0]                # stride 2
    assert not (lt.is_contiguous() or st.is_contiguous() or ps.is_contiguous() or idv.is_contiguous())
    for block_l in (None, 128):
        (loss, grad, yhat, _), (r_loss, r_grad, _, _) = run_both(lt, st, ps, idv, block_l=block_l)
        assert rel_err(loss, r_loss) <= 1e-5 and rel_err(grad, r_grad) <= 1e-5
        assert_yhat(yhat, logits)
    ps0 = torch.full((1, L), 0.5).expand(B, L)            # stride (0, 1): a broadcast ỹ = 0.5
    (loss, grad, _, _), (r_loss, r_grad, _, _) = run_both(lt, st, ps0, idv, block_l=128)
    assert rel_err(loss, r_loss) <= 1e-5 and rel_err(grad, r_grad) <= 1e-5


def test_million_labels_tile_loop():
    L = (1 << 20) + 3  # > 1M labels: 129 tiles of 8192 per sweep
    logits, states, pseudo, ids = make_inputs(2, L, gen_seed=13, pseudo_dtype=torch.float16)
    (loss, grad, _, p), (r_loss, r_grad, r_p, _) = run_both(logits, states, pseudo, ids)
    assert rel_err(loss, r_loss) <= 1e-5 and rel_err(grad, r_grad) <= 1e-5
    assert torch.equal(p.double(), r_p)


def test_backward_twice_with_different_grad_output():
    logits, states, pseudo, ids = make_inputs(4, 100, gen_seed=2)
    x = logits.clone().requires_grad_(True)
    loss, yhat, p = fused_partial_label_loss(x, states, pseudo, ids, q=0.5, **KW)
    assert not yhat.requires_grad and not p.requires_grad
    (g1,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(1.0), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(-2.5), retain_graph=True)
    (g3,) = torch.autograd.grad(loss, x, grad_outputs=torch.tensor(1.0))
    _, r_grad, _, _ = ref_loss(logits, states, pseudo, ids, q=0.5, **KW)
    assert rel_err(g1, r_grad) <= 1e-5
    assert rel_err(g2, -2.5 * r_grad) <= 1e-5
    assert torch.equal(g1, g3)  # the saved gradient was not modified by the earlier backward calls
    assert g1.data_ptr() != g3.data_ptr()


def test_no_grad_forward_matches_and_skips_gradient():
    logits, states, pseudo, ids = make_inputs(4, 100, gen_seed=4)
    with torch.no_grad():
        loss, yhat, p = fused_partial_label_loss(logits, states, pseudo, ids, q=0.5, **KW)
    r_loss, _, r_p, _ = ref_loss(logits, states, pseudo, ids, q=0.5, **KW)
    assert rel_err(loss, r_loss) <= 1e-5 and torch.equal(p.double(), r_p)
    out = partial_label_forward(logits, states, pseudo, ids, q=0.5, need_grad=False, **KW)
    assert out[1] is None


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change,match", [
    (dict(states=torch.zeros(2, 5, dtype=torch.int32)), "states must be int8"),
    (dict(states=torch.zeros(2, 4, dtype=torch.int8)), "states must have the shape"),
    (dict(pseudo=torch.zeros(2, 5, dtype=torch.float64)), "pseudo dtype"),
    (dict(logits=torch.zeros(2, 5, dtype=torch.float64)), "logits dtype"),
    (dict(logits=torch.zeros(10)), "logits must be 2-D"),
    (dict(sample_ids=torch.zeros(3, dtype=torch.int64)), r"sample_ids must have shape \(B,\)"),
    (dict(sample_ids=torch.zeros(2)), "sample_ids must be int64 or int32"),
    (dict(q=1.5), "q must be"),
    (dict(p_rule="paper"), "p_rule must be one of"),
    (dict(seed=-1), "seed must be an integer"),
    (dict(epoch=2 ** 32), "epoch must be an integer"),
    (dict(alpha=float("nan")), "alpha must be a finite float"),
    (dict(neg_gamma=-0.5), r"neg_gamma .*must be in \[0, 8\]"),
    (dict(neg_gamma=8.5), r"neg_gamma .*must be in \[0, 8\]"),
    (dict(neg_gamma=float("inf")), "neg_gamma must be a finite float"),
    (dict(neg_gamma="2"), "neg_gamma must be a host float"),
    (dict(neg_gamma=torch.tensor(2.0)), "neg_gamma must be a host float"),
    (dict(neg_margin=1.0), r"neg_margin .*must be in \[0, 1\)"),
    (dict(neg_margin=-0.05), r"neg_margin .*must be in \[0, 1\)"),
    (dict(neg_margin=float("nan")), "neg_margin must be a finite float"),
    (dict(neg_margin=True), "neg_margin must be a host float"),
])
def test_bad_input_errors(change, match):
    args = dict(logits=torch.zeros(2, 5), states=torch.zeros(2, 5, dtype=torch.int8), pseudo=torch.zeros(2, 5),
                sample_ids=torch.zeros(2, dtype=torch.int64))
    kw = dict(KW, q=0.5)
    for k, v in change.items():
        (args if k in args else kw)[k] = v
    with pytest.raises((ValueError, TypeError), match=match):
        fused_partial_label_loss(args["logits"], args["states"], args["pseudo"], args["sample_ids"], **kw)


def test_empty_batch_rejected():
    with pytest.raises(ValueError, match="B >= 1"):
        fused_partial_label_loss(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.int8), torch.zeros(0, 5),
                                 torch.zeros(0, dtype=torch.int64), q=0.5, **KW)


# ------------------------------------------------------------------ vs the library's torch loss


def test_matches_library_torch_loss_if_present():
    try:
        from pml_scale.losses.partial import partial_label_loss_with_stats
    except ImportError as exc:
        pytest.skip(f"pml_scale.losses.partial not importable yet ({exc})")
    logits, states, pseudo, ids = make_inputs(5, 300, gen_seed=21)
    kw = dict(epoch=EPOCH, total_epochs=10, seed=SEED, q=0.5, p_threshold=0.1, p_rule="text")
    results = {}
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        try:
            loss, stats, yhat = partial_label_loss_with_stats(x, states, pseudo, ids, backend=backend, **kw)
        except TypeError as exc:
            pytest.skip(f"partial_label_loss_with_stats signature changed ({exc})")
        loss.backward()
        results[backend] = (loss.detach(), x.grad, stats, yhat)
    t_loss, t_grad, stats, t_yhat = results["torch"]
    params = dict(alpha=stats["alpha"], beta=stats["beta"], d=stats["d"], q=0.5, seed=SEED, epoch=EPOCH)
    x = logits.clone().requires_grad_(True)
    loss, yhat, _ = fused_partial_label_loss(x, states, pseudo, ids, **params)
    loss.backward()
    assert rel_err(loss, t_loss) <= 1e-5 and rel_err(x.grad, t_grad) <= 1e-5
    assert_yhat(yhat, logits)
    k_loss, k_grad, _, k_yhat = results["triton"]  # the library's dispatch to this kernel
    assert rel_err(k_loss, t_loss) <= 1e-5 and rel_err(k_grad, t_grad) <= 1e-5
    assert torch.equal(k_yhat, yhat)


def assert_backends_agree(logits, states, pseudo, ids, **kw):
    """The library loss on backend "triton" equals backend "torch": loss, gradient, ŷ, α and β."""
    from pml_scale.losses import partial_label_loss_with_stats

    out = {}
    for backend in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        loss, stats, yhat = partial_label_loss_with_stats(x, states, pseudo, ids, backend=backend, **kw)
        loss.backward()
        out[backend] = (loss.item(), x.grad, yhat.float(), stats["alpha"], stats["beta"])
    (l0, g0, y0, a0, b0), (l1, g1, y1, a1, b1) = out["torch"], out["triton"]
    assert l1 == pytest.approx(l0, rel=2e-5) and (a1, b1) == pytest.approx((a0, b0))
    assert torch.allclose(g1, g0, rtol=2e-4, atol=1e-7)
    assert torch.allclose(y1, y0, atol=1e-3)


# --------------------------------------------------------------------------- α/β readings, ours+ weights
@pytest.mark.parametrize("reading", ["slots", "observed", "seen", "none"])
@pytest.mark.parametrize("pseudo_weights", ["alpha_beta", "balanced", "capped"])
def test_triton_backend_matches_reference_for_every_reading(reading, pseudo_weights):
    """The loss's triton backend (the fused kernel, interpreted here) equals the PyTorch reference
    for every α/β reading and every pseudo-term weighting: loss, gradient, ŷ."""
    g = torch.Generator().manual_seed(11)
    B, L = 9, 77
    logits = torch.randn(B, L, generator=g) * 2.5
    states = torch.randint(-1, 2, (B, L), generator=g).to(torch.int8)
    pseudo = torch.rand(B, L, generator=g)
    ids = torch.randperm(500, generator=g)[:B]
    kw = dict(epoch=2, total_epochs=7, seed=3, q=0.6, alpha_beta=reading, pseudo_weights=pseudo_weights)
    assert_backends_agree(logits, states, pseudo, ids, **kw)


def test_balanced_weights_and_coef_tensor_in_the_kernel():
    """pseudo_weights='balanced' with (α, β) read from a tensor equals host floats and the reference."""
    from pml_scale.kernels import fused_partial_label_loss
    from pml_scale.losses import partial_label_loss_grad

    g = torch.Generator().manual_seed(5)
    B, L = 6, 50
    logits = torch.randn(B, L, generator=g)
    states = torch.randint(-1, 2, (B, L), generator=g).to(torch.int8)
    pseudo = torch.rand(B, L, generator=g)
    ids = torch.arange(B)
    res = []
    for ab in (dict(alpha=0.8, beta=0.2), dict(coef=torch.tensor([0.8, 0.2]))):
        x = logits.clone().requires_grad_(True)
        loss, _, _ = fused_partial_label_loss(x, states, pseudo, ids, **ab, d=1.3, q=0.5, seed=1, epoch=0,
                                              pseudo_weights="balanced")
        loss.backward()
        res.append(x.grad.clone())
    assert torch.equal(res[0], res[1])
    want = partial_label_loss_grad(logits.double(), states, pseudo.double(), ids, epoch=0, total_epochs=1, seed=1,
                                   q=0.5, batch_counts=None, alpha_beta="none", pseudo_weights="balanced",
                                   use_d=False, use_p=False)
    # reference with α = β = 1, d = 1 and p = 1 differs from (0.8, 0.2, d = 1.3) by known factors only on the
    # observed entries; so compare the picked entries, where balanced gives (α+β)/2 · d = 0.5 · 1.3 vs 1 · 1
    picked = (states == -1) & (want != 0)
    p = torch.ones(B)  # p: recompute as the kernel does
    yhat = torch.sigmoid(logits)
    p = torch.where(yhat.amax(1) < 0.1, 2.0, 1.0)[:, None]
    assert torch.allclose(res[0][picked].double(), (want * p * 0.65)[picked], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("ab,same_as", [((0.8, 0.2), "balanced"), ((0.2, 0.8), "alpha_beta"), ((0.5, 0.5), "alpha_beta")])
def test_capped_weights_in_the_kernel(ab, same_as):
    """pseudo_weights='capped' (ours+) in the kernel: balanced when α > β, the paper's otherwise,
    bit for bit, with host floats and with a coef tensor."""
    from pml_scale.kernels import fused_partial_label_loss

    g = torch.Generator().manual_seed(8)
    B, L = 5, 40
    logits = torch.randn(B, L, generator=g)
    states = torch.randint(-1, 2, (B, L), generator=g).to(torch.int8)
    pseudo = torch.rand(B, L, generator=g)
    ids = torch.arange(B)

    def run(weights, coef):
        x = logits.clone().requires_grad_(True)
        ab_kw = dict(coef=torch.tensor(ab)) if coef else dict(alpha=ab[0], beta=ab[1])
        loss, _, _ = fused_partial_label_loss(x, states, pseudo, ids, **ab_kw, d=1.3, q=0.5, seed=1, epoch=0,
                                              pseudo_weights=weights)
        loss.backward()
        return loss.item(), x.grad

    for coef in (False, True):
        (l_c, g_c), (l_s, g_s) = run("capped", coef), run(same_as, coef)
        assert l_c == l_s and torch.equal(g_c, g_s)


# --------------------------------------------------------------------------- ours+ negative-side terms
NEG_OPTIONS = [(2.0, 0.0), (0.0, 0.05), (4.0, 0.1)]  # (neg_gamma γ⁻, neg_margin m⁻)
REF_TOTAL_EPOCHS = 10
REF_M = REF_TOTAL_EPOCHS * float(np.log(KW["d"])) + REF_TOTAL_EPOCHS - EPOCH  # Eq. (9) "centered" gives d = KW["d"]


def ref_loss_lib(logits, states, pseudo, ids, *, neg_gamma=0.0, neg_margin=0.0, pseudo_weights="alpha_beta",
                 alpha=KW["alpha"], beta=KW["beta"], q=0.5, seed=SEED, epoch=EPOCH):
    """The library's PyTorch reference (``paper_loss(backend="torch")`` and ``partial_label_loss_grad``)
    in float64 with α, β (α + β = 1: counts P/T = β under the 'observed' reading; the kernel tests'
    0.3, 0.7 by default), d = 1.3 and p by the text rule at 0.1; returns (loss, grad, p, ŷ), grad the autograd
    gradient of the torch loss, checked against the closed form ``partial_label_loss_grad``."""
    from pml_scale.losses.partial import PaperOptions, paper_loss, partial_label_loss_grad

    assert epoch == EPOCH and alpha + beta == pytest.approx(1.0) and 0.05 <= beta <= 0.95
    opts = dict(q=q, m=REF_M, neg_gamma=neg_gamma, neg_margin=neg_margin, pseudo_weights=pseudo_weights)
    kw = dict(epoch=epoch, total_epochs=REF_TOTAL_EPOCHS, seed=seed, batch_counts=(beta, 1.0))
    x = logits.detach().double().requires_grad_(True)
    loss, stats, yhat = paper_loss(PaperOptions(**opts).check(), x, states, pseudo.double(), ids, backend="torch",
                                   **kw)
    assert (stats["alpha"], stats["beta"], stats["d"]) == pytest.approx((alpha, beta, KW["d"]), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, x)
    closed = partial_label_loss_grad(logits.double(), states, pseudo.double(), ids, **kw, **opts)
    # The closed form is NaN where ŷ rounds to 1 (s > ~36 in fp64) with m⁻ = 0 < γ⁻: negative_term_grad
    # takes log(1 − ŷ) = log 0 and multiplies by ŷ(1 − ŷ) = 0. The loss's autograd is finite (≈ −1)
    # there, so it is the gradient reference; elsewhere both agree.
    finite = torch.isfinite(closed)
    assert bool((logits.double()[~finite] > 36).all())
    torch.testing.assert_close(grad[finite], closed[finite], rtol=1e-9, atol=1e-15)
    p = torch.where(yhat.amax(1) < 0.1, 2.0, 1.0).double()
    return loss.detach(), grad, p, yhat


def neg_inputs(B, L, *, gen_seed, dtype=torch.float32, pseudo_dtype=torch.float32):
    """``make_inputs`` plus saturated logits (|s| up to 100) and entries at ŷ ≈ m⁻ on row 3."""
    logits, states, pseudo, ids = make_inputs(B, L, gen_seed=gen_seed)
    if B > 3 and L >= 8:
        logits[3, :8] = torch.tensor([-100.0, -30.0, -17.0, -2.944, -2.197, 17.0, 30.0, 100.0])  # σ(-2.944) ≈ 0.05
        states[3, :8] = torch.tensor([0, 0, -1, 0, 0, -1, 0, 0], dtype=torch.int8)
    return logits.to(dtype), states, pseudo.to(pseudo_dtype), ids


def test_library_reference_helper_is_the_paper_at_zero():
    """Sanity of ``ref_loss_lib``: with γ⁻ = m⁻ = 0 it is docs/design.md §1 (``ref_loss``) at α, β, d = KW."""
    logits, states, pseudo, ids = neg_inputs(6, 50, gen_seed=1)
    loss, grad, p, _ = ref_loss_lib(logits, states, pseudo, ids)
    r_loss, r_grad, r_p, _ = ref_loss(logits, states, pseudo, ids, q=0.5, **KW)
    assert loss.item() == pytest.approx(r_loss.item(), rel=1e-12)
    torch.testing.assert_close(grad, r_grad, rtol=1e-10, atol=1e-16)
    assert torch.equal(p, r_p)


# pseudo-term weights with their (α, β): "capped" with α > β takes its balanced branch
WEIGHTINGS = [("alpha_beta", (KW["alpha"], KW["beta"])), ("capped", (0.8, 0.2))]


@pytest.mark.parametrize("neg_gamma,neg_margin", NEG_OPTIONS)
@pytest.mark.parametrize("pseudo_weights,ab", WEIGHTINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_options_match_library_reference(neg_gamma, neg_margin, pseudo_weights, ab, dtype):
    """Kernel (row path, 2-D tiles of 16 rows) vs the torch reference with the ours+ negative terms:
    loss, gradient, ŷ, p; tolerances of the plain tests (1e-5 fp32, 1e-2 bf16)."""
    logits, states, pseudo, ids = neg_inputs(9, 77, gen_seed=17, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    params = dict(KW, alpha=ab[0], beta=ab[1], q=0.5, pseudo_weights=pseudo_weights, neg_gamma=neg_gamma,
                  neg_margin=neg_margin)
    loss, yhat, p = fused_partial_label_loss(x, states, pseudo, ids, **params)
    loss.backward()
    r_loss, r_grad, r_p, _ = ref_loss_lib(logits, states, pseudo, ids, neg_gamma=neg_gamma, neg_margin=neg_margin,
                                          pseudo_weights=pseudo_weights, alpha=ab[0], beta=ab[1])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert rel_err(loss, r_loss) <= tol and rel_err(x.grad, r_grad) <= tol
    if dtype == torch.float32:  # elementwise too: the saturated and at-the-margin entries of row 3
        torch.testing.assert_close(x.grad.double(), r_grad, rtol=1e-5, atol=1e-9)
    assert torch.equal(p.double(), r_p)
    assert_yhat(yhat, logits)
    # the options change the loss: the plain kernel gives another value
    plain = fused_partial_label_loss(logits, states, pseudo, ids, **dict(params, neg_gamma=0.0, neg_margin=0.0))
    assert plain[0].item() != pytest.approx(loss.item(), rel=1e-3)
    assert torch.equal(plain[1], yhat) and torch.equal(plain[2], p)  # ŷ and p do not depend on them


@pytest.mark.parametrize("neg_gamma,neg_margin", NEG_OPTIONS + [(0.5, 0.2)])
def test_neg_options_hand_computed_single_row(neg_gamma, neg_margin):
    """s = 0 everywhere (ŷ = 1/2), states [+, −, missing], q = 1, ỹ = 0.25: the closed forms
    N = u^γ ln(1−u) and dN/ds = ŷ(1−ŷ)[γ u^(γ−1) ln(1−u) − u^γ/(1−u)], u = 1/2 − m."""
    g, m = neg_gamma, neg_margin
    u = 0.5 - m
    N = u ** g * np.log(1 - u)
    dN = 0.25 * (g * u ** (g - 1) * np.log(1 - u) - u ** g / (1 - u))
    a, b, d, l2 = 0.3, 0.7, 2.0, np.log(0.5)
    expect = -(a * (0.5 * l2 + d * 0.25 * l2) + b * (0.5 * N + d * 0.75 * N))
    x = torch.zeros(1, 3, requires_grad=True)
    states = torch.tensor([[1, 0, -1]], dtype=torch.int8)
    loss, _, _ = fused_partial_label_loss(x, states, torch.tensor([[0.9, 0.9, 0.25]]), torch.tensor([7]), alpha=a,
                                          beta=b, d=d, q=1.0, seed=1, epoch=0, neg_gamma=g, neg_margin=m)
    loss.backward()
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    want = [-a * 0.5 / 2, -b * dN / 2, -d * (a * 0.25 * 0.5 + b * 0.75 * dN)]
    assert x.grad[0].tolist() == pytest.approx(want, rel=1e-6)


def test_default_negatives_are_the_plain_kernel_bit_for_bit():
    """γ⁻ = m⁻ = 0, explicit (as floats, ints, -0.0) or omitted, launches the unchanged plain
    specialisation: identical loss, gradient, ŷ and p, in the kernel and through the library."""
    import pml_scale.kernels.partial_label as pl
    from pml_scale.kernels.caches import CACHES
    from pml_scale.losses import partial_label_loss_with_stats

    logits, states, pseudo, ids = neg_inputs(9, 77, gen_seed=3)
    pl.clear_caches()
    outs = []
    for extra in (dict(), dict(neg_gamma=0.0, neg_margin=0.0), dict(neg_gamma=0, neg_margin=-0.0)):
        x = logits.clone().requires_grad_(True)
        loss, yhat, p = fused_partial_label_loss(x, states, pseudo, ids, q=0.5, **KW, **extra)
        loss.backward()
        outs.append((loss.detach(), x.grad, yhat, p))
    for out in outs[1:]:
        assert all(torch.equal(u, v) for u, v in zip(out, outs[0]))
    flags = [plan.flags["NEG_FOCUS"] for plan in CACHES.plans.values()]
    assert flags and not any(flags)
    lib = []
    for extra in (dict(), dict(neg_gamma=0.0, neg_margin=0.0)):
        x = logits.clone().requires_grad_(True)
        loss, _, yhat = partial_label_loss_with_stats(x, states, pseudo, ids, backend="triton", epoch=EPOCH,
                                                      total_epochs=10, seed=SEED, **extra)
        loss.backward()
        lib.append((loss.detach(), x.grad, yhat))
    assert all(torch.equal(u, v) for u, v in zip(lib[0], lib[1]))


@pytest.mark.parametrize("neg_gamma,neg_margin", NEG_OPTIONS)
def test_triton_backend_with_neg_options_matches_torch_backend(neg_gamma, neg_margin):
    """The library's triton backend takes the options (it raised NotImplementedError before) and
    equals its torch backend, as the plain options do (tolerances of that test)."""
    logits, states, pseudo, ids = neg_inputs(9, 77, gen_seed=11)
    kw = dict(epoch=2, total_epochs=7, seed=3, q=0.6, alpha_beta="seen", pseudo_weights="capped",
              neg_gamma=neg_gamma, neg_margin=neg_margin)
    assert_backends_agree(logits, states, pseudo, ids, **kw)

"""The paper's loss and the baselines against hand-computed values, the closed-form gradient
against autograd, and the registry's errors."""

import math
import sys

import pytest
import torch

from pml_scale.losses import (
    LossInputs,
    alpha_beta,
    build_loss,
    d_coefficient,
    loss_names,
    loss_options,
    partial_label_loss,
    partial_label_loss_grad,
    partial_label_loss_with_stats,
    penalty,
    pick_mask,
)
from pml_scale.losses import baselines as bl

ln, e = math.log, math.e
D64 = torch.float64


def t64(rows):
    return torch.tensor(rows, dtype=D64)


def s8(rows):
    return torch.tensor(rows, dtype=torch.int8)


# --------------------------------------------------------------------------- paper: pieces
def test_alpha_beta():
    assert alpha_beta(10, 100) == pytest.approx((0.9, 0.1))
    assert alpha_beta(1, 100, 0.05) == pytest.approx((0.95, 0.05))  # γ floor
    a, b = alpha_beta(torch.tensor(30.0), torch.tensor(100.0))  # tensors: computed on their device, no sync
    assert torch.is_tensor(a) and (a.item(), b.item()) == pytest.approx((0.7, 0.3))
    assert [v.item() for v in alpha_beta(torch.tensor(0.0), torch.tensor(0.0))] == pytest.approx([0.95, 0.05])
    # clamp_high (readings observed/seen): β at most 1 − γ, e.g. a PPL batch where every observed label is positive
    assert alpha_beta(10, 10, clamp_high=True) == pytest.approx((0.05, 0.95))
    assert [v.item() for v in alpha_beta(torch.tensor(10.0), torch.tensor(10.0), clamp_high=True)] == \
        pytest.approx([0.05, 0.95])
    assert alpha_beta(10, 10) == pytest.approx((0.0, 1.0))
    with pytest.raises(ValueError, match="T"):
        alpha_beta(0, 0)
    with pytest.raises(ValueError, match="P"):
        alpha_beta(5, 4)
    with pytest.raises(ValueError, match="gamma"):
        alpha_beta(1, 4, gamma=1.5)


def test_d_coefficient():
    assert d_coefficient(7, 10, 3) == pytest.approx(1.0)  # equal weight at e = E − m
    assert d_coefficient(1, 6, 3) == pytest.approx(math.exp(-1 / 3))
    assert d_coefficient(1, 6, 3, "printed") == pytest.approx(math.exp(4 / 6))
    with pytest.raises(ValueError, match="d_schedule"):
        d_coefficient(0, 6, 3, "linear")
    with pytest.raises(ValueError, match="total_epochs"):
        d_coefficient(0, 0, 3)
    with pytest.raises(ValueError, match="epoch"):
        d_coefficient(-1, 5, 3)


def test_penalty_rules():
    rowmax = torch.tensor([0.05, 0.1, 0.5, 0.0999])
    assert penalty(rowmax).tolist() == [2.0, 1.0, 1.0, 2.0]
    assert penalty(rowmax, rule="printed").tolist() == [1.0, 2.0, 2.0, 1.0]
    assert penalty(rowmax, threshold=0.6).tolist() == [2.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="p_rule"):
        penalty(rowmax, rule="both")


# --------------------------------------------------------------------------- paper: 2×4 by hand
# row 0: states [1, 0, -1, -1], ŷ = [.75, .25, .5, .9]      (max .9: p_text = 1)
# row 1: states [-1, 0, 0, -1], ŷ = [.05, .05, .01, .05]    (max .05: p_text = 2)
LOGITS_2x4 = [[ln(3), -ln(3), 0.0, ln(9)], [-ln(19), -ln(19), -ln(99), -ln(19)]]
STATES_2x4 = [[1, 0, -1, -1], [-1, 0, 0, -1]]
PSEUDO_2x4 = [[0.3, 0.6, 0.5, 0.2], [0.5, 0.9, 0.9, 0.3]]


def hand_2x4(d, p0, p1, alpha=3 / 4, beta=1 / 4):
    # default: reading "observed", P = 1 positive, T = 4 observed entries, 1/4 in [γ, 1 − γ]
    A0 = 0.5 * ln(0.75) + d / 2 * (0.5 * ln(0.5) + 0.2 * ln(0.9))
    B0 = 0.5 * ln(0.75) + d / 2 * (0.5 * ln(0.5) + 0.8 * ln(0.1))
    A1 = d / 2 * (0.5 * ln(0.05) + 0.3 * ln(0.05))
    B1 = 0.5 * (ln(0.95) + ln(0.99)) + d / 2 * (0.5 * ln(0.95) + 0.7 * ln(0.95))
    return 0.5 * (-p0 * (alpha * A0 + beta * B0) - p1 * (alpha * A1 + beta * B1))


@pytest.mark.parametrize("d_schedule,d", [("centered", math.exp(-1 / 3)), ("printed", math.exp(4 / 6))])
@pytest.mark.parametrize("p_rule,p0,p1", [("text", 1, 2), ("printed", 2, 1)])
def test_paper_loss_2x4_by_hand(d_schedule, d, p_rule, p0, p1):
    kw = dict(epoch=1, total_epochs=6, seed=0, q=1.0, m=3.0, d_schedule=d_schedule, p_rule=p_rule)
    args = (t64(LOGITS_2x4), s8(STATES_2x4), t64(PSEUDO_2x4), torch.tensor([4, 9]))
    loss, stats, yhat = partial_label_loss_with_stats(*args, **kw)
    assert loss.item() == pytest.approx(hand_2x4(d, p0, p1), rel=1e-12)
    assert stats == pytest.approx({"alpha": 3 / 4, "beta": 1 / 4, "d": d, "p2_share": 0.5, "picked_share": 1.0})
    assert torch.allclose(yhat, t64([[0.75, 0.25, 0.5, 0.9], [0.05, 0.05, 0.01, 0.05]]))
    # fp32 / bf16 logits compute in fp32
    loss32 = partial_label_loss(t64(LOGITS_2x4).float(), *args[1:], **kw)
    assert loss32.dtype == torch.float32 and loss32.item() == pytest.approx(hand_2x4(d, p0, p1), rel=1e-5)
    lossbf = partial_label_loss(t64(LOGITS_2x4).bfloat16(), *args[1:], **kw)
    assert lossbf.dtype == torch.float32 and lossbf.item() == pytest.approx(hand_2x4(d, p0, p1), rel=3e-2)


def test_paper_ablation_flags_2x4():
    args = (t64(LOGITS_2x4), s8(STATES_2x4), t64(PSEUDO_2x4), torch.tensor([4, 9]))
    kw = dict(epoch=1, total_epochs=6, seed=0, q=1.0)
    d = math.exp(-1 / 3)
    assert partial_label_loss(*args, **kw, use_d=False).item() == pytest.approx(hand_2x4(1.0, 1, 2))
    assert partial_label_loss(*args, **kw, use_p=False).item() == pytest.approx(hand_2x4(d, 1, 1))
    # use_q=False uses every missing entry, whatever q says
    assert partial_label_loss(*args, **{**kw, "q": 0.0}, use_q=False).item() == pytest.approx(hand_2x4(d, 1, 2))
    # α = β = 1: the plain two-part BCE of Eq. (7)
    A0 = 0.5 * ln(0.75) + d / 2 * (0.5 * ln(0.5) + 0.2 * ln(0.9))
    B0 = 0.5 * ln(0.75) + d / 2 * (0.5 * ln(0.5) + 0.8 * ln(0.1))
    A1 = d / 2 * (0.5 * ln(0.05) + 0.3 * ln(0.05))
    B1 = 0.5 * (ln(0.95) + ln(0.99)) + d / 2 * (0.5 * ln(0.95) + 0.7 * ln(0.95))
    want = 0.5 * (-(A0 + B0) - 2 * (A1 + B1))
    assert partial_label_loss(*args, **kw, use_alpha_beta=False).item() == pytest.approx(want)


# α/β readings on the 2×4 batch with q = 1 (every missing entry picked): 4 observed entries, 1 positive;
# picked pseudo labels .5 + .2 (row 0) + .5 + .3 (row 1) = 1.5 over 4 picked entries.
@pytest.mark.parametrize("reading,P,T", [("slots", 1, 8), ("observed", 1, 4), ("seen", 2.5, 8), ("none", None, None)])
def test_paper_alpha_beta_readings_2x4(reading, P, T):
    from pml_scale.losses import alpha_beta_counts

    args = (t64(LOGITS_2x4), s8(STATES_2x4), t64(PSEUDO_2x4), torch.tensor([4, 9]))
    d = math.exp(-1 / 3)
    alpha, beta = (1.0, 1.0) if P is None else (1 - P / T, P / T)
    loss, stats, _ = partial_label_loss_with_stats(*args, epoch=1, total_epochs=6, seed=0, q=1.0, alpha_beta=reading)
    assert loss.item() == pytest.approx(hand_2x4(d, 1, 2, alpha, beta), rel=1e-12)
    assert (stats["alpha"], stats["beta"]) == pytest.approx((alpha, beta))
    if P is not None:
        counts = alpha_beta_counts(reading, args[1], args[2], args[3], seed=0, epoch=1, q=1.0)
        assert counts.dtype == D64 and counts.tolist() == pytest.approx([P, T])
    # the gradient of every reading is the closed form's
    x = args[0].clone().requires_grad_(True)
    partial_label_loss(x, *args[1:], epoch=1, total_epochs=6, seed=0, q=1.0, alpha_beta=reading).backward()
    want = partial_label_loss_grad(*args, epoch=1, total_epochs=6, seed=0, q=1.0, alpha_beta=reading)
    assert torch.allclose(x.grad, want, rtol=1e-10, atol=1e-14)


def test_alpha_beta_counts_seen_uses_the_loss_picks():
    from pml_scale.losses import alpha_beta_counts

    g = torch.Generator().manual_seed(0)
    states = torch.randint(-1, 2, (5, 37), generator=g).to(torch.int8)
    pseudo = torch.rand(5, 37, generator=g, dtype=D64)
    ids = torch.tensor([3, 17, 2, 90, 11])
    picked = pick_mask(ids, 37, seed=7, epoch=2, q=0.4) & (states == -1)
    want_p = float((states == 1).sum()) + float(pseudo[picked].sum())
    want_t = float((states >= 0).sum()) + float(picked.sum())
    got = alpha_beta_counts("seen", states, pseudo, ids, seed=7, epoch=2, q=0.4)
    assert got.tolist() == pytest.approx([want_p, want_t])
    with pytest.raises(ValueError, match="seen"):
        alpha_beta_counts("seen", states)
    with pytest.raises(ValueError, match="alpha_beta must be one of"):
        alpha_beta_counts("labels", states)
    with pytest.raises(ValueError, match="alpha_beta must be one of"):
        build_loss("paper", alpha_beta="everything")


def test_paper_balanced_pseudo_weights_2x4():
    """pseudo_weights="balanced": observed terms keep α/β, picked terms weigh (α+β)/2 each."""
    args = (t64(LOGITS_2x4), s8(STATES_2x4), t64(PSEUDO_2x4), torch.tensor([4, 9]))
    d, a, b = math.exp(-1 / 3), 3 / 4, 1 / 4  # the default reading 'observed'
    m = (a + b) / 2
    obs0 = a * 0.5 * ln(0.75) + b * 0.5 * ln(0.75)
    pick0 = m * d / 2 * ((0.5 * ln(0.5) + 0.2 * ln(0.9)) + (0.5 * ln(0.5) + 0.8 * ln(0.1)))
    obs1 = b * 0.5 * (ln(0.95) + ln(0.99))
    pick1 = m * d / 2 * ((0.5 * ln(0.05) + 0.3 * ln(0.05)) + (0.5 * ln(0.95) + 0.7 * ln(0.95)))
    want = 0.5 * (-(obs0 + pick0) - 2 * (obs1 + pick1))
    kw = dict(epoch=1, total_epochs=6, seed=0, q=1.0, pseudo_weights="balanced")
    assert partial_label_loss(*args, **kw).item() == pytest.approx(want, rel=1e-12)
    x = args[0].clone().requires_grad_(True)
    partial_label_loss(x, *args[1:], **kw).backward()
    assert torch.allclose(x.grad, partial_label_loss_grad(*args, **kw), rtol=1e-10, atol=1e-14)
    # at ỹ = ŷ the balanced pseudo gradient vanishes on every picked entry (no drift), the paper's does not
    yhat = torch.sigmoid(args[0])
    g_bal = partial_label_loss_grad(args[0], args[1], yhat, args[3], **kw)
    g_pap = partial_label_loss_grad(args[0], args[1], yhat, args[3], **{**kw, "pseudo_weights": "alpha_beta"})
    missing = args[1] == -1
    assert g_bal[missing].abs().max() < 1e-15 and (g_pap[missing] < 0).all()  # α > β: the paper pushes up
    with pytest.raises(ValueError, match="pseudo_weights"):
        partial_label_loss(*args, **{**kw, "pseudo_weights": "equal"})


def test_paper_capped_pseudo_weights_2x4():
    """ours+ pseudo_weights="capped": balanced when α > β, the paper's weights when α ≤ β; the same
    with host counts and with device-tensor counts (the no-sync path)."""
    args = (t64(LOGITS_2x4), s8(STATES_2x4), t64(PSEUDO_2x4), torch.tensor([4, 9]))
    kw = dict(epoch=1, total_epochs=6, seed=0, q=1.0)

    def loss(weights, counts):
        return partial_label_loss(*args, **kw, pseudo_weights=weights, batch_counts=counts).item()

    for counts in ((1, 4), torch.tensor([1.0, 4.0], dtype=D64)):  # α = 3/4 > β: capped = balanced ≠ paper
        assert loss("capped", counts) == loss("balanced", counts) != pytest.approx(loss("alpha_beta", counts))
    for counts in ((3, 4), torch.tensor([3.0, 4.0], dtype=D64)):  # α = 1/4 < β: capped = the paper ≠ balanced
        assert loss("capped", counts) == loss("alpha_beta", counts) != pytest.approx(loss("balanced", counts))
    # the default reading on this batch gives α = 3/4: the balanced hand value of the test above
    assert loss("capped", None) == pytest.approx(loss("balanced", None), rel=1e-15)
    x = args[0].clone().requires_grad_(True)
    partial_label_loss(x, *args[1:], **kw, pseudo_weights="capped", batch_counts=(3, 4)).backward()
    want = partial_label_loss_grad(*args, **kw, pseudo_weights="capped", batch_counts=(3, 4))
    assert torch.allclose(x.grad, want, rtol=1e-10, atol=1e-14)


def test_paper_batch_counts_override():
    args = (t64(LOGITS_2x4), s8(STATES_2x4), t64(PSEUDO_2x4), torch.tensor([4, 9]))
    _, stats, _ = partial_label_loss_with_stats(*args, epoch=1, total_epochs=6, seed=0, batch_counts=(30, 100))
    assert (stats["alpha"], stats["beta"]) == pytest.approx((0.7, 0.3))
    with pytest.raises(ValueError, match="batch_counts"):
        partial_label_loss(*args, epoch=1, total_epochs=6, seed=0, batch_counts=5)


# --------------------------------------------------------------------------- paper: edge rows
# row 0: nothing observed, all missing, ŷ = .5       row 1: nothing missing, ŷ = [.5, .75, .25]
# row 2: one positive, two missing, ŷ = .05 (p = 2)
EDGE_LOGITS = [[0.0, 0.0, 0.0], [0.0, ln(3), -ln(3)], [-ln(19)] * 3]
EDGE_STATES = [[-1, -1, -1], [1, 0, 0], [-1, 1, -1]]
EDGE_PSEUDO = [[0.2, 0.4, 0.6], [0.5, 0.5, 0.5], [0.1, 0.5, 0.7]]


@pytest.mark.parametrize("q", [0.0, 1.0])
def test_paper_edge_rows_q0_q1(q):
    # default reading 'observed': P = 2 observed positives, T = 4 observed entries → β = α = 1/2
    alpha, beta, d = 1 / 2, 1 / 2, math.exp((0 + 3 - 4) / 4)
    A1, B1 = ln(0.5) / 3, (ln(0.25) + ln(0.75)) / 3
    A2, B2 = ln(0.05), 0.0
    A0 = B0 = 0.0
    if q == 1.0:
        A0, B0 = d / 3 * 1.2 * ln(0.5), d / 3 * 1.8 * ln(0.5)
        A2 += d / 2 * (0.1 + 0.7) * ln(0.05)
        B2 += d / 2 * (0.9 + 0.3) * ln(0.95)
    rows = [-1 * (alpha * A0 + beta * B0), -1 * (alpha * A1 + beta * B1), -2 * (alpha * A2 + beta * B2)]
    loss, stats, _ = partial_label_loss_with_stats(
        t64(EDGE_LOGITS), s8(EDGE_STATES), t64(EDGE_PSEUDO), torch.arange(3), epoch=0, total_epochs=4, seed=5, q=q)
    assert loss.item() == pytest.approx(sum(rows) / 3, rel=1e-12)
    assert stats["picked_share"] == q and stats["p2_share"] == pytest.approx(1 / 3)
    assert math.isfinite(loss.item())


def loop_reference(logits, states, pseudo, picks, alpha, beta, d, p_thr):
    """A second, element-by-element implementation of docs/design.md §1 (text rule)."""
    B, L = len(logits), len(logits[0])
    total = 0.0
    for i in range(B):
        y = [1 / (1 + math.exp(-s)) for s in logits[i]]
        E = [j for j in range(L) if states[i][j] in (0, 1)]
        S = [j for j in range(L) if states[i][j] == -1 and picks[i][j]]
        A = sum(ln(y[j]) for j in E if states[i][j] == 1) / len(E) if E else 0.0
        Bt = sum(ln(1 - y[j]) for j in E if states[i][j] == 0) / len(E) if E else 0.0
        if S:
            A += d / len(S) * sum(pseudo[i][j] * ln(y[j]) for j in S)
            Bt += d / len(S) * sum((1 - pseudo[i][j]) * ln(1 - y[j]) for j in S)
        p = 2.0 if max(y) < p_thr else 1.0
        total += -p * (alpha * A + beta * Bt)
    return total / B


def random_batch(B, L, seed, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, generator=g) * 2.5).to(dtype)
    states = torch.randint(-1, 2, (B, L), generator=g, dtype=torch.int8)
    states[0] = -1  # a row with nothing observed
    states[1] = torch.randint(0, 2, (L,), generator=g, dtype=torch.int8)  # nothing missing
    logits[2] = -6.0  # all ŷ < 0.1
    pseudo = torch.rand(B, L, generator=g, dtype=dtype)
    ids = torch.randint(0, 2**40, (B,), generator=g)
    return logits, states, pseudo, ids


def test_paper_q_half_matches_loop_reference():
    logits, states, pseudo, ids = random_batch(6, 9, seed=1)
    picks = pick_mask(ids, 9, seed=3, epoch=2, q=0.5)
    P, T = int((states == 1).sum()), int((states >= 0).sum())  # the default reading 'observed'
    beta = min(max(P / T, 0.05), 0.95)
    alpha = 1 - beta
    d = math.exp((2 + 3 - 10) / 10)
    want = loop_reference(logits.tolist(), states.tolist(), pseudo.tolist(), picks.tolist(), alpha, beta, d, 0.1)
    got = partial_label_loss(logits, states, pseudo, ids, epoch=2, total_epochs=10, seed=3, q=0.5)
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("cfg", [
    dict(q=0.5), dict(q=0.0), dict(q=1.0, d_schedule="printed", p_rule="printed"),
    dict(q=0.3, use_alpha_beta=False, use_p=False), dict(q=0.7, batch_counts=(40, 500), m=1.0),
])
def test_closed_form_grad_equals_autograd(cfg):
    logits, states, pseudo, ids = random_batch(7, 11, seed=2)
    kw = dict(epoch=3, total_epochs=8, seed=9, **cfg)
    x = logits.clone().requires_grad_(True)
    partial_label_loss(x, states, pseudo, ids, **kw).backward()
    closed = partial_label_loss_grad(logits, states, pseudo, ids, **kw)
    assert closed.dtype == D64
    assert torch.allclose(closed, x.grad, rtol=1e-10, atol=1e-13)
    assert (x.grad[(states == -1) & ~pick_mask(ids, 11, seed=9, epoch=3, q=cfg["q"])] == 0).all()


def test_gradient_flows_back_in_input_dtype():
    logits, states, pseudo, ids = random_batch(4, 6, seed=3, dtype=torch.float32)
    x = logits.bfloat16().requires_grad_(True)
    partial_label_loss(x, states, pseudo, ids, epoch=0, total_epochs=5, seed=0).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_saturated_logits_stay_finite():
    logits = t64([[80.0, -80.0, 80.0, -80.0]]).float()
    loss = partial_label_loss(logits.requires_grad_(True), s8([[0, 1, -1, -1]]), torch.full((1, 4), 0.5),
                              torch.tensor([1]), epoch=0, total_epochs=2, seed=0, q=1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 70 and torch.isfinite(logits.grad).all()


def test_paper_bad_options():
    args = (t64(LOGITS_2x4), s8(STATES_2x4), t64(PSEUDO_2x4), torch.tensor([4, 9]))
    for q in (-0.5, 1.01):
        with pytest.raises(ValueError, match="q must be in"):
            partial_label_loss(*args, epoch=0, total_epochs=6, seed=0, q=q)
    with pytest.raises(ValueError, match="backend"):
        partial_label_loss(*args, epoch=0, total_epochs=6, seed=0, backend="cuda")
    with pytest.raises(ValueError, match="p_rule"):
        partial_label_loss(*args, epoch=0, total_epochs=6, seed=0, p_rule="inverse")


def test_triton_backend_missing_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pml_scale.kernels", None)
    args = (t64(LOGITS_2x4).float(), s8(STATES_2x4), t64(PSEUDO_2x4).float(), torch.tensor([4, 9]))
    with pytest.raises(RuntimeError, match="fused_partial_label_loss"):
        partial_label_loss(*args, epoch=0, total_epochs=6, seed=0, backend="triton")
    # "auto" on CPU tensors stays on the torch reference
    assert math.isfinite(partial_label_loss(*args, epoch=0, total_epochs=6, seed=0, backend="auto").item())


def test_triton_backend_matches_reference_when_kernel_present():
    kernels = pytest.importorskip("pml_scale.kernels")
    if not hasattr(kernels, "fused_partial_label_loss"):
        pytest.skip("pml_scale.kernels.fused_partial_label_loss not written yet")
    logits, states, pseudo, ids = random_batch(8, 40, seed=4, dtype=torch.float32)
    for extra in (dict(), dict(p_rule="printed", d_schedule="printed"), dict(use_p=False, use_q=False)):
        kw = dict(epoch=1, total_epochs=5, seed=7, q=0.5, **extra)
        x_ref, x_tri = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        ref, ref_stats, ref_yhat = partial_label_loss_with_stats(x_ref, states, pseudo, ids, **kw)
        got, stats, yhat = partial_label_loss_with_stats(x_tri, states, pseudo, ids, backend="triton", **kw)
        assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6), extra
        assert torch.allclose(yhat.float(), ref_yhat, atol=1e-3), extra
        assert stats["p2_share"] == ref_stats["p2_share"] and math.isnan(stats["picked_share"]), extra
        ref.backward()
        got.backward()
        assert torch.allclose(x_tri.grad, x_ref.grad, rtol=1e-4, atol=1e-7), extra


# --------------------------------------------------------------------------- baselines by hand
# ŷ = [[.75, .25, .75], [.5, .9, .1]]; states [[1, 0, -1], [-1, 1, 0]] → AN targets [[1,0,0],[0,1,0]]
BL_LOGITS = [[ln(3), -ln(3), ln(3)], [0.0, ln(9), -ln(9)]]
BL_STATES = [[1, 0, -1], [-1, 1, 0]]
YH = [[0.75, 0.25, 0.75], [0.5, 0.9, 0.1]]
TGT = [[1, 0, 0], [0, 1, 0]]
CELLS = [(i, j) for i in range(2) for j in range(3)]


def run(name, epoch=0, total_epochs=5, estimates=None, k=None, dtype=D64, **options):
    x = t64(BL_LOGITS).to(dtype).requires_grad_(True)
    inp = LossInputs(x, s8(BL_STATES), torch.tensor([0, 1]), epoch, total_epochs, estimates=estimates,
                     expected_positives=k)
    out = build_loss(name, **options)(inp)
    return out, x


def bce_cell(t, y):
    return -(t * ln(y) + (1 - t) * ln(1 - y))


def test_bce_an_bce_ls_wan_ignore_by_hand():
    want_bce = (ln(1 / 0.75) * 2 + ln(1 / 0.25) + ln(2) + ln(1 / 0.9) * 2) / 6
    for name in ("bce", "an"):
        assert run(name)[0].loss.item() == pytest.approx(want_bce, rel=1e-12)
    want_ls = sum(bce_cell(0.9 if TGT[i][j] else 0.1, YH[i][j]) for i, j in CELLS) / 6
    assert run("bce_ls")[0].loss.item() == pytest.approx(want_ls, rel=1e-12)
    want_wan = (-ln(0.75) - ln(0.9) + (-ln(0.75) - ln(0.25) - ln(0.5) - ln(0.9)) / 2) / 6
    assert run("wan")[0].loss.item() == pytest.approx(want_wan, rel=1e-12)
    want_ignore = (-ln(0.75) - ln(0.75) - ln(0.9) - ln(0.9)) / 4  # observed cells only
    assert run("ignore")[0].loss.item() == pytest.approx(want_ignore, rel=1e-12)
    out = build_loss("ignore")(LossInputs(torch.zeros(1, 2, requires_grad=True), s8([[-1, -1]]),
                                          torch.tensor([0]), 0, 1))
    assert out.loss.item() == 0.0 and out.loss.requires_grad


def test_focal_and_asl_by_hand():
    want_focal = sum(-(1 - YH[i][j]) ** 2 * ln(YH[i][j]) if TGT[i][j] else -YH[i][j] ** 2 * ln(1 - YH[i][j])
                     for i, j in CELLS)
    assert run("focal")[0].loss.item() == pytest.approx(want_focal, rel=1e-12)
    want_asl = 0.0
    for i, j in CELLS:
        y = YH[i][j]
        if TGT[i][j]:
            want_asl += -ln(y)
        else:
            ym = max(y - 0.05, 0.0)
            want_asl += -ym ** 4 * ln(1 - ym)
    assert run("asl")[0].loss.item() == pytest.approx(want_asl, rel=1e-12)
    # official default: no gradient through the focusing weight; negative cell (1,2), ŷ=.1
    out, x = run("asl")
    out.loss.backward()
    ym = 0.05
    assert x.grad[1, 2].item() == pytest.approx(ym ** 4 * 0.1 * 0.9 / (1 - ym), rel=1e-10)
    out, x = run("focal", detach_weights=False)
    out.loss.backward()
    y = 0.1  # d/ds[−y² log(1−y)] = −2y²(1−y) log(1−y) + y³
    assert x.grad[1, 2].item() == pytest.approx(-2 * y * y * (1 - y) * ln(1 - y) + y ** 3, rel=1e-10)


def test_epr_by_hand():
    k = 1.0
    reg = ((1.75 + 1.5) / 2 - k) ** 2 / 9
    out, _ = run("epr", k=k)
    assert out.loss.item() == pytest.approx((-ln(0.75) - ln(0.9)) / 6 + reg, rel=1e-12)
    out, _ = run("epr", expected_positives=k, use_negatives=True)
    want = (-ln(0.75) - ln(0.9) - ln(0.75) - ln(0.9)) / 6 + reg
    assert out.loss.item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="expected_positives"):
        run("epr")


def test_role_by_hand_and_detached_targets():
    g = torch.zeros(2, 3, dtype=D64, requires_grad=True)  # estimator ŷ_g = .5 everywhere
    k = 1.0
    out, x = run("role", estimates=g, k=k)
    pos_f = -ln(0.75) - ln(0.9)
    pos_g = -2 * ln(0.5)
    cross_f = sum(bce_cell(0.5, YH[i][j]) for i, j in CELLS)
    cross_g = 6 * ln(2)  # −[ŷ log .5 + (1−ŷ) log .5]
    reg_f, reg_g = ((1.75 + 1.5) / 2 - k) ** 2 / 9, (1.5 - k) ** 2 / 9
    want = (0.5 * (pos_f + pos_g) + 0.5 * (cross_f + cross_g)) / 6 + 0.5 * (reg_f + reg_g)
    assert out.loss.item() == pytest.approx(want, rel=1e-12)
    out.loss.backward()
    # estimator gradient: its own positive term, its cross term towards detached ŷ_f, its EPR
    for i, j in CELLS:
        pos_term = -0.5 * (1 - 0.5) if BL_STATES[i][j] == 1 else 0.0
        want_g = pos_term / 6 + 0.5 * (0.5 - YH[i][j]) / 6 + 0.5 * 2 * (1.5 - k) / 9 * 0.5 * 0.25
        assert g.grad[i, j].item() == pytest.approx(want_g, rel=1e-10)
    with pytest.raises(ValueError, match="estimates"):
        run("role", k=1.0)


def test_hill_by_hand():
    pm0, pm1 = 3 / (3 + e), 9 / (9 + e)  # σ(s − 1) for s = ln 3, ln 9
    want = -(1 - pm0) ** 2 * ln(pm0) - (1 - pm1) ** 2 * ln(pm1)
    want += sum((1.5 - y) * y * y for y in (0.25, 0.75, 0.5, 0.1))
    assert run("hill")[0].loss.item() == pytest.approx(want, rel=1e-12)


def test_splc_by_hand():
    pm0, pm1 = 3 / (3 + e), 9 / (9 + e)
    pos = -(1 - pm0) ** 2 * ln(pm0) - (1 - pm1) ** 2 * ln(pm1)

    def neg(y):
        return -y * y * ln(1 - y)

    assert run("splc", epoch=0)[0].loss.item() == pytest.approx(pos + neg(.25) + neg(.75) + neg(.5) + neg(.1))
    # from epoch 1 the missing cell with ŷ = .75 > τ counts as a positive (no margin)
    want1 = pos + neg(.25) + neg(.5) + neg(.1) - (1 - 0.75) ** 2 * ln(0.75)
    assert run("splc", epoch=1)[0].loss.item() == pytest.approx(want1, rel=1e-12)
    # an observed negative is never corrected
    out = build_loss("splc")(LossInputs(t64([[ln(9)]]), s8([[0]]), torch.tensor([0]), 5, 9))
    assert out.loss.item() == pytest.approx(neg(0.9))


def test_large_loss_by_hand():
    cells = {(0, 0): -ln(0.75), (0, 1): -ln(0.75), (0, 2): -ln(0.25),
             (1, 0): -ln(0.5), (1, 1): -ln(0.9), (1, 2): -ln(0.9)}
    total = sum(cells.values())
    for name in ("ll_r", "ll_ct"):
        assert run(name, epoch=0, delta=0.1)[0].loss.item() == pytest.approx(total / 6)  # k = 0: AN
    # epoch 1: k = ceil(0.1·1·6) = 1 → the largest missing loss, cell (0, 2)
    out, _ = run("ll_r", epoch=1, delta=0.1)
    assert out.loss.item() == pytest.approx((total - cells[0, 2]) / 6) and out.stats["k"] == 1
    assert run("ll_ct", epoch=1, delta=0.1)[0].loss.item() == pytest.approx((total - cells[0, 2] - ln(0.75)) / 6)
    # epoch 2: k = 2 → both missing cells
    want = (total - cells[0, 2] - cells[1, 0] - ln(0.75) - ln(0.5)) / 6
    assert run("ll_ct", epoch=2, delta=0.1)[0].loss.item() == pytest.approx(want)
    # k caps at the number of missing entries
    assert run("ll_r", epoch=9, delta=0.1)[0].loss.item() == pytest.approx((total - cells[0, 2] - cells[1, 0]) / 6)
    assert bl.large_loss_k(1, 4096, 600) == 4916  # ceil(0.002 · 2,457,600) with the default Δ
    assert bl.large_loss_k(1, 50, 10) == 1  # 0.002·500 = 1 exactly, no float round-up to 2


# --------------------------------------------------------------------------- registry and errors
def test_registry_names_and_every_loss_backprops():
    assert loss_names() == ["paper", "bce", "bce_ls", "focal", "asl", "an", "wan", "epr", "role", "ignore",
                            "hill", "splc", "ll_r", "ll_ct"]
    logits, states, pseudo, ids = random_batch(6, 10, seed=5, dtype=torch.float32)
    for name in loss_names():
        x = logits.clone().requires_grad_(True)
        g = torch.randn(6, 10, requires_grad=True)
        inp = LossInputs(x, states, ids, 2, 6, pseudo=pseudo, estimates=g, expected_positives=2.0)
        out = build_loss(name)(inp)
        out.loss.backward()
        assert out.loss.dim() == 0 and math.isfinite(out.loss.item()), name
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name
        assert out.yhat.shape == (6, 10) and not out.yhat.requires_grad, name
        assert torch.allclose(out.yhat.float(), torch.sigmoid(logits)), name
        assert all(isinstance(v, float) or (torch.is_tensor(v) and v.dim() == 0) for v in out.stats.values()), name


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown loss 'bce2'.*paper, bce"):
        build_loss("bce2")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gama'\].*gamma"):
        build_loss("paper", gama=0.1)
    with pytest.raises(ValueError, match="q must be in"):
        build_loss("paper", q=2.0)
    for name, opt, message in [("asl", dict(clip=-0.1), "clip"), ("focal", dict(gamma=-1), "gamma_pos"),
                               ("bce_ls", dict(eps=2), "eps"), ("splc", dict(tau=1.5), "tau"),
                               ("hill", dict(gamma="x"), "gamma"), ("ll_r", dict(delta=-1), "delta"),
                               ("epr", dict(expected_positives=-3), "expected_positives")]:
        with pytest.raises(ValueError, match=message):  # at build time, before any batch
            build_loss(name, **opt)
    assert loss_options("asl") == {"gamma_pos": 0.0, "gamma_neg": 4.0, "clip": 0.05, "detach_weights": True,
                                   "validate": True}
    x, st, ids = t64(BL_LOGITS), s8(BL_STATES), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="pseudo"):
        build_loss("paper")(LossInputs(x, st, ids, 0, 3))


@pytest.mark.parametrize("name", ["paper", "bce", "asl", "ll_r"])
def test_bad_inputs_name_the_argument(name):
    x, st, ids = t64(BL_LOGITS), s8(BL_STATES), torch.tensor([0, 1])
    pseudo = torch.full((2, 3), 0.5, dtype=D64)
    fn = build_loss(name)

    def call(logits=x, states=st, sample_ids=ids, pseudo=pseudo):
        return fn(LossInputs(logits, states, sample_ids, 1, 3, pseudo=pseudo))

    with pytest.raises(ValueError, match=r"states must hold only -1.*found 2 at \[1, 2\]"):
        call(states=s8([[1, 0, -1], [-1, 1, 2]]))
    with pytest.raises(TypeError, match="states must be a signed integer"):
        call(states=st.float())
    bad = x.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"logits contain 1 NaN/inf.*\[0, 1\]"):
        call(logits=bad)
    bad[0, 1] = float("inf")
    with pytest.raises(ValueError, match="logits"):
        call(logits=bad)
    with pytest.raises(ValueError, match="states must have the shape"):
        call(states=st[:, :2])
    with pytest.raises(ValueError, match="sample_ids must have shape"):
        call(sample_ids=torch.tensor([0, 1, 2]))
    if name == "paper":
        with pytest.raises(ValueError, match="pseudo must lie in"):
            call(pseudo=pseudo + 1)


# ------------------------------------------------------------------ ours+ negative-side options
@pytest.mark.parametrize("gamma,margin", [(2.0, 0.0), (0.5, 0.0), (0.0, 0.05), (4.0, 0.1), (1.0, 0.3)])
@pytest.mark.parametrize("weights", ["alpha_beta", "capped"])
def test_negative_focusing_closed_form_gradient_equals_autograd(gamma, margin, weights):
    from pml_scale.losses.partial import partial_label_loss, partial_label_loss_grad

    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 17, generator=g, dtype=torch.float64) * 4
    x[0, :4] = torch.tensor([-60.0, -30.0, 30.0, 60.0], dtype=torch.float64)  # saturated logits stay finite
    states = torch.randint(-1, 2, (9, 17), generator=g).to(torch.int8)
    pseudo = torch.rand(9, 17, generator=g, dtype=torch.float64)
    ids = torch.arange(9)
    kw = dict(epoch=1, total_epochs=4, seed=3, neg_gamma=gamma, neg_margin=margin, pseudo_weights=weights)
    xx = x.clone().requires_grad_()
    partial_label_loss(xx, states, pseudo, ids, **kw).backward()
    closed = partial_label_loss_grad(x, states, pseudo, ids, **kw)
    assert torch.isfinite(closed).all()
    torch.testing.assert_close(closed, xx.grad, rtol=1e-9, atol=1e-15)


def test_negative_term_by_hand():
    from pml_scale.losses.partial import negative_term

    x = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)  # ŷ = 0.5, 0.75
    assert torch.equal(negative_term(x), torch.nn.functional.logsigmoid(-x))  # the paper's term, bit for bit
    want_focus = torch.tensor([0.5 ** 2 * math.log(0.5), 0.75 ** 2 * math.log(0.25)], dtype=torch.float64)
    torch.testing.assert_close(negative_term(x, 2.0, 0.0), want_focus)
    # margin 0.6: ŷ = 0.5 is below it (no loss), ŷ = 0.75 becomes u = 0.15
    torch.testing.assert_close(negative_term(x, 0.0, 0.6), torch.tensor([0.0, math.log(0.85)], dtype=torch.float64))
    torch.testing.assert_close(negative_term(x, 1.0, 0.6), torch.tensor([0.0, 0.15 * math.log(0.85)], dtype=torch.float64))

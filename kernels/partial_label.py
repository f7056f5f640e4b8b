"""Fused forward + gradient kernels for the paper's partial-label loss (docs/design.md §1, §2).

One pass reads logits, label states and pseudo labels, draws the q-picks of missing labels
in-kernel (the counter-based hash of ``pml_scale.losses.picks``, bit for bit, in uint32
arithmetic) and writes, per row, the loss L_i and the penalty p_i, per element the gradient
dL/ds (already divided by the batch divisor, kept for backward) and ŷ = σ(s) in fp16, and the
batch mean of L_i. The mean is reduced in the kernel: every program takes a ticket (an atomic
counter in a per-stream workspace that the last program resets) and the last one sums the
rows in a fixed order, so the value does not depend on scheduling.

Why two paths: p_i needs the row max and the row normalisers need N_e and |S|, all row-wide,
before any element's gradient can be written.
- ``row`` (L <= 16384): a program holds whole rows in registers as one or two power-of-two
  tiles (W1 + W2 >= L: 8192 + 2048 for 9605 labels, 512 + 128 for 600), so every input byte is
  read once. BLOCK_B > 1 rows: ``_row_kernel`` (2-D tiles); one row: ``_row1_kernel`` (1-D).
- ``split`` (any L): one program per (row, column tile); a stats kernel writes per-tile max and
  counts, the fused kernel combines its row's partials and computes its tile, and a per-row
  ticket lets the row's last tile sum the row loss. Logits and states are read twice (12
  instead of 9 bytes per bf16 element) but the GPU is filled at any B.
On a GPU the first call for a (B bucket, L, dtypes) times a few candidates of both paths and
keeps the fastest (``candidate_configs``, ``tuned_configs``); every config computes the same
per-element gradient bits, only the loss's summation order differs.

The element loop costs one exp2, one lg2 and one reciprocal (MUFU forms on the GPU, exact under
the interpreter), no division (the row's reciprocals and the gradient scale are folded into
four per-row weights), and one pick hash: fmix32 with its first xor-shift split into a per-row
and a per-column half (xor and logical shifts commute).

Addressing: contiguous inputs use flat offsets. When rows are not 16-aligned (L % 16 != 0) but
the tensor ends on a 16-element boundary (B·L % 16 == 0), the 1-D kernels read aligned windows
of whole vectors (``_tile``, WINDOW) so loads vectorise for any L. Strided inputs get a
stride-addressed variant (correct, slower). Outputs are contiguous. Offsets are int64.

Host path: per-call work is kept to what changes per call (a cached ``_Plan`` holds the rest),
and after the first launch of a specialisation the cached CompiledKernel's launcher is called
directly (``_run_kernel``), skipping Triton's per-call argument binding.

The host-side key and threshold live in ``pick_hash`` (no triton import), shared with the
PyTorch reference in ``pml_scale.losses.picks``. Autograd lives in ``ops``.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .pick_hash import GOLDEN, MASK32, PICK_BITS, launch_key, pick_threshold  # noqa: F401 (re-exported)


P_RULES = ("text", "printed")
PSEUDO_WEIGHTS = ("alpha_beta", "balanced", "capped")  # PSEUDO_MODE = index
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PSEUDO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int64, torch.int32)


def interpreter_active() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


def _int32_bits(x: int) -> int:
    """uint32 -> the int32 with the same bits (Triton would pass ints >= 2**31 as int64)."""
    return x - (1 << 32) if x >= (1 << 31) else x


# ---------------------------------------------------------------- Triton device functions


@triton.jit
def _fmix32(h):
    # h is uint32; literals >= 2**31 are uint32 too, so * wraps modulo 2**32 and >> is logical.
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return h


@triton.jit
def _row_mix(ids, key_bits):
    """Per-row half of the element hash: R = row ^ (row >> 16), row = fmix32(fmix32(key^lo)^hi).

    fmix32(row ^ col) starts with x ^= x >> 16; for x = row ^ col that is R ^ C with
    C = col ^ (col >> 16), so the row half is done once per row and the column half once
    per column (see ``_picked``).
    """
    ids = ids.to(tl.int64)
    lo = ids.to(tl.uint32)  # truncation = ids & 0xFFFFFFFF
    hi = (ids >> 32).to(tl.uint32)
    key = key_bits.to(tl.uint32, bitcast=True)
    r = _fmix32(_fmix32(key ^ lo) ^ hi)
    return r ^ (r >> 16)


@triton.jit
def _col_mix(cols):
    c = (cols + 1).to(tl.uint32) * 0x9E3779B9
    return c ^ (c >> 16)


@triton.jit
def _picked(rmix, cmix, thr):
    """The rest of fmix32(row ^ col) and the 24-bit threshold test: exactly ``pick_mask``.

    rmix and cmix come broadcast-ready (a [BB, 1] and a [1, W] tensor, or a scalar and a [W]).
    """
    h = (rmix ^ cmix) * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return (h >> 8) < thr  # thr is uint32 (see _thr_u32): an unsigned 32-bit compare


@triton.jit
def _thr_u32(thr):
    return thr.to(tl.uint32)


@triton.jit
def _offs(r, c, L, s_b, s_l, CONTIG: tl.constexpr):
    """Element offsets of rows r (int64) and columns c (int32), broadcast-ready."""
    if CONTIG:
        return r * L + c
    else:
        return r * s_b + c.to(tl.int64) * s_l


@triton.jit
def _counts(pos, neg, sel):
    """N_e and |S| of a slot packed in one int32 (N_e + |S|·2^16): one reduction for both.
    Exact while a reduced tile holds fewer than 2^15 slots of a row (tiles are <= 16384)."""
    return tl.where(pos | neg, 1, 0) + tl.where(sel, 65536, 0)


@triton.jit
def _load_coef(coef_ptr, s_coef, alpha, beta, COEF_PTR: tl.constexpr, PSEUDO_MODE: tl.constexpr):
    """(α, β, α_S, β_S): the observed-term and picked-pseudo-term weights. PSEUDO_MODE (index in
    PSEUDO_WEIGHTS): 0 the paper (α, β); 1 "balanced", both (α+β)/2; 2 "capped" (ours+), the
    paper's when α ≤ β, balanced when α > β (pseudo terms never pull missing labels up)."""
    if COEF_PTR:  # α, β from a device tensor: no host sync in the caller
        a = tl.load(coef_ptr).to(tl.float32)
        b = tl.load(coef_ptr + s_coef).to(tl.float32)
    else:
        a = alpha
        b = beta
    if PSEUDO_MODE == 1:
        sa = 0.5 * (a + b)
        sb = sa
    elif PSEUDO_MODE == 2:
        mid = 0.5 * (a + b)
        sa = tl.where(a > b, mid, a)
        sb = tl.where(a > b, mid, b)
    else:
        sa = a
        sb = b
    return a, b, sa, sb


@triton.jit
def _row_coefs(m, ne, ns, a, b, sa, sb, d, inv_n, p_threshold, P_PRINTED: tl.constexpr):
    """Per-row p, the four element weights pre-multiplied by the gradient scale g = -p/num_rows,
    and p·ln2/g = -ln2·num_rows, which turns a row's sum of those terms back into L_i.

    Divisions happen here, once per row; the element loop only multiplies.
    """
    ymax = 1.0 / (1.0 + tl.exp(-tl.maximum(m, -88.0)))  # σ is monotone: σ(max s) = max σ(s)
    if P_PRINTED:
        big = ymax >= p_threshold
    else:
        big = ymax < p_threshold
    p = tl.where(big, 2.0, 1.0)
    nef = ne.to(tl.float32)
    nsf = ns.to(tl.float32)
    g = -p * inv_n
    gi = tl.where(nef > 0.0, g / tl.maximum(nef, 1.0), 0.0)
    gs = tl.where(nsf > 0.0, g * d / tl.maximum(nsf, 1.0), 0.0)
    return p, a * gi, b * gi, sa * gs, sb * gs, -0.6931471805599453 / inv_n


@triton.jit
def _elem(s, pos, neg, sel, yt, a_ne, b_ne, a_s, b_s, neg_gamma, neg_margin, FAST: tl.constexpr,
          NEG_FOCUS: tl.constexpr):
    """Per element: the scaled loss term g·t/ln2, ŷ, and the gradient g·(w⁺(1-ŷ) - w⁻ŷ).

    The weights come pre-multiplied by the row's gradient scale g (``_row_coefs``) and
    broadcast-ready ([BB, 1] or scalars). One exp, one log, one reciprocal, all base 2:
    x = s·log2(e), t = 2^-|x|, u = 1 + t, r = 1/u give σ(s) and 1-σ(s) without cancellation
    (r and t·r, swapped by the sign of s) and log2(1+e^-|s|) = log2 u for both softplus terms
    (softplus(∓s)/ln2 = max(∓x, 0) + log2 u). FAST (GPU) uses the MUFU forms (ex2, lg2, rcp
    approx, ~2 ulp); the interpreter the exact ones.

    NEG_FOCUS (constexpr; False = the paper, the default specialisation): the negative-side terms
    (observed negatives and the (1−ỹ) part of the picks, weight w⁻) use the ours+ focusing γ⁻ and
    margin m⁻ (``neg_gamma``, ``neg_margin``, runtime scalars, unused when False): the gradient
    becomes g·(w⁺(1-ŷ) + w⁻·dN/ds), see ``_neg_focus`` (two lg2, one ex2, two rcp more).
    """
    x = s * 1.4426950408889634
    if FAST:
        t = tl.exp2(-tl.abs(x))
        u = 1.0 + t
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                      is_pure=True, pack=1)
        lp = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                       is_pure=True, pack=1)
    else:
        t = tl.exp2(-tl.abs(x))
        u = 1.0 + t
        r = 1.0 / u
        lp = tl.log2(u)
    tr = t * r
    nonneg = s >= 0.0
    y = tl.where(nonneg, r, tr)
    omy = tl.where(nonneg, tr, r)
    ys = tl.where(sel, yt, 0.0)
    w_pos = tl.where(pos, a_ne, a_s * ys)
    w_neg = tl.where(neg, b_ne, tl.where(sel, b_s - b_s * ys, 0.0))
    if NEG_FOCUS:  # ours+: w⁻ weighs −N/ln2 and dN/ds of ``_neg_focus`` instead of softplus(s)/ln2 and −ŷ
        n, dn = _neg_focus(x, u, lp, y, omy, nonneg, neg_gamma, neg_margin, FAST)
        term = w_pos * (lp + tl.maximum(-x, 0.0)) + w_neg * n
        grad = w_pos * omy + w_neg * dn
    else:  # the paper's terms (the default; unchanged code, so unchanged bits and SASS)
        # softplus(∓s)/ln2 = max(∓x, 0) + log2 u: the max term is |x| on one side only, so
        # w⁺·softplus(-s) + w⁻·softplus(s) = (w⁺ + w⁻)·log2 u + (x >= 0 ? w⁻ : w⁺)·|x| (no cancellation)
        term = (w_pos + w_neg) * lp + tl.where(nonneg, w_neg, w_pos) * tl.abs(x)
        grad = w_pos * omy - w_neg * y
    return term, y, grad


@triton.jit
def _lg2(v, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(v)


@triton.jit
def _rcp(v, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / v


@triton.jit
def _neg_focus(x, u1, lp, y, omy, nonneg, gamma, margin, FAST: tl.constexpr):
    """The ours+ negative-side term (``neg_gamma`` γ >= 0, ``neg_margin`` 0 <= m < 1, runtime scalars):
    N = v^γ·ln(1−v) with v = max(ŷ − m, 0) (the u of ``pml_scale.losses.partial.negative_term``)
    replaces the paper's ln(1−ŷ) (ASL's focusing and probability margin). Returns (n, dn):
    n = −N/ln2 >= 0 (the loss term in the units of ``_elem``, where the paper's is softplus(s)/ln2)
    and dn = dN/ds = v'·v^γ·[γ·f − 1/(1−v)], f = ln(1−v)/v, v' = ŷ(1−ŷ) where ŷ > m, else 0
    (for γ = m = 0, dn = −ŷ; that case never gets here, it is the plain specialisation).

    u1 = 1 + e^-|s| and lp = log2(u1) come from ``_elem`` (ŷ = 1/u1 or e^-|s|/u1, no cancellation).
    Numerics, fp32 (FAST: MUFU lg2/ex2/rcp approximations; exact forms under the interpreter):
    - 1 − v: for m > 0 it is w = min(σ(−s) + m, 1), never 1 − v (cancellation near ŷ = 1); for
      m = 0 the log-sigmoid form ln(1−ŷ) = −softplus(s) keeps it finite for saturated logits.
    - f without dividing a rounded log by a tiny v: m > 0: ln w/(1−w) (1 − w is exact, the v that w
      stands for); m = 0, s < 0: ŷ = t/(1+t), so f = −(1+t)·ln(1+t)/t = −u1·ln u1/(u1 − 1); m = 0,
      s >= 0: ŷ >= 1/2, f = ln(1−ŷ)/ŷ as is; f → −1 where the denominator rounds to 0 (v → 0).
    - v^γ = 2^(γ·log2 v), taken at v = 1 where ŷ <= m (there the log term and v' are 0 anyway), so
      neither 0^γ nor v^(γ−1) at v = 0 (∞·0) is ever evaluated; dn is 0 there; v is floored at the
      smallest normal float (a subnormal v flushed to 0 would give 0·∞ for γ = 0). v'/(1−v) is ŷ for
      m = 0 (no 0/0 when 1 − ŷ underflows) and ŷ(1−ŷ)/w for m > 0 (w >= m).
    No division by 0 and no inf·0 is evaluated anywhere, even in a discarded ``where`` branch.
    """
    LN2: tl.constexpr = 0.6931471805599453
    on = margin > 0.0
    active = y > margin
    TINY: tl.constexpr = 1.1754943508222875e-38  # smallest normal fp32: lg2 stays finite under FTZ
    v = tl.maximum(y - margin, 0.0)
    # 1 − v for m > 0 (unused for m = 0); >= m, floored for a margin too small for fp32
    w = tl.where(on, tl.maximum(tl.minimum(omy + margin, 1.0), TINY), 1.0)
    l2 = tl.where(on, _lg2(w, FAST), -(tl.maximum(x, 0.0) + lp))  # log2(1 − v)
    l2 = tl.where(active, l2, 0.0)
    pw = tl.exp2(gamma * _lg2(tl.where(active, tl.maximum(v, TINY), 1.0), FAST))  # v^γ (1 where inactive)
    den = tl.where(on, 1.0 - w, tl.where(nonneg, y, u1 - 1.0))
    num = tl.where(on | nonneg, l2, -u1 * lp)
    ok = den > 0.0
    f = tl.where(ok, num * LN2 * _rcp(tl.where(ok, den, 1.0), FAST), -1.0)  # no 1/0 even where unused
    du = y * omy
    q = tl.where(on, du * _rcp(w, FAST), y)  # v'/(1 − v)
    dn = tl.where(active, pw * (gamma * du * f - q), 0.0)
    return -pw * l2, dn


@triton.jit
def _store_out(grad_ptr, yhat_ptr, picks_ptr, off, mask, y, grad, rmix, cmix, thr,
               STORE_GRAD: tl.constexpr, STORE_PICKS: tl.constexpr):
    tl.store(yhat_ptr + off, y.to(tl.float16), mask=mask)
    if STORE_GRAD:
        tl.store(grad_ptr + off, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    if STORE_PICKS:  # test hook: the raw pick bits, before intersecting with missing
        tl.store(picks_ptr + off, _picked(rmix, cmix, thr).to(tl.int8), mask=mask)


@triton.jit
def _finish_mean(out_ptr, cnt_ptr, B, n_tickets, inv_n):
    """Ticket reduction: the last program to arrive sums row_loss[0:B] in a fixed order.

    Each program's row_loss stores happen before its acq_rel increment; the winner reads
    them through L2 (.cg) and resets the counter for the next launch on this stream.
    """
    tl.debug_barrier()
    t = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if t == n_tickets - 1:
        tl.debug_barrier()
        acc = tl.zeros([1024], tl.float32)
        for i in range(0, B, 1024):
            o = i + tl.arange(0, 1024)
            acc += tl.load(out_ptr + o, mask=o < B, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + 2 * B, tl.sum(acc, axis=0) * inv_n)
        tl.store(cnt_ptr, 0)


@triton.jit
def _tile(logits_ptr, states_ptr, pseudo_ptr, r, ok, f0, c0, j, lo, hi, BL, L,
          s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, rmix, thr, CONTIG: tl.constexpr, WINDOW: tl.constexpr):
    """Loads of one tile: slot j (broadcast-ready) holds flat element f0 + j, column c0 + j.

    The tile owns the columns [lo, hi) of row(s) r (hi <= L). In WINDOW mode f0 is a multiple of
    16 and the loads are masked only by the end of the tensor (BL, a multiple of 16), so they
    vectorise for any L; the slots of neighbouring rows are then neutralised (s = 0, state 2).
    ỹ is loaded under the same mask (a per-element mask would split vector loads) and only
    used where picked and missing. Returns s (fp32), the owned positive / negative / picked
    missing slots, ỹ (fp32), own, the output offsets and the columns.
    """
    col = c0 + j
    own = ok & ((col - lo).to(tl.uint32) < tl.cast(hi - lo, tl.uint32))  # lo <= col < hi, one compare
    if CONTIG:
        flat = f0 + j
        if WINDOW:
            ld = ok & (flat < BL)
        else:
            ld = own
        s = tl.load(logits_ptr + flat, mask=ld, other=0.0).to(tl.float32)
        st = tl.load(states_ptr + flat, mask=ld, other=2)
        yt = tl.load(pseudo_ptr + flat, mask=ld, other=0.0).to(tl.float32)
        if WINDOW:  # a neighbour's slot: no state, and no inf/nan logit in this row's sums
            s = tl.where(own, s, 0.0)
            st_ok = own
        else:
            st_ok = True  # st = 2 (other) outside own
        out = flat
    else:
        c64 = col.to(tl.int64)
        s = tl.load(logits_ptr + r * s_lb + c64 * s_ll, mask=own, other=0.0).to(tl.float32)
        st = tl.load(states_ptr + r * s_sb + c64 * s_sl, mask=own, other=2)
        yt = tl.load(pseudo_ptr + r * s_pb + c64 * s_pl, mask=own, other=0.0).to(tl.float32)
        out = r * L + col
        st_ok = True
    pos = (st == 1) & st_ok
    neg = (st == 0) & st_ok
    sel = (st == -1) & st_ok & _picked(rmix, _col_mix(col), thr)
    return s, pos, neg, sel, yt, own, out, col


@triton.jit
def _window(base, WINDOW: tl.constexpr):
    """Start of the aligned window holding flat element ``base`` (int64)."""
    if WINDOW:
        return tl.multiple_of((base // 16) * 16, 16)
    else:
        return base


@triton.jit(do_not_specialize=["key_bits", "thr"])
def _row_kernel(
    logits_ptr, states_ptr, pseudo_ptr, ids_ptr, coef_ptr,
    grad_ptr, yhat_ptr, out_ptr, picks_ptr, cnt_ptr,
    B, L, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, s_coef,
    alpha, beta, d, inv_n, p_threshold, key_bits, thr, neg_gamma, neg_margin,
    CONTIG: tl.constexpr, COEF_PTR: tl.constexpr, PSEUDO_MODE: tl.constexpr, P_PRINTED: tl.constexpr,
    NEG_FOCUS: tl.constexpr, STORE_GRAD: tl.constexpr, STORE_PICKS: tl.constexpr, FAST: tl.constexpr,
    BLOCK_B: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
):
    """BLOCK_B whole rows per program, held as a W1 tile and (if W2 > 0) a W2 tile, W1 + W2 >= L.

    Rows are addressed plainly, not through aligned windows: a window's loads vectorise but its
    stores cannot (row boundaries fall inside vectors), and in a 2-D tile the two layouts make
    Triton recompute the element math in the store layout (twice the MUFU work on sm_90).
    """
    thr = _thr_u32(thr)
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    r2 = rows64[:, None]
    ok2 = row_ok[:, None]
    f02 = r2 * L
    rmix2 = _row_mix(tl.load(ids_ptr + rows64 * s_id, mask=row_ok, other=0), key_bits)[:, None]

    j1 = tl.arange(0, W1)[None, :]
    s1, pos1, neg1, sel1, yt1, own1, out1, col1 = _tile(logits_ptr, states_ptr, pseudo_ptr, r2, ok2, f02, 0, j1, 0, L,
                                                 0, L, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, rmix2, thr,
                                                 CONTIG, False)
    m = tl.max(tl.where(own1, s1, float("-inf")), axis=1)
    cnt = tl.sum(_counts(pos1, neg1, sel1), axis=1)
    if W2 > 0:
        j2 = W1 + tl.arange(0, W2)[None, :]
        s2, pos2, neg2, sel2, yt2, own2, out2, col2 = _tile(logits_ptr, states_ptr, pseudo_ptr, r2, ok2, f02, 0, j2, 0,
                                                     L, 0, L, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, rmix2, thr,
                                                     CONTIG, False)
        m = tl.maximum(m, tl.max(tl.where(own2, s2, float("-inf")), axis=1))
        cnt += tl.sum(_counts(pos2, neg2, sel2), axis=1)

    a, b, sa, sb = _load_coef(coef_ptr, s_coef, alpha, beta, COEF_PTR, PSEUDO_MODE)
    p, a_ne, b_ne, a_s, b_s, to_loss = _row_coefs(m, cnt & 0xFFFF, cnt >> 16, a, b, sa, sb, d, inv_n, p_threshold,
                                                  P_PRINTED)
    a_ne = a_ne[:, None]
    b_ne = b_ne[:, None]
    a_s = a_s[:, None]
    b_s = b_s[:, None]
    term, y, grad = _elem(s1, pos1, neg1, sel1, yt1, a_ne, b_ne, a_s, b_s, neg_gamma, neg_margin,
                          FAST, NEG_FOCUS)
    _store_out(grad_ptr, yhat_ptr, picks_ptr, out1, own1, y, grad, rmix2, _col_mix(col1), thr,
               STORE_GRAD, STORE_PICKS)
    acc = tl.sum(term, axis=1)  # slots not owned have no state and s = 0: zero weights, zero term
    if W2 > 0:
        term, y, grad = _elem(s2, pos2, neg2, sel2, yt2, a_ne, b_ne, a_s, b_s, neg_gamma, neg_margin,
                              FAST, NEG_FOCUS)
        _store_out(grad_ptr, yhat_ptr, picks_ptr, out2, own2, y, grad, rmix2, _col_mix(col2), thr,
                   STORE_GRAD, STORE_PICKS)
        acc += tl.sum(term, axis=1)
    tl.store(out_ptr + rows64, acc * to_loss, mask=row_ok)
    tl.store(out_ptr + B + rows64, p, mask=row_ok)
    _finish_mean(out_ptr, cnt_ptr, B, tl.num_programs(0), inv_n)


@triton.jit(do_not_specialize=["key_bits", "thr"])
def _row1_kernel(
    logits_ptr, states_ptr, pseudo_ptr, ids_ptr, coef_ptr,
    grad_ptr, yhat_ptr, out_ptr, picks_ptr, cnt_ptr,
    B, L, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, s_coef,
    alpha, beta, d, inv_n, p_threshold, key_bits, thr, neg_gamma, neg_margin,
    CONTIG: tl.constexpr, WINDOW: tl.constexpr, COEF_PTR: tl.constexpr, PSEUDO_MODE: tl.constexpr, P_PRINTED: tl.constexpr,
    NEG_FOCUS: tl.constexpr, STORE_GRAD: tl.constexpr, STORE_PICKS: tl.constexpr, FAST: tl.constexpr,
    W1: tl.constexpr, W2: tl.constexpr,
):
    """One whole row per program as 1-D tiles (W1 + W2 >= L, + 15 in WINDOW mode).

    The 1-D form of ``_row_kernel`` for long rows: the row's scalars stay scalars, and in
    WINDOW mode the loads vectorise without the 2-D layout conflict described there.
    """
    thr = _thr_u32(thr)
    r = tl.program_id(0).to(tl.int64)
    rmix = _row_mix(tl.load(ids_ptr + r * s_id), key_bits)
    BL = (tl.cast(B, tl.int64) * L // 16) * 16  # == B*L in WINDOW mode (a host precondition)
    base = r * L
    f0 = _window(base, WINDOW)
    c0 = (f0 - base).to(tl.int32)
    ok = r < B
    s1, pos1, neg1, sel1, yt1, own1, out1, col1 = _tile(logits_ptr, states_ptr, pseudo_ptr, r, ok, f0, c0,
                                                        tl.arange(0, W1), 0, L, BL, L, s_lb, s_ll, s_sb, s_sl,
                                                        s_pb, s_pl, rmix, thr, CONTIG, WINDOW)
    m = tl.max(tl.where(own1, s1, float("-inf")), axis=0)
    cnt = tl.sum(_counts(pos1, neg1, sel1), axis=0)
    if W2 > 0:
        s2, pos2, neg2, sel2, yt2, own2, out2, col2 = _tile(logits_ptr, states_ptr, pseudo_ptr, r, ok, f0, c0,
                                                            W1 + tl.arange(0, W2), 0, L, BL, L, s_lb, s_ll, s_sb,
                                                            s_sl, s_pb, s_pl, rmix, thr, CONTIG, WINDOW)
        m = tl.maximum(m, tl.max(tl.where(own2, s2, float("-inf")), axis=0))
        cnt += tl.sum(_counts(pos2, neg2, sel2), axis=0)
    a, b, sa, sb = _load_coef(coef_ptr, s_coef, alpha, beta, COEF_PTR, PSEUDO_MODE)
    p, a_ne, b_ne, a_s, b_s, to_loss = _row_coefs(m, cnt & 0xFFFF, cnt >> 16, a, b, sa, sb, d, inv_n, p_threshold,
                                                  P_PRINTED)
    term, y, grad = _elem(s1, pos1, neg1, sel1, yt1, a_ne, b_ne, a_s, b_s, neg_gamma, neg_margin,
                          FAST, NEG_FOCUS)
    _store_out(grad_ptr, yhat_ptr, picks_ptr, out1, own1, y, grad, rmix, _col_mix(col1), thr,
               STORE_GRAD, STORE_PICKS)
    acc = tl.sum(term, axis=0)
    if W2 > 0:
        term, y, grad = _elem(s2, pos2, neg2, sel2, yt2, a_ne, b_ne, a_s, b_s, neg_gamma, neg_margin,
                              FAST, NEG_FOCUS)
        _store_out(grad_ptr, yhat_ptr, picks_ptr, out2, own2, y, grad, rmix, _col_mix(col2), thr,
                   STORE_GRAD, STORE_PICKS)
        acc += tl.sum(term, axis=0)
    tl.store(out_ptr + r, acc * to_loss)
    tl.store(out_ptr + B + r, p)
    _finish_mean(out_ptr, cnt_ptr, B, tl.num_programs(0), inv_n)


@triton.jit
def _split_tile(logits_ptr, states_ptr, pseudo_ptr, r, k, B, L, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, rmix, thr,
                CONTIG: tl.constexpr, WINDOW: tl.constexpr, W: tl.constexpr):
    """Tile k of row r: it owns the columns [k·C, (k+1)·C) with C = W - 16 in WINDOW mode (the
    aligned window of W slots then covers them), C = W otherwise."""
    if WINDOW:
        C: tl.constexpr = W - 16
    else:
        C: tl.constexpr = W
    BL = (tl.cast(B, tl.int64) * L // 16) * 16
    base = r * L
    f0 = _window(base + k * C, WINDOW)
    lo = k * C
    return _tile(logits_ptr, states_ptr, pseudo_ptr, r, r < B, f0, (f0 - base).to(tl.int32), tl.arange(0, W),
                 lo, tl.minimum(lo + C, L), BL, L, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, rmix, thr, CONTIG, WINDOW)


@triton.jit(do_not_specialize=["key_bits", "thr"])
def _split_stats_kernel(
    logits_ptr, states_ptr, pseudo_ptr, ids_ptr, part_ptr,
    B, L, K, NK, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, key_bits, thr,
    CONTIG: tl.constexpr, WINDOW: tl.constexpr, W: tl.constexpr,
):
    """Pass 1 of the split path: max, N_e and |S| of one column tile of one row."""
    thr = _thr_u32(thr)
    r = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    rmix = _row_mix(tl.load(ids_ptr + r * s_id), key_bits)
    s, pos, neg, sel, yt, own, out, col = _split_tile(logits_ptr, states_ptr, pseudo_ptr, r, k, B, L, s_lb, s_ll,
                                                      s_sb, s_sl, s_pb, s_pl, rmix, thr, CONTIG, WINDOW, W)
    cnt = tl.sum(_counts(pos, neg, sel), axis=0)
    idx = r * K + k
    tl.store(part_ptr + idx, tl.max(tl.where(own, s, float("-inf")), axis=0))
    tl.store(part_ptr + NK + idx, (cnt & 0xFFFF).to(tl.float32))  # exact: counts < 2**24
    tl.store(part_ptr + 2 * NK + idx, (cnt >> 16).to(tl.float32))


@triton.jit(do_not_specialize=["key_bits", "thr"])
def _split_fused_kernel(
    logits_ptr, states_ptr, pseudo_ptr, ids_ptr, coef_ptr,
    grad_ptr, yhat_ptr, out_ptr, picks_ptr, cnt_ptr, part_ptr,
    B, L, K, NK, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, s_coef,
    alpha, beta, d, inv_n, p_threshold, key_bits, thr, neg_gamma, neg_margin,
    CONTIG: tl.constexpr, WINDOW: tl.constexpr, COEF_PTR: tl.constexpr, PSEUDO_MODE: tl.constexpr, P_PRINTED: tl.constexpr,
    NEG_FOCUS: tl.constexpr, STORE_GRAD: tl.constexpr, STORE_PICKS: tl.constexpr, FAST: tl.constexpr,
    W: tl.constexpr, KP: tl.constexpr,
):
    """Pass 2 of the split path: the row's stats from its K tile partials, then one tile."""
    thr = _thr_u32(thr)
    r = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    rmix = _row_mix(tl.load(ids_ptr + r * s_id), key_bits)
    s, pos, neg, sel, yt, own, out, col = _split_tile(logits_ptr, states_ptr, pseudo_ptr, r, k, B, L, s_lb, s_ll,
                                                      s_sb, s_sl, s_pb, s_pl, rmix, thr, CONTIG, WINDOW, W)
    kk = tl.arange(0, KP)
    pm = kk < K
    pidx = r * K + kk
    m = tl.max(tl.load(part_ptr + pidx, mask=pm, other=float("-inf")), axis=0)
    ne = tl.sum(tl.load(part_ptr + NK + pidx, mask=pm, other=0.0), axis=0)
    ns = tl.sum(tl.load(part_ptr + 2 * NK + pidx, mask=pm, other=0.0), axis=0)
    a, b, sa, sb = _load_coef(coef_ptr, s_coef, alpha, beta, COEF_PTR, PSEUDO_MODE)
    p, a_ne, b_ne, a_s, b_s, to_loss = _row_coefs(m, ne, ns, a, b, sa, sb, d, inv_n, p_threshold, P_PRINTED)
    term, y, grad = _elem(s, pos, neg, sel, yt, a_ne, b_ne, a_s, b_s, neg_gamma, neg_margin,
                          FAST, NEG_FOCUS)
    _store_out(grad_ptr, yhat_ptr, picks_ptr, out, own, y, grad, rmix, _col_mix(col), thr,
               STORE_GRAD, STORE_PICKS)
    tl.store(part_ptr + 3 * NK + r * K + k, tl.sum(term, axis=0) * to_loss)

    # The last tile of this row to finish sums the row's partials (fixed order) ...
    tl.debug_barrier()
    t = tl.atomic_add(cnt_ptr + 1 + r, 1, sem="acq_rel")
    if t == K - 1:
        tl.debug_barrier()
        parts = tl.load(part_ptr + 3 * NK + pidx, mask=pm, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + r, tl.sum(parts, axis=0))
        tl.store(out_ptr + B + r, p)
        tl.store(cnt_ptr + 1 + r, 0)
        # ... and the last row to finish takes the batch mean.
        _finish_mean(out_ptr, cnt_ptr, B, B, inv_n)


@triton.jit(do_not_specialize=["key_bits", "thr"])
def _picked_sums_kernel(
    states_ptr, pseudo_ptr, ids_ptr, out_ptr, cnt_ptr, part_ptr,
    B, L, NP, s_sb, s_sl, s_pb, s_pl, s_id, key_bits, thr,
    CONTIG: tl.constexpr, BLOCK_B: tl.constexpr, W: tl.constexpr,
):
    """Σ ỹ and the count over picked missing entries of one tile; the last program totals
    all tiles in a fixed order (fp64), so the result is deterministic."""
    thr = _thr_u32(thr)
    pid = tl.program_id(0)
    k = tl.program_id(1)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    r2 = rows64[:, None]
    rmix2 = _row_mix(tl.load(ids_ptr + rows64 * s_id, mask=row_ok, other=0), key_bits)[:, None]
    c = k * W + tl.arange(0, W)[None, :]
    mask = row_ok[:, None] & (c < L)
    st = tl.load(states_ptr + _offs(r2, c, L, s_sb, s_sl, CONTIG), mask=mask, other=2)
    sel = (st == -1) & _picked(rmix2, _col_mix(c), thr)
    yt = tl.load(pseudo_ptr + _offs(r2, c, L, s_pb, s_pl, CONTIG), mask=sel, other=0.0).to(tl.float32)
    idx = pid * tl.num_programs(1) + k
    tl.store(part_ptr + idx, tl.sum(tl.sum(yt, axis=1), axis=0))
    tl.store(part_ptr + NP + idx, tl.sum(tl.sum(sel.to(tl.int32), axis=1), axis=0).to(tl.float32))
    tl.debug_barrier()
    t = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if t == NP - 1:
        tl.debug_barrier()
        acc_y = tl.zeros([1024], tl.float64)
        acc_n = tl.zeros([1024], tl.float64)
        for i in range(0, NP, 1024):
            o = i + tl.arange(0, 1024)
            acc_y += tl.load(part_ptr + o, mask=o < NP, other=0.0, cache_modifier=".cg").to(tl.float64)
            acc_n += tl.load(part_ptr + NP + o, mask=o < NP, other=0.0, cache_modifier=".cg").to(tl.float64)
        tl.store(out_ptr, tl.sum(acc_y, axis=0).to(tl.float32))
        tl.store(out_ptr + 1, tl.sum(acc_n, axis=0).to(tl.float32))
        tl.store(cnt_ptr, 0)


@triton.jit
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    """x *= g in place, g a device scalar; programs exit at once when g == 1 (the usual case)."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            o = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + o, mask=o < n)
            tl.store(x_ptr + o, (x.to(tl.float32) * g).to(x.dtype), mask=o < n)


# ---------------------------------------------------------------- configurations


class Config(NamedTuple):
    """One launch configuration: path ``row`` (W1 [+ W2] tiles hold whole rows) or ``split``
    (W1-wide column tiles, two kernels); BLOCK_B rows per program; Triton's num_warps and
    num_stages (the kernels have no software-pipelined loop, so num_stages only matters to
    the final ticket reduction and is kept for completeness)."""

    path: str
    block_b: int
    w1: int
    w2: int
    num_warps: int
    num_stages: int = 1

    def label(self) -> str:
        tiles = f"{self.w1}+{self.w2}" if self.w2 else f"{self.w1}"
        return f"{self.path}:bb{self.block_b}:w{tiles}:nw{self.num_warps}:ns{self.num_stages}"

    @staticmethod
    def parse(text: str) -> "Config":
        """Inverse of ``label`` (for the PML_KERNEL_CONFIG override), e.g. ``split:bb1:w4096:nw8:ns1``."""
        try:
            path, bb, w, nw, ns = text.strip().split(":")
            w1, _, w2 = w[1:].partition("+")
            cfg = Config(path, int(bb[2:]), int(w1), int(w2 or 0), int(nw[2:]), int(ns[2:]))
        except (ValueError, IndexError):
            raise ValueError(f"kernel config must look like 'row:bb4:w512+128:nw4:ns1' or "
                             f"'split:bb1:w4096:nw8:ns1', got {text!r}") from None
        cfg.check()
        return cfg

    def check(self) -> None:
        def pow2(v):
            return v >= 1 and v & (v - 1) == 0
        if self.path not in ("row", "split"):
            raise ValueError(f"config path must be 'row' or 'split', got {self.path!r}")
        if not (pow2(self.block_b) and pow2(self.w1) and self.w1 >= 16 and (self.w2 == 0 or (pow2(self.w2) and self.w2 >= 16))
                and pow2(self.num_warps) and self.num_warps <= 32 and self.num_stages >= 1):
            raise ValueError(f"config {self.label()}: block sizes and num_warps must be powers of two, tiles >= 16")
        if max(self.w1, self.w2) > ROW_MAX_LANES:  # the packed N_e/|S| counts need tiles < 2**15
            raise ValueError(f"config {self.label()}: tiles must be <= {ROW_MAX_LANES} wide")
        if self.path == "split" and (self.w2 or self.block_b != 1):
            raise ValueError(f"config {self.label()}: a split config has one tile width and block_b 1")


ROW_MAX_LANES = 16384  # rows up to this many labels stay in one program (row path)
_GPU_TILE = 4096       # elements per program the small-L row heuristic aims at
_GPU_MIN_PROGRAMS = 264  # ~2 programs per SM on an H100/H200
_INTERP_TILE = 16384   # the interpreter runs programs one after another: fewer, larger ones


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def row_tiles(L: int) -> tuple[int, int]:
    """(W1, W2): one or two power-of-two tiles covering L labels with the least waste.

    9605 -> (8192, 2048), 600 -> (512, 128), 1024 -> (1024, 0). A second tile narrower than 64
    is not worth it (80 -> (128, 0)): a tile must span at least 32 lanes per warp, or Triton
    lays the two tiles out differently and converts (and recomputes) between the layouts.
    """
    p = max(16, _next_pow2(L))
    if p == 16 or p == L:
        return p, 0
    lo = p // 2
    w2 = max(16, _next_pow2(L - lo))
    return (lo, w2) if lo + w2 < p and w2 >= 64 else (p, 0)


def _row_warps(bb: int, w1: int, w2: int, hi: int = 32) -> int:
    """~16 elements per thread, and every warp along the columns of both tiles (W >= 32·warps)."""
    cap = max(1, min(w1, w2 or w1) // 32)
    return max(1, min(_warps_for(bb * (w1 + w2), lo=1, hi=hi), cap))


def _warps_for(elems: int, lo: int = 2, hi: int = 16) -> int:
    """~16 elements per thread: enough loads in flight without spilling."""
    w = _next_pow2(max(1, elems // 512))
    return max(lo, min(hi, w))


def heuristic_config(B: int, L: int, *, interpret: bool, block_l: int | None = None,
                     window: bool = False) -> Config:
    """The default (untuned) config; ``block_l`` forces the tile width (tests: split path).

    ``window``: the split path's aligned-window addressing (contiguous inputs, L % 16 != 0),
    where a tile owns 16 columns fewer than its width.
    """
    need = L  # the row path addresses rows plainly (see _row_kernel)
    if block_l is not None:
        if block_l < 16 or block_l & (block_l - 1) or block_l > ROW_MAX_LANES:
            raise ValueError(f"block_l must be a power of two in [16, {ROW_MAX_LANES}], got {block_l!r}")
        if window and L + 15 <= block_l and B == 1:
            return Config("row", 1, block_l, 0, 1 if interpret else _row_warps(1, block_l, 0))
        if need <= block_l and not (window and B == 1):
            w1, w2 = block_l, 0
        elif window and block_l <= 16:
            raise ValueError(f"block_l must be > 16 here (the aligned window uses 16 slots), got {block_l}")
        elif interpret:
            return Config("split", 1, block_l, 0, 1)
        else:
            return Config("split", 1, block_l, 0, _warps_for(block_l, hi=8))
    else:
        w1, w2 = row_tiles(need)
        if w1 + w2 > ROW_MAX_LANES:
            if interpret:
                return Config("split", 1, ROW_MAX_LANES, 0, 1)
            return Config("split", 1, 4096, 0, 8)
    width = w1 + w2
    if interpret:
        bb = _floor_pow2(min(max(1, _INTERP_TILE // width), _next_pow2(B)))
    else:
        bb = _floor_pow2(min(max(1, _GPU_TILE // width), _next_pow2(B)))
        while bb > 1 and triton.cdiv(B, bb) < _GPU_MIN_PROGRAMS:
            bb //= 2
    if bb == 1 and window and block_l is None:  # one row per program: 1-D, windowed, 15 slots more
        w1, w2 = row_tiles(L + 15)
        if w1 + w2 > ROW_MAX_LANES:
            return Config("split", 1, ROW_MAX_LANES if interpret else 4096, 0, 1 if interpret else 8)
    return Config("row", bb, w1, w2, 1 if interpret else _row_warps(bb, w1, w2))


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _split_widths(L: int, window: bool) -> list[int]:
    """Split tile widths by the least padding (K tiles of W slots own K·(W - 16·window) columns)."""
    def lanes(w):
        return triton.cdiv(L, w - 16 if window else w) * w
    return sorted((2048, 4096, 8192), key=lambda w: (lanes(w), -w))


def candidate_configs(B: int, L: int, *, window: bool = False) -> list[Config]:
    """What the GPU tuner times for a B×L problem (first entry = the heuristic): the row path
    with two warp counts against the split path's two best-fitting tile widths."""
    base = heuristic_config(B, L, interpret=False, window=window)
    if L <= 2048:
        return [base]  # small rows: the time is host overhead, not the kernel
    cands = [base]
    if base.path == "row":  # whole rows in registers vs. the split path's small tiles
        cands += [base._replace(num_warps=nw) for nw in (16, 32)
                  if nw != base.num_warps and nw <= _row_warps(1, base.w1, base.w2)][:1]
        w = _split_widths(L, window)[0]
        cands += [Config("split", 1, w, 0, w // 512), Config("split", 1, w, 0, w // 1024)]
    else:  # 16 and 32 elements per thread, and the least padded width
        w = _split_widths(L, window)[0]
        cands += [Config("split", 1, 4096, 0, 4), Config("split", 1, 8192, 0, 8), Config("split", 1, w, 0, w // 1024)]
    out = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out[:4]


# ---------------------------------------------------------------- validation


def _check_finite(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a finite float, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite float, got {v!r}")
    return f


def check_inputs(logits: torch.Tensor, states: torch.Tensor, pseudo: torch.Tensor,
                 sample_ids: torch.Tensor) -> tuple[int, int]:
    """Validate shapes, dtypes and devices; returns (B, L). Values are not scanned (no sync)."""
    for name, t in (("logits", logits), ("states", states), ("pseudo", pseudo), ("sample_ids", sample_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (B, L), got shape {tuple(logits.shape)}")
    B, L = logits.shape
    if B < 1 or L < 1:
        raise ValueError(f"logits must have B >= 1 rows and L >= 1 labels, got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits dtype must be one of float32, bfloat16, float16, got {logits.dtype}")
    if states.shape != logits.shape:
        raise ValueError(f"states must have the shape of logits {tuple(logits.shape)}, got {tuple(states.shape)}")
    if states.dtype != torch.int8:
        raise TypeError(f"states must be int8 (1 positive, 0 negative, -1 missing), got {states.dtype}")
    if pseudo.shape != logits.shape:
        raise ValueError(f"pseudo must have the shape of logits {tuple(logits.shape)}, got {tuple(pseudo.shape)}")
    if pseudo.dtype not in PSEUDO_DTYPES:
        raise TypeError(f"pseudo dtype must be one of float32, bfloat16, float16, got {pseudo.dtype}")
    _check_ids(sample_ids, B)
    dev = logits.device
    for name, t in (("states", states), ("pseudo", pseudo), ("sample_ids", sample_ids)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but logits is on {dev}; move all inputs to one device")
    _check_device(dev)
    return B, L


NEG_GAMMA_MAX = 8.0  # the range PaperOptions accepts


def _check_neg(neg_gamma, neg_margin) -> tuple[float, float]:
    """(γ⁻, m⁻) as floats: host reals, γ⁻ in [0, NEG_GAMMA_MAX], m⁻ in [0, 1)."""
    out = []
    for name, v in (("neg_gamma", neg_gamma), ("neg_margin", neg_margin)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a host float, got {v!r} ({type(v).__name__})")
        out.append(_check_finite(name, v))
    g, m = out
    if not 0.0 <= g <= NEG_GAMMA_MAX:
        raise ValueError(f"neg_gamma (focusing exponent of the negative-side terms) must be in "
                         f"[0, {NEG_GAMMA_MAX:g}], got {neg_gamma!r}")
    if not 0.0 <= m < 1.0:
        raise ValueError(f"neg_margin (probability margin of the negative-side terms) must be in [0, 1), "
                         f"got {neg_margin!r}")
    return g, m


def _check_ids(sample_ids: torch.Tensor, B: int) -> None:
    if sample_ids.shape != (B,):
        raise ValueError(f"sample_ids must have shape (B,) = ({B},), got {tuple(sample_ids.shape)}")
    if sample_ids.dtype not in ID_DTYPES:
        raise TypeError(f"sample_ids must be int64 or int32, got {sample_ids.dtype}")


def _check_device(dev: torch.device) -> None:
    if dev.type == "cpu" and not interpreter_active():
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is "
                           "imported, or pass CUDA tensors")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"tensors must be on a CUDA device (or CPU under TRITON_INTERPRET=1), got {dev}")


def _check_coef(coef, dev: torch.device) -> int:
    """coef must be a (2,) float32 tensor (α, β) on the logits' device; returns its stride."""
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"coef must be a torch.Tensor of shape (2,) holding (alpha, beta), got {type(coef).__name__}")
    if coef.shape != (2,) or coef.dtype != torch.float32:
        raise ValueError(f"coef must be a (2,) float32 tensor holding (alpha, beta), got shape {tuple(coef.shape)} "
                         f"dtype {coef.dtype}")
    if coef.device != dev:
        raise ValueError(f"coef is on {coef.device} but logits is on {dev}; it must be on the logits' device")
    return coef.stride(0)


@functools.lru_cache(maxsize=256)
def _key_bits(seed, epoch) -> int:
    return _int32_bits(launch_key(seed, epoch))


@functools.lru_cache(maxsize=64)
def _thr(q) -> int:
    return pick_threshold(q)


def _num_rows_inv(num_rows, B: int) -> float:
    if num_rows is None:
        return 1.0 / B
    if isinstance(num_rows, bool) or not isinstance(num_rows, numbers.Real):
        raise TypeError(f"num_rows must be a host int or float > 0 (the batch divisor), got {num_rows!r}")
    n = _check_finite("num_rows", num_rows)
    if n <= 0:
        raise ValueError(f"num_rows must be > 0 (the number of valid rows), got {num_rows!r}")
    return 1.0 / n


# ---------------------------------------------------------------- workspace and plans

_WORKSPACES: dict = {}
_SM_COUNT: dict = {}


def _workspace(dev: torch.device, n_cnt: int, n_part: int):
    """(counters int32, partials fp32) for the current stream of ``dev``.

    Counters start at zero and every kernel that takes a ticket resets its counter, so the
    buffers are reused without a memset (one per stream: launches on one stream are ordered).
    """
    if dev.type == "cuda":
        key = (dev.index, torch._C._cuda_getCurrentRawStream(dev.index))
    else:
        key = ("cpu",)
    ws = _WORKSPACES.get(key)
    if ws is None or ws[0].numel() < n_cnt or ws[1].numel() < n_part:
        old_c, old_p = (ws[0].numel(), ws[1].numel()) if ws is not None else (0, 0)
        cnt = torch.zeros(max(n_cnt, old_c, 64), dtype=torch.int32, device=dev)
        part = torch.empty(max(n_part, old_p, 1024), dtype=torch.float32, device=dev)
        ws = _WORKSPACES[key] = (cnt, part)
    return ws


def _sm_count(dev: torch.device) -> int:
    n = _SM_COUNT.get(dev.index)
    if n is None:
        n = _SM_COUNT[dev.index] = torch.cuda.get_device_properties(dev).multi_processor_count
    return n


class _Plan:
    """Everything about a call that depends only on shapes, dtypes, strides, device and flags."""

    __slots__ = ("B", "L", "dev", "cuda", "contig", "window", "strides", "flags", "cfg", "tune_key", "block_l",
                 "dtype", "tuned")

    def __init__(self, logits, states, pseudo, ids, *, need_grad, return_picks, p_rule, coef_ptr, block_l,
                 pseudo_mode=0, neg_focus=False):
        B, L = check_inputs(logits, states, pseudo, ids)
        self.B, self.L, self.dev = B, L, logits.device
        self.cuda = self.dev.type == "cuda"
        self.dtype = logits.dtype
        contig = all(t.stride() == (L, 1) for t in (logits, states, pseudo))
        self.contig = contig
        # aligned windows make loads vectorise when rows are not 16-aligned; they need the
        # tensor to end on a 16-element boundary (B*L % 16 == 0, e.g. any B that is a multiple of 16)
        self.window = window = contig and L % 16 != 0 and (B * L) % 16 == 0
        self.strides = (logits.stride(0), logits.stride(1), states.stride(0), states.stride(1),
                        pseudo.stride(0), pseudo.stride(1), ids.stride(0))
        self.flags = dict(CONTIG=contig, WINDOW=window, COEF_PTR=coef_ptr, PSEUDO_MODE=pseudo_mode,
                          P_PRINTED=(p_rule == "printed"), NEG_FOCUS=bool(neg_focus),
                          STORE_GRAD=need_grad, STORE_PICKS=return_picks,
                          FAST=self.cuda and not interpreter_active())  # MUFU forms only when compiled
        self.block_l = block_l
        self.cfg = _forced_config() if block_l is None else None
        if self.cfg is not None:
            _check_fits(self.cfg, L, window)
        else:
            self.cfg = heuristic_config(B, L, interpret=not self.cuda or interpreter_active(), block_l=block_l,
                                        window=window)
        # tuned on the GPU at the first launch unless forced or disabled
        self.tuned = not (self.cuda and block_l is None and _forced_config() is None and _tuning_enabled()
                          and not interpreter_active())
        # the ours+ negative terms cost more per element: tuned apart from the paper's
        self.tune_key = (min(_next_pow2(B), 8192), L, logits.dtype, pseudo.dtype, contig, window, need_grad,
                         bool(neg_focus))


def _forced_config() -> Config | None:
    text = os.environ.get("PML_KERNEL_CONFIG", "").strip()
    return Config.parse(text) if text else None


def _tuning_enabled() -> bool:
    return os.environ.get("PML_KERNEL_TUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _check_fits(cfg: Config, L: int, window: bool) -> None:
    cfg.check()
    need = L + 15 if window and cfg.block_b == 1 else L  # block_b 1 rows are windowed
    if cfg.path == "row" and cfg.w1 + cfg.w2 < need:
        raise ValueError(f"config {cfg.label()} holds {cfg.w1 + cfg.w2} slots per row, fewer than the {need} "
                         f"this L = {L} needs")
    if cfg.path == "split" and window and cfg.w1 <= 16:
        raise ValueError(f"config {cfg.label()}: split tiles must be wider than 16 here")


_PLANS: dict = {}
_TUNED: dict = {}


def clear_caches() -> None:
    """Forget plans, tuned configs and workspaces (tests; after changing PML_KERNEL_* env vars)."""
    _PLANS.clear()
    _TUNED.clear()
    _WORKSPACES.clear()


def tuned_configs() -> dict:
    """{(B bucket, L, logits dtype, pseudo dtype, contiguous, window, need_grad, neg_focus):
    (config label, {label: ms})}."""
    return {k: (v[0].label(), dict(v[1])) for k, v in _TUNED.items()}


def _plan_key(logits, states, pseudo, ids, need_grad, return_picks, p_rule, coef_ptr, block_l, pseudo_mode,
              neg_focus):
    return (logits.shape, logits.stride(), logits.dtype, logits.device,
            states.shape, states.stride(), states.dtype, states.device,
            pseudo.shape, pseudo.stride(), pseudo.dtype, pseudo.device,
            ids.shape, ids.stride(), ids.dtype, ids.device,
            need_grad, return_picks, p_rule, coef_ptr, block_l, pseudo_mode, neg_focus)


def _get_plan(logits, states, pseudo, ids, need_grad, return_picks, p_rule, coef_ptr, block_l,
              pseudo_mode=0, neg_focus=False) -> _Plan:
    try:
        key = _plan_key(logits, states, pseudo, ids, need_grad, return_picks, p_rule, coef_ptr, block_l, pseudo_mode,
                        neg_focus)
    except (AttributeError, TypeError):  # not tensors: let check_inputs name the argument
        key = None
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        if p_rule not in P_RULES:
            raise ValueError(f"p_rule must be one of {P_RULES}, got {p_rule!r}")
        plan = _Plan(logits, states, pseudo, ids, need_grad=need_grad, return_picks=return_picks,
                     p_rule=p_rule, coef_ptr=coef_ptr, block_l=block_l, pseudo_mode=pseudo_mode,
                     neg_focus=neg_focus)
        if key is not None:
            if len(_PLANS) > 4096:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


# ---------------------------------------------------------------- launches

try:  # the launch hooks (profilers) that the direct launch must respect
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - triton < 3.4: no direct launches
    _knobs = None

_COMPILED: dict = {}
_DIRECT_LAUNCHES = [0]  # how many launches took the direct path (tests check it engages)


def _fast_launch_enabled() -> bool:
    """Direct launches are opt-in (PML_KERNEL_FAST_LAUNCH=1) until checked on a GPU: before the
    HookChain fix they never engaged, so the GPU tests that compare them with Triton's launcher
    compared the slow path with itself (H100 run of 2026-11-27; see benchmarks/RESULTS.md)."""
    return _knobs is not None and os.environ.get("PML_KERNEL_FAST_LAUNCH", "0").strip().lower() in (
        "1", "true", "yes", "on")


_FAST_LAUNCH = _fast_launch_enabled()


def _hook_idle(hook) -> bool:
    """No launch hook to call: None (triton < 3.5) or an empty ``HookChain`` (triton 3.5+,
    where the knob is never None; testing ``is None`` there kept every launch on the slow path)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not getattr(hook, "calls", True))


def _launch_hooks_idle() -> bool:
    rt = _knobs.runtime
    return _hook_idle(rt.launch_enter_hook) and _hook_idle(rt.launch_exit_hook)


def _aligned(*tensors) -> bool:
    """All data pointers 16-byte aligned: the specialisation the cached kernels were built for."""
    acc = 0
    for t in tensors:
        acc |= t.data_ptr()
    return acc & 15 == 0


def _int_spec(v: int) -> tuple:
    """How Triton specialises an int argument: 1 is a constant, else its width and % 16."""
    return (v == 1, v % 16 == 0, -(1 << 31) <= v < (1 << 31))


def _run_kernel(fn, grid, args, num_warps, num_stages, key) -> None:
    """``fn[grid](*args)``; with a ``key`` (CUDA, all pointers aligned) the second and later
    launches call the cached CompiledKernel's launcher directly, as JITFunction.run itself
    does after binding, which skips Triton's per-call argument binding and cache-key
    formatting (tens of µs on a host for ~40 arguments). ``key`` must determine every
    specialisation Triton would compute: kernel, constexprs, options, argument types and
    the int specialisations; the callers build it from the plan (shapes, strides, dtypes,
    flags), the config, and the per-call alignment / int specs."""
    if key is not None:
        ck = _COMPILED.get(key)
        if ck is not None and _launch_hooks_idle():
            ck.run(grid[0], grid[1] if len(grid) > 1 else 1, 1,
                   torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice()),
                   ck.function, ck.packed_metadata, None, None, None, *args)
            _DIRECT_LAUNCHES[0] += 1
            return
    ck = fn[grid](*args, num_warps=num_warps, num_stages=num_stages)
    if key is not None and ck is not None and hasattr(ck, "packed_metadata"):
        _COMPILED[key] = ck


def _launch(plan: _Plan, cfg: Config, a: tuple, scalars: tuple) -> None:
    """Launch ``cfg`` once. a = (logits, states, pseudo, ids, coef, grad, yhat, out, picks); scalars =
    (alpha, beta, d, inv_n, p_threshold, key_bits, thr, s_coef, neg_gamma, neg_margin)."""
    logits, states, pseudo, ids, coef, grad, yhat, out, picks = a
    B, L = plan.B, plan.L
    s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id = plan.strides
    alpha, beta, d, inv_n, p_threshold, key_bits, thr, s_coef, neg_gamma, neg_margin = scalars
    f = plan.flags
    key = None
    if plan.cuda and _FAST_LAUNCH and _aligned(*a):
        key = (plan, cfg, _int_spec(s_coef))
    if cfg.path == "row":
        cnt, _ = _workspace(plan.dev, 1, 0)
        if key is not None and cnt.data_ptr() & 15:
            key = None
        if cfg.block_b == 1:  # 1-D form; it can use aligned windows
            _run_kernel(_row1_kernel, (B,), (
                logits, states, pseudo, ids, coef, grad, yhat, out, picks, cnt,
                B, L, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, s_coef,
                alpha, beta, d, inv_n, p_threshold, key_bits, thr, neg_gamma, neg_margin,
                f["CONTIG"], f["WINDOW"], f["COEF_PTR"], f["PSEUDO_MODE"], f["P_PRINTED"], f["NEG_FOCUS"],
                f["STORE_GRAD"], f["STORE_PICKS"], f["FAST"], cfg.w1, cfg.w2), cfg.num_warps, cfg.num_stages, key)
            return
        _run_kernel(_row_kernel, (triton.cdiv(B, cfg.block_b),), (
            logits, states, pseudo, ids, coef, grad, yhat, out, picks, cnt,
            B, L, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, s_coef,
            alpha, beta, d, inv_n, p_threshold, key_bits, thr, neg_gamma, neg_margin,
            f["CONTIG"], f["COEF_PTR"], f["PSEUDO_MODE"], f["P_PRINTED"], f["NEG_FOCUS"], f["STORE_GRAD"],
            f["STORE_PICKS"], f["FAST"], cfg.block_b, cfg.w1, cfg.w2), cfg.num_warps, cfg.num_stages, key)
        return
    W = cfg.w1
    K = triton.cdiv(L, W - 16 if f["WINDOW"] else W)
    NK = B * K
    cnt, part = _workspace(plan.dev, 1 + B, 4 * NK)
    grid = (B, K)
    _run_kernel(_split_stats_kernel, grid, (
        logits, states, pseudo, ids, part, B, L, K, NK, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, key_bits, thr,
        f["CONTIG"], f["WINDOW"], W), cfg.num_warps, cfg.num_stages, key and key + ("stats", _aligned(part)))
    _run_kernel(_split_fused_kernel, grid, (
        logits, states, pseudo, ids, coef, grad, yhat, out, picks, cnt, part,
        B, L, K, NK, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, s_coef,
        alpha, beta, d, inv_n, p_threshold, key_bits, thr, neg_gamma, neg_margin,
        f["CONTIG"], f["WINDOW"], f["COEF_PTR"], f["PSEUDO_MODE"], f["P_PRINTED"], f["NEG_FOCUS"], f["STORE_GRAD"],
        f["STORE_PICKS"], f["FAST"], W, _next_pow2(K)), cfg.num_warps, cfg.num_stages,
        key and key + ("fused", _aligned(cnt, part)))


def _tune(plan: _Plan, a: tuple, scalars: tuple) -> Config:
    """Time each candidate config once per (B bucket, L, dtypes, ...) on the GPU; keep the fastest.

    Every config computes the same per-element gradient (one shared device function and the
    same per-row counts), so the choice changes only the summation order of the loss value.
    """
    hit = _TUNED.get(plan.tune_key)
    if hit is not None:
        return hit[0]
    cands = candidate_configs(plan.B, plan.L, window=plan.window)
    if len(cands) == 1 or torch.cuda.is_current_stream_capturing():
        return cands[0]
    times = {}
    for cfg in cands:
        try:
            _launch(plan, cfg, a, scalars)  # compile + warm up
            torch.cuda.synchronize(plan.dev)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                _launch(plan, cfg, a, scalars)
            end.record()
            end.synchronize()
            times[cfg.label()] = start.elapsed_time(end) / 5
        except Exception as exc:  # e.g. out of registers/shared memory for this config
            times[cfg.label()] = float("inf")
            if os.environ.get("PML_KERNEL_TUNE_VERBOSE"):
                print(f"pml_scale.kernels: config {cfg.label()} failed: {exc}")
    best = min(cands, key=lambda c: times[c.label()])
    if not math.isfinite(times[best.label()]):
        raise RuntimeError(f"every kernel config failed for B={plan.B}, L={plan.L}: {times}")
    _TUNED[plan.tune_key] = (best, times)
    return best


class ForwardResult(NamedTuple):
    loss: torch.Tensor       # () fp32, Σ row_loss / num_rows
    grad: torch.Tensor | None  # (B, L) logits dtype, d loss / d logits
    yhat: torch.Tensor       # (B, L) fp16
    p: torch.Tensor          # (B,) fp32
    out: torch.Tensor        # (2B+1,) fp32: row_loss | p | loss
    picks: torch.Tensor | None  # (B, L) int8 raw pick bits (test hook)

    @property
    def row_loss(self) -> torch.Tensor:
        return self.out[:self.p.shape[0]]


def forward(logits, states, pseudo, sample_ids, *, alpha=None, beta=None, coef=None, d, q, seed, epoch,
            p_threshold=0.1, p_rule="text", need_grad=True, block_l=None, return_picks=False,
            num_rows=None, pseudo_weights="alpha_beta", neg_gamma=0.0, neg_margin=0.0) -> ForwardResult:
    """One launch (two for the split path), behind ``partial_label_forward`` and the autograd op.

    Per-call host work is kept to what changes per call: everything that depends only on
    shapes, dtypes, strides, device and flags is in a cached plan; the outputs are three
    allocations; the device is switched only when it is not current. neg_gamma = neg_margin = 0
    (the paper) launches the plain specialisation (NEG_FOCUS False), anything else the ours+ one.
    """
    coef_ptr = coef is not None
    if pseudo_weights not in PSEUDO_WEIGHTS:
        raise ValueError(f"pseudo_weights must be one of {PSEUDO_WEIGHTS}, got {pseudo_weights!r}")
    if neg_gamma == 0.0 and neg_margin == 0.0:  # the paper (the default): two compares of host work
        neg_focus, neg_gamma, neg_margin = False, 0.0, 0.0
    else:
        neg_gamma, neg_margin = _check_neg(neg_gamma, neg_margin)
        neg_focus = True
    plan = _get_plan(logits, states, pseudo, sample_ids, need_grad, return_picks, p_rule, coef_ptr, block_l,
                     PSEUDO_WEIGHTS.index(pseudo_weights), neg_focus)
    if coef_ptr:
        if alpha is not None or beta is not None:
            raise ValueError("pass either alpha and beta (host floats) or coef (a (2,) device tensor), not both")
        s_coef = _check_coef(coef, plan.dev)
        alpha = beta = 0.0
    else:
        if alpha is None or beta is None:
            raise ValueError("alpha and beta are required (host floats), or pass coef=(2,) tensor instead")
        alpha = _check_finite("alpha", alpha)
        beta = _check_finite("beta", beta)
        s_coef = 0
    scalars = (alpha, beta, _check_finite("d", d), _num_rows_inv(num_rows, plan.B),
               _check_finite("p_threshold", p_threshold), _key_bits(seed, epoch), _thr(q), s_coef,
               neg_gamma, neg_margin)
    B, L, dev = plan.B, plan.L, plan.dev
    yhat = torch.empty((B, L), dtype=torch.float16, device=dev)
    grad = torch.empty((B, L), dtype=plan.dtype, device=dev) if need_grad else None
    picks = torch.empty((B, L), dtype=torch.int8, device=dev) if return_picks else None
    out = torch.empty(2 * B + 1, dtype=torch.float32, device=dev)
    a = (logits, states, pseudo, sample_ids, coef if coef_ptr else out,
         grad if need_grad else yhat, yhat, out, picks if return_picks else yhat)
    if plan.cuda and torch._C._cuda_getDevice() != dev.index:
        with torch.cuda.device(dev):
            _run(plan, a, scalars)
    else:
        _run(plan, a, scalars)
    return ForwardResult(out[2 * B], grad, yhat, out[B:2 * B], out, picks)


def _run(plan: _Plan, a: tuple, scalars: tuple) -> None:
    if not plan.tuned:
        plan.cfg = _tune(plan, a, scalars)
        plan.tuned = True
    _launch(plan, plan.cfg, a, scalars)


def partial_label_forward(
    logits: torch.Tensor, states: torch.Tensor, pseudo: torch.Tensor, sample_ids: torch.Tensor, *,
    alpha: float | None = None, beta: float | None = None, coef: torch.Tensor | None = None,
    d: float, q: float, seed: int, epoch: int,
    p_threshold: float = 0.1, p_rule: str = "text", need_grad: bool = True,
    block_l: int | None = None, return_picks: bool = False, num_rows: float | None = None,
    pseudo_weights: str = "alpha_beta", neg_gamma: float = 0.0, neg_margin: float = 0.0,
):
    """Launch the fused kernel once (twice for rows longer than 16384 labels).

    Returns ``(row_loss, grad, yhat, p)`` and, with ``return_picks`` (a test hook), the raw
    pick bits ``(B, L) int8`` (before intersecting with missing) as a fifth item.
    row_loss: (B,) fp32 L_i (not divided); grad: (B, L) in logits' dtype, dL/ds of the mean
    loss (already / num_rows), or None when ``need_grad`` is False; yhat: (B, L) fp16; p: (B,) fp32.
    α, β: host floats ``alpha``/``beta``, or ``coef``, a (2,) fp32 tensor on the logits' device
    read by the kernel (no host sync). ``num_rows`` (default B) divides the loss and gradient;
    rows whose states are all outside {-1, 0, 1} contribute nothing.
    ``pseudo_weights``: "alpha_beta" (the paper: α, β also weigh the picked pseudo terms) or
    "balanced" (both pseudo terms weigh (α+β)/2) or "capped" (ours+: the paper's weights when
    α ≤ β, balanced when α > β).
    ``neg_gamma`` γ⁻ in [0, 8], ``neg_margin`` m⁻ in [0, 1) (ours+, default 0 = the paper): the
    negative-side terms (observed negatives, and the (1−ỹ) part of the picks) use u^γ⁻·log(1−u),
    u = max(ŷ − m⁻, 0), instead of log(1−ŷ) (``pml_scale.losses.partial.negative_term``).
    ``block_l`` forces the tile width: rows longer than it take the split path.
    """
    r = forward(logits, states, pseudo, sample_ids, alpha=alpha, beta=beta, coef=coef, d=d, q=q, seed=seed,
                epoch=epoch, p_threshold=p_threshold, p_rule=p_rule, need_grad=need_grad, block_l=block_l,
                return_picks=return_picks, num_rows=num_rows, pseudo_weights=pseudo_weights,
                neg_gamma=neg_gamma, neg_margin=neg_margin)
    out = (r.row_loss, r.grad, r.yhat, r.p)
    return out + (r.picks,) if return_picks else out


def picked_pseudo_sums(states: torch.Tensor, pseudo: torch.Tensor, sample_ids: torch.Tensor, *,
                       q: float, seed: int, epoch: int) -> torch.Tensor:
    """(2,) fp32 [Σ ỹ over picked missing entries, their number] over the batch, on the device.

    Picked = ``pick_mask(ids, L, seed=, epoch=, q=) & (states == -1)``, the kernel's own picks;
    rows whose states are all sentinels count nothing. For the ``seen`` reading of α/β without
    a host sync (all-reduce the result across ranks). Deterministic: fixed-order reduction.
    """
    for name, t in (("states", states), ("pseudo", pseudo), ("sample_ids", sample_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if states.dim() != 2 or states.dtype != torch.int8:
        raise ValueError(f"states must be a 2-D int8 tensor (B, L), got shape {tuple(states.shape)} dtype {states.dtype}")
    B, L = states.shape
    if B < 1 or L < 1:
        raise ValueError(f"states must have B >= 1 rows and L >= 1 labels, got shape {tuple(states.shape)}")
    if pseudo.shape != states.shape:
        raise ValueError(f"pseudo must have the shape of states {tuple(states.shape)}, got {tuple(pseudo.shape)}")
    if pseudo.dtype not in PSEUDO_DTYPES:
        raise TypeError(f"pseudo dtype must be one of float32, bfloat16, float16, got {pseudo.dtype}")
    _check_ids(sample_ids, B)
    dev = states.device
    for name, t in (("pseudo", pseudo), ("sample_ids", sample_ids)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but states is on {dev}; move all inputs to one device")
    _check_device(dev)
    key_bits, thr = _key_bits(seed, epoch), _thr(q)
    contig = states.stride() == (L, 1) and pseudo.stride() == (L, 1)
    interpret = dev.type == "cpu" or interpreter_active()
    w = min(max(16, _next_pow2(L)), 8192 if interpret else 2048)
    bb = _floor_pow2(min(max(1, (_INTERP_TILE if interpret else 4096) // w), _next_pow2(B)))
    grid = (triton.cdiv(B, bb), triton.cdiv(L, w))
    NP = grid[0] * grid[1]
    out = torch.empty(2, dtype=torch.float32, device=dev)
    cnt, part = _workspace(dev, 1, 2 * NP)
    args = (states, pseudo, sample_ids, out, cnt, part,
            B, L, NP, states.stride(0), states.stride(1), pseudo.stride(0), pseudo.stride(1), sample_ids.stride(0),
            key_bits, thr, contig, bb, w)
    key = None
    if dev.type == "cuda" and _FAST_LAUNCH and _aligned(states, pseudo, sample_ids, out, cnt, part):
        key = ("picked_sums", dev.index, pseudo.dtype, sample_ids.dtype, grid) + tuple(_int_spec(v) for v in args[6:14]) + (
            contig, bb, w)
    if dev.type == "cuda" and torch._C._cuda_getDevice() != dev.index:
        with torch.cuda.device(dev):
            _run_kernel(_picked_sums_kernel, grid, args, 4, 1, key)
    else:
        _run_kernel(_picked_sums_kernel, grid, args, 1 if interpret else 4, 1, key)
    return out


def scale_(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x *= g in place for a contiguous x and a one-element device tensor g, without a host
    sync: the kernel reads g and returns at once when it is 1."""
    n = x.numel()
    if x.device.type == "cuda":
        block, num_warps = 4096, 8
        nprog = max(1, min(triton.cdiv(n, block), 4 * _sm_count(x.device)))
        key = ("scale", x.device.index, x.dtype, g.dtype, _int_spec(n)) if _FAST_LAUNCH and _aligned(x, g) else None
    else:
        block, num_warps = 65536, 1
        nprog = max(1, triton.cdiv(n, block))
        key = None
    _run_kernel(_scale_kernel, (nprog,), (x, g, n, block), num_warps, 1, key)
    return x

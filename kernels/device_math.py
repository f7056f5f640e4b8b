"""Device math of the fused partial-label loss: the @triton.jit helpers the kernels inline.

Hash: the counter-based pick hash of ``pml_scale.losses.picks``, bit for bit, in uint32
arithmetic, with fmix32's first xor-shift split into a per-row half (``_row_mix``) and a
per-column half (``_col_mix``; xor and logical shifts commute). Loads: ``_tile`` reads one tile
(see Addressing). Math: ``_row_coefs`` folds the row's divisions into four per-row weights,
``_elem`` costs one exp2, one lg2 and one reciprocal per element (MUFU forms on the GPU, exact
under the interpreter), ``_neg_focus`` is the ours+ negative-side term. ``_finish_mean`` is the
ticket reduction of the batch mean (the last program sums the rows in a fixed order).

Addressing: contiguous inputs use flat offsets. When rows are not 16-aligned (L % 16 != 0) but
the tensor ends on a 16-element boundary (B·L % 16 == 0), the 1-D kernels read aligned windows
of whole vectors (``_tile``, WINDOW) so loads vectorise for any L. Strided inputs get a
stride-addressed variant (correct, slower). Outputs are contiguous. Offsets are int64.

The leading underscore marks device-only functions: callable from @triton.jit code, not from
the host. The kernels themselves are in ``device_kernels``.
"""

import triton
import triton.language as tl


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
    t = tl.exp2(-tl.abs(x))
    u = 1.0 + t
    r = _mufu(u, False, FAST)
    lp = _mufu(u, True, FAST)
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
def _mufu(v, LOG2: tl.constexpr, FAST: tl.constexpr):
    """log2(v) (LOG2) or 1/v: the MUFU approximations lg2/rcp.approx.ftz (~2 ulp) when compiled
    for the GPU (FAST), the exact forms under the interpreter (which cannot run inline PTX)."""
    if FAST:
        if LOG2:
            asm: tl.constexpr = "lg2.approx.ftz.f32 $0, $1;"
        else:
            asm: tl.constexpr = "rcp.approx.ftz.f32 $0, $1;"
        return tl.inline_asm_elementwise(asm, "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
    elif LOG2:
        return tl.log2(v)
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
    l2 = tl.where(on, _mufu(w, True, FAST), -(tl.maximum(x, 0.0) + lp))  # log2(1 − v)
    l2 = tl.where(active, l2, 0.0)
    pw = tl.exp2(gamma * _mufu(tl.where(active, tl.maximum(v, TINY), 1.0), True, FAST))  # v^γ (1 where inactive)
    den = tl.where(on, 1.0 - w, tl.where(nonneg, y, u1 - 1.0))
    num = tl.where(on | nonneg, l2, -u1 * lp)
    ok = den > 0.0
    f = tl.where(ok, num * LN2 * _mufu(tl.where(ok, den, 1.0), False, FAST), -1.0)  # no 1/0 even where unused
    du = y * omy
    q = tl.where(on, du * _mufu(w, False, FAST), y)  # v'/(1 − v)
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

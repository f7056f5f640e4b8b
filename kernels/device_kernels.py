"""The Triton kernels of the fused partial-label loss (their building blocks: ``device_math``).

Why two paths: p_i needs the row max and the row normalisers need N_e and |S|, all row-wide,
before any element's gradient can be written.
- ``row`` (L <= 16384): a program holds whole rows in registers as one or two power-of-two
  tiles (W1 + W2 >= L: 8192 + 2048 for 9605 labels, 512 + 128 for 600), so every input byte is
  read once. BLOCK_B > 1 rows: ``_row_kernel`` (2-D tiles); one row: ``_row1_kernel`` (1-D).
- ``split`` (any L): one program per (row, column tile); ``_split_stats_kernel`` writes per-tile
  max and counts, ``_split_fused_kernel`` combines its row's partials and computes its tile, and
  a per-row ticket lets the row's last tile sum the row loss. Logits and states are read twice
  (12 instead of 9 bytes per bf16 element) but the GPU is filled at any B.
Each writes, per row, the loss L_i and the penalty p_i, per element the gradient dL/ds (already
divided by the batch divisor) and ŷ = σ(s) in fp16, and the batch mean of L_i, reduced in the
kernel by a ticket (an atomic counter in a per-stream workspace that the last program resets),
so the value does not depend on scheduling. ``_picked_sums_kernel`` sums ỹ over the picks (the
no-sync α/β reading); ``_scale_kernel`` scales the saved gradient in backward.

Kernel names are kept stable: they name the kernels in profiles and in the compiled code.
"""

import triton
import triton.language as tl

from .device_math import (_col_mix, _counts, _elem, _finish_mean, _load_coef, _offs, _picked, _row_coefs, _row_mix,
                          _split_tile, _store_out, _thr_u32, _tile, _window)


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

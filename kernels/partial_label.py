"""Fused forward + gradient kernel for the paper's partial-label loss (DESIGN.md §1, §2).

One launch reads logits, label states and pseudo labels once, draws the q-picks of missing
labels in-kernel (the counter-based hash of ``pml_scale.losses.picks``, bit for bit, in uint32
arithmetic) and writes, per row, the loss L_i and the penalty p_i, and per element the
gradient dL/ds (already divided by B, kept for backward) and ŷ = σ(s) in fp16.

Why two sweeps: p_i needs the row max of ŷ and the row normalisers need N_e and |S|, all
row-wide. A row that fits one tile (L <= BLOCK_L) is loaded once; a longer row is read twice
(sweep 1: logits + states for max and counts, picks recomputed, never stored; sweep 2: all
three inputs for the terms). Memory: outputs are grad (B×L, logits dtype), ŷ (B×L, fp16) and
two (B,) fp32 vectors; nothing else grows with B×L. Per-program registers grow with
BLOCK_B×BLOCK_L only, so any L works (the tile loop has no bound; tested to 2**20 + 3).

Inputs may be non-contiguous: every input is addressed through its own (row, column)
strides, so no copy is made (a column stride != 1 is correct but slower). Offsets are int64,
so B×L beyond 2**31 is fine. Outputs are always contiguous.

The host-side key and threshold live in ``pick_hash`` (no triton import), shared with the
PyTorch reference in ``pml_scale.losses.picks``.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from .pick_hash import GOLDEN, MASK32, PICK_BITS, launch_key, pick_threshold  # noqa: F401 (re-exported)

P_RULES = ("text", "printed")
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
def _row_hash(ids_ptr, rows64, row_ok, s_id, key_bits):
    ids = tl.load(ids_ptr + rows64 * s_id, mask=row_ok, other=0).to(tl.int64)
    lo = ids.to(tl.uint32)  # truncation = ids & 0xFFFFFFFF
    hi = (ids >> 32).to(tl.uint32)
    key = key_bits.to(tl.uint32, bitcast=True)
    return _fmix32(_fmix32(key ^ lo) ^ hi)


@triton.jit
def _draw_picks(row_h, cols, thr):
    col_h = (cols + 1).to(tl.uint32) * 0x9E3779B9
    h = _fmix32(row_h[:, None] ^ col_h[None, :])
    return (h >> 8) < thr


@triton.jit
def _load_tile(logits_ptr, states_ptr, rows64, cols, mask, s_lb, s_ll, s_sb, s_sl):
    cols64 = cols.to(tl.int64)
    s = tl.load(logits_ptr + rows64[:, None] * s_lb + cols64[None, :] * s_ll, mask=mask, other=0.0)
    st = tl.load(states_ptr + rows64[:, None] * s_sb + cols64[None, :] * s_sl, mask=mask, other=2)
    return s.to(tl.float32), st.to(tl.int32)


@triton.jit
def _row_weights(m, ne, ns, alpha, beta, d, inv_b, p_threshold, P_PRINTED: tl.constexpr):
    """Per-row p, element weights and gradient scale from the row max and counts."""
    ymax = 1.0 / (1.0 + tl.exp(-tl.maximum(m, -88.0)))  # same ŷ formula as _tile_terms
    if P_PRINTED:
        big = ymax >= p_threshold
    else:
        big = ymax < p_threshold
    p = tl.where(big, 2.0, 1.0)
    inv_ne = tl.where(ne > 0, 1.0 / tl.maximum(ne, 1).to(tl.float32), 0.0)
    ds = tl.where(ns > 0, d / tl.maximum(ns, 1).to(tl.float32), 0.0)
    return p, alpha * inv_ne, beta * inv_ne, alpha * ds, beta * ds, -p * inv_b


@triton.jit
def _tile_terms(s, st, picked, mask, rows64, cols, L,
                pseudo_ptr, s_pb, s_pl, grad_ptr, yhat_ptr, picks_ptr,
                a_ne, b_ne, a_s, b_s, gscale,
                STORE_GRAD: tl.constexpr, STORE_PICKS: tl.constexpr):
    """Loss terms of one tile (returned as per-row sums), and its gradient and ŷ stores."""
    cols64 = cols.to(tl.int64)
    sel = (st == -1) & picked
    yt = tl.load(pseudo_ptr + rows64[:, None] * s_pb + cols64[None, :] * s_pl,
                 mask=mask & sel, other=0.0).to(tl.float32)
    # ŷ exactly as torch.sigmoid computes it, so the fp16 output matches it.
    # The clamp only avoids an inf (ŷ < 1e-38 rounds to 0 in fp16 either way).
    e = tl.exp(-tl.maximum(s, -88.0))
    y = 1.0 / (1.0 + e)
    one_m_y = tl.where(s >= 0, tl.minimum(e, 1.0) * y, 1.0 - y)  # 1-σ(s), no cancellation for s >= 0
    # softplus(±s) = max(±s, 0) + log1p(exp(-|s|)); log1p via Goldberg's trick (no libdevice).
    t = tl.exp(-tl.abs(s))
    u = 1.0 + t
    lp = tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))
    sp_n = tl.maximum(-s, 0.0) + lp  # -log σ(s)
    sp_p = tl.maximum(s, 0.0) + lp   # -log(1-σ(s))
    w_pos = tl.where(st == 1, a_ne[:, None], tl.where(sel, a_s[:, None] * yt, 0.0))
    w_neg = tl.where(st == 0, b_ne[:, None], tl.where(sel, b_s[:, None] * (1.0 - yt), 0.0))
    terms = tl.where(mask, w_pos * sp_n + w_neg * sp_p, 0.0)
    out_off = rows64[:, None] * L + cols64[None, :]
    tl.store(yhat_ptr + out_off, y.to(tl.float16), mask=mask)
    if STORE_GRAD:
        g = gscale[:, None] * (w_pos * one_m_y - w_neg * y)
        tl.store(grad_ptr + out_off, g.to(grad_ptr.dtype.element_ty), mask=mask)
    if STORE_PICKS:
        tl.store(picks_ptr + out_off, picked.to(tl.int8), mask=mask)
    return tl.sum(terms, axis=1)


@triton.jit(do_not_specialize=["key_bits", "thr"])
def _partial_label_fwd_kernel(
    logits_ptr, states_ptr, pseudo_ptr, ids_ptr,
    grad_ptr, yhat_ptr, row_loss_ptr, p_ptr, picks_ptr,
    B, L,
    s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id,
    alpha, beta, d, inv_b, p_threshold, key_bits, thr,
    P_PRINTED: tl.constexpr, STORE_GRAD: tl.constexpr, STORE_PICKS: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    row_h = _row_hash(ids_ptr, rows64, row_ok, s_id, key_bits)
    cols0 = tl.arange(0, BLOCK_L)

    if SINGLE:
        # The whole row is one tile: load once, reduce, then compute terms from registers.
        mask = row_ok[:, None] & (cols0 < L)[None, :]
        s, st = _load_tile(logits_ptr, states_ptr, rows64, cols0, mask, s_lb, s_ll, s_sb, s_sl)
        picked = _draw_picks(row_h, cols0, thr)
        m = tl.max(tl.where(mask, s, float("-inf")), axis=1)
        ne = tl.sum(((st == 0) | (st == 1)).to(tl.int32), axis=1)
        ns = tl.sum(((st == -1) & picked).to(tl.int32), axis=1)
        p, a_ne, b_ne, a_s, b_s, gscale = _row_weights(m, ne, ns, alpha, beta, d, inv_b,
                                                       p_threshold, P_PRINTED)
        acc = _tile_terms(s, st, picked, mask, rows64, cols0, L,
                          pseudo_ptr, s_pb, s_pl, grad_ptr, yhat_ptr, picks_ptr,
                          a_ne, b_ne, a_s, b_s, gscale, STORE_GRAD, STORE_PICKS)
    else:
        # Sweep 1: row max of logits and the counts N_e, |S| (picks recomputed later).
        m = tl.full([BLOCK_B], float("-inf"), tl.float32)
        ne = tl.zeros([BLOCK_B], tl.int32)
        ns = tl.zeros([BLOCK_B], tl.int32)
        for start in range(0, L, BLOCK_L):
            cols = start + cols0
            mask = row_ok[:, None] & (cols < L)[None, :]
            s, st = _load_tile(logits_ptr, states_ptr, rows64, cols, mask, s_lb, s_ll, s_sb, s_sl)
            picked = _draw_picks(row_h, cols, thr)
            m = tl.maximum(m, tl.max(tl.where(mask, s, float("-inf")), axis=1))
            ne += tl.sum(((st == 0) | (st == 1)).to(tl.int32), axis=1)
            ns += tl.sum(((st == -1) & picked).to(tl.int32), axis=1)
        p, a_ne, b_ne, a_s, b_s, gscale = _row_weights(m, ne, ns, alpha, beta, d, inv_b,
                                                       p_threshold, P_PRINTED)
        # Sweep 2: terms, gradient, ŷ.
        acc = tl.zeros([BLOCK_B], tl.float32)
        for start in range(0, L, BLOCK_L):
            cols = start + cols0
            mask = row_ok[:, None] & (cols < L)[None, :]
            s, st = _load_tile(logits_ptr, states_ptr, rows64, cols, mask, s_lb, s_ll, s_sb, s_sl)
            picked = _draw_picks(row_h, cols, thr)
            acc += _tile_terms(s, st, picked, mask, rows64, cols, L,
                               pseudo_ptr, s_pb, s_pl, grad_ptr, yhat_ptr, picks_ptr,
                               a_ne, b_ne, a_s, b_s, gscale, STORE_GRAD, STORE_PICKS)

    tl.store(row_loss_ptr + rows64, p * acc, mask=row_ok)
    tl.store(p_ptr + rows64, p, mask=row_ok)


# ---------------------------------------------------------------- launch helpers

# GPU: ~4k elements per program keeps registers in check; at least ~4 programs per SM.
_GPU_TILE, _GPU_MAX_BLOCK_L, _GPU_MIN_PROGRAMS = 4096, 4096, 512
# Interpreter: programs run one after another in Python, so fewer, larger tiles are faster.
_INTERP_TILE, _INTERP_MAX_BLOCK_L = 16384, 8192


def choose_blocks(B: int, L: int, *, interpret: bool, block_l: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_L, num_warps) for a B×L problem; ``block_l`` forces the tile width."""
    if block_l is None:
        block_l = min(triton.next_power_of_2(L), _INTERP_MAX_BLOCK_L if interpret else _GPU_MAX_BLOCK_L)
    elif block_l < 16 or block_l & (block_l - 1):
        raise ValueError(f"block_l must be a power of two >= 16, got {block_l!r}")
    tile = _INTERP_TILE if interpret else _GPU_TILE
    block_b = max(1, tile // block_l)
    block_b = min(block_b, triton.next_power_of_2(B))
    if not interpret:  # keep enough programs in flight to cover every SM
        while block_b > 1 and triton.cdiv(B, block_b) < _GPU_MIN_PROGRAMS:
            block_b //= 2
    num_warps = 8 if block_b * block_l >= 4096 else 4
    return block_b, block_l, num_warps


def _check_finite(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
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
    if sample_ids.shape != (B,):
        raise ValueError(f"sample_ids must have shape (B,) = ({B},), got {tuple(sample_ids.shape)}")
    if sample_ids.dtype not in ID_DTYPES:
        raise TypeError(f"sample_ids must be int64 or int32, got {sample_ids.dtype}")
    dev = logits.device
    for name, t in (("states", states), ("pseudo", pseudo), ("sample_ids", sample_ids)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but logits is on {dev}; move all inputs to one device")
    if dev.type == "cpu" and not interpreter_active():
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is "
                           "imported, or pass CUDA tensors")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"tensors must be on a CUDA device (or CPU under TRITON_INTERPRET=1), got {dev}")
    return B, L


def partial_label_forward(
    logits: torch.Tensor, states: torch.Tensor, pseudo: torch.Tensor, sample_ids: torch.Tensor, *,
    alpha: float, beta: float, d: float, q: float, seed: int, epoch: int,
    p_threshold: float = 0.1, p_rule: str = "text", need_grad: bool = True,
    block_l: int | None = None, return_picks: bool = False,
):
    """Launch the fused kernel once.

    Returns ``(row_loss, grad, yhat, p)`` and, with ``return_picks`` (a test hook), the raw
    pick bits ``(B, L) int8`` (before intersecting with missing) as a fifth item.
    row_loss: (B,) fp32 L_i (not divided by B); grad: (B, L) in logits' dtype, dL/ds of the
    mean loss (already / B), or None when ``need_grad`` is False; yhat: (B, L) fp16; p: (B,) fp32.
    """
    B, L = check_inputs(logits, states, pseudo, sample_ids)
    alpha = _check_finite("alpha", alpha)
    beta = _check_finite("beta", beta)
    d = _check_finite("d", d)
    p_threshold = _check_finite("p_threshold", p_threshold)
    if p_rule not in P_RULES:
        raise ValueError(f"p_rule must be one of {P_RULES}, got {p_rule!r}")
    thr = pick_threshold(q)
    key = launch_key(seed, epoch)

    dev = logits.device
    interpret = dev.type == "cpu"
    block_b, block_l, num_warps = choose_blocks(B, L, interpret=interpret, block_l=block_l)
    yhat = torch.empty((B, L), dtype=torch.float16, device=dev)
    grad = torch.empty((B, L), dtype=logits.dtype, device=dev) if need_grad else yhat  # dummy ptr
    picks = torch.empty((B, L), dtype=torch.int8, device=dev) if return_picks else yhat  # dummy ptr
    row_loss = torch.empty((B,), dtype=torch.float32, device=dev)
    p = torch.empty((B,), dtype=torch.float32, device=dev)

    grid = (triton.cdiv(B, block_b),)
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _partial_label_fwd_kernel[grid](
            logits, states, pseudo, sample_ids,
            grad, yhat, row_loss, p, picks,
            B, L,
            logits.stride(0), logits.stride(1), states.stride(0), states.stride(1),
            pseudo.stride(0), pseudo.stride(1), sample_ids.stride(0),
            alpha, beta, d, 1.0 / B, p_threshold, _int32_bits(key), thr,
            P_PRINTED=(p_rule == "printed"), STORE_GRAD=need_grad, STORE_PICKS=return_picks,
            SINGLE=(L <= block_l), BLOCK_B=block_b, BLOCK_L=block_l,
            num_warps=num_warps,
        )
    out = (row_loss, grad if need_grad else None, yhat, p)
    return out + (picks,) if return_picks else out


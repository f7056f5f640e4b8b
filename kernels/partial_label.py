"""The fused partial-label loss (docs/design.md §1, §2): the host API.

One pass reads logits, label states and pseudo labels, draws the q-picks of missing labels
in-kernel (the counter-based hash of ``pml_scale.losses.picks``, bit for bit) and writes, per
row, the loss L_i and the penalty p_i, per element the gradient dL/ds (already divided by the
batch divisor, kept for backward) and ŷ = σ(s) in fp16, and the batch mean of L_i.

Where things are: the Triton kernels in ``device_kernels`` (their helpers in ``device_math``),
launch configs and heuristics in ``launch_config``, plans, tuning and launches in ``launch``
(``direct_launch`` for the launcher shortcut), validation in ``checks``, every cache in
``caches.CACHES``, the environment switches in ``switches``, autograd in ``ops``, the
``torch.library`` op in ``library_op`` (its CPU torch fallback in ``torch_fallback``). The
host-side key and threshold live in ``pick_hash`` (no triton import), shared with the PyTorch
reference in ``pml_scale.losses.picks``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from .caches import CACHES, sm_count, workspace
from .checks import (PSEUDO_WEIGHTS, check_coef, check_finite, check_inputs, check_label_inputs, check_neg,
                     key_bits, num_rows_inv, threshold)
from .device_kernels import _picked_sums_kernel, _scale_kernel
from .direct_launch import direct_launch_ok, int_spec, run_kernel
from .launch import get_plan, run
from .launch_config import INTERP_TILE, LaunchConfig, floor_pow2, next_pow2
from .pick_hash import launch_key, pick_threshold
from .switches import interpreter_active

__all__ = ["ForwardResult", "LaunchConfig", "check_inputs", "clear_caches", "forward", "launch_key",
           "partial_label_forward", "pick_threshold", "picked_pseudo_sums", "scale_", "tuned_configs"]


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
        neg_gamma, neg_margin = check_neg(neg_gamma, neg_margin)
        neg_focus = True
    plan = get_plan(logits, states, pseudo, sample_ids, need_grad, return_picks, p_rule, coef_ptr, block_l,
                    PSEUDO_WEIGHTS.index(pseudo_weights), neg_focus)
    alpha, beta, s_coef = _weights(alpha, beta, coef, plan.dev)
    scalars = (alpha, beta, check_finite("d", d), num_rows_inv(num_rows, plan.B),
               check_finite("p_threshold", p_threshold), key_bits(seed, epoch), threshold(q), s_coef,
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
            run(plan, a, scalars)
    else:
        run(plan, a, scalars)
    return ForwardResult(out[2 * B], grad, yhat, out[B:2 * B], out, picks)


def _weights(alpha, beta, coef, dev) -> tuple[float, float, int]:
    """(alpha, beta, coef stride) for the kernel: host floats α, β, or a (2,) device ``coef``
    the kernel reads itself (then α = β = 0.0 are placeholders)."""
    if coef is not None:
        if alpha is not None or beta is not None:
            raise ValueError("pass either alpha and beta (host floats) or coef (a (2,) device tensor), not both")
        return 0.0, 0.0, check_coef(coef, dev)
    if alpha is None or beta is None:
        raise ValueError("alpha and beta are required (host floats), or pass coef=(2,) tensor instead")
    return check_finite("alpha", alpha), check_finite("beta", beta), 0


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
    B, L = check_label_inputs(states, pseudo, sample_ids)
    dev = states.device
    kb, thr = key_bits(seed, epoch), threshold(q)
    contig = states.stride() == (L, 1) and pseudo.stride() == (L, 1)
    interpret = dev.type == "cpu" or interpreter_active()
    w = min(max(16, next_pow2(L)), 8192 if interpret else 2048)
    bb = floor_pow2(min(max(1, (INTERP_TILE if interpret else 4096) // w), next_pow2(B)))
    grid = (triton.cdiv(B, bb), triton.cdiv(L, w))
    NP = grid[0] * grid[1]
    out = torch.empty(2, dtype=torch.float32, device=dev)
    cnt, part = workspace(dev, 1, 2 * NP)
    args = (states, pseudo, sample_ids, out, cnt, part,
            B, L, NP, states.stride(0), states.stride(1), pseudo.stride(0), pseudo.stride(1), sample_ids.stride(0),
            kb, thr, contig, bb, w)
    key = None
    if dev.type == "cuda" and direct_launch_ok(states, pseudo, sample_ids, out, cnt, part):
        key = (("picked_sums", dev.index, pseudo.dtype, sample_ids.dtype, grid)
               + tuple(int_spec(v) for v in args[6:14]) + (contig, bb, w))
    if dev.type == "cuda" and torch._C._cuda_getDevice() != dev.index:
        with torch.cuda.device(dev):
            run_kernel(_picked_sums_kernel, grid, args, 4, 1, key)
    else:
        run_kernel(_picked_sums_kernel, grid, args, 1 if interpret else 4, 1, key)
    return out


def scale_(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x *= g in place for a contiguous x and a one-element device tensor g, without a host
    sync: the kernel reads g and returns at once when it is 1."""
    n = x.numel()
    if x.device.type == "cuda":
        block, num_warps = 4096, 8
        nprog = max(1, min(triton.cdiv(n, block), 4 * sm_count(x.device)))
        key = ("scale", x.device.index, x.dtype, g.dtype, int_spec(n)) if direct_launch_ok(x, g) else None
    else:
        block, num_warps = 65536, 1
        nprog = max(1, triton.cdiv(n, block))
        key = None
    run_kernel(_scale_kernel, (nprog,), (x, g, n, block), num_warps, 1, key)
    return x


def clear_caches() -> None:
    """Forget plans, tuned configs, workspaces and compiled launchers, and re-read the switches
    (tests; after changing PML_KERNEL_* environment variables)."""
    CACHES.reset()


def tuned_configs() -> dict:
    """{(B bucket, L, logits dtype, pseudo dtype, contiguous, window, need_grad, neg_focus):
    (config label, {label: ms})}."""
    return {k: (v[0].label(), dict(v[1])) for k, v in CACHES.tuned.items()}

"""Planning, tuning and launching one forward of the fused kernel.

Per-call host work is kept to what changes per call: everything that depends only on shapes,
dtypes, strides, device and flags is in a ``LaunchPlan``, cached in ``CACHES.plans``. On a GPU
the first call for a (B bucket, L, dtypes, ...) times the candidate configs of both paths
(``launch_config.candidate_configs``) and keeps the fastest (``CACHES.tuned``).
"""

from __future__ import annotations

import math

import torch
import triton

from .caches import CACHES, workspace
from .checks import P_RULES, check_inputs
from .device_kernels import _row1_kernel, _row_kernel, _split_fused_kernel, _split_stats_kernel
from .direct_launch import aligned, direct_launch_ok, int_spec, run_kernel
from .launch_config import LaunchConfig, check_fits, forced_config, heuristic_config, next_pow2, candidate_configs
from .switches import interpreter_active, tune_verbose, tuning_enabled


class LaunchPlan:
    """Everything about a call that depends only on shapes, dtypes, strides, device and flags.

    Reads PML_KERNEL_CONFIG and PML_KERNEL_TUNE when built (once per cached signature)."""

    __slots__ = ("B", "L", "dev", "cuda", "contig", "window", "strides", "flags", "cfg", "tune_key", "block_l",
                 "dtype", "tuned")

    def __init__(self, logits, states, pseudo, ids, *, need_grad, return_picks, p_rule, coef_ptr, block_l,
                 pseudo_mode=0, neg_focus=False):
        B, L = check_inputs(logits, states, pseudo, ids)
        self.B, self.L, self.dev = B, L, logits.device
        self.cuda = self.dev.type == "cuda"
        self.dtype = logits.dtype
        self.contig = contig = all(t.stride() == (L, 1) for t in (logits, states, pseudo))
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
        forced = forced_config() if block_l is None else None
        if forced is not None:
            check_fits(forced, L, window)
            self.cfg = forced
        else:
            self.cfg = heuristic_config(B, L, interpret=not self.cuda or interpreter_active(), block_l=block_l,
                                        window=window)
        # tuned on the GPU at the first launch unless forced or disabled
        self.tuned = not (self.cuda and block_l is None and forced is None and tuning_enabled()
                          and not interpreter_active())
        # the ours+ negative terms cost more per element: tuned apart from the paper's
        self.tune_key = (min(next_pow2(B), 8192), L, logits.dtype, pseudo.dtype, contig, window, need_grad,
                         bool(neg_focus))


def _plan_key(logits, states, pseudo, ids, need_grad, return_picks, p_rule, coef_ptr, block_l, pseudo_mode,
              neg_focus):
    return (logits.shape, logits.stride(), logits.dtype, logits.device,
            states.shape, states.stride(), states.dtype, states.device,
            pseudo.shape, pseudo.stride(), pseudo.dtype, pseudo.device,
            ids.shape, ids.stride(), ids.dtype, ids.device,
            need_grad, return_picks, p_rule, coef_ptr, block_l, pseudo_mode, neg_focus)


def get_plan(logits, states, pseudo, ids, need_grad, return_picks, p_rule, coef_ptr, block_l,
             pseudo_mode=0, neg_focus=False) -> LaunchPlan:
    """The cached plan of this call signature (built and validated on first use)."""
    try:
        key = _plan_key(logits, states, pseudo, ids, need_grad, return_picks, p_rule, coef_ptr, block_l, pseudo_mode,
                        neg_focus)
    except (AttributeError, TypeError):  # not tensors: let check_inputs name the argument
        key = None
    plans = CACHES.plans
    plan = plans.get(key) if key is not None else None
    if plan is None:
        if p_rule not in P_RULES:
            raise ValueError(f"p_rule must be one of {P_RULES}, got {p_rule!r}")
        plan = LaunchPlan(logits, states, pseudo, ids, need_grad=need_grad, return_picks=return_picks,
                          p_rule=p_rule, coef_ptr=coef_ptr, block_l=block_l, pseudo_mode=pseudo_mode,
                          neg_focus=neg_focus)
        if key is not None:
            if len(plans) > 4096:
                plans.clear()
            plans[key] = plan
    return plan


def run(plan: LaunchPlan, a: tuple, scalars: tuple) -> None:
    """Launch the plan's config (tuning it first on a shape's first GPU call)."""
    if not plan.tuned:
        plan.cfg = tune(plan, a, scalars)
        plan.tuned = True
    launch(plan, plan.cfg, a, scalars)


def launch(plan: LaunchPlan, cfg: LaunchConfig, a: tuple, scalars: tuple) -> None:
    """Launch ``cfg`` once. a = (logits, states, pseudo, ids, coef, grad, yhat, out, picks); scalars =
    (alpha, beta, d, inv_n, p_threshold, key_bits, thr, s_coef, neg_gamma, neg_margin)."""
    key = (plan, cfg, int_spec(scalars[7])) if plan.cuda and direct_launch_ok(*a) else None
    if cfg.path == "row":
        _launch_row(plan, cfg, a, scalars, key)
    else:
        _launch_split(plan, cfg, a, scalars, key)


def _launch_row(plan: LaunchPlan, cfg: LaunchConfig, a: tuple, scalars: tuple, key) -> None:
    logits, states, pseudo, ids, coef, grad, yhat, out, picks = a
    alpha, beta, d, inv_n, p_threshold, key_bits, thr, s_coef, neg_gamma, neg_margin = scalars
    f = plan.flags
    cnt, _ = workspace(plan.dev, 1, 0)
    if key is not None and cnt.data_ptr() & 15:
        key = None
    head = (logits, states, pseudo, ids, coef, grad, yhat, out, picks, cnt, plan.B, plan.L, *plan.strides, s_coef,
            alpha, beta, d, inv_n, p_threshold, key_bits, thr, neg_gamma, neg_margin, f["CONTIG"])
    tail = (f["COEF_PTR"], f["PSEUDO_MODE"], f["P_PRINTED"], f["NEG_FOCUS"], f["STORE_GRAD"], f["STORE_PICKS"],
            f["FAST"])
    if cfg.block_b == 1:  # 1-D form; it can use aligned windows
        run_kernel(_row1_kernel, (plan.B,), head + (f["WINDOW"],) + tail + (cfg.w1, cfg.w2),
                   cfg.num_warps, cfg.num_stages, key)
    else:
        run_kernel(_row_kernel, (triton.cdiv(plan.B, cfg.block_b),), head + tail + (cfg.block_b, cfg.w1, cfg.w2),
                   cfg.num_warps, cfg.num_stages, key)


def _launch_split(plan: LaunchPlan, cfg: LaunchConfig, a: tuple, scalars: tuple, key) -> None:
    logits, states, pseudo, ids, coef, grad, yhat, out, picks = a
    alpha, beta, d, inv_n, p_threshold, key_bits, thr, s_coef, neg_gamma, neg_margin = scalars
    B, L, f = plan.B, plan.L, plan.flags
    s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id = plan.strides
    W = cfg.w1
    K = triton.cdiv(L, W - 16 if f["WINDOW"] else W)
    NK = B * K
    cnt, part = workspace(plan.dev, 1 + B, 4 * NK)
    grid = (B, K)
    run_kernel(_split_stats_kernel, grid, (
        logits, states, pseudo, ids, part, B, L, K, NK, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, key_bits, thr,
        f["CONTIG"], f["WINDOW"], W), cfg.num_warps, cfg.num_stages, key and key + ("stats", aligned(part)))
    run_kernel(_split_fused_kernel, grid, (
        logits, states, pseudo, ids, coef, grad, yhat, out, picks, cnt, part,
        B, L, K, NK, s_lb, s_ll, s_sb, s_sl, s_pb, s_pl, s_id, s_coef,
        alpha, beta, d, inv_n, p_threshold, key_bits, thr, neg_gamma, neg_margin,
        f["CONTIG"], f["WINDOW"], f["COEF_PTR"], f["PSEUDO_MODE"], f["P_PRINTED"], f["NEG_FOCUS"], f["STORE_GRAD"],
        f["STORE_PICKS"], f["FAST"], W, next_pow2(K)), cfg.num_warps, cfg.num_stages,
        key and key + ("fused", aligned(cnt, part)))


def tune(plan: LaunchPlan, a: tuple, scalars: tuple) -> LaunchConfig:
    """Time each candidate config once per (B bucket, L, dtypes, ...) on the GPU; keep the fastest.

    Every config computes the same per-element gradient (one shared device function and the
    same per-row counts), so the choice changes only the summation order of the loss value.
    Not while a CUDA graph is being captured (timing syncs): the heuristic config is used then.
    """
    hit = CACHES.tuned.get(plan.tune_key)
    if hit is not None:
        return hit[0]
    cands = candidate_configs(plan.B, plan.L, window=plan.window)
    if len(cands) == 1 or torch.cuda.is_current_stream_capturing():
        return cands[0]
    times = {cfg.label(): _time_config(plan, cfg, a, scalars) for cfg in cands}
    best = min(cands, key=lambda c: times[c.label()])
    if not math.isfinite(times[best.label()]):
        raise RuntimeError(f"every kernel config failed for B={plan.B}, L={plan.L}: {times}")
    CACHES.tuned[plan.tune_key] = (best, times)
    return best


def _time_config(plan: LaunchPlan, cfg: LaunchConfig, a: tuple, scalars: tuple) -> float:
    """ms per launch of ``cfg`` (after a compile + warm-up launch); inf if it fails to build or run."""
    try:
        launch(plan, cfg, a, scalars)  # compile + warm up
        torch.cuda.synchronize(plan.dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            launch(plan, cfg, a, scalars)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 5
    except Exception as exc:  # e.g. out of registers/shared memory for this config
        if tune_verbose():
            print(f"pml_scale.kernels: config {cfg.label()} failed: {exc}")
        return float("inf")

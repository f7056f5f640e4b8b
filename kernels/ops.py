"""Autograd wrapper around the fused partial-label kernel.

Forward launches the kernel (the batch mean is reduced inside it) and saves the gradient it
wrote. Backward hands that saved gradient back, scaled in place by the upstream gradient: a
tiny kernel reads the upstream scalar on the device and returns at once when it is 1 (the
usual ``loss.backward()``), so there is no host sync and no new B×L tensor.

retain_graph: the first backward through a graph returns the saved buffer itself (scaled by
g₁). A later backward through the same retained graph (call n >= 2) never touches that buffer
again: it returns a new tensor saved × (gₙ / g₁). That is exact when g₁ = 1 (the usual case)
and one extra rounding otherwise; it is NaN if g₁ was 0. Gradients returned by earlier calls
are never modified afterwards. Higher-order gradients (create_graph=True) raise a clear error
(a second-order gradient through the constant saved gradient would silently be zero).
Memory: the saved gradient and ŷ (B×L each) live until the graph is freed; backward allocates
nothing in the first call.

Inside ``torch.compile`` (Dynamo cannot trace this Function: the launcher reads data pointers),
``fused_partial_label_loss`` calls the ``pml_scale::partial_label_loss`` custom op of
``library_op`` instead: same outputs, no graph break; its backward multiplies instead of scaling
in place.
"""

from __future__ import annotations

import torch

from .library_op import fused_partial_label_loss_op
from .partial_label import forward, scale_


class FusedPartialLabelLoss(torch.autograd.Function):
    """apply(logits, states, pseudo, sample_ids, params: dict, block_l: int | None).

    ``params`` holds the keyword arguments of ``partial_label_forward`` (alpha and beta, or
    coef; d, q, seed, epoch, p_threshold, p_rule, optional num_rows, pseudo_weights, neg_gamma,
    neg_margin); ``block_l`` forces the
    tile width (tests use it to exercise the split path). Outputs (loss, yhat, p); only loss
    is differentiable.
    """

    @staticmethod
    def forward(ctx, logits, states, pseudo, sample_ids, params, block_l=None):
        need_grad = bool(ctx.needs_input_grad[0])
        r = forward(logits, states, pseudo, sample_ids, need_grad=need_grad, block_l=block_l, **params)
        ctx.mark_non_differentiable(r.yhat, r.p)
        if need_grad:
            ctx.save_for_backward(r.grad)
        ctx.calls = 0
        return r.loss, r.yhat, r.p

    @staticmethod
    def backward(ctx, g_loss, g_yhat, g_p):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError("fused_partial_label_loss does not support higher-order gradients "
                               "(create_graph=True): its saved gradient is a constant to autograd, so a "
                               "second-order gradient through it would be silently zero; use the torch "
                               "backend of the loss for that")
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        ctx.calls += 1
        if ctx.calls == 1:
            ctx.g1 = g_loss
            return scale_(grad, g_loss), None, None, None, None, None
        # a second backward through a retained graph: leave the returned buffer alone
        return grad * (g_loss / ctx.g1), None, None, None, None, None


def fused_partial_label_loss(
    logits: torch.Tensor, states: torch.Tensor, pseudo: torch.Tensor, sample_ids: torch.Tensor, *,
    alpha: float | None = None, beta: float | None = None, coef: torch.Tensor | None = None,
    d: float, q: float, seed: int, epoch: int,
    p_threshold: float = 0.1, p_rule: str = "text", num_rows: float | None = None,
    pseudo_weights: str = "alpha_beta", neg_gamma: float = 0.0, neg_margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's loss (docs/design.md §1) fused: returns (loss, yhat, p).

    loss: fp32 scalar (1/num_rows) Σ_i L_i (num_rows defaults to B), differentiable wrt
    logits; yhat: (B, L) fp16 σ(logits), no grad (scatter it to the pseudo store); p: (B,)
    fp32 per-row penalty, no grad. logits fp32/bf16/fp16 (B, L), states int8 (1/0/-1),
    pseudo fp32/bf16/fp16 ỹ, sample_ids (B,) int64/int32; any strides. α, β: host floats
    ``alpha``, ``beta``, or ``coef``, a (2,) fp32 tensor (α, β) on the logits' device that the
    kernel reads (no host sync); d a host float. The q-picks are drawn in-kernel exactly as
    ``pml_scale.losses.picks.pick_mask(ids, L, seed, epoch, q)``. State values other than
    1/0/-1 are not scanned for (no device sync) and contribute nothing: mark padded or
    invalid rows that way and pass ``num_rows`` = the number of valid rows. ``pseudo_weights``
    "balanced" weighs both picked pseudo terms (α+β)/2 instead of α and β; "capped" (ours+) does
    so only when α > β and keeps the paper's α, β otherwise.
    ``neg_gamma`` γ⁻ in [0, 8] and ``neg_margin`` m⁻ in [0, 1) (ours+; both 0, the default, is the
    paper and runs the unchanged plain specialisation): every negative-side log(1−ŷ) (observed
    negatives, and the (1−ỹ) part of the picks) becomes u^γ⁻·log(1−u) with u = max(ŷ − m⁻, 0),
    in the loss and its gradient, in the same single pass; ŷ is unchanged. Same definition as
    ``pml_scale.losses.partial.negative_term`` / ``negative_term_grad``.
    """
    params = dict(alpha=alpha, beta=beta, coef=coef, d=d, q=q, seed=seed, epoch=epoch,
                  p_threshold=p_threshold, p_rule=p_rule, num_rows=num_rows, pseudo_weights=pseudo_weights,
                  neg_gamma=neg_gamma, neg_margin=neg_margin)
    if torch.compiler.is_compiling():  # traced: the custom op (no graph break)
        return fused_partial_label_loss_op(logits, states, pseudo, sample_ids, **params)
    return FusedPartialLabelLoss.apply(logits, states, pseudo, sample_ids, params, None)

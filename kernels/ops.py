"""Autograd wrapper around the fused partial-label kernel.

Forward launches the kernel once; it writes dL/ds for the mean loss, which autograd saves.
Backward only scales that saved gradient by the upstream gradient into a NEW tensor (the
saved one is never modified or returned), so calling backward twice with retain_graph gives
independent, correct results. Memory: the saved gradient and ŷ (B×L each) live until the
graph is freed; backward allocates one more B×L gradient (what any op returns), nothing else.
"""

from __future__ import annotations

import torch

from .partial_label import partial_label_forward


class FusedPartialLabelLoss(torch.autograd.Function):
    """apply(logits, states, pseudo, sample_ids, params: dict, block_l: int | None).

    ``params`` holds the keyword arguments of ``partial_label_forward`` (alpha, beta, d, q,
    seed, epoch, p_threshold, p_rule); ``block_l`` forces the tile width (tests use it to
    exercise the two-sweep path). Outputs (loss, yhat, p); only loss is differentiable.
    """

    @staticmethod
    def forward(ctx, logits, states, pseudo, sample_ids, params, block_l=None):
        need_grad = bool(ctx.needs_input_grad[0])
        row_loss, grad, yhat, p = partial_label_forward(
            logits, states, pseudo, sample_ids, need_grad=need_grad, block_l=block_l, **params)
        loss = row_loss.sum() / logits.shape[0]
        ctx.mark_non_differentiable(yhat, p)
        ctx.save_for_backward(grad)
        return loss, yhat, p

    @staticmethod
    def backward(ctx, g_loss, g_yhat, g_p):
        (grad,) = ctx.saved_tensors
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        # g_loss is a 0-dim fp32 tensor: the product keeps grad's dtype and is a fresh buffer.
        return grad * g_loss, None, None, None, None, None


def fused_partial_label_loss(
    logits: torch.Tensor, states: torch.Tensor, pseudo: torch.Tensor, sample_ids: torch.Tensor, *,
    alpha: float, beta: float, d: float, q: float, seed: int, epoch: int,
    p_threshold: float = 0.1, p_rule: str = "text",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's loss (DESIGN.md §1) in one fused launch: returns (loss, yhat, p).

    loss: fp32 scalar (1/B) Σ_i L_i, differentiable wrt logits; yhat: (B, L) fp16 σ(logits),
    no grad (scatter it to the pseudo store); p: (B,) fp32 per-row penalty, no grad.
    logits fp32/bf16/fp16 (B, L), states int8 (1/0/-1), pseudo fp32/bf16/fp16 ỹ, sample_ids
    (B,) int64/int32; any strides. α, β, d are host floats the caller computed; the q-picks
    are drawn in-kernel exactly as ``pml_scale.losses.picks.pick_mask(ids, L, seed, epoch, q)``.
    State values other than 1/0/-1 are not scanned for (no device sync) and contribute nothing.
    """
    params = dict(alpha=alpha, beta=beta, d=d, q=q, seed=seed, epoch=epoch,
                  p_threshold=p_threshold, p_rule=p_rule)
    return FusedPartialLabelLoss.apply(logits, states, pseudo, sample_ids, params, None)

"""The fused loss as a ``torch.library`` custom op, ``pml_scale::partial_label_loss``, so that a
``torch.compile``d step traces through it without a graph break.

A custom op takes tensors, optional tensors and scalars only, so the loss's keyword parameters
are flattened into its schema. It returns (out, yhat, grad): out = row_loss | p | loss (fp32,
2B+1), ŷ (B, L) fp16, and the gradient the kernel wrote (B, L), or (0, L) without need_grad. The
fake implementation gives those shapes and dtypes to the tracer; autograd is registered with
``register_autograd`` (backward scales the saved gradient by the upstream gradient of the loss;
no in-place scaling here, unlike ``ops.FusedPartialLabelLoss``: the compiler owns the buffers).

Devices: CUDA launches the Triton kernel; CPU runs it under Triton's interpreter when
TRITON_INTERPRET=1 is set, else ``torch_fallback`` (the same loss in plain torch).
Annotations are real types, not strings (no ``from __future__ import annotations``): the
schema is inferred from them.
"""

from typing import Optional

import torch

from .partial_label import forward
from .switches import interpreter_active
from .torch_fallback import reference_forward

OP_NAME = "pml_scale::partial_label_loss"


@torch.library.custom_op(OP_NAME, mutates_args=())
def partial_label_loss_op(
    logits: torch.Tensor, states: torch.Tensor, pseudo: torch.Tensor, sample_ids: torch.Tensor,
    coef: Optional[torch.Tensor], alpha: Optional[float], beta: Optional[float], d: float, q: float, seed: int,
    epoch: int, p_threshold: float, p_rule: str, num_rows: Optional[float], pseudo_weights: str, neg_gamma: float,
    neg_margin: float, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, yhat, grad) of one fused launch; see ``ops.fused_partial_label_loss`` for the arguments."""
    if logits.device.type == "cpu" and not interpreter_active():
        return reference_forward(logits, states, pseudo, sample_ids, coef, alpha, beta, d, q, seed, epoch,
                                 p_threshold, p_rule, num_rows, pseudo_weights, neg_gamma, neg_margin, need_grad)
    r = forward(logits, states, pseudo, sample_ids, alpha=alpha, beta=beta, coef=coef, d=d, q=q, seed=seed,
                epoch=epoch, p_threshold=p_threshold, p_rule=p_rule, need_grad=need_grad, num_rows=num_rows,
                pseudo_weights=pseudo_weights, neg_gamma=neg_gamma, neg_margin=neg_margin)
    grad = r.grad if need_grad else logits.new_empty((0, logits.shape[1]))
    return r.out, r.yhat, grad


@partial_label_loss_op.register_fake
def _fake(logits, states, pseudo, sample_ids, coef, alpha, beta, d, q, seed, epoch, p_threshold, p_rule, num_rows,
          pseudo_weights, neg_gamma, neg_margin, need_grad):
    B, L = logits.shape
    out = logits.new_empty((2 * B + 1,), dtype=torch.float32)
    yhat = logits.new_empty((B, L), dtype=torch.float16)
    grad = logits.new_empty((B, L) if need_grad else (0, L))
    return out, yhat, grad


def _setup_context(ctx, inputs, output) -> None:
    out, yhat, grad = output
    ctx.mark_non_differentiable(yhat, grad)
    ctx.save_for_backward(grad)


def _backward(ctx, g_out, g_yhat, g_grad):
    """Only the loss (out[-1]) is differentiable: row_loss and p in ``out`` are not exposed."""
    if torch.is_grad_enabled():  # create_graph=True
        raise RuntimeError("pml_scale::partial_label_loss does not support higher-order gradients "
                           "(create_graph=True): its saved gradient is a constant to autograd")
    (grad,) = ctx.saved_tensors
    g_logits = grad * g_out[-1].to(grad.dtype) if ctx.needs_input_grad[0] else None
    return (g_logits,) + (None,) * 17


partial_label_loss_op.register_autograd(_backward, setup_context=_setup_context)


def fused_partial_label_loss_op(logits, states, pseudo, sample_ids, *, alpha=None, beta=None, coef=None, d, q,
                                seed, epoch, p_threshold=0.1, p_rule="text", num_rows=None,
                                pseudo_weights="alpha_beta", neg_gamma=0.0, neg_margin=0.0):
    """``ops.fused_partial_label_loss`` through the custom op: (loss, yhat, p), traceable. The float
    arguments are constants to torch.compile (each new value recompiles): pass α, β as ``coef``."""
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    out, yhat, _ = partial_label_loss_op(logits, states, pseudo, sample_ids, coef, alpha, beta, d, q, seed, epoch,
                                         p_threshold, p_rule, num_rows, pseudo_weights, neg_gamma, neg_margin,
                                         need_grad)
    B = logits.shape[0]
    return out[2 * B], yhat, out[B:2 * B].detach()

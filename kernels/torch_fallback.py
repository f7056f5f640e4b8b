"""The fused kernel's outputs computed in plain torch, for CPU tensors when the Triton interpreter
is off (the ``pml_scale::partial_label_loss`` op must run on CPU as well: tests, tracing).

Built from the PyTorch reference itself (``pml_scale.losses.partial``: its setup for given
(α, β, d), its per-image losses and its closed-form gradient), imported when first needed so
that ``pml_scale.kernels`` stays a leaf package at import time. Same contract as
``partial_label.forward``: (out, yhat, grad) with out = row_loss | p | loss (fp32), ŷ fp16, and
d loss / d logits in the logits' dtype; states outside {1, 0, -1} contribute nothing.
"""

from __future__ import annotations

import torch


def reference_forward(logits, states, pseudo, sample_ids, coef, alpha, beta, d, q, seed, epoch, p_threshold,
                      p_rule, num_rows, pseudo_weights, neg_gamma, neg_margin, need_grad):
    """(out (2B+1,), yhat (B, L) fp16, grad (B, L) or (0, L)) of the loss, float32 math."""
    from pml_scale.losses.partial import PaperOptions, loss_grad, loss_rows, setup_from_coefficients

    if coef is not None:  # (α, β) stay on the device: no host sync
        alpha, beta = coef[0], coef[1]
    opts = PaperOptions(q=q, p_threshold=p_threshold, p_rule=p_rule, pseudo_weights=pseudo_weights,
                        neg_gamma=neg_gamma, neg_margin=neg_margin)
    s = setup_from_coefficients(opts, logits.float(), states, pseudo, sample_ids, alpha=alpha, beta=beta, d=d,
                                seed=seed, epoch=epoch)
    rows = loss_rows(s)
    n = float(logits.shape[0] if num_rows is None else num_rows)
    out = torch.cat([rows, s.p, (rows.sum() / n).reshape(1)])
    grad = loss_grad(s, n).to(logits.dtype) if need_grad else logits.new_empty((0, logits.shape[1]))
    return out, s.yhat.to(torch.float16), grad

"""The fused kernel's outputs computed in plain torch, for CPU tensors when the Triton interpreter
is off (the ``pml_scale::partial_label_loss`` op must run on CPU as well: tests, tracing).

Built from the public pieces of the PyTorch reference (``pml_scale.losses``: the picks, the
penalty, the pseudo-term weights, the negative-side term and its derivative), imported when
first needed so that ``pml_scale.kernels`` stays a leaf package at import time. Same contract as
``partial_label.forward``: (out, yhat, grad) with out = row_loss | p | loss (fp32), ŷ fp16, and
d loss / d logits in the logits' dtype; states outside {1, 0, -1} contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_forward(logits, states, pseudo, sample_ids, coef, alpha, beta, d, q, seed, epoch, p_threshold,
                      p_rule, num_rows, pseudo_weights, neg_gamma, neg_margin, need_grad):
    """(out (2B+1,), yhat (B, L) fp16, grad (B, L) or (0, L)) of the loss, float32 math."""
    from pml_scale.losses.partial import (PaperOptions, negative_term, negative_term_grad, penalty,
                                          pseudo_coefficients)
    from pml_scale.losses.picks import pick_mask

    x = logits.float()
    B, L = x.shape
    if coef is not None:  # (α, β) stay on the device: no host sync
        alpha, beta = coef[0], coef[1]
    y = torch.sigmoid(x)
    pos, neg = states == 1, states == 0
    picked = pick_mask(sample_ids, L, seed=seed, epoch=epoch, q=q) & (states == -1)
    inv_ne = _inverse_counts(pos | neg)
    inv_ns = _inverse_counts(picked)
    p = penalty(y.amax(dim=1), p_threshold, p_rule)
    a_s, b_s = pseudo_coefficients(PaperOptions(pseudo_weights=pseudo_weights), alpha, beta)
    yt = torch.where(picked, pseudo.float(), 0.0)
    log_p, log_n = F.logsigmoid(x), negative_term(x, neg_gamma, neg_margin)

    def masked_sum(mask, v):  # where, not a product: no 0·inf from a masked-out slot
        return torch.where(mask, v, 0.0).sum(1)

    obs = inv_ne * (alpha * masked_sum(pos, log_p) + beta * masked_sum(neg, log_n))
    pick = d * inv_ns * (a_s * masked_sum(picked, yt * log_p) + b_s * masked_sum(picked, (1 - yt) * log_n))
    rows = -p * (obs + pick)
    n = float(B if num_rows is None else num_rows)
    out = torch.cat([rows, p, (rows.sum() / n).reshape(1)])
    if need_grad:
        d_neg = negative_term_grad(y, neg_gamma, neg_margin)
        w_pos = inv_ne[:, None] * alpha * pos + d * inv_ns[:, None] * a_s * yt
        w_neg = inv_ne[:, None] * beta * neg + d * inv_ns[:, None] * b_s * (picked * (1 - yt))
        grad = (-(p / n)[:, None] * (w_pos * (1 - y) + w_neg * d_neg)).to(logits.dtype)
    else:
        grad = logits.new_empty((0, L))
    return out, y.to(torch.float16), grad


def _inverse_counts(mask: torch.Tensor) -> torch.Tensor:
    """1 / (the row's count of ``mask``), 0 for a row with none."""
    n = mask.sum(1).float()
    return torch.where(n > 0, 1.0 / n.clamp(min=1), 0.0)

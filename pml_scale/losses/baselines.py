"""Baseline losses for partially labelled multi-label training (docs/design.md §1 table).

Every function takes (B, L) logits and int8 states (1 positive, 0 negative, -1 missing),
computes in fp32 (fp64 stays fp64) and returns a scalar. Each keeps the reduction of its
paper's official code, because the reduction sets the useful learning rate:

  mean over all B·L entries: bce, bce_ls, an, wan, epr, role (Cole et al. 2021), ll_r, ll_ct
                             (Kim et al. 2022);
  sum over all entries:      focal, asl (Ridnik et al. 2021), hill, splc (Zhang et al. 2021);
  mean over observed entries: ignore.

Logs use log-sigmoid, so values agree with the official code except where it clamps
(Cole: log(x + 1e-5), ASL: log(max(x, 1e-8))), i.e. only for predictions saturated below
~1e-5. Inputs are checked once by the registry (``validate_batch``), not here. Each loss
holds a few (B, L) temporaries; nothing grows with the dataset size or the number of ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pml_scale.losses.partial import compute_dtype

LL_DELTA = 0.002  # Kim et al.: the rejection rate grows by 0.2 % of B·L per epoch


def _require(name: str, value, lo: float, hi: float) -> float:
    """Option check: a finite number in [lo, hi], else an error naming the option."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}") from None
    if not (lo <= v <= hi) or math.isnan(v):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return v


def _prep(logits: torch.Tensor, states: torch.Tensor):
    x = logits.to(compute_dtype(logits))
    return x, states == 1, states == 0, states == -1


def _positive_targets(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Missing as negative: target 1 on observed positives, 0 everywhere else."""
    return pos.to(x.dtype)


def bce(logits, states) -> torch.Tensor:
    """BCE, missing as negative; mean over B·L."""
    x, pos, _, _ = _prep(logits, states)
    return F.binary_cross_entropy_with_logits(x, _positive_targets(x, pos))


def bce_ls(logits, states, *, eps: float = 0.1) -> torch.Tensor:
    """BCE against targets smoothed on both sides (1 → 1−ε, 0 → ε), missing as negative;
    mean over B·L (Cole et al.'s ``loss_bce_ls``)."""
    eps = _require("eps", eps, 0.0, 1.0)
    x, pos, _, _ = _prep(logits, states)
    y = _positive_targets(x, pos)
    return F.binary_cross_entropy_with_logits(x, y * (1 - eps) + (1 - y) * eps)


def asl(logits, states, *, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05,
        detach_weights: bool = True) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al.), missing as negative; returns the sum (official code).

    Positive: −(1−ŷ)^γ⁺ log ŷ; negative with ŷ⁻ = max(ŷ − clip, 0): −(ŷ⁻)^γ⁻ log(1 − ŷ⁻).
    ``detach_weights`` mirrors the official ``disable_torch_grad_focal_loss=True``: no
    gradient through the focusing weights.
    """
    gamma_pos = _require("gamma_pos", gamma_pos, 0.0, math.inf)
    gamma_neg = _require("gamma_neg", gamma_neg, 0.0, math.inf)
    clip = _require("clip", clip, 0.0, 0.999)
    x, pos, _, _ = _prep(logits, states)
    y = torch.sigmoid(x)
    log_pos = F.logsigmoid(x)
    if clip > 0:
        y_neg = (y - clip).clamp(min=0)
        log_neg = torch.log1p(-y_neg)            # log(1 − ŷ⁻) >= log(clip)
    else:
        y_neg = y
        log_neg = F.logsigmoid(-x)
    w_pos, w_neg = (1 - y).pow(gamma_pos), y_neg.pow(gamma_neg)
    if detach_weights:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    return -torch.where(pos, w_pos * log_pos, w_neg * log_neg).sum()


def focal(logits, states, *, gamma: float = 2.0, detach_weights: bool = True) -> torch.Tensor:
    """Focal loss as ASL with γ⁺ = γ⁻ = γ, no clip, no α; missing as negative; sum."""
    return asl(logits, states, gamma_pos=gamma, gamma_neg=gamma, clip=0.0, detach_weights=detach_weights)


def assume_negative(logits, states) -> torch.Tensor:
    """AN (Cole et al.): BCE with observed positives as 1 and everything else as 0; mean
    over B·L. With our states this equals ``bce`` (missing and negative both count as 0)."""
    return bce(logits, states)


def weak_assume_negative(logits, states) -> torch.Tensor:
    """WAN (Cole et al.): AN with the negative terms weighted 1/(L−1); mean over B·L."""
    x, pos, _, _ = _prep(logits, states)
    L = x.shape[1]
    if L < 2:
        raise ValueError(f"wan needs at least 2 labels (weight 1/(L-1)), got L={L}")
    loss = torch.where(pos, -F.logsigmoid(x), -F.logsigmoid(-x) / (L - 1))
    return loss.mean()


def expected_positive_penalty(yhat: torch.Tensor, k: float) -> torch.Tensor:
    """Cole et al.'s regulariser: (mean_i Σ_j ŷ_ij − k)² / L²."""
    return (yhat.sum(1).mean() - k).pow(2) / yhat.shape[1] ** 2


def _observed_terms(x, pos, neg, use_negatives: bool) -> torch.Tensor:
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    terms = torch.where(pos, -F.logsigmoid(x), zero)
    if use_negatives:
        terms = terms + torch.where(neg, -F.logsigmoid(-x), zero)
    return terms


def _check_k(k) -> float:
    if k is None:
        raise ValueError("expected_positives (k, expected positives per image) is required for epr/role: "
                         "set it as a loss option or pass LossInputs.expected_positives")
    k = float(k)
    if not (k >= 0 and math.isfinite(k)):
        raise ValueError(f"expected_positives must be a finite number >= 0, got {k!r}")
    return k


def expected_positive_regularization(logits, states, *, expected_positives: float,
                                     use_negatives: bool = False) -> torch.Tensor:
    """EPR (Cole et al.): −log ŷ on observed positives (mean over B·L) plus the expected
    positive penalty. Missing entries are ignored. The official code has no observed
    negatives (SPL); ``use_negatives=True`` adds −log(1−ŷ) on them for PAL settings."""
    k = _check_k(expected_positives)
    x, pos, neg, _ = _prep(logits, states)
    return _observed_terms(x, pos, neg, use_negatives).mean() + expected_positive_penalty(torch.sigmoid(x), k)


def role(logits, estimates, states, *, expected_positives: float, use_negatives: bool = False) -> torch.Tensor:
    """ROLE (Cole et al.): classifier f (``logits``) and label estimator g (``estimates``,
    the (B, L) rows of the trainer's learnable N×L logit matrix).

    loss = Σ[½(pos_f + pos_g) + ½(BCE(f, σ(g).detach()) + BCE(g, σ(f).detach()))] / (B·L)
           + ½(EPR_penalty(σ(f)) + EPR_penalty(σ(g)))
    The cross terms cover every entry, as in the official code.
    """
    k = _check_k(expected_positives)
    x, pos, neg, _ = _prep(logits, states)
    g = estimates.to(x.dtype)
    yf, yg = torch.sigmoid(x), torch.sigmoid(g)
    obs = 0.5 * (_observed_terms(x, pos, neg, use_negatives) + _observed_terms(g, pos, neg, use_negatives))
    cross_f = F.binary_cross_entropy_with_logits(x, yg.detach(), reduction="none")
    cross_g = F.binary_cross_entropy_with_logits(g, yf.detach(), reduction="none")
    main = (obs + 0.5 * (cross_f + cross_g)).mean()
    return main + 0.5 * (expected_positive_penalty(yf, k) + expected_positive_penalty(yg, k))


def ignore_missing(logits, states) -> torch.Tensor:
    """BCE over observed entries only; mean over the observed entries (0 if there are none,
    still attached to the graph)."""
    x, pos, neg, _ = _prep(logits, states)
    observed = pos | neg
    n = int(observed.sum())
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    terms = torch.where(observed, F.binary_cross_entropy_with_logits(x, pos.to(x.dtype), reduction="none"), zero)
    return terms.sum() / max(n, 1)


def hill(logits, states, *, lamb: float = 1.5, margin: float = 1.0, gamma: float = 2.0) -> torch.Tensor:
    """Hill (Zhang et al.): positives −(1−σ(s−m))^γ log σ(s−m) (focal margin), negatives and
    missing (λ − ŷ)ŷ²; returns the sum (official default)."""
    lamb = _require("lamb", lamb, -math.inf, math.inf)
    margin = _require("margin", margin, -math.inf, math.inf)
    gamma = _require("gamma", gamma, 0.0, math.inf)
    x, pos, _, _ = _prep(logits, states)
    xm = x - margin
    loss_pos = -(1 - torch.sigmoid(xm)).pow(gamma) * F.logsigmoid(xm)
    y = torch.sigmoid(x)
    loss_neg = (lamb - y) * y.pow(2)
    return torch.where(pos, loss_pos, loss_neg).sum()


def splc(logits, states, *, epoch: int, tau: float = 0.6, change_epoch: int = 1, margin: float = 1.0,
         gamma: float = 2.0) -> torch.Tensor:
    """SPLC with focal margin (Zhang et al.); returns the sum (official default).

    Observed positives: −(1−σ(s−m))^γ log σ(s−m). From ``epoch >= change_epoch`` on (0-based
    here, as in the official loop), missing entries with σ(s) > τ count as positives without
    margin: −(1−ŷ)^γ log ŷ. Other entries (negatives, missing): −ŷ^γ log(1−ŷ). Observed
    negatives are never corrected (the official code has none to protect).
    """
    tau = _require("tau", tau, 0.0, 1.0)
    margin = _require("margin", margin, -math.inf, math.inf)
    gamma = _require("gamma", gamma, 0.0, math.inf)
    if int(change_epoch) != change_epoch or change_epoch < 0:
        raise ValueError(f"change_epoch must be an integer >= 0, got {change_epoch!r}")
    x, pos, _, missing = _prep(logits, states)
    xs = torch.where(pos, x - margin, x)
    target = pos
    if epoch >= change_epoch:
        target = pos | (missing & (torch.sigmoid(x.detach()) > tau))
    y = torch.sigmoid(xs)
    loss_pos = -(1 - y).pow(gamma) * F.logsigmoid(xs)
    loss_neg = -y.pow(gamma) * F.logsigmoid(-xs)
    return torch.where(target, loss_pos, loss_neg).sum()


def large_loss_k(epoch: int, batch_size: int, num_labels: int, delta: float = LL_DELTA) -> int:
    """Entries modified per batch: ceil(Δ · epoch · B · L), epoch 0-based (0 at the start)."""
    if int(epoch) != epoch or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    if not (0.0 <= float(delta) <= 1.0):
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    return int(math.ceil(float(delta) * int(epoch) * batch_size * num_labels - 1e-9))


def large_loss(logits, states, *, epoch: int, delta: float = LL_DELTA, mode: str = "reject") -> torch.Tensor:
    """LL-R / LL-Ct (Kim et al.): AN, then among the missing entries the k largest losses
    (k = ``large_loss_k``) are dropped ("reject") or their target flipped to 1 ("correct");
    mean over B·L. Exactly k entries are modified (the official code's threshold compare
    may modify more on ties); k is capped at the number of missing entries.
    """
    if mode not in ("reject", "correct"):
        raise ValueError(f"mode must be 'reject' or 'correct', got {mode!r}")
    x, pos, _, missing = _prep(logits, states)
    loss = F.binary_cross_entropy_with_logits(x, pos.to(x.dtype), reduction="none")
    k = min(large_loss_k(epoch, x.shape[0], x.shape[1], delta), int(missing.sum()))
    if k == 0:
        return loss.mean()
    cand = torch.where(missing, loss.detach(), torch.full_like(loss, -math.inf)).flatten()
    chosen = torch.zeros(cand.numel(), dtype=torch.bool, device=x.device)
    chosen[torch.topk(cand, k).indices] = True
    chosen = chosen.view_as(loss)
    if mode == "reject":
        replaced = torch.zeros_like(loss)
    else:
        replaced = -F.logsigmoid(x)
    return torch.where(chosen, replaced, loss).mean()

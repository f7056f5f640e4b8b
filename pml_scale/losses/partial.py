"""The paper's loss (DESIGN.md §1), readable pure PyTorch: the reference the fused Triton
kernel is tested against, and the CPU path.

Per image i of a batch of B over its L labels (E⁺/E⁻ observed positives/negatives, N_e = |E|,
S = picked missing labels, ŷ = σ(s), ỹ the stored pseudo label):

    A_i = (1/N_e) Σ_{E⁺} log ŷ     + (d/|S|) Σ_S ỹ log ŷ
    B_i = (1/N_e) Σ_{E⁻} log(1−ŷ)  + (d/|S|) Σ_S (1−ỹ) log(1−ŷ)
    L_i = −p_i (α A_i + β B_i)      L = (1/B) Σ_i L_i

An empty E or S contributes 0 to its term. Logs are taken in log-sigmoid form, so saturated
logits give finite losses. Memory: the reference holds a handful of (B, L) fp32 temporaries
(picks, masks, log terms); the fused kernel is the memory-lean path for large B·L. Nothing
here grows with the dataset size N or the number of ranks (α/β take global counts as two
scalars through ``batch_counts``).

Ablations (paper Table VII), our readings:
  use_alpha_beta=False → α = β = 1: the plain two-part BCE of Eq. (7) that Eq. (8) adds the
                         penalty coefficients to;
  use_d=False → d = 1;  use_p=False → p = 1;  use_q=False → q = 1 (every missing entry used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pml_scale.losses.picks import pick_mask, pick_threshold

D_SCHEDULES = ("centered", "printed")
P_RULES = ("text", "printed")
BACKENDS = ("torch", "triton", "auto")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STATE_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------- input checks
def validate_batch(logits, states, *, pseudo=None, sample_ids=None, estimates=None) -> None:
    """One shared check for every loss: shapes, dtypes, devices and values.

    Raises ValueError/TypeError naming the offending argument and the accepted values.
    Value checks read each tensor once and sync with the host (cheap next to a train step,
    but pass ``validate=False`` to the losses to skip them in a tuned hot loop).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (B, L), got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    shape = tuple(logits.shape)
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"logits must have B >= 1 rows and L >= 1 labels, got shape {shape}")
    bad = ~torch.isfinite(logits.detach())
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"logits contain {int(bad.sum())} NaN/inf value(s), first at [{i}, {j}] = "
            f"{float(logits[i, j])}; logits must be finite"
        )
    if not isinstance(states, torch.Tensor):
        raise TypeError(f"states must be a torch.Tensor, got {type(states).__name__}")
    if tuple(states.shape) != shape:
        raise ValueError(f"states must have the shape of logits {shape}, got {tuple(states.shape)}")
    if states.dtype not in _STATE_DTYPES:
        raise TypeError(f"states must be a signed integer tensor (int8 by convention), got {states.dtype}")
    if states.device != logits.device:
        raise ValueError(f"states is on {states.device} but logits on {logits.device}")
    bad = (states < -1) | (states > 1)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"states must hold only -1 (missing), 0 (negative), 1 (positive); "
            f"found {int(states[i, j])} at [{i}, {j}] ({int(bad.sum())} bad entries)"
        )
    if pseudo is not None:
        if not isinstance(pseudo, torch.Tensor) or pseudo.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"pseudo must be a float tensor, got {getattr(pseudo, 'dtype', type(pseudo))}")
        if tuple(pseudo.shape) != shape:
            raise ValueError(f"pseudo must have the shape of logits {shape}, got {tuple(pseudo.shape)}")
        if pseudo.device != logits.device:
            raise ValueError(f"pseudo is on {pseudo.device} but logits on {logits.device}")
        bad = ~((pseudo >= 0) & (pseudo <= 1))  # also catches NaN
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"pseudo must lie in [0, 1]; found {float(pseudo[i, j])} at [{i}, {j}]")
    if sample_ids is not None:
        if not isinstance(sample_ids, torch.Tensor) or sample_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"sample_ids must be an int64/int32 tensor, got {getattr(sample_ids, 'dtype', type(sample_ids))}"
            )
        if tuple(sample_ids.shape) != (shape[0],):
            raise ValueError(f"sample_ids must have shape ({shape[0]},), got {tuple(sample_ids.shape)}")
        if sample_ids.device != logits.device:
            raise ValueError(f"sample_ids is on {sample_ids.device} but logits on {logits.device}")
        if bool((sample_ids < 0).any()):
            raise ValueError(f"sample_ids must be >= 0, found {int(sample_ids.min())}")
    if estimates is not None:
        if not isinstance(estimates, torch.Tensor) or estimates.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"estimates must be a float tensor, got {getattr(estimates, 'dtype', type(estimates))}")
        if tuple(estimates.shape) != shape:
            raise ValueError(f"estimates must have the shape of logits {shape}, got {tuple(estimates.shape)}")
        if not bool(torch.isfinite(estimates.detach()).all()):
            raise ValueError("estimates contain NaN/inf; estimates (label-estimator logits) must be finite")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (for gradient checks); every other float computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- coefficients
def alpha_beta(P, T, gamma: float = 0.05) -> tuple[float, float]:
    """Eq. (8): β = max(P/T, γ), α = 1 − β.

    P = observed positives, T = all label slots (B·L) of the batch, or their sums over the
    global batch under data parallelism. 0-d tensors are accepted (one host sync).
    """
    P = float(P.item() if isinstance(P, torch.Tensor) else P)
    T = float(T.item() if isinstance(T, torch.Tensor) else T)
    gamma = float(gamma)
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"T (label slots in the batch) must be a positive number, got {T!r}")
    if not (0.0 <= P <= T):
        raise ValueError(f"P (observed positives) must be in [0, T={T:g}], got {P!r}")
    beta = max(P / T, gamma)
    return 1.0 - beta, beta


def d_coefficient(epoch: int, total_epochs: int, m: float = 3.0, schedule: str = "centered") -> float:
    """Eq. (9), e the 0-based epoch, E the total epochs.

    "centered" (default, the text's reading): d = exp((e + m − E)/E), so d = 1 at e = E − m.
    "printed" (the formula as printed): d = exp((e + m)/E).
    """
    if schedule not in D_SCHEDULES:
        raise ValueError(f"d_schedule must be one of {D_SCHEDULES}, got {schedule!r}")
    if int(total_epochs) != total_epochs or total_epochs < 1:
        raise ValueError(f"total_epochs must be an integer >= 1, got {total_epochs!r}")
    if int(epoch) != epoch or epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0 (0-based), got {epoch!r}")
    m = float(m)
    if not math.isfinite(m):
        raise ValueError(f"m must be finite, got {m!r}")
    E = float(total_epochs)
    if schedule == "centered":
        return math.exp((epoch + m - E) / E)
    return math.exp((epoch + m) / E)


def penalty(yhat_rowmax: torch.Tensor, threshold: float = 0.1, rule: str = "text") -> torch.Tensor:
    """Eq. (10) per row from max_j ŷ_ij; returns (B,) fp32 in {1, 2}, no gradient.

    "text" (default): p = 2 if every prediction is below the threshold, else 1.
    "printed": its inverse, p = 2 if some prediction reaches the threshold.
    """
    if rule not in P_RULES:
        raise ValueError(f"p_rule must be one of {P_RULES}, got {rule!r}")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"p_threshold must be finite, got {threshold!r}")
    low = yhat_rowmax.detach() < threshold
    if rule == "printed":
        low = ~low
    return 1.0 + low.to(torch.float32)


# --------------------------------------------------------------------------- shared setup
@dataclass
class _Setup:
    x: torch.Tensor          # (B, L) logits in the compute dtype
    yhat: torch.Tensor       # (B, L) σ(x), detached
    pos: torch.Tensor        # (B, L) bool E⁺
    neg: torch.Tensor        # (B, L) bool E⁻
    picked: torch.Tensor     # (B, L) bool S
    missing: torch.Tensor    # (B, L) bool M
    pseudo: torch.Tensor     # (B, L) ỹ in the compute dtype
    inv_ne: torch.Tensor     # (B,) 1/N_e or 0
    inv_ns: torch.Tensor     # (B,) 1/|S| or 0
    p: torch.Tensor          # (B,) in {1, 2}
    alpha: float
    beta: float
    d: float


def check_paper_options(q, gamma, m, p_threshold, d_schedule, p_rule, backend) -> None:
    pick_threshold(q)  # raises for q outside [0, 1]
    if d_schedule not in D_SCHEDULES:
        raise ValueError(f"d_schedule must be one of {D_SCHEDULES}, got {d_schedule!r}")
    if p_rule not in P_RULES:
        raise ValueError(f"p_rule must be one of {P_RULES}, got {p_rule!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (0.0 <= float(gamma) <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if not math.isfinite(float(m)):
        raise ValueError(f"m must be finite, got {m!r}")
    if not math.isfinite(float(p_threshold)):
        raise ValueError(f"p_threshold must be finite, got {p_threshold!r}")


def _coefficients(states, *, epoch, total_epochs, gamma, m, d_schedule, batch_counts,
                  use_alpha_beta, use_d) -> tuple[float, float, float]:
    if use_alpha_beta:
        if batch_counts is None:
            P, T = int((states == 1).sum()), states.numel()
        else:
            try:
                P, T = batch_counts
            except (TypeError, ValueError):
                raise ValueError(f"batch_counts must be a pair (P, T), got {batch_counts!r}") from None
        alpha, beta = alpha_beta(P, T, gamma)
    else:
        alpha = beta = 1.0
    d = d_coefficient(epoch, total_epochs, m, d_schedule)
    return alpha, beta, (d if use_d else 1.0)


def _setup(logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed, q, gamma, m,
           p_threshold, d_schedule, p_rule, batch_counts, use_alpha_beta, use_d, use_p, use_q,
           validate) -> _Setup:
    check_paper_options(q, gamma, m, p_threshold, d_schedule, p_rule, "torch")
    if validate:
        validate_batch(logits, states, pseudo=pseudo, sample_ids=sample_ids)
    alpha, beta, d = _coefficients(states, epoch=epoch, total_epochs=total_epochs, gamma=gamma, m=m,
                                   d_schedule=d_schedule, batch_counts=batch_counts,
                                   use_alpha_beta=use_alpha_beta, use_d=use_d)
    dt = compute_dtype(logits)
    x = logits.to(dt)
    yhat = torch.sigmoid(x.detach())
    pos, neg, missing = states == 1, states == 0, states == -1
    num_labels = logits.shape[1]
    picks = pick_mask(sample_ids, num_labels, seed=seed, epoch=epoch, q=(q if use_q else 1.0))
    picked = picks & missing
    n_e = (pos | neg).sum(1).to(dt)
    n_s = picked.sum(1).to(dt)
    inv_ne = torch.where(n_e > 0, 1.0 / n_e.clamp(min=1), torch.zeros_like(n_e))
    inv_ns = torch.where(n_s > 0, 1.0 / n_s.clamp(min=1), torch.zeros_like(n_s))
    if use_p:
        p = penalty(yhat.amax(dim=1), p_threshold, p_rule).to(dt)
    else:
        p = torch.ones(logits.shape[0], dtype=dt, device=logits.device)
    return _Setup(x, yhat, pos, neg, picked, missing, pseudo.to(dt), inv_ne, inv_ns, p, alpha, beta, d)


def _rows(s: _Setup) -> torch.Tensor:
    """(B,) per-image losses L_i, differentiable in s.x."""
    log_p = F.logsigmoid(s.x)      # log ŷ
    log_n = F.logsigmoid(-s.x)     # log(1 − ŷ)
    zero = torch.zeros((), dtype=s.x.dtype, device=s.x.device)
    a_obs = torch.where(s.pos, log_p, zero).sum(1)
    b_obs = torch.where(s.neg, log_n, zero).sum(1)
    a_pick = torch.where(s.picked, s.pseudo * log_p, zero).sum(1)
    b_pick = torch.where(s.picked, (1 - s.pseudo) * log_n, zero).sum(1)
    A = s.inv_ne * a_obs + s.d * s.inv_ns * a_pick
    B = s.inv_ne * b_obs + s.d * s.inv_ns * b_pick
    return -s.p * (s.alpha * A + s.beta * B)


def _stats(s: _Setup) -> dict[str, float]:
    n_missing = int(s.missing.sum())
    return {
        "alpha": s.alpha,
        "beta": s.beta,
        "d": s.d,
        "p2_share": float((s.p == 2).to(torch.float32).mean()),
        "picked_share": (int(s.picked.sum()) / n_missing) if n_missing else 0.0,
    }


# --------------------------------------------------------------------------- public face
def partial_label_loss_with_stats(logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed,
                                  q=0.5, gamma=0.05, m=3.0, p_threshold=0.1, d_schedule="centered",
                                  p_rule="text", batch_counts=None, backend="torch",
                                  use_alpha_beta=True, use_d=True, use_p=True, use_q=True,
                                  validate=True):
    """(loss, stats, ŷ): the scalar mean loss, a dict of floats (alpha, beta, d, p2_share =
    fraction of rows with p = 2, picked_share = |S| / |M| over the batch), and ŷ = σ(s)
    detached (B, L) for the pseudo-label store (fp32 from "torch", fp16 from "triton").

    ``batch_counts=(P, T)`` overrides the local counts (the trainer passes global sums).
    On "triton", picked_share is NaN (the picks never leave the kernel).
    """
    check_paper_options(q, gamma, m, p_threshold, d_schedule, p_rule, backend)
    if backend == "auto":
        backend = "triton" if logits.is_cuda else "torch"
    if backend == "triton":
        return _triton(logits, states, pseudo, sample_ids, epoch=epoch, total_epochs=total_epochs,
                       seed=seed, q=q, gamma=gamma, m=m, p_threshold=p_threshold, d_schedule=d_schedule,
                       p_rule=p_rule, batch_counts=batch_counts, use_alpha_beta=use_alpha_beta,
                       use_d=use_d, use_p=use_p, use_q=use_q, validate=validate)
    s = _setup(logits, states, pseudo, sample_ids, epoch=epoch, total_epochs=total_epochs, seed=seed,
               q=q, gamma=gamma, m=m, p_threshold=p_threshold, d_schedule=d_schedule, p_rule=p_rule,
               batch_counts=batch_counts, use_alpha_beta=use_alpha_beta, use_d=use_d, use_p=use_p,
               use_q=use_q, validate=validate)
    loss = _rows(s).mean()
    return loss, _stats(s), s.yhat


def partial_label_loss(logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed,
                       q=0.5, gamma=0.05, m=3.0, p_threshold=0.1, d_schedule="centered", p_rule="text",
                       batch_counts=None, backend="torch", use_alpha_beta=True, use_d=True, use_p=True,
                       use_q=True, validate=True) -> torch.Tensor:
    """The paper's loss: scalar mean over the B images, differentiable in ``logits``.

    logits (B, L) fp32/bf16/fp16 (computed in fp32), states int8 in {-1, 0, 1}, pseudo (B, L)
    ỹ in [0, 1], sample_ids (B,) int64. Picks S = pick_mask(ids, L, seed, epoch, q) ∧ missing.
    use_alpha_beta/use_d/use_p/use_q: ablations (see the module docstring); validate=False skips
    the input value checks. backend: "torch" | "triton" | "auto" (triton on CUDA tensors).
    """
    loss, _, _ = partial_label_loss_with_stats(
        logits, states, pseudo, sample_ids, epoch=epoch, total_epochs=total_epochs, seed=seed, q=q,
        gamma=gamma, m=m, p_threshold=p_threshold, d_schedule=d_schedule, p_rule=p_rule,
        batch_counts=batch_counts, backend=backend, use_alpha_beta=use_alpha_beta, use_d=use_d,
        use_p=use_p, use_q=use_q, validate=validate)
    return loss


def partial_label_loss_grad(logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed,
                            q=0.5, gamma=0.05, m=3.0, p_threshold=0.1, d_schedule="centered",
                            p_rule="text", batch_counts=None, use_alpha_beta=True, use_d=True,
                            use_p=True, use_q=True, validate=True) -> torch.Tensor:
    """Closed-form d(loss)/d(logits), (B, L) in the compute dtype: the kernel's reference.

    E⁺: −pα(1−ŷ)/(N_e B) · E⁻: +pβŷ/(N_e B) · S: −p d[αỹ(1−ŷ) − β(1−ỹ)ŷ]/(|S| B) · else 0.
    """
    s = _setup(logits, states, pseudo, sample_ids, epoch=epoch, total_epochs=total_epochs, seed=seed,
               q=q, gamma=gamma, m=m, p_threshold=p_threshold, d_schedule=d_schedule, p_rule=p_rule,
               batch_counts=batch_counts, use_alpha_beta=use_alpha_beta, use_d=use_d, use_p=use_p,
               use_q=use_q, validate=validate)
    y, yt = s.yhat, s.pseudo
    scale = (s.p / logits.shape[0])[:, None]
    g_obs = torch.where(s.pos, -s.alpha * (1 - y), torch.where(s.neg, s.beta * y, torch.zeros_like(y)))
    g_pick = -s.d * (s.alpha * yt * (1 - y) - s.beta * (1 - yt) * y)
    g = s.inv_ne[:, None] * g_obs + torch.where(s.picked, s.inv_ns[:, None] * g_pick, torch.zeros_like(y))
    return scale * g


# --------------------------------------------------------------------------- triton backend
def _triton(logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed, q, gamma, m, p_threshold,
            d_schedule, p_rule, batch_counts, use_alpha_beta, use_d, use_p, use_q, validate):
    try:
        from pml_scale.kernels import fused_partial_label_loss
    except ImportError as exc:
        raise RuntimeError(
            "backend='triton' needs pml_scale.kernels.fused_partial_label_loss, which failed to import "
            f"({exc}); use backend='torch' (or 'auto' on CPU)"
        ) from exc
    if validate:
        validate_batch(logits, states, pseudo=pseudo, sample_ids=sample_ids)
    alpha, beta, d = _coefficients(states, epoch=epoch, total_epochs=total_epochs, gamma=gamma, m=m,
                                   d_schedule=d_schedule, batch_counts=batch_counts,
                                   use_alpha_beta=use_alpha_beta, use_d=use_d)
    if not use_p:  # ŷ >= 0 always, so "max ŷ < 0" never holds: p = 1 on every row
        p_rule, p_threshold = "text", 0.0
    loss, yhat, p = fused_partial_label_loss(
        logits, states, pseudo, sample_ids, alpha=alpha, beta=beta, d=d, q=(q if use_q else 1.0),
        seed=seed, epoch=epoch, p_threshold=p_threshold, p_rule=p_rule)
    stats = {"alpha": alpha, "beta": beta, "d": d,
             "p2_share": float((p == 2).to(torch.float32).mean()), "picked_share": float("nan")}
    return loss, stats, yhat

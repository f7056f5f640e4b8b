"""The paper's loss (docs/design.md §1), readable pure PyTorch: the reference the fused Triton
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

α/β readings of Eq. (8), β = max(P/T, γ), α = 1 − β (``alpha_beta=``; the paper does not say
which labels P and T count, and the choice decides whether the method works, see README):
  observed  (default, chosen by the readings grid) P = observed positives, T = observed
            entries; β clamped to [γ, 1 − γ];
  slots     P = observed positives, T = all B·L label slots of the batch (β floored at γ);
  seen      P = observed positives + Σ_S ỹ, T = observed + picked entries (what the loss sees,
            pseudo labels counted by their value); β clamped to [γ, 1 − γ];
  none      α = β = 1.
Under data parallelism the trainer sums (P, T) over the global batch (``alpha_beta_counts``
on each rank, one all-reduce) and passes them as ``batch_counts``.

Ablations (paper Table VII), our readings:
  use_alpha_beta=False → α = β = 1 (the reading ``none``): the plain two-part BCE of Eq. (7)
                         that Eq. (8) adds the penalty coefficients to;
  use_d=False → d = 1;  use_p=False → p = 1;  use_q=False → q = 1 (every missing entry used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pml_scale.losses.picks import pick_mask, pick_threshold

ALPHA_BETA_READINGS = ("slots", "observed", "seen", "none")
PSEUDO_WEIGHTS = ("alpha_beta", "balanced", "capped")
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
    shape = _check_logits(logits)
    _check_states(states, logits, shape)
    if pseudo is not None:
        _check_pseudo(pseudo, logits, shape)
    if sample_ids is not None:
        _check_sample_ids(sample_ids, logits, shape)
    if estimates is not None:
        _check_estimates(estimates, shape)


def _check_logits(logits) -> tuple:
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
    return shape


def _check_states(states, logits, shape: tuple) -> None:
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


def _check_pseudo(pseudo, logits, shape: tuple) -> None:
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


def _check_sample_ids(sample_ids, logits, shape: tuple) -> None:
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


def _check_estimates(estimates, shape: tuple) -> None:
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
def alpha_beta(P, T, gamma: float = 0.05, *, clamp_high: bool = False):
    """Eq. (8): β = max(P/T, γ), α = 1 − β; with ``clamp_high`` β is also at most 1 − γ.

    Host numbers give floats (checked: 0 <= P <= T, T > 0). Tensors give 0-d fp64 tensors
    computed on their device without a host sync (the trainer's all-reduced counts), unchecked;
    T = 0 there (no entry counted in the whole batch) gives β = γ.
    """
    gamma = float(gamma)
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    hi = 1.0 - gamma if clamp_high else 1.0
    if isinstance(P, torch.Tensor):
        T = torch.as_tensor(T, dtype=torch.float64, device=P.device)
        ratio = torch.where(T > 0, P.double() / T.clamp(min=1e-300), torch.zeros_like(T))
        beta = ratio.clamp(min=gamma, max=max(hi, gamma))  # fp64 0-d: promotes no (B, L) tensor
        return 1.0 - beta, beta
    P = float(P.item() if isinstance(P, torch.Tensor) else P)
    T = float(T.item() if isinstance(T, torch.Tensor) else T)
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"T (label entries counted in the batch) must be a positive number, got {T!r}")
    if not (0.0 <= P <= T):
        raise ValueError(f"P (positives counted) must be in [0, T={T:g}], got {P!r}")
    beta = min(max(P / T, gamma), max(hi, gamma))
    return 1.0 - beta, beta


def check_reading(alpha_beta_reading: str) -> str:
    if alpha_beta_reading not in ALPHA_BETA_READINGS:
        raise ValueError(f"alpha_beta must be one of {ALPHA_BETA_READINGS}, got {alpha_beta_reading!r}")
    return alpha_beta_reading


def alpha_beta_counts(reading: str, states: torch.Tensor, pseudo: torch.Tensor | None = None,
                      sample_ids: torch.Tensor | None = None, *, seed: int = 0, epoch: int = 0,
                      q: float = 0.5) -> torch.Tensor:
    """(2,) float64 tensor (P, T) of one (local) batch for the α/β ``reading``, on the device of
    ``states``; rows to leave out should not be passed. ``seen`` needs ``pseudo`` and
    ``sample_ids`` (it counts the picked missing entries, the same picks as the loss); the
    others read the states only. Sum these over ranks for global statistics.
    """
    check_reading(reading)
    pos = (states == 1).sum()
    if reading == "slots":
        T = torch.tensor(states.numel(), device=states.device)
    elif reading in ("observed", "none"):
        T = (states >= 0).sum()
    else:
        if pseudo is None or sample_ids is None:
            raise ValueError("alpha_beta='seen' counts picked pseudo labels: pass pseudo and sample_ids")
        observed = (states >= 0).sum().double()
        if states.is_cuda:  # one fused pass on the device (the same picks, drawn in-kernel)
            from pml_scale.kernels import picked_pseudo_sums

            sums = picked_pseudo_sums(states, pseudo, sample_ids, q=q, seed=seed, epoch=epoch).double()
            return torch.stack([pos.double() + sums[0], observed + sums[1]])
        picked = pick_mask(sample_ids, states.shape[1], seed=seed, epoch=epoch, q=q) & (states == -1)
        P = pos.double() + torch.where(picked, pseudo.double(), torch.zeros((), dtype=torch.float64,
                                                                             device=states.device)).sum()
        return torch.stack([P, observed + picked.sum().double()])
    return torch.stack([pos.double(), T.double()])


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


# --------------------------------------------------------------------------- options
@dataclass(frozen=True)
class PaperOptions:
    """Every option of the paper's loss, checked once (``check``), shared by both backends.

    q: pick probability of a missing entry (Eq. 12); gamma: floor of β (Eq. 8); m: Eq. (9);
    p_threshold, p_rule: Eq. (10); d_schedule: Eq. (9) reading; alpha_beta: Eq. (8) reading;
    pseudo_weights: "alpha_beta" (the paper: α and β also weigh the picked pseudo labels) or
    "balanced" (both pseudo terms weighed (α + β)/2) or "capped" (ours+: balanced when α > β,
    the paper's otherwise; see ``pseudo_coefficients``);
    neg_gamma, neg_margin (ours+ options, default off = the paper): asymmetric focusing and a
    probability margin on the negative-side terms (observed negatives and the (1−ỹ) part of the
    picked pseudo labels), as ASL does for assumed negatives: log(1−ŷ) becomes
    u^γ⁻ log(1−u) with u = max(ŷ − m⁻, 0) (see ``negative_term``);
    use_*: the ablations of Table VII.
    """

    q: float = 0.5
    gamma: float = 0.05
    m: float = 3.0
    p_threshold: float = 0.1
    d_schedule: str = "centered"
    p_rule: str = "text"
    alpha_beta: str = "observed"
    pseudo_weights: str = "alpha_beta"
    neg_gamma: float = 0.0
    neg_margin: float = 0.0
    use_alpha_beta: bool = True
    use_d: bool = True
    use_p: bool = True
    use_q: bool = True

    def check(self) -> "PaperOptions":
        pick_threshold(self.q)  # raises for q outside [0, 1]
        if self.d_schedule not in D_SCHEDULES:
            raise ValueError(f"d_schedule must be one of {D_SCHEDULES}, got {self.d_schedule!r}")
        if self.p_rule not in P_RULES:
            raise ValueError(f"p_rule must be one of {P_RULES}, got {self.p_rule!r}")
        check_reading(self.alpha_beta)
        if self.pseudo_weights not in PSEUDO_WEIGHTS:
            raise ValueError(f"pseudo_weights must be one of {PSEUDO_WEIGHTS}, got {self.pseudo_weights!r}")
        if not (0.0 <= float(self.gamma) <= 1.0):
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma!r}")
        if not math.isfinite(float(self.m)):
            raise ValueError(f"m must be finite, got {self.m!r}")
        if not math.isfinite(float(self.p_threshold)):
            raise ValueError(f"p_threshold must be finite, got {self.p_threshold!r}")
        if not (0.0 <= float(self.neg_gamma) <= 8.0):
            raise ValueError(f"neg_gamma must be in [0, 8], got {self.neg_gamma!r}")
        if not (0.0 <= float(self.neg_margin) < 1.0):
            raise ValueError(f"neg_margin must be in [0, 1), got {self.neg_margin!r}")
        return self

    @property
    def plain_negatives(self) -> bool:
        """True when the negative-side terms are the paper's log(1−ŷ) (no focusing, no margin)."""
        return float(self.neg_gamma) == 0.0 and float(self.neg_margin) == 0.0

    @property
    def reading(self) -> str:
        """The α/β reading in force (the ablation use_alpha_beta=False is the reading ``none``)."""
        return self.alpha_beta if self.use_alpha_beta else "none"

    @property
    def q_used(self) -> float:
        return self.q if self.use_q else 1.0


def check_paper_options(q=0.5, gamma=0.05, m=3.0, p_threshold=0.1, d_schedule="centered", p_rule="text",
                        backend="torch", alpha_beta="observed") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    PaperOptions(q=q, gamma=gamma, m=m, p_threshold=p_threshold, d_schedule=d_schedule, p_rule=p_rule,
                 alpha_beta=alpha_beta).check()


def coefficients(opts: PaperOptions, states, pseudo, sample_ids, *, epoch: int, total_epochs: int, seed: int,
                 batch_counts=None) -> tuple:
    """(α, β, d) of one batch: α, β host floats, or 0-d device tensors (no host sync) when
    ``batch_counts`` is a device tensor; local counts of ``opts.reading`` when it is None."""
    if opts.reading == "none":
        alpha = beta = 1.0
    else:
        if batch_counts is None:
            batch_counts = alpha_beta_counts(opts.reading, states, pseudo, sample_ids, seed=seed, epoch=epoch,
                                             q=opts.q_used)
        try:
            P, T = batch_counts
        except (TypeError, ValueError):
            raise ValueError(f"batch_counts must be a pair (P, T), got {batch_counts!r}") from None
        alpha, beta = alpha_beta(P, T, opts.gamma, clamp_high=opts.reading != "slots")
    d = d_coefficient(epoch, total_epochs, opts.m, opts.d_schedule) if opts.use_d else 1.0
    return alpha, beta, d


def pseudo_coefficients(opts: PaperOptions, alpha, beta) -> tuple:
    """(α_S, β_S), the weights of the picked pseudo terms Σ_S ỹ log ŷ and Σ_S (1−ỹ) log(1−ŷ).

    The paper uses α and β there too. With ỹ ≈ ŷ (ỹ is last visit's ŷ) the gradient on a picked
    logit is then −p·d·(α−β)·ŷ(1−ŷ)/|S|: whenever α ≠ β every missing label drifts, by
    log(α/β) in logit per visit, towards 1 (α > β) or 0, whatever the image shows. "balanced"
    weighs both terms (α+β)/2: the pseudo part pulls ŷ towards ỹ and no further, and
    α/β keep balancing the observed positives against the observed negatives.
    "capped" (ours+) keeps the paper's weights when α ≤ β (missing labels lean negative, as in
    PPL/SPL batches under the 'observed' reading: positives are rare) and balances them when
    α > β (PAL batches): the pseudo terms never pull a missing label up. α, β may be floats or
    0-d tensors (the no-sync path); the choice is made without reading them on the host.
    """
    if opts.pseudo_weights == "alpha_beta":
        return alpha, beta
    mid = 0.5 * (alpha + beta)
    if opts.pseudo_weights == "balanced":
        return mid, mid
    if isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
        up = torch.as_tensor(alpha) > torch.as_tensor(beta)
        return torch.where(up, mid, alpha), torch.where(up, mid, beta)
    return (mid, mid) if alpha > beta else (alpha, beta)


# --------------------------------------------------------------------------- negative side
def negative_term(x: torch.Tensor, gamma: float = 0.0, margin: float = 0.0) -> torch.Tensor:
    """The negative-side log term of logits ``x``, differentiable: u^γ·log(1−u), u = max(ŷ−m, 0).

    γ = m = 0 gives log(1−ŷ) = logsigmoid(−x), the paper's term, bit for bit. The margin m
    (ASL's probability shifting) gives no loss and no gradient to a negative already below m;
    the focusing factor u^γ discounts negatives the model finds likely positive (ASL's γ⁻),
    which is what an assumed or pseudo negative that is really a positive looks like. Both are
    the mechanisms the paper's related work credits ASL with; we apply them to both negative
    parts of Eq. (8) (observed negatives and the (1−ỹ) pseudo part).
    """
    if gamma == 0.0 and margin == 0.0:
        return F.logsigmoid(-x)
    if margin == 0.0:  # u = ŷ: u^γ = exp(γ log σ(x)), finite and differentiable for any logit
        return torch.exp(gamma * F.logsigmoid(x)) * F.logsigmoid(-x)
    u = (torch.sigmoid(x) - margin).clamp(min=0.0)
    log_n = torch.log((torch.sigmoid(-x) + margin).clamp(max=1.0))  # log(1 − u), exact where u > 0
    return log_n if gamma == 0.0 else u.pow(gamma) * log_n


def negative_term_grad(yhat: torch.Tensor, gamma: float = 0.0, margin: float = 0.0) -> torch.Tensor:
    """d negative_term / dx as a function of ŷ = σ(x): −ŷ for the paper's term; in general
    u'·[γ u^(γ−1) log(1−u) − u^γ/(1−u)] with u' = ŷ(1−ŷ) where ŷ > m, else 0."""
    if gamma == 0.0 and margin == 0.0:
        return -yhat
    if margin == 0.0:  # ŷ^γ (γ (1−ŷ) log1p(−ŷ) − ŷ): −1 as ŷ → 1 (xlog1py), no NaN anywhere
        return yhat.pow(gamma) * (gamma * torch.special.xlog1py(1 - yhat, -yhat) - yhat)
    u = (yhat - margin).clamp(min=0.0)
    active = yhat > margin
    du = torch.where(active, yhat * (1 - yhat), torch.zeros_like(yhat))
    one_minus_u = 1 - u
    log_n = torch.log(one_minus_u)
    safe_u = torch.where(active, u, torch.ones_like(u))
    focus = gamma * safe_u.pow(gamma - 1) * log_n if gamma != 0.0 else torch.zeros_like(u)
    return torch.where(active, du * (focus - u.pow(gamma) / one_minus_u), torch.zeros_like(yhat))


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
    alpha: float | torch.Tensor
    beta: float | torch.Tensor
    alpha_s: float | torch.Tensor  # weights of the picked pseudo terms (pseudo_coefficients)
    beta_s: float | torch.Tensor
    d: float
    neg_gamma: float = 0.0
    neg_margin: float = 0.0


def _setup(opts: PaperOptions, logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed, batch_counts,
           validate) -> _Setup:
    if validate:
        validate_batch(logits, states, pseudo=pseudo, sample_ids=sample_ids)
    alpha, beta, d = coefficients(opts, states, pseudo, sample_ids, epoch=epoch, total_epochs=total_epochs,
                                  seed=seed, batch_counts=batch_counts)
    return setup_from_coefficients(opts, logits, states, pseudo, sample_ids, alpha=alpha, beta=beta, d=d, seed=seed,
                                   epoch=epoch)


def setup_from_coefficients(opts: PaperOptions, logits, states, pseudo, sample_ids, *, alpha, beta, d, seed,
                            epoch) -> _Setup:
    """The batch's masks, picks, counts and penalty for given (α, β, d): what ``loss_rows`` and
    ``loss_grad`` read (the kernel's torch fallback passes the coefficients it was given)."""
    dt = compute_dtype(logits)
    x = logits.to(dt)
    yhat = torch.sigmoid(x.detach())
    pos, neg, missing = states == 1, states == 0, states == -1
    picked = pick_mask(sample_ids, logits.shape[1], seed=seed, epoch=epoch, q=opts.q_used) & missing
    n_e = (pos | neg).sum(1).to(dt)
    n_s = picked.sum(1).to(dt)
    inv_ne = torch.where(n_e > 0, 1.0 / n_e.clamp(min=1), torch.zeros_like(n_e))
    inv_ns = torch.where(n_s > 0, 1.0 / n_s.clamp(min=1), torch.zeros_like(n_s))
    if opts.use_p:
        p = penalty(yhat.amax(dim=1), opts.p_threshold, opts.p_rule).to(dt)
    else:
        p = torch.ones(logits.shape[0], dtype=dt, device=logits.device)
    alpha_s, beta_s = pseudo_coefficients(opts, alpha, beta)
    return _Setup(x, yhat, pos, neg, picked, missing, pseudo.to(dt), inv_ne, inv_ns, p, alpha, beta, alpha_s, beta_s, d,
                  float(opts.neg_gamma), float(opts.neg_margin))


def loss_rows(s: _Setup) -> torch.Tensor:
    """(B,) per-image losses L_i, differentiable in s.x."""
    log_p = F.logsigmoid(s.x)      # log ŷ
    if s.neg_gamma == 0.0 and s.neg_margin == 0.0:
        # log(1 − ŷ) = log ŷ − x: one log-sigmoid pass instead of two (the CPU reference's largest
        # cost at 10k labels); within float rounding of logsigmoid(−x), the gradient −ŷ alike
        log_n = log_p - s.x
    else:
        log_n = negative_term(s.x, s.neg_gamma, s.neg_margin)  # its focused / shifted form
    # masks as 0/1 factors, not torch.where: the same values bit for bit (v·1 = v, v·0 = ±0, and
    # log ŷ, log(1 − ŷ) are finite for finite logits), the same gradients, ~2x faster on CPU
    pos, neg, picked = (m.to(s.x.dtype) for m in (s.pos, s.neg, s.picked))
    a_obs = (log_p * pos).sum(1)
    b_obs = (log_n * neg).sum(1)
    a_pick = (s.pseudo * log_p * picked).sum(1)
    b_pick = ((1 - s.pseudo) * log_n * picked).sum(1)
    obs = s.inv_ne * (s.alpha * a_obs + s.beta * b_obs)
    pick = s.d * s.inv_ns * (s.alpha_s * a_pick + s.beta_s * b_pick)
    return -s.p * (obs + pick)


def _stats(s: _Setup) -> dict:
    """Per-batch statistics; values may be 0-d tensors (read them at logging time only)."""
    n_missing = s.missing.sum()
    return {
        "alpha": s.alpha,
        "beta": s.beta,
        "d": s.d,
        "p2_share": (s.p == 2).to(torch.float32).mean(),
        "picked_share": s.picked.sum() / n_missing.clamp(min=1),
    }


def _options(**options) -> PaperOptions:
    unknown = sorted(set(options) - set(PaperOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} of the paper's loss; valid: "
                        f"{', '.join(PaperOptions.__dataclass_fields__)}")
    return PaperOptions(**options).check()


# --------------------------------------------------------------------------- public face
def paper_loss(opts: PaperOptions, logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed,
               batch_counts=None, backend="torch", validate=True):
    """(loss, stats, ŷ) of the paper's loss with options ``opts``: the scalar mean loss, a dict
    of statistics (alpha, beta, d, p2_share = fraction of rows with p = 2, picked_share =
    |S| / |M| over the batch; floats or 0-d tensors), and ŷ = σ(s) detached (B, L) for the
    pseudo-label store (fp32 from "torch", fp16 from "triton").

    ``batch_counts=(P, T)`` overrides the local counts of ``opts.reading`` (the trainer passes
    global sums, host floats or a (2,) device tensor). On "triton", picked_share is NaN.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if logits.is_cuda else "torch"
    if backend == "triton":
        return _triton(opts, logits, states, pseudo, sample_ids, epoch=epoch, total_epochs=total_epochs, seed=seed,
                       batch_counts=batch_counts, validate=validate)
    s = _setup(opts, logits, states, pseudo, sample_ids, epoch=epoch, total_epochs=total_epochs, seed=seed,
               batch_counts=batch_counts, validate=validate)
    return loss_rows(s).mean(), _stats(s), s.yhat


def partial_label_loss_with_stats(logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed,
                                  batch_counts=None, backend="torch", validate=True, **options):
    """``paper_loss`` with the options as keywords (``PaperOptions`` fields); stats as floats."""
    loss, stats, yhat = paper_loss(_options(**options), logits, states, pseudo, sample_ids, epoch=epoch,
                                   total_epochs=total_epochs, seed=seed, batch_counts=batch_counts, backend=backend,
                                   validate=validate)
    return loss, {k: float(v) for k, v in stats.items()}, yhat


def partial_label_loss(logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed, batch_counts=None,
                       backend="torch", validate=True, **options) -> torch.Tensor:
    """The paper's loss: scalar mean over the B images, differentiable in ``logits``.

    logits (B, L) fp32/bf16/fp16 (computed in fp32), states int8 in {-1, 0, 1}, pseudo (B, L)
    ỹ in [0, 1], sample_ids (B,) int64. Picks S = pick_mask(ids, L, seed, epoch, q) ∧ missing.
    ``options``: the fields of ``PaperOptions`` (q, gamma, m, p_threshold, d_schedule, p_rule,
    alpha_beta, use_alpha_beta/use_d/use_p/use_q). validate=False skips the value checks.
    backend: "torch" | "triton" | "auto" (triton on CUDA tensors).
    """
    loss, _, _ = paper_loss(_options(**options), logits, states, pseudo, sample_ids, epoch=epoch,
                            total_epochs=total_epochs, seed=seed, batch_counts=batch_counts, backend=backend,
                            validate=validate)
    return loss


def partial_label_loss_grad(logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed, batch_counts=None,
                            validate=True, **options) -> torch.Tensor:
    """Closed-form d(loss)/d(logits), (B, L) in the compute dtype: the kernel's reference.

    E⁺: −pα(1−ŷ)/(N_e B) · E⁻: +pβŷ/(N_e B) · S: −p d[α_S ỹ(1−ŷ) − β_S (1−ỹ)ŷ]/(|S| B) · else 0,
    with (α_S, β_S) = ``pseudo_coefficients`` ((α, β) for the paper); with neg_gamma/neg_margin
    every −ŷ of a negative-side term becomes ``negative_term_grad(ŷ)``.
    """
    s = _setup(_options(**options), logits, states, pseudo, sample_ids, epoch=epoch, total_epochs=total_epochs,
               seed=seed, batch_counts=batch_counts, validate=validate)
    return loss_grad(s, logits.shape[0])


def loss_grad(s: _Setup, num_rows: float) -> torch.Tensor:
    """The closed-form gradient of ``loss_rows(s).sum() / num_rows`` (see partial_label_loss_grad)."""
    y, yt = s.yhat, s.pseudo
    scale = (s.p / num_rows)[:, None]
    dneg = negative_term_grad(y, s.neg_gamma, s.neg_margin)  # −ŷ for the paper
    g_obs = torch.where(s.pos, -s.alpha * (1 - y), torch.where(s.neg, -s.beta * dneg, torch.zeros_like(y)))
    g_pick = -s.d * (s.alpha_s * yt * (1 - y) + s.beta_s * (1 - yt) * dneg)
    g = s.inv_ne[:, None] * g_obs + torch.where(s.picked, s.inv_ns[:, None] * g_pick, torch.zeros_like(y))
    return scale * g


# --------------------------------------------------------------------------- triton backend
def _triton(opts: PaperOptions, logits, states, pseudo, sample_ids, *, epoch, total_epochs, seed, batch_counts,
            validate):
    try:
        from pml_scale.kernels import fused_partial_label_loss
    except ImportError as exc:
        raise RuntimeError(
            "backend='triton' needs pml_scale.kernels.fused_partial_label_loss, which failed to import "
            f"({exc}); use backend='torch' (or 'auto' on CPU)"
        ) from exc
    if validate:
        validate_batch(logits, states, pseudo=pseudo, sample_ids=sample_ids)
    alpha, beta, d = coefficients(opts, states, pseudo, sample_ids, epoch=epoch, total_epochs=total_epochs,
                                  seed=seed, batch_counts=batch_counts)
    p_rule, p_threshold = opts.p_rule, opts.p_threshold
    if not opts.use_p:  # ŷ >= 0 always, so "max ŷ < 0" never holds: p = 1 on every row
        p_rule, p_threshold = "text", 0.0
    if isinstance(alpha, torch.Tensor):  # device counts: the kernel reads (α, β) itself, no host sync
        ab = dict(coef=torch.stack([alpha, beta]).to(device=logits.device, dtype=torch.float32))
    else:
        ab = dict(alpha=float(alpha), beta=float(beta))
    loss, yhat, p = fused_partial_label_loss(
        logits, states, pseudo, sample_ids, **ab, d=d, q=opts.q_used, seed=seed, epoch=epoch,
        p_threshold=p_threshold, p_rule=p_rule, pseudo_weights=opts.pseudo_weights,
        neg_gamma=opts.neg_gamma, neg_margin=opts.neg_margin)  # validated by the kernel (ValueError/TypeError)
    stats = {"alpha": alpha, "beta": beta, "d": d, "p2_share": (p == 2).to(torch.float32).mean(),
             "picked_share": float("nan")}
    return loss, stats, yhat

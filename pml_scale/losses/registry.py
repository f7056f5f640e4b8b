"""One face for every loss, so the trainer picks one by name from the config.

    loss_fn = build_loss("asl", gamma_neg=4)      # options checked here, once
    out = loss_fn(LossInputs(logits, states, ids, epoch, total_epochs, pseudo=...))
    out.loss.backward(); store.write(ids, out.yhat)

Each call checks its inputs once (``validate_batch``; option ``validate=False`` skips the
value checks in a tuned loop) and returns the loss, ŷ = σ(logits) detached for the pseudo
store, and a few float statistics for logging.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from pml_scale.losses import baselines as bl
from pml_scale.losses.partial import PaperOptions, check_paper_options, paper_loss, validate_batch


@dataclass
class LossInputs:
    """One batch, as the trainer gathers it by sample id.

    estimates: ROLE only, the (B, L) rows of the label estimator's logits (requires_grad).
    batch_counts: (P, T) of the paper's α/β reading, summed over the global batch
        (``partial.alpha_beta_counts``); host floats or a (2,) device tensor.
    expected_positives: k for EPR/ROLE when the loss options do not set it (from the data).
    """

    logits: torch.Tensor
    states: torch.Tensor
    sample_ids: torch.Tensor
    epoch: int
    total_epochs: int
    pseudo: torch.Tensor | None = None
    estimates: torch.Tensor | None = None
    batch_counts: tuple | None = None
    expected_positives: float | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor
    yhat: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


LossFn = Callable[[LossInputs], LossOutput]


def _yhat(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.detach().float())


def _check(inp: LossInputs, validate: bool, **extra) -> None:
    if not isinstance(inp, LossInputs):
        raise TypeError(f"a loss takes one LossInputs, got {type(inp).__name__}")
    if validate:
        validate_batch(inp.logits, inp.states, sample_ids=inp.sample_ids, **extra)


_PROBE_LOGITS = torch.zeros(1, 3)
_PROBE_STATES = torch.tensor([[1, 0, -1]], dtype=torch.int8)


def _simple(fn, **fixed) -> Callable[..., LossFn]:
    """Builder for a baseline that needs only logits and states (+ its own options)."""
    defaults = {k: v.default for k, v in inspect.signature(fn).parameters.items()
                if v.kind is inspect.Parameter.KEYWORD_ONLY and k not in fixed}

    def builder(validate: bool = True, **options) -> LossFn:
        opts = {**defaults, **options}
        fn(_PROBE_LOGITS, _PROBE_STATES, **fixed, **opts)  # bad option values fail here, at config time

        def loss_fn(inp: LossInputs) -> LossOutput:
            _check(inp, validate)
            return LossOutput(fn(inp.logits, inp.states, **fixed, **opts), _yhat(inp.logits), {})

        return loss_fn

    builder.options = {**defaults, "validate": True}
    return builder


def _build_paper(q=0.5, gamma=0.05, m=3.0, p_threshold=0.1, d_schedule="centered", p_rule="text", alpha_beta="observed",
                 pseudo_weights="alpha_beta", neg_gamma=0.0, neg_margin=0.0, seed=0, backend="auto",
                 use_alpha_beta=True, use_d=True, use_p=True, use_q=True, validate=True) -> LossFn:
    opts = PaperOptions(q=q, gamma=gamma, m=m, p_threshold=p_threshold, d_schedule=d_schedule, p_rule=p_rule,
                        alpha_beta=alpha_beta, pseudo_weights=pseudo_weights, neg_gamma=float(neg_gamma),
                        neg_margin=float(neg_margin), use_alpha_beta=use_alpha_beta,
                        use_d=use_d, use_p=use_p, use_q=use_q).check()
    check_paper_options(backend=backend)

    def loss_fn(inp: LossInputs) -> LossOutput:
        if inp.pseudo is None:
            raise ValueError("loss 'paper' needs LossInputs.pseudo (the stored pseudo labels ỹ, (B, L) in [0, 1])")
        _check(inp, validate, pseudo=inp.pseudo)
        loss, stats, yhat = paper_loss(opts, inp.logits, inp.states, inp.pseudo, inp.sample_ids, epoch=inp.epoch,
                                       total_epochs=inp.total_epochs, seed=seed, batch_counts=inp.batch_counts,
                                       backend=backend, validate=False)
        return LossOutput(loss, yhat, stats)

    loss_fn.options, loss_fn.seed = opts, seed  # the trainer counts α/β statistics with them
    return loss_fn


def _build_epr(expected_positives=None, use_negatives=False, validate=True) -> LossFn:
    if expected_positives is not None:
        bl._check_k(expected_positives)
    def loss_fn(inp: LossInputs) -> LossOutput:
        _check(inp, validate)
        k = expected_positives if expected_positives is not None else inp.expected_positives
        loss = bl.expected_positive_regularization(inp.logits, inp.states, expected_positives=k,
                                                   use_negatives=use_negatives)
        return LossOutput(loss, _yhat(inp.logits), {})

    return loss_fn


def _build_role(expected_positives=None, use_negatives=False, validate=True) -> LossFn:
    if expected_positives is not None:
        bl._check_k(expected_positives)
    def loss_fn(inp: LossInputs) -> LossOutput:
        if inp.estimates is None:
            raise ValueError("loss 'role' needs LossInputs.estimates (the (B, L) label-estimator logits of the batch)")
        _check(inp, validate, estimates=inp.estimates)
        k = expected_positives if expected_positives is not None else inp.expected_positives
        loss = bl.role(inp.logits, inp.estimates, inp.states, expected_positives=k, use_negatives=use_negatives)
        return LossOutput(loss, _yhat(inp.logits), {})

    return loss_fn


def _build_splc(tau=0.6, change_epoch=1, margin=1.0, gamma=2.0, validate=True) -> LossFn:
    bl.splc(_PROBE_LOGITS, _PROBE_STATES, epoch=0, tau=tau, change_epoch=change_epoch, margin=margin, gamma=gamma)
    def loss_fn(inp: LossInputs) -> LossOutput:
        _check(inp, validate)
        loss = bl.splc(inp.logits, inp.states, epoch=inp.epoch, tau=tau, change_epoch=change_epoch,
                       margin=margin, gamma=gamma)
        return LossOutput(loss, _yhat(inp.logits), {})

    return loss_fn


def _build_large_loss(mode: str):
    def builder(delta=bl.LL_DELTA, validate=True) -> LossFn:
        bl.large_loss_k(0, 1, 1, delta)  # checks delta now, not at the first batch

        def loss_fn(inp: LossInputs) -> LossOutput:
            _check(inp, validate)
            loss = bl.large_loss(inp.logits, inp.states, epoch=inp.epoch, delta=delta, mode=mode)
            B, L = inp.logits.shape
            return LossOutput(loss, _yhat(inp.logits), {"k": float(bl.large_loss_k(inp.epoch, B, L, delta))})

        return loss_fn

    return builder


LOSSES: dict[str, Callable[..., LossFn]] = {
    "paper": _build_paper,
    "bce": _simple(bl.bce),
    "bce_ls": _simple(bl.bce_ls),
    "focal": _simple(bl.focal),
    "asl": _simple(bl.asl),
    "an": _simple(bl.assume_negative),
    "wan": _simple(bl.weak_assume_negative),
    "epr": _build_epr,
    "role": _build_role,
    "ignore": _simple(bl.ignore_missing),
    "hill": _simple(bl.hill),
    "splc": _build_splc,
    "ll_r": _build_large_loss("reject"),
    "ll_ct": _build_large_loss("correct"),
}


def loss_names() -> list[str]:
    return list(LOSSES)


def loss_options(name: str) -> dict:
    """The options a loss accepts, with their defaults."""
    builder = _get(name)
    if hasattr(builder, "options"):
        return dict(builder.options)
    return {k: v.default for k, v in inspect.signature(builder).parameters.items()}


def _get(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return LOSSES[name]


def build_loss(name: str, **options) -> LossFn:
    """The loss called ``name`` with ``options``; unknown names/options raise ValueError
    listing the valid ones."""
    builder = _get(name)
    valid = loss_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for loss {name!r}; valid options: "
                         f"{', '.join(sorted(valid)) or '(none)'}")
    return builder(**options)

"""One face for every loss, so the trainer picks one by name from the config.

An entry is a builder (options -> loss function) and the ``TrainingLoss`` class that gives the
trainer its hooks (per-sample state, host batch statistics, the update after the step). Adding
a loss is one module and one line here.

    loss_fn = build_loss("asl", gamma_neg=4)      # options checked here, once
    out = loss_fn(LossInputs(logits, states, ids, epoch, total_epochs, pseudo=...))
    out.loss.backward(); store.write(ids, out.yhat)

Each call checks its inputs once (``validate_batch``; option ``validate=False`` skips the
value checks in a tuned loop) and returns the loss, ŷ = σ(logits) detached for the pseudo
store, and a few float statistics for logging.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from pml_scale.losses import baselines as bl
from pml_scale.losses.inputs import LossFn, LossInputs, LossOutput, check_batch, sigmoid_yhat
from pml_scale.losses.paper import PaperTrainingLoss, build_paper
from pml_scale.losses.role import RoleTrainingLoss, build_role
from pml_scale.losses.training import TrainingLoss

__all__ = ["LOSSES", "LossEntry", "LossFn", "LossInputs", "LossOutput", "build_loss", "build_training_loss",
           "loss_names", "loss_options"]


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
            check_batch(inp, validate)
            return LossOutput(fn(inp.logits, inp.states, **fixed, **opts), sigmoid_yhat(inp.logits), {})

        return loss_fn

    builder.options = {**defaults, "validate": True}
    return builder


def _build_epr(expected_positives=None, use_negatives=False, validate=True) -> LossFn:
    if expected_positives is not None:
        bl._check_k(expected_positives)
    def loss_fn(inp: LossInputs) -> LossOutput:
        check_batch(inp, validate)
        k = expected_positives if expected_positives is not None else inp.expected_positives
        loss = bl.expected_positive_regularization(inp.logits, inp.states, expected_positives=k,
                                                   use_negatives=use_negatives)
        return LossOutput(loss, sigmoid_yhat(inp.logits), {})

    return loss_fn


def _build_splc(tau=0.6, change_epoch=1, margin=1.0, gamma=2.0, validate=True) -> LossFn:
    bl.splc(_PROBE_LOGITS, _PROBE_STATES, epoch=0, tau=tau, change_epoch=change_epoch, margin=margin, gamma=gamma)
    def loss_fn(inp: LossInputs) -> LossOutput:
        check_batch(inp, validate)
        loss = bl.splc(inp.logits, inp.states, epoch=inp.epoch, tau=tau, change_epoch=change_epoch,
                       margin=margin, gamma=gamma)
        return LossOutput(loss, sigmoid_yhat(inp.logits), {})

    return loss_fn


def _build_large_loss(mode: str):
    def builder(delta=bl.LL_DELTA, validate=True) -> LossFn:
        bl.large_loss_k(0, 1, 1, delta)  # checks delta now, not at the first batch

        def loss_fn(inp: LossInputs) -> LossOutput:
            check_batch(inp, validate)
            loss = bl.large_loss(inp.logits, inp.states, epoch=inp.epoch, delta=delta, mode=mode)
            B, L = inp.logits.shape
            return LossOutput(loss, sigmoid_yhat(inp.logits), {"k": float(bl.large_loss_k(inp.epoch, B, L, delta))})

        return loss_fn

    return builder


@dataclass(frozen=True)
class LossEntry:
    build: Callable[..., LossFn]
    trainer: type[TrainingLoss] = TrainingLoss


LOSSES: dict[str, LossEntry] = {
    "paper": LossEntry(build_paper, PaperTrainingLoss),
    "bce": LossEntry(_simple(bl.bce)),
    "bce_ls": LossEntry(_simple(bl.bce_ls)),
    "focal": LossEntry(_simple(bl.focal)),
    "asl": LossEntry(_simple(bl.asl)),
    "an": LossEntry(_simple(bl.assume_negative)),
    "wan": LossEntry(_simple(bl.weak_assume_negative)),
    "epr": LossEntry(_build_epr),
    "role": LossEntry(build_role, RoleTrainingLoss),
    "ignore": LossEntry(_simple(bl.ignore_missing)),
    "hill": LossEntry(_simple(bl.hill)),
    "splc": LossEntry(_build_splc),
    "ll_r": LossEntry(_build_large_loss("reject")),
    "ll_ct": LossEntry(_build_large_loss("correct")),
}


def loss_names() -> list[str]:
    return list(LOSSES)


def loss_options(name: str) -> dict:
    """The options a loss accepts, with their defaults."""
    builder = _get(name).build
    if hasattr(builder, "options"):
        return dict(builder.options)
    return {k: v.default for k, v in inspect.signature(builder).parameters.items()}


def _get(name: str) -> LossEntry:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return LOSSES[name]


def build_loss(name: str, **options) -> LossFn:
    """The loss called ``name`` with ``options``; unknown names/options raise ValueError
    listing the valid ones."""
    builder = _get(name).build
    valid = loss_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for loss {name!r}; valid options: "
                         f"{', '.join(sorted(valid)) or '(none)'}")
    return builder(**options)


def build_training_loss(name: str, options: dict, *, seed: int, estimates_lr_multiplier: float = 1.0) -> TrainingLoss:
    """The loss ``name`` as the trainer uses it (``losses/training.py``): options checked now."""
    entry = _get(name)

    def build(**opts) -> LossFn:
        return build_loss(name, **opts)

    return entry.trainer(name, build, loss_options(name), options, seed=seed,
                         estimates_lr_multiplier=estimates_lr_multiplier)

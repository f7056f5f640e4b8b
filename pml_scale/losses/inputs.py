"""What every loss takes and returns: one batch gathered by sample id in, the loss, ŷ and a few
statistics out (the face ``registry.build_loss`` gives every loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pml_scale.losses.partial import validate_batch


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


def sigmoid_yhat(logits: torch.Tensor) -> torch.Tensor:
    """ŷ = σ(logits), detached, fp32: what the pseudo-label store receives."""
    return torch.sigmoid(logits.detach().float())


def check_batch(inp: LossInputs, validate: bool, **extra) -> None:
    """The type always; the values (a host sync) when ``validate``."""
    if not isinstance(inp, LossInputs):
        raise TypeError(f"a loss takes one LossInputs, got {type(inp).__name__}")
    if validate:
        validate_batch(inp.logits, inp.states, sample_ids=inp.sample_ids, **extra)

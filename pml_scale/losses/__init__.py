"""Losses: the paper's loss (pure-PyTorch reference + Triton dispatch), the baselines, and
one registry that builds any of them by name from the config.

    from pml_scale.losses import build_loss, LossInputs
"""

from pml_scale.losses.partial import (
    ALPHA_BETA_READINGS,
    PaperOptions,
    alpha_beta,
    alpha_beta_counts,
    d_coefficient,
    partial_label_loss,
    partial_label_loss_grad,
    partial_label_loss_with_stats,
    penalty,
    validate_batch,
)
from pml_scale.losses.picks import pick_mask
from pml_scale.losses.registry import (
    LOSSES,
    LossInputs,
    LossOutput,
    build_loss,
    build_training_loss,
    loss_names,
    loss_options,
)
from pml_scale.losses.training import TrainingLoss

__all__ = [
    "ALPHA_BETA_READINGS",
    "LOSSES",
    "PaperOptions",
    "alpha_beta_counts",
    "LossInputs",
    "LossOutput",
    "alpha_beta",
    "build_loss",
    "build_training_loss",
    "TrainingLoss",
    "d_coefficient",
    "loss_names",
    "loss_options",
    "partial_label_loss",
    "partial_label_loss_grad",
    "partial_label_loss_with_stats",
    "penalty",
    "pick_mask",
    "validate_batch",
]

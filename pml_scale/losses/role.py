"""ROLE (Cole et al. 2021) as a registry entry: the loss, and the per-sample state it keeps, a
learnable N × L matrix of label-estimate logits (``RoleEstimates``), gathered with each batch,
trained by SGD at the model's learning rate × ``optim.role_lr_multiplier`` and written back
after the step. The example of a loss with per-sample state: one module, one registry entry."""

from __future__ import annotations

from pathlib import Path

import torch

from pml_scale.losses import baselines as bl
from pml_scale.losses.inputs import LossFn, LossInputs, LossOutput, check_batch, sigmoid_yhat
from pml_scale.losses.training import TrainingLoss
from pml_scale.labels.stores import RoleEstimates


def build_role(expected_positives=None, use_negatives=False, validate=True) -> LossFn:
    if expected_positives is not None:
        bl._check_k(expected_positives)

    def loss_fn(inp: LossInputs) -> LossOutput:
        if inp.estimates is None:
            raise ValueError("loss 'role' needs LossInputs.estimates (the (B, L) label-estimator logits of the batch)")
        check_batch(inp, validate, estimates=inp.estimates)
        k = expected_positives if expected_positives is not None else inp.expected_positives
        loss = bl.role(inp.logits, inp.estimates, inp.states, expected_positives=k, use_negatives=use_negatives)
        return LossOutput(loss, sigmoid_yhat(inp.logits), {})

    return loss_fn


class RoleTrainingLoss(TrainingLoss):
    ESTIMATES = "role"
    STATE_FILES = ("role.f32",)

    def open_state(self, folder: Path, num_samples: int, num_labels: int, *, observed, create: bool) -> dict:
        """The estimates (random, observed entries pinned) are made once, by ``create``; a resumed run
        reopens them as they are (the checkpoint restores them)."""
        path = folder / "role.f32"
        if create:
            RoleEstimates(path, num_samples, num_labels, init_observed=observed, seed=self.seed)
            return {}
        return {"role": RoleEstimates(path, num_samples, num_labels, seed=self.seed)}

    def updated_estimates(self, estimates: torch.Tensor | None, lr: float) -> torch.Tensor | None:
        if estimates is None or estimates.grad is None:
            return None
        return (estimates - lr * self.estimates_lr_multiplier * estimates.grad).detach()

"""A loss as the trainer sees it: one object with one face, so the trainer never names a loss.

    loss = build_training_loss(cfg.loss.name, cfg.loss.options, seed=..., estimates_lr_multiplier=...)
    stores = {"pseudo": ..., **loss.open_state(folder, N, L, observed=..., create=...)}
    counts = loss.host_counts(states, pseudo, ids, epoch)     # label thread, per batch (α/β)
    out = loss(LossInputs(...), check=first_or_logging_step)  # the loss, ŷ, statistics
    rows = loss.updated_estimates(estimates, lr)              # after the optimizer step

A loss that keeps per-sample state or wants batch statistics subclasses ``TrainingLoss`` and
overrides the hooks it needs (``losses/paper.py``: α/β counts; ``losses/role.py``: a learnable
N × L estimate store updated after each step); its registry entry names the subclass. Stateless
losses use the base class as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pml_scale.losses.inputs import LossFn, LossInputs, LossOutput

BATCH_STATS = ("global", "local")


class TrainingLoss:
    """The configured loss, its checked and check-free twins, and the hooks the trainer calls.

    ``batch_stats`` (option): "global" sums the host counts over ranks (α/β independent of the
    number of GPUs), "local" keeps each rank's. The check-free twin skips the value checks, which
    read device values (host syncs): the trainer uses the checked one on the first step and on
    logging steps only, unless the options set ``validate`` themselves.
    """

    ESTIMATES: str | None = None  # the store whose rows reach the loss as LossInputs.estimates
    STATE_FILES: tuple[str, ...] = ()  # files of open_state, deleted when a fresh run starts

    def __init__(self, name: str, build: Callable[..., LossFn], accepted: dict, options: dict, *, seed: int,
                 estimates_lr_multiplier: float = 1.0):
        opts = dict(options)
        self.name, self.seed, self.estimates_lr_multiplier = name, int(seed), float(estimates_lr_multiplier)
        self.batch_stats = opts.pop("batch_stats", "global")
        if self.batch_stats not in BATCH_STATS:
            raise ValueError(f"loss.options.batch_stats must be 'global' or 'local', got {self.batch_stats!r}")
        opts = self.resolve_options(opts)
        self.checked = build(**opts)
        self.unchecked = self.checked
        if "validate" not in opts and "validate" in accepted:
            self.unchecked = build(**opts, validate=False)

    def resolve_options(self, options: dict) -> dict:
        """The options the builder gets (a subclass may add run-level defaults, e.g. the seed)."""
        return options

    def __call__(self, inp: LossInputs, *, check: bool = True) -> LossOutput:
        return (self.checked if check else self.unchecked)(inp)

    def open_state(self, folder: Path, num_samples: int, num_labels: int, *, observed, create: bool) -> dict:
        """Per-sample state besides the pseudo labels, {name: store}: created (``create``, one
        process per node) or opened. Saved and restored with every checkpoint."""
        return {}

    def host_counts(self, states: np.ndarray, pseudo: np.ndarray, ids: np.ndarray, epoch: int):
        """Batch statistics the label thread computes on the host from the gathered rows, as
        (P, T) floats (summed over ranks when batch_stats is global), or None."""
        return None

    def updated_estimates(self, estimates: torch.Tensor | None, lr: float) -> torch.Tensor | None:
        """New rows for the ESTIMATES store after the optimizer step (None: nothing to write)."""
        return None

"""The paper's loss as a registry entry: its builder (options checked once, the Triton kernel or
the PyTorch reference per batch) and its trainer hooks (the run's seed as the default pick seed,
α/β counts computed by the label thread from the gathered rows)."""

from __future__ import annotations

import numpy as np
import torch

from pml_scale.losses.inputs import LossFn, LossInputs, LossOutput, check_batch
from pml_scale.losses.partial import PaperOptions, alpha_beta_counts, check_paper_options, paper_loss
from pml_scale.losses.training import TrainingLoss


def build_paper(q=0.5, gamma=0.05, m=3.0, p_threshold=0.1, d_schedule="centered", p_rule="text",
                alpha_beta="observed", pseudo_weights="alpha_beta", neg_gamma=0.0, neg_margin=0.0, seed=0,
                backend="auto", use_alpha_beta=True, use_d=True, use_p=True, use_q=True, validate=True) -> LossFn:
    opts = PaperOptions(q=q, gamma=gamma, m=m, p_threshold=p_threshold, d_schedule=d_schedule, p_rule=p_rule,
                        alpha_beta=alpha_beta, pseudo_weights=pseudo_weights, neg_gamma=float(neg_gamma),
                        neg_margin=float(neg_margin), use_alpha_beta=use_alpha_beta,
                        use_d=use_d, use_p=use_p, use_q=use_q).check()
    check_paper_options(backend=backend)

    def loss_fn(inp: LossInputs) -> LossOutput:
        if inp.pseudo is None:
            raise ValueError("loss 'paper' needs LossInputs.pseudo (the stored pseudo labels ỹ, (B, L) in [0, 1])")
        check_batch(inp, validate, pseudo=inp.pseudo)
        loss, stats, yhat = paper_loss(opts, inp.logits, inp.states, inp.pseudo, inp.sample_ids, epoch=inp.epoch,
                                       total_epochs=inp.total_epochs, seed=seed, batch_counts=inp.batch_counts,
                                       backend=backend, validate=False)
        return LossOutput(loss, yhat, stats)

    loss_fn.options, loss_fn.seed = opts, seed  # host_counts reads them
    return loss_fn


class PaperTrainingLoss(TrainingLoss):
    """α/β come from (P, T) counted over the global batch: the label thread counts them on the host
    for the picks of this epoch (no device sync), the trainer sums them over ranks."""

    def resolve_options(self, options: dict) -> dict:
        return {"seed": self.seed, **options}  # the q% picks follow the run's seed unless set

    def host_counts(self, states: np.ndarray, pseudo: np.ndarray, ids: np.ndarray, epoch: int):
        c = paper_host_counts(self.checked, states, torch.from_numpy(pseudo), ids, epoch=epoch)
        return None if c is None else (float(c[0]), float(c[1]))


def paper_host_counts(loss_fn, states: np.ndarray, pseudo: torch.Tensor, ids: np.ndarray, *, epoch: int):
    """(P, T) of these rows for the paper loss's α/β reading (float64 CPU tensor); None when the
    reading needs none."""
    opts = loss_fn.options
    if opts.reading == "none":
        return None
    return alpha_beta_counts(opts.reading, torch.from_numpy(states), pseudo, torch.from_numpy(ids),
                             seed=loss_fn.seed, epoch=epoch, q=opts.q_used)

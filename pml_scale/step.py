"""One optimisation step, launched without waiting for the device.

The batch's labels were gathered by the label thread while the previous step ran; they go to the
device with non-blocking copies, invalid rows are dropped with a host-built index (no boolean
mask on the device), the loss runs (the fused Triton kernel on GPUs), DeepSpeed steps, and ŷ (and
the loss's updated estimates) go back to the label thread, which writes them behind the next
steps. Nothing here reads a device value.
"""

from __future__ import annotations

import time

from .engine import prepare_images
from .losses import LossInputs
from .tracking import add_time_share


def train_step(engine, batch, pending, loss, *, check: bool, traffic, cfg, epoch, in_dtype, k_expected,
               shares, tag: str = "") -> dict:
    """One optimisation step, launched without waiting for the device. ``pending`` is the batch's
    queued label gather. Returns the step's statistics as they come (device tensors or floats):
    the caller reads them only when it logs. Rows with valid=False (padding, replacements of
    corrupt samples) take no part in the loss, the batch statistics or the stores. ``check``: the
    loss checks its inputs' values (a host sync; first and logging steps only)."""
    tick = time.perf_counter()
    labels = traffic.to_device(traffic.collect(pending))
    estimates = labels.estimates.requires_grad_(True) if labels.estimates is not None else None
    tock = add_time_share(shares, "labels", tick)

    logits = engine(prepare_images(batch.images, in_dtype, cfg.model.channels_last))
    if labels.rows is not None:  # some rows invalid: a host-built index, no boolean mask on the device
        logits = logits.index_select(0, labels.rows)
    tock = add_time_share(shares, "forward", tock)
    out = loss(LossInputs(logits=logits, states=labels.states, sample_ids=labels.ids, epoch=epoch,
                          total_epochs=cfg.run.epochs, pseudo=labels.pseudo, estimates=estimates,
                          batch_counts=labels.counts, expected_positives=k_expected), check=check)
    tock = add_time_share(shares, "loss", tock)
    engine.backward(out.loss)
    engine.step()
    tock = add_time_share(shares, "backward_step", tock)

    new_estimates = loss.updated_estimates(estimates, engine.get_lr()[0]) if estimates is not None else None
    traffic.scatter(batch, labels, out.yhat, new_estimates, tag)  # written behind the next steps
    add_time_share(shares, "stores", tock)
    stats = {"loss": out.loss.detach()}
    stats.update(out.stats)
    return stats

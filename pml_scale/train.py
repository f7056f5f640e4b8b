"""The training loop: shards + loaders + loss + label stores joined into a DeepSpeed data-parallel
run that can be killed at any moment and resumed without losing anything. Read top-down: ``run``
is a row of phases (each in a module of its own: ``run_data``, ``engine``, ``run_stores``,
``evaluate``, ``tracking``), then the epoch loop, the step (``step.train_step``) and the summary.

Per step, on every rank, with the host never waiting for the GPU:
  1. the loader yields images (on the device) and the batch's sample ids and validity on the
     host; the next batch is fetched before this step is launched;
  2. the next batch's observed states, stored pseudo labels and the loss's host statistics (the
     paper's α/β counts) are gathered on a background thread from host memmaps into pinned memory
     (``labels.traffic``); the counts are summed over ranks on a gloo group, so α/β do not
     depend on the number of GPUs;
  3. ``step.train_step``: labels to the device, forward, loss, DeepSpeed backward/step;
  4. ŷ goes back to pinned memory asynchronously (all-gathered first, fixed size, when every
     node's store must hold every row) and the thread writes the pseudo-label store once it landed.
Loss statistics are read (a sync) only every ``run.log_every`` steps. SIGTERM (preemption) is
handled at step boundaries: a checkpoint at the current step, then exit 143 (``preemption``).
Ordering of store reads and writes across epochs, checkpoints and resumes: ``LabelTraffic.fence``.

The trainer never names a loss: what a loss needs besides logits and labels (stores, host
statistics, an update after the step) are the hooks of its ``losses.TrainingLoss``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint
from .atomic import atomic_write_json
from .config import load_config, parse_cli, save_resolved
from .labels.traffic import LabelTraffic
from .distributed import barrier, broadcast_buffers, disable_deepspeed_cpu_shm_op, setup_distributed
from .engine import DTYPES, build_engine
from .evaluate import evaluate_epoch, test_once
from .losses import TrainingLoss, build_training_loss
from .preemption import EXIT_PREEMPTED, PreemptionGuard, Preempted
from .run_data import RunData, build_data
from .run_stores import RunStores, build_label_traffic, build_stores, checkpoint_dir, control_group, restore
from .step import train_step
from .tracking import EpochClock, EpochMeters, Tracker, add_time_share


def run(cfg) -> dict:
    """Train and evaluate one configuration; returns the summary written to summary.json."""
    t_start = time.time()
    guard = PreemptionGuard(cfg.run.preempt_grace_s).install()  # first: a SIGTERM during startup counts
    try:
        dist_info, run_dir = start_run(cfg)
        data = build_data(cfg, dist_info)
        loss = build_training_loss(cfg.loss.name, cfg.loss.options, seed=cfg.run.seed,
                                   estimates_lr_multiplier=cfg.optim.role_lr_multiplier)
        stores = build_stores(cfg, dist_info, run_dir, data, loss)
        engine, scheduler = build_engine(cfg, dist_info, data)
        state = restore(cfg, dist_info, run_dir, engine, stores)
        traffic = build_label_traffic(cfg, dist_info, stores, data, loss)
        guard.group, guard.world_size = control_group(cfg, dist_info), dist_info.world_size
        trainer = Trainer(cfg=cfg, dist_info=dist_info, run_dir=run_dir, data=data, loss=loss, stores=stores,
                          engine=engine, scheduler=scheduler, traffic=traffic, state=state, t_start=t_start,
                          tracker=Tracker(run_dir, enabled=dist_info.is_main, tensorboard=cfg.run.tensorboard),
                          sync_debug=sync_debug_mode(dist_info), preempt=guard)
        summary = None
        try:
            for epoch in range(state["epoch"], cfg.run.epochs):
                train_epoch(trainer, epoch)
                end_epoch(trainer, epoch)
            summary = finish(trainer)
        finally:
            trainer.close()
    finally:
        guard.uninstall()
    return summary


@dataclass
class Trainer:
    """What the epoch loop, evaluation and the summary share, built by the phases before them.
    ``state`` is the resumable part (saved in every checkpoint); the rest is rebuilt at start."""
    cfg: Any
    dist_info: Any
    run_dir: Path
    data: RunData
    loss: TrainingLoss
    stores: RunStores
    engine: Any
    scheduler: Any
    traffic: LabelTraffic
    state: dict
    t_start: float
    tracker: Tracker
    sync_debug: str
    preempt: PreemptionGuard

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint_dir(self.run_dir)

    @property
    def in_dtype(self) -> torch.dtype:
        return DTYPES[self.cfg.model.dtype]

    def save_checkpoint(self, tag: str) -> None:
        """One place for the step and epoch checkpoints: engine, resumable state and the stores."""
        checkpoint.save(self.engine, self.ckpt_dir, tag, dict(self.state), stores=self.stores.stores,
                        dist_info=self.dist_info, per_node=self.stores.per_node, keep=self.cfg.run.keep_checkpoints)

    def close(self) -> None:
        """Stop the tracker, the loaders' workers and the label thread (also on errors)."""
        self.tracker.close()
        self.data.train_loader.close()
        self.data.eval_loader.close()
        self.traffic.close()


def start_run(cfg):
    """Distributed setup, the run folder with its resolved config, then the seeds: the first phase,
    so that every later one may talk to other ranks and draws its random numbers after seeding.
    Returns (dist_info, run_dir)."""
    if not cfg.data.root:
        raise ValueError("data.root is not set: point it at a dataset folder made by `pml-shard convert` "
                         "(or set data.build_demo=true to build the embedded demo dataset there)")
    dist_info = setup_distributed(cfg.run.dist_timeout_s)
    disable_deepspeed_cpu_shm_op()
    import deepspeed  # noqa: F401  (imported once the shm op is disabled; build_engine uses it)

    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
    barrier()

    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.run.deterministic  # fixed input shapes: let cuDNN pick kernels
    return dist_info, run_dir


def sync_debug_mode(dist_info) -> str:
    """Test hook: PML_SYNC_DEBUG=warn|error turns on torch's sync debug mode around every hot-loop
    iteration (not the first step, logging steps or checkpoints, which sync on purpose); CUDA only."""
    return os.environ.get("PML_SYNC_DEBUG", "") if dist_info.device.type == "cuda" else ""


def train_epoch(trainer: Trainer, epoch: int) -> None:
    """One epoch of steps (from the restored batch when resuming mid-epoch), then its timing records.
    The next batch and its labels are always requested before the current step is launched."""
    cfg, state = trainer.cfg, trainer.state
    start_batch = state["batch"] if epoch == state["epoch"] else 0
    trainer.data.train_loader.set_epoch(epoch, start_batch=start_batch)
    # explicit ordering: every store write of the previous epoch (or the restored snapshot) is in
    # every rank's store before this epoch's first gather reads it
    trainer.traffic.fence(barrier=True)
    pseudo = trainer.stores.pseudo
    if hasattr(pseudo, "begin_epoch"):  # versioned: read last epoch's version, write this one's
        pseudo.begin_epoch(epoch)
    bar = trainer.tracker.progress(trainer.data.steps_per_epoch, f"epoch {epoch + 1}/{cfg.run.epochs}",
                                   initial=start_batch)
    t_last = time.perf_counter()
    shares = {"_sync": cfg.run.time_shares and trainer.dist_info.device.type == "cuda"}
    clock = EpochClock(trainer.dist_info.device)
    meters = EpochMeters(bar=bar, shares=shares, clock=clock, t_last=t_last, t_prev=time.perf_counter())
    batches = iter(trainer.data.train_loader)
    batch = next(batches, None)
    clock.first_batch()
    pending = trainer.traffic.gather(batch, epoch) if batch is not None else None
    while batch is not None:
        batch, pending = epoch_step(trainer, meters, epoch, batch, pending, batches)
    bar.close()
    trainer.traffic.fence(barrier=False)
    if hasattr(pseudo, "end_epoch"):  # complete this epoch's version (rows not visited) before its checkpoint
        pseudo.end_epoch(link=trainer.dist_info.is_local_main)
    record_epoch(trainer, meters, epoch)


def epoch_step(trainer: Trainer, meters: EpochMeters, epoch: int, batch, pending, batches):
    """The loop's side of one step: queue the next batch and its labels, run ``train_step``, count,
    log on logging steps, checkpoint on the step cadence. Returns the next (batch, pending)."""
    cfg, state = trainer.cfg, trainer.state
    step_no = state["global_step"] + 1
    log_now = step_no % cfg.run.log_every == 0 or batch.index + 1 == trainer.data.steps_per_epoch
    check = state["global_step"] == 0 or log_now  # the loss checks its inputs (a sync) here only
    hot = trainer.sync_debug and meters.clock.steps >= 1 and not check
    if hot:
        torch.cuda.set_sync_debug_mode(trainer.sync_debug)
    # the next batch and its labels are on their way before this step is launched
    nxt = next(batches, None)
    nxt_pending = trainer.traffic.gather(nxt, epoch) if nxt is not None else None  # ids disjoint within an epoch
    add_time_share(meters.shares, "loader", meters.t_prev)
    if meters.clock.steps == 1:
        meters.clock.steady_start(meters.epoch_images)
    stats = train_step(trainer.engine, batch, pending, trainer.loss, check=check, traffic=trainer.traffic, cfg=cfg,
                       epoch=epoch, in_dtype=trainer.in_dtype, k_expected=trainer.data.k_expected,
                       shares=meters.shares, tag=f"{step_no}-{trainer.dist_info.rank}")
    if hot:
        torch.cuda.set_sync_debug_mode(0)
    meters.clock.steps += 1
    state["global_step"] = step_no
    state["batch"] = batch.index + 1
    valid_images = int(batch.valid_host.sum()) * trainer.dist_info.world_size
    meters.n_imgs += valid_images
    meters.epoch_images += valid_images
    meters.bar.update(1)
    if log_now:
        log_step(trainer, meters, epoch, stats)
    ckpt_every = cfg.run.checkpoint_every_steps
    mid_epoch = state["batch"] < trainer.data.steps_per_epoch  # the epoch's last step checkpoints in end_epoch
    saved = bool(ckpt_every and state["global_step"] % ckpt_every == 0 and mid_epoch)
    if saved:
        trainer.traffic.fence(barrier=False)  # the snapshot must hold every ŷ up to this step
        trainer.save_checkpoint(f"step{state['global_step']}")
    if trainer.preempt.should_stop() and mid_epoch:
        tag = f"step{state['global_step']}"
        if not saved:
            trainer.traffic.fence(barrier=False)
            trainer.save_checkpoint(tag)
        raise trainer.preempt.committed(tag)
    meters.t_prev = time.perf_counter()
    return nxt, nxt_pending


def log_step(trainer: Trainer, meters: EpochMeters, epoch: int, stats: dict) -> None:
    """The only place loss statistics are read back (a host sync): progress bar and metrics.jsonl."""
    values = {k: float(v) for k, v in stats.items()}
    now = time.perf_counter()
    img_s = meters.n_imgs / max(now - meters.t_last, 1e-9)
    meters.t_last, meters.n_imgs = now, 0
    lr = trainer.scheduler.get_last_lr()[0]
    own = {{"alpha": "a", "beta": "b", "p2_share": "p2"}.get(k, k): f"{v:.3g}"
           for k, v in values.items() if k != "loss"}  # the statistics this loss returned, only
    meters.bar.set_postfix(loss=f"{values['loss']:.4f}", **own, img_s=f"{img_s:.0f}", refresh=False)
    trainer.tracker.log("train", trainer.state["global_step"], epoch=epoch, lr=lr, img_s=img_s,
                  skipped=trainer.data.train_loader.skipped, **values)


def record_epoch(trainer: Trainer, meters: EpochMeters, epoch: int) -> None:
    """After the epoch's last fence: its throughput and time-share records, and the resumable state
    moved to the start of the next epoch."""
    state = trainer.state
    timing = meters.clock.end(meters.epoch_images)
    if timing:
        trainer.tracker.log("epoch", state["global_step"], epoch=epoch, **timing)
    state["epoch"], state["batch"] = epoch + 1, 0
    parts = {k: v for k, v in meters.shares.items() if not k.startswith("_")}
    total_time = sum(parts.values())
    if total_time > 0:
        trainer.tracker.log("time_share", state["global_step"], epoch=epoch,
                      **{k: v / total_time for k, v in parts.items()})


def end_epoch(trainer: Trainer, epoch: int) -> None:
    """Evaluate when due (every run.eval_every epochs and after the last), then the epoch's
    checkpoint, which thus holds the evaluation's best_map/last_map."""
    cfg = trainer.cfg
    if epoch + 1 == cfg.run.epochs or (cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0):
        broadcast_buffers(trainer.engine.module)  # one set of BatchNorm statistics for every rank's share
        trainer.state["last_map"] = evaluate_epoch(trainer, epoch)
    trainer.save_checkpoint(f"epoch{epoch + 1}")
    if trainer.preempt.should_stop() and epoch + 1 < cfg.run.epochs:  # after the last epoch: finish instead
        raise trainer.preempt.committed(f"epoch{epoch + 1}")


def finish(trainer: Trainer) -> dict:
    """The run's summary: written last (summary.json marks a finished run) and printed, by rank 0."""
    cfg, state, dist_info, data = trainer.cfg, trainer.state, trainer.dist_info, trainer.data
    test_map = test_once(trainer)
    summary = {"final_map": state["last_map"], "best_map": state["best_map"], "best_epoch": state["best_epoch"],
               "eval_split": data.eval_name, "test_map": test_map if data.eval_name == "val" else state["last_map"],
               "epochs": cfg.run.epochs, "loss": cfg.loss.name, "setting": cfg.data.setting, "seed": cfg.run.seed,
               "dataset": Path(cfg.data.root).name,
               "world_size": dist_info.world_size, "skipped_samples": trainer.data.train_loader.skipped,
               "wall_s": time.time() - trainer.t_start}
    if dist_info.is_main:
        atomic_write_json(trainer.run_dir / "summary.json", summary)
        print(f"[pml-scale] {cfg.run.name}: final {data.eval_name} mAP {100 * (summary['final_map'] or 0):.2f}  "
              f"best {100 * summary['best_map']:.2f} (epoch {summary['best_epoch']})  "
              f"{summary['wall_s']:.0f} s", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(config_path, overrides)
    try:
        run(cfg)
    except Preempted as e:
        print(f"[pml-scale] {e}; exit code {EXIT_PREEMPTED}", flush=True)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a run reports itself: metrics.jsonl (the machine-readable record the grid runner reads),
TensorBoard curves, and a tqdm progress bar (only rank 0 writes; other ranks get a silent
tracker); and the clocks behind the throughput and time-share records, which never sync the
device per step."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


class Tracker:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            except Exception as e:  # tensorboard missing or broken: curves are optional, the run is not
                print(f"[pml-scale] TensorBoard disabled: {e}")

    def log(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, float) else v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"kind": kind, "step": step, **clean, "time": time.time()}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def progress(self, total: int, desc: str, initial: int = 0):
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.enabled, dynamic_ncols=True,
                    mininterval=1.0, unit="batch")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class EpochClock:
    """Per-epoch throughput without per-step syncs: host time to the first batch, CUDA events (host
    time on CPU) from the second step to the end of the epoch, read after one sync at its end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()
        self.first_s = None
        self.steps = 0
        self._start = None
        self._start_images = 0

    def first_batch(self) -> None:
        self.first_s = time.perf_counter() - self.t0

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def steady_start(self, images_so_far: int) -> None:
        self._start, self._start_images = self._mark(), images_so_far

    def end(self, images: int) -> dict:
        """{first_batch_s, epoch_img_s, steady_img_s, images} (one device sync), or {} if empty."""
        if self.steps == 0:
            return {}
        stop = self._mark()
        if self.cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - self.t0
        out = {"first_batch_s": self.first_s, "epoch_img_s": images / max(total, 1e-9), "images": images,
               "steps": self.steps}
        if self._start is not None:
            span = self._start.elapsed_time(stop) / 1000 if self.cuda else stop - self._start
            out["steady_img_s"] = (images - self._start_images) / max(span, 1e-9)
        return out


@dataclass
class EpochMeters:
    """Per-epoch bookkeeping the steps of one epoch share: the progress bar, the host time shares,
    the throughput clock and image counters (``n_imgs``/``t_last`` since the last log line)."""
    bar: Any
    shares: dict
    clock: EpochClock
    t_last: float
    t_prev: float
    n_imgs: int = 0
    epoch_images: int = 0


def add_time_share(shares: dict, name: str, since: float) -> float:
    """Add the host time since ``since`` to part ``name`` of the step. GPU work is asynchronous, so
    these are host (launch and wait) times; with ``run.time_shares`` on a GPU we synchronise at
    each boundary for device-time shares (off by default: it costs the overlap)."""
    if shares.get("_sync"):
        torch.cuda.synchronize()
    now = time.perf_counter()
    shares[name] = shares.get(name, 0.0) + (now - since)
    return now

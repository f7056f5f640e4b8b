"""Where a run reports itself: metrics.jsonl (the machine-readable record the grid runner reads),
TensorBoard curves, and a tqdm progress bar. Only rank 0 writes; other ranks get a silent tracker."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

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

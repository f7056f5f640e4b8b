"""``FeatureLoader``: the epoch loader over a frozen-trunk feature cache (``features``) instead of images."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .batch_source import flip_draws
from .loaders import Batch, EpochLoader, LoaderConfig


class FeatureLoader(EpochLoader):
    """An EpochLoader that yields cached trunk features instead of images: the same plan (order,
    rank split, resume, validation subset), the same flip draws (view 1 = mirrored)."""

    def __init__(self, cfg: LoaderConfig, index, *, rank: int, world_size: int, local_rank: int, device):
        super().__init__(cfg, "features", index, rank=rank, world_size=world_size, local_rank=local_rank,
                         device=device)
        path = Path(cfg.features)
        self.rows = np.load(path, mmap_mode="r")
        self.row_ids = np.load(path.with_name(path.stem + ".ids.npy"))
        if len(self.row_ids) != index.num_samples:
            raise ValueError(f"{path}: {len(self.row_ids)} rows, but split {cfg.split!r} has {index.num_samples} "
                             f"samples: delete the stale cache folder {path.parent}")

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        return self._iter_features(plan)

    def _iter_features(self, plan) -> Iterator[Batch]:
        flips = self.cfg.train and self.cfg.hflip > 0 and self.rows.shape[1] > 1
        for b in range(len(plan)):
            ids = plan.ids[b]
            rows = np.searchsorted(self.row_ids, ids)
            view = flip_draws(self.cfg.seed, self.epoch, ids, self.cfg.hflip) if flips else np.zeros(len(ids), int)
            x = torch.from_numpy(np.ascontiguousarray(self.rows[rows, view])).to(self._dtype)
            yield self._finish(x, ids, plan.valid[b], plan.start_batch + b)

    def close(self) -> None:
        self.rows = None  # the memmap; the base class closes its (unused) reader and pipeline state
        super().close()

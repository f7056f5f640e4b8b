"""``build_loader``: the trainer's one entry point to the input pipelines.

Why a module of its own: it picks between the image loader (``loaders``) and the feature-cache
loader (``feature_loader``, a subclass of the former); the feature cache's builder (``features``)
in turn runs image loaders. Here, above both, nothing imports in a circle.
"""

from __future__ import annotations

import torch

from ..shards.format import read_manifest
from ..shards.index import SampleIndex
from .feature_loader import FeatureLoader
from .loaders import EpochLoader, LoaderConfig, dali_importable, resolve_backend


def build_loader(cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device=None) -> EpochLoader:
    """The trainer's entry point: load the split's index (own shards only in affinity mode)."""
    if not isinstance(cfg, LoaderConfig):
        raise TypeError(f"cfg must be a LoaderConfig, got {type(cfg).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    backend = resolve_backend(cfg.backend)
    if backend == "dali":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'dali' decodes on the GPU but CUDA is not available; "
                               "use backend 'dali_cpu', 'pil' or 'auto'")
        if not dali_importable():
            raise RuntimeError("backend 'dali' needs nvidia-dali (pip install nvidia-dali-cuda120)")
    if backend == "dali_cpu" and not dali_importable():
        raise RuntimeError("backend 'dali_cpu' needs nvidia-dali (pip install nvidia-dali-cuda120)")
    if device is None:
        device = torch.device("cuda", local_rank) if backend == "dali" or torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    shards = None
    if cfg.affinity == "shard":
        n = len(read_manifest(cfg.root)["splits"].get(cfg.split, {"shards": []})["shards"])
        if n < world_size:
            raise ValueError(f"affinity='shard' needs at least one shard per rank: split {cfg.split!r} of "
                             f"{cfg.root} has {n} shards for world_size {world_size}")
        shards = list(range(rank, n, world_size))
    index = SampleIndex.load(cfg.root, cfg.split, shards)
    if cfg.features is not None:
        return FeatureLoader(cfg, index, rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    return EpochLoader(cfg, backend, index, rank=rank, world_size=world_size, local_rank=local_rank, device=device)

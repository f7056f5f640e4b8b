"""The input pipelines: shards (or a feature cache) to device batches, in the seeded epoch plan's
order, with the same augmentation draws on every backend (DALI on GPU or CPU, PIL)."""

from .build import build_loader
from .loaders import Batch, LoaderConfig, dali_importable

__all__ = ["Batch", "LoaderConfig", "build_loader", "dali_importable"]

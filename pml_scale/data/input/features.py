"""Frozen-trunk feature cache: compute the frozen units of a backbone once per image, train the rest.

Why: fine-tuning a pretrained backbone on 2 CPU cores is slow, and when the first k units are
frozen (``model.frozen_stages=k``: eval-mode BatchNorm, no gradient) their output is a pure
function of the image. ``data.feature_cache=true`` computes it once per image and per flip and
stores it; training and evaluation then read rows instead of decoding and running the trunk.
Grids of dozens of runs become minutes, with the same order, flips, resume and validation split
as the image loaders (``FeatureLoader`` reuses the epoch plan).

Layout: ``<data.root>/features/<key>/<split>.npy`` (fp16, (N, V, *feature shape), V = 2 views
for the training split: the plain resize and its mirror image; 1 for the others), ``<split>.ids.npy``
(sorted sample ids, row i is ids[i]) and ``meta.json``. ``key`` names the model, a digest of the
frozen units' weights, k and the image size, so another backbone, another initialisation or
another resolution never reads a stale cache. Each split file is written atomically: an
interrupted build keeps the splits it finished and redoes the one it was in.

What it costs: N × V × (feature size) × 2 bytes per split (EfficientNet-Lite0 pooled features:
1280 values, 5 KB per image and view); building it is one forward pass of the trunk per image and
view (~50 img/s at 224 px on 2 CPU cores).

Augmentation with a cache is the mirror flip only (``augment=resize``); random-resized crops
would make the trunk's output a function of the crop.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ...atomic import atomic_path, atomic_write_json
from .build import build_loader
from .loaders import LoaderConfig

VIEWS_TRAIN = 2  # plain, mirrored


def trunk_digest(model: torch.nn.Module, frozen: int) -> str:
    """sha256 over the frozen units' state (names, shapes, bytes): the cache's identity."""
    h = hashlib.sha256(f"{type(model).__name__}/{frozen}".encode())
    for unit in model.units()[:frozen]:
        for name, t in unit.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_dir(root, model_name: str, digest: str, frozen: int, image_size: int) -> Path:
    return Path(root) / "features" / f"{model_name}-{digest[:12]}-u{frozen}-{image_size}px"


@torch.inference_mode()
def trunk_forward(model: torch.nn.Module, frozen: int, images: torch.Tensor) -> torch.Tensor:
    """The first ``frozen`` units on loader-normalised images (the model's input affine first)."""
    x = images * model.in_scale + model.in_shift
    if x.dim() == 4 and x.device.type == "cpu":  # CPU depthwise convolutions: ~4x faster channels_last
        x = x.contiguous(memory_format=torch.channels_last)
    for unit in model.units()[:frozen]:
        x = unit(x)
    return x.contiguous()


def build_split(model, frozen: int, loader_cfg: LoaderConfig, out: Path, views: int, progress: bool) -> None:
    """Run the trunk over every sample of one split (id order) and write ``out`` atomically."""
    from tqdm import tqdm

    loader = build_loader(LoaderConfig(**{**loader_cfg.__dict__, "train": False, "subset": "all", "features": None}))
    loader.set_epoch(0)
    ids_all = np.sort(np.concatenate(loader.index.shard_ids()))
    model.eval().to(memory_format=torch.channels_last)
    arr = None
    written = np.zeros(len(ids_all), bool)
    bar = tqdm(total=len(ids_all), desc=f"features {loader_cfg.split}", unit="img", disable=not progress)
    with atomic_path(out) as tmp:
        for batch in loader:
            keep = batch.valid_host
            images = batch.images.float()
            feats = [trunk_forward(model, frozen, images)]
            if views == 2:
                feats.append(trunk_forward(model, frozen, torch.flip(images, dims=[3])))
            block = torch.stack(feats, 1).to(torch.float16).numpy()
            if arr is None:
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                shape=(len(ids_all), views, *block.shape[2:]))
            rows = np.searchsorted(ids_all, batch.ids_host[keep])
            arr[rows] = block[keep]
            written[rows] = True
            bar.update(int(keep.sum()))
        bar.close()
        loader.close()
        if arr is None or not written.all():
            raise RuntimeError(f"feature cache {out}: {int((~written).sum())} samples of split "
                               f"{loader_cfg.split!r} were not read (bad images?)")
        arr.flush()
        del arr
    with atomic_path(out.with_name(out.stem + ".ids.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, ids_all)


def ensure_cache(root, model, model_name: str, frozen: int, loader_cfg: LoaderConfig, splits: dict[str, int],
                 *, progress: bool = False) -> Path:
    """The cache folder for ``model``'s first ``frozen`` units, built for the missing ``splits``
    ({split: views}). Call on one process per node, then barrier."""
    if not hasattr(model, "units"):
        raise ValueError(f"data.feature_cache needs a model that exposes units() (efficientnet_lite0); "
                         f"{type(model).__name__} does not")
    if not 0 < frozen <= len(model.units()):
        raise ValueError(f"data.feature_cache needs 0 < model.frozen_stages <= {len(model.units())}, got {frozen}")
    if loader_cfg.augment != "resize":
        raise ValueError("data.feature_cache supports data.augment=resize only (a crop changes the trunk's output)")
    digest = trunk_digest(model, frozen)
    folder = cache_dir(root, model_name, digest, frozen, loader_cfg.image_size)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp-*"):  # left by a killed build; a live builder's file is kept
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            stale.unlink(missing_ok=True)
    for split, views in splits.items():
        out = folder / f"{split}.npy"
        if not out.exists() or not out.with_name(f"{split}.ids.npy").exists():
            build_split(model, frozen, LoaderConfig(**{**loader_cfg.__dict__, "split": split}), out, views, progress)
    meta = folder / "meta.json"
    if not meta.exists():
        atomic_write_json(meta, {"model": model_name, "frozen_units": frozen, "digest": digest,
                                 "image_size": loader_cfg.image_size, "views": splits})
    return folder


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True

"""Input pipelines: DALI on GPU, DALI on CPU, or PIL + torch DataLoader, all fed by our plan.

Every backend reads the same thing in the same order: ``plan.make_plan`` decides the ids of
each batch of each rank, ``index.SampleIndex`` says where they are, workers ``os.pread`` the
bytes. Backends differ only in decoding and augmentation:

* ``dali``      external source (parallel python workers) -> GPU ("mixed") decode -> resize to
                ``image_size`` square (or random-resized-crop, ``augment="rrc"``) ->
                crop_mirror_normalize (coin-flip mirror, ImageNet mean/std, NCHW) on the GPU.
* ``dali_cpu``  the same graph with ``device_id=None`` and CPU decode.
* ``pil``       a DataLoader whose items are whole batches (one worker per batch): PIL decode,
                torchvision resize/crop/flip to uint8; normalisation and the dtype cast happen on
                the target device, so workers ship 1 byte per pixel instead of 4.
* ``auto``      dali if CUDA and DALI import, else dali_cpu if DALI imports, else pil.

Evaluation (``train=False``) uses no randomness: plain resize, no flip. Augmentation is
deterministic per (seed, epoch, rank, start_batch) for DALI (pipeline seed) and per
(seed, epoch, sample id) for PIL (a torch Generator per sample), so a resumed DALI epoch keeps
the exact order but draws fresh augmentations; a resumed PIL epoch reproduces them exactly.

Bad samples (corrupt JPEG, short read, id mismatch): workers check the bytes before decoding
(``index.check_image_bytes``), and replace a bad sample by the next good sample of the same
batch (cyclically) marked ``valid=False``, so the batch shape never changes; the main process
warns once per sample with shard+key+reason, counts every occurrence in ``skipped`` and lists
(shard, key, reason) in ``errors``; ``on_error="fail"`` raises ``SampleError`` instead. DALI
fails a whole batch on an image it cannot decode that passed the checks: the loader then
decodes that batch's images with PIL, marks the culprits bad and restarts the pipeline at that
batch; if PIL finds nothing wrong the DALI error is raised with the batch's shards and keys.

Costs: a DALI pipeline (and its python workers) is built per epoch (~1 s with spawn), the PIL
DataLoader's workers per epoch too. Host memory per rank: the index (36 B/sample) + the plan.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .index import Locations, SampleError, SampleIndex, SampleSource, ShardReader, read_checked
from .plan import AFFINITIES, batches_per_epoch, make_plan

BACKENDS = ("auto", "dali", "dali_cpu", "pil")
AUGMENTS = ("resize", "rrc")
ON_ERROR = ("skip", "fail")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


@dataclass
class LoaderConfig:
    root: str
    split: str = "train"
    backend: str = "auto"
    image_size: int = 448
    batch_size: int = 32
    train: bool = True
    augment: str = "resize"  # or "rrc"
    hflip: float = 0.5
    workers: int = 4
    dtype: str = "float32"  # "bf16" | "fp16"
    on_error: str = "skip"  # or "fail"
    affinity: str = "none"  # or "shard"
    seed: int = 0

    def __post_init__(self):
        choices = {"backend": BACKENDS, "augment": AUGMENTS, "dtype": tuple(DTYPES), "on_error": ON_ERROR,
                   "affinity": AFFINITIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LoaderConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, lo in (("image_size", 1), ("batch_size", 1), ("workers", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"LoaderConfig.{name} must be an integer >= {lo}, got {v!r}")
        if not 0.0 <= float(self.hflip) <= 1.0:
            raise ValueError(f"LoaderConfig.hflip must be a probability in [0, 1], got {self.hflip!r}")


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) on the device, normalised, cfg.dtype
    ids: torch.Tensor  # (B,) int64 sample ids
    valid: torch.Tensor  # (B,) bool; False: padding repeat or a replaced bad sample
    index: int  # batch number within the epoch


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA runtime behind it
        return False
    return True


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    if dali_importable():
        return "dali" if torch.cuda.is_available() else "dali_cpu"
    return "pil"


def _seed(*key: int, bits: int = 63) -> int:
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << bits) - 1))


# ---------------------------------------------------------------- DALI


def _dali_pipeline(cfg: LoaderConfig, source: SampleSource, *, gpu: bool, device_id, seed: int):
    from nvidia.dali import fn, pipeline_def, types

    S = cfg.image_size
    out_type = types.FLOAT if DTYPES[cfg.dtype] == torch.float32 else types.FLOAT16
    workers = max(1, cfg.workers)
    # fork after CUDA init is unsafe; spawn costs ~1-3 s per epoch (worker start-up)
    start = "spawn" if gpu or torch.cuda.is_initialized() else "fork"

    @pipeline_def(batch_size=cfg.batch_size, num_threads=workers, device_id=device_id, seed=seed,
                  py_num_workers=workers, py_start_method=start, prefetch_queue_depth=2)
    def graph():
        jpeg, ids, valid, bad = fn.external_source(
            source=source, num_outputs=4, batch=False, parallel=True, prefetch_queue_depth=2,
            dtype=[types.UINT8, types.INT64, types.BOOL, types.INT64])
        dev = "mixed" if gpu else "cpu"
        if cfg.train and cfg.augment == "rrc":
            img = fn.decoders.image_random_crop(jpeg, device=dev, output_type=types.RGB,
                                                random_area=list(RRC_SCALE), random_aspect_ratio=list(RRC_RATIO),
                                                num_attempts=10)
        else:
            img = fn.decoders.image(jpeg, device=dev, output_type=types.RGB)
        img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_LINEAR, antialias=True)
        mirror = fn.random.coin_flip(probability=float(cfg.hflip)) if cfg.train and cfg.hflip > 0 else 0
        img = fn.crop_mirror_normalize(img, dtype=out_type, output_layout="CHW", mirror=mirror,
                                       mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])
        return img, ids, valid, bad

    pipe = graph()
    pipe.build()
    return pipe


# ---------------------------------------------------------------- PIL


def _rrc_params(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``g`` instead of the global RNG."""
    area = width * height
    log_ratio = torch.log(torch.tensor(RRC_RATIO))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*RRC_SCALE, generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=g)).item()
        w = int(round((target * aspect) ** 0.5))
        h = int(round((target / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return i, j, h, w
    ratio = width / height
    if ratio < RRC_RATIO[0]:
        w, h = width, int(round(width / RRC_RATIO[0]))
    elif ratio > RRC_RATIO[1]:
        h, w = height, int(round(height * RRC_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _PilBatches(torch.utils.data.Dataset):
    """Item ``b`` is the whole batch ``b`` of the plan, as uint8 images (one worker per batch)."""

    def __init__(self, cfg: LoaderConfig, epoch: int, loc: Locations, valid: np.ndarray, known_bad: dict):
        self.cfg, self.epoch, self.loc, self.valid, self.known_bad = cfg, epoch, loc, valid, dict(known_bad)
        self.reader = ShardReader()

    def __len__(self) -> int:
        return self.valid.shape[0]

    def _image(self, data: bytes, sid: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as F

        cfg, S = self.cfg, self.cfg.image_size
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")  # full decode: a damaged scan raises here
        if cfg.train:
            g = torch.Generator().manual_seed(_seed(cfg.seed, self.epoch, sid))
            if cfg.augment == "rrc":
                top, left, h, w = _rrc_params(im.width, im.height, g)
                im = F.resized_crop(im, top, left, h, w, [S, S], antialias=True)
            else:
                im = F.resize(im, [S, S], antialias=True)
            x = F.pil_to_tensor(im)
            if cfg.hflip > 0 and torch.rand(1, generator=g).item() < cfg.hflip:
                x = x.flip(-1)
            return x
        return F.pil_to_tensor(F.resize(im, [S, S], antialias=True))

    def __getitem__(self, b: int) -> dict:
        B, S = self.valid.shape[1], self.cfg.image_size
        images = torch.zeros(B, 3, S, S, dtype=torch.uint8)
        ids = torch.from_numpy(self.loc.ids[b].copy())
        valid = torch.from_numpy(self.valid[b].copy())
        ok = np.zeros(B, bool)
        errors = []
        for j in range(B):
            sid = int(self.loc.ids[b, j])
            try:
                data = read_checked(self.reader, self.loc, (b, j), self.known_bad)
                try:
                    images[j] = self._image(data, sid)
                except Exception as e:  # PIL decode errors come in many types
                    shard, key = self.loc.where((b, j))
                    raise SampleError(shard, key, f"decode failed ({type(e).__name__}: {e})") from None
                ok[j] = True
            except SampleError as e:
                errors.append((sid, e.shard, e.key, e.reason))
        for j in np.nonzero(~ok)[0]:
            good = next(((j + k) % B for k in range(1, B) if ok[(j + k) % B]), None)
            if good is not None:
                images[j], ids[j] = images[good], ids[good]
            valid[j] = False
        return {"images": images, "ids": ids, "valid": valid, "errors": errors}


# ---------------------------------------------------------------- the loader


class EpochLoader:
    """Iterates one rank's batches of one epoch; ``len(loader)`` is equal on every rank."""

    def __init__(self, cfg: LoaderConfig, backend: str, index: SampleIndex, *, rank: int, world_size: int,
                 local_rank: int, device: torch.device):
        self.cfg, self.backend, self.index = cfg, backend, index
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.num_samples = index.num_samples
        self.batches_per_epoch = batches_per_epoch(index.shard_counts, batch_size=cfg.batch_size,
                                                   world_size=world_size, train=cfg.train, affinity=cfg.affinity)
        self.skipped = 0
        self.errors: list[tuple[str, str, str]] = []
        self._reported: set[int] = set()
        self._known_bad: dict[int, str] = {}
        self._shard_ids = index.shard_ids()
        self._main_reader = ShardReader()
        self._active = None
        self.epoch, self.start_batch = 0, 0
        dtype = DTYPES[cfg.dtype]
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(shape) * 255
        self._inv_std = 1 / (torch.tensor(IMAGENET_STD, device=device).view(shape) * 255)
        self._dtype = dtype

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch=k`` (resume) skips its first k batches without reading them."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if isinstance(start_batch, bool) or not isinstance(start_batch, int) or not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be an integer in [0, {len(self)}], got {start_batch!r}")
        self.epoch, self.start_batch = epoch, start_batch

    def plan(self):
        return make_plan(self._shard_ids, seed=self.cfg.seed, epoch=self.epoch, rank=self.rank,
                         world_size=self.world_size, batch_size=self.cfg.batch_size, train=self.cfg.train,
                         affinity=self.cfg.affinity, start_batch=self.start_batch)

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        if len(plan) == 0:
            return iter(())
        loc = self.index.locate(plan.ids)
        if self.backend == "pil":
            return self._iter_pil(plan, loc)
        return self._iter_dali(plan, loc)

    # -- shared

    def _report(self, sid: int, shard: str, key: str, reason: str) -> None:
        self.skipped += 1
        if self.cfg.on_error == "fail":
            raise SampleError(shard, key, reason)
        if sid not in self._reported:
            self._reported.add(sid)
            self.errors.append((shard, key, reason))
            warnings.warn(f"skipping bad sample: shard {shard}, key {key}: {reason}", RuntimeWarning, stacklevel=3)

    def _finish(self, images: torch.Tensor, ids, valid, index: int) -> Batch:
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = ((x.float() - self._mean) * self._inv_std).to(self._dtype)
        elif x.dtype != self._dtype:
            x = x.to(self._dtype)
        return Batch(x, ids.to(self.device, torch.int64, non_blocking=True),
                     valid.to(self.device, torch.bool, non_blocking=True), index)

    # -- pil

    def _iter_pil(self, plan, loc) -> Iterator[Batch]:
        ds = _PilBatches(self.cfg, self.epoch, loc, plan.valid, self._known_bad)
        pin = self.device.type == "cuda"
        dl = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.cfg.workers,
                                         pin_memory=pin, prefetch_factor=2 if self.cfg.workers else None)
        for b, item in enumerate(dl):
            for sid, shard, key, reason in item["errors"]:
                self._report(int(sid), shard, key, reason)
            yield self._finish(item["images"], item["ids"], item["valid"], plan.start_batch + b)

    # -- dali

    def _iter_dali(self, plan, loc) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        gpu = self.backend == "dali"
        b = 0
        last_failed = -1
        while b < len(plan):
            sub = Locations(loc.paths, loc.ids[b:], loc.shard[b:], loc.offset[b:], loc.size[b:], loc.id_offset[b:])
            source = SampleSource(sub, plan.valid[b:], self._known_bad)
            seed = _seed(self.cfg.seed, self.epoch, self.rank, plan.start_batch + b, bits=31)
            failure = None
            pipe = _dali_pipeline(self.cfg, source, gpu=gpu, device_id=self.local_rank if gpu else None, seed=seed)
            self._active = pipe
            try:
                try:
                    it = DALIGenericIterator([pipe], ["images", "ids", "valid", "bad"], auto_reset=False)
                except Exception as e:  # the iterator runs the first batches while it is built
                    failure, it = e, iter(())
                while failure is None:
                    try:
                        d = next(it)[0]
                    except StopIteration:
                        break
                    except Exception as e:  # a DALI error: typically an image it cannot decode
                        failure = e
                        break
                    for j in np.nonzero(d["bad"].cpu().numpy().reshape(-1) >= 0)[0]:
                        self._report_dali(loc, plan.ids, b, int(j), int(d["bad"].view(-1)[j]))
                    yield self._finish(d["images"], d["ids"].view(-1), d["valid"].view(-1), plan.start_batch + b)
                    b += 1
            finally:  # drop the iterator and pipeline now: their workers exit before any restart
                self._active = it = pipe = None
            if failure is None:
                return
            if b == last_failed or not self._find_undecodable(loc, b, min(len(plan), b + 3)):
                names = sorted({loc.where((b, j))[0] for j in range(plan.ids.shape[1])})
                raise RuntimeError(f"DALI failed on batch {plan.start_batch + b} of epoch {self.epoch} (shards "
                                   f"{names}) and PIL finds no new undecodable image there: {failure}") from failure
            last_failed = b  # restart the pipeline at this batch with the culprits marked bad

    def _report_dali(self, loc: Locations, ids: np.ndarray, b: int, j: int, bad: int) -> None:
        pos = (b, j) if int(ids[b, j]) == bad else tuple(np.argwhere(ids == bad)[0])
        shard, key = loc.where(pos)
        reason = self._known_bad.get(bad)
        if reason is None:
            try:
                self._main_reader.read(loc, pos)
                reason = "unreadable in a loader worker"
            except SampleError as e:
                reason = e.reason
        self._report(bad, shard, key, reason)

    def _find_undecodable(self, loc: Locations, b0: int, b1: int) -> bool:
        """After a DALI failure: decode batches [b0, b1) with PIL; remember what fails."""
        from PIL import Image

        found = False
        for b in range(b0, b1):
            for j in range(loc.ids.shape[1]):
                sid = int(loc.ids[b, j])
                if sid in self._known_bad:
                    continue
                try:
                    data = self._main_reader.read(loc, (b, j))
                    with Image.open(io.BytesIO(data)) as im:
                        im.convert("RGB")
                except SampleError:
                    continue  # the workers already replace it
                except Exception as e:
                    self._known_bad[sid] = f"decode failed ({type(e).__name__}: {e})"
                    found = True
        return found

    def close(self) -> None:
        self._active = None
        self._main_reader.close()


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
        from .format import read_manifest

        n = len(read_manifest(cfg.root)["splits"].get(cfg.split, {"shards": []})["shards"])
        if n < world_size:
            raise ValueError(f"affinity='shard' needs at least one shard per rank: split {cfg.split!r} of "
                             f"{cfg.root} has {n} shards for world_size {world_size}")
        shards = list(range(rank, n, world_size))
    index = SampleIndex.load(cfg.root, cfg.split, shards)
    return EpochLoader(cfg, backend, index, rank=rank, world_size=world_size, local_rank=local_rank, device=device)

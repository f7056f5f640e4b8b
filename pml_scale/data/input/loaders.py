"""Input pipelines: DALI on GPU, DALI on CPU, or PIL + torch DataLoader, all fed by our plan.

Every backend reads the same thing in the same order: ``plan.make_plan`` decides the ids of
each batch of each rank, ``shards.index.SampleIndex`` says where they are, and the bytes are read by
``os.preadv`` at those offsets. Backends differ only in decoding and augmentation:

* ``dali``      a batch-mode external source in this process (``batch_source.PlanSource``:
                whole-batch reads on a few threads, vectorised checks) -> GPU ("mixed") decode
                -> resize to ``image_size`` square (or random-resized-crop, ``augment="rrc"``)
                -> crop_mirror_normalize (ImageNet mean/std, NCHW) on the GPU.
* ``dali_cpu``  the same graph with ``device_id=None`` and CPU decode.
* ``pil``       a DataLoader whose items are whole batches (one worker per batch): PIL decode,
                torchvision resize/crop/flip to uint8; normalisation and the dtype cast happen on
                the target device, so workers ship 1 byte per pixel instead of 4.
* ``auto``      dali if CUDA and DALI import, else dali_cpu if DALI imports, else pil.

One DALI pipeline per loader, built at its first epoch and kept for the run: a new epoch (or a
resume at ``start_batch``) repositions the source and calls ``pipe.reset()``; nothing is
rebuilt and no process is started, so the first batch of an epoch costs one batch of reading
and decoding. The train and eval loaders each keep their own pipeline. An epoch left early
(``break``) is drained (at most the DALI prefetch depth of batches) at the next ``iter``.

Batches carry the sample ids and validity on the host too (``ids_host``, ``valid_host``): the
trainer uses those and never copies them back from the device.

Evaluation (``train=False``) uses no randomness: plain resize, no flip. Flips are drawn per
(seed, epoch, sample id) on every backend, so a resumed epoch flips exactly as an uninterrupted
one; DALI's random-resized-crop draws from the pipeline's RNG (seeded per (seed, rank)), so a
resumed DALI epoch keeps the exact order and flips but draws fresh crops. PIL crops are per
(seed, epoch, sample id) too.

Bad samples (corrupt JPEG, short read, id mismatch): the source checks the bytes before
decoding and replaces a bad sample by the next good sample of the same batch (cyclically)
marked ``valid=False``, so the batch shape never changes; when the batch is yielded the loader
warns once per sample with shard+key+reason, counts every occurrence in ``skipped`` and lists
(shard, key, reason) in ``errors``; ``on_error="fail"`` raises ``SampleError`` instead. DALI
fails a whole batch on an image it cannot decode that passed the checks: the loader then
decodes that batch's images with PIL, marks the culprits bad and rebuilds the pipeline at that
batch (the only rebuild); if PIL finds nothing wrong the DALI error is raised with the batch's
shards and keys.

Costs: host memory per rank: the index (36 B/sample) + the plan + a few batch buffers of
compressed bytes. The PIL DataLoader forks its workers per epoch (cheap with fork; the DALI
backends are the fast path).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ...dtypes import DTYPE_NAMES, torch_dtype
from ...imagenet import UINT8_MEAN, UINT8_STD, uint8_mean_std
from .batch_source import PlanSource, flip_draws
from ..shards.index import Locations, SampleError, SampleIndex, ShardReader, read_checked
from .plan import AFFINITIES, SUBSETS, batches_per_epoch, make_plan, restrict

BACKENDS = ("auto", "dali", "dali_cpu", "pil")
AUGMENTS = ("resize", "rrc")
ON_ERROR = ("skip", "fail")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def _ignore_sigterm(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the trainer: Slurm signals every process of the job, and
    a worker that died of it would fail the batch the preemption checkpoint waits for (the
    workers stop with the loader, or by torch's parent watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)

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
    dtype: str = "fp32"  # "bf16" | "fp16" (dtypes.DTYPES; torch's names accepted too)
    on_error: str = "skip"  # or "fail"
    affinity: str = "none"  # or "shard"
    seed: int = 0
    hw_decoder_load: float | None = None  # dali: share of JPEGs for the hardware decoder (None: DALI's default)
    subset: str = "all"  # "fit": the split minus its validation ids; "val": those ids only
    val_fraction: float = 0.0
    val_seed: int = 0
    val_ids: str | None = None  # a dataset's own validation ids (.npy), instead of a seeded carve
    features: str | None = None  # a feature cache file (data.input.features): read rows instead of decoding

    def __post_init__(self):
        choices = {"backend": BACKENDS, "augment": AUGMENTS, "dtype": DTYPE_NAMES, "on_error": ON_ERROR,
                   "affinity": AFFINITIES, "subset": SUBSETS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LoaderConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, lo in (("image_size", 1), ("batch_size", 1), ("workers", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"LoaderConfig.{name} must be an integer >= {lo}, got {v!r}")
        if not 0.0 <= float(self.hflip) <= 1.0:
            raise ValueError(f"LoaderConfig.hflip must be a probability in [0, 1], got {self.hflip!r}")
        if self.subset != "all" and not 0.0 < float(self.val_fraction) < 1.0:
            raise ValueError(f"LoaderConfig.subset={self.subset!r} needs 0 < val_fraction < 1, got {self.val_fraction!r}")
        if self.subset != "all" and self.affinity == "shard":
            raise ValueError("a validation split (subset 'fit'/'val') needs affinity 'none': with shard affinity a "
                             "rank does not know the other ranks' ids")
        if self.hw_decoder_load is not None and not 0.0 <= float(self.hw_decoder_load) <= 1.0:
            raise ValueError(f"LoaderConfig.hw_decoder_load must be in [0, 1] or None, got {self.hw_decoder_load!r}")


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) on the device, normalised, cfg.dtype
    ids: torch.Tensor  # (B,) int64 sample ids, on the device (copied without a sync)
    valid: torch.Tensor  # (B,) bool on the device; False: padding repeat or a replaced bad sample
    index: int  # batch number within the epoch
    ids_host: np.ndarray  # (B,) int64, the same ids on the host: use these, never ids.cpu()
    valid_host: np.ndarray  # (B,) bool, the same validity on the host


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

PREFETCH_DEPTH = 2  # DALI batches in flight; also what an abandoned epoch drains


def source_threads(workers: int) -> int:
    """Reader threads of the DALI source: reads are memcpy/IO bound, a few threads suffice."""
    return min(max(int(workers), 0), 4)


def _dali_pipeline(cfg: LoaderConfig, source: PlanSource, *, gpu: bool, device_id, seed: int):
    """The loader's one pipeline. The source runs in this process (no python workers), so
    nothing is spawned or re-imported, and the pipeline outlives epochs."""
    from nvidia.dali import fn, pipeline_def, types

    S = cfg.image_size
    out_type = types.FLOAT if torch_dtype(cfg.dtype) == torch.float32 else types.FLOAT16

    @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers), device_id=device_id, seed=seed,
                  prefetch_queue_depth=PREFETCH_DEPTH, exec_dynamic=True)
    def graph():
        dtypes = [types.UINT8, types.INT64] + ([types.INT32] if source.flips else [])
        # no_copy: DALI reads the source's buffers in place; each stays untouched until its batch's
        # output is out (the source recycles it only then), which is what no_copy asks for
        outs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, batch_info=True,
                                  parallel=False, dtype=dtypes, no_copy=True)
        jpeg, ids = outs[0], outs[1]
        dev = "mixed" if gpu else "cpu"
        hw = {"hw_decoder_load": float(cfg.hw_decoder_load)} if gpu and cfg.hw_decoder_load is not None else {}
        if cfg.train and cfg.augment == "rrc":
            img = fn.decoders.image_random_crop(jpeg, device=dev, output_type=types.RGB,
                                                random_area=list(RRC_SCALE), random_aspect_ratio=list(RRC_RATIO),
                                                num_attempts=10, **hw)
        else:
            img = fn.decoders.image(jpeg, device=dev, output_type=types.RGB, **hw)
        img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_LINEAR, antialias=True)
        mirror = outs[2] if source.flips else 0
        img = fn.crop_mirror_normalize(img, dtype=out_type, output_layout="CHW", mirror=mirror,
                                       mean=UINT8_MEAN, std=UINT8_STD)
        return img, ids

    pipe = graph()
    pipe.build()
    return pipe


def _dali_to_torch(out, device: torch.device) -> torch.Tensor:
    """Zero-copy view of a dense DALI output (the dynamic executor keeps the buffer alive)."""
    tensor = out.as_tensor()
    if device.type == "cuda":
        with device:
            return torch.from_dlpack(tensor)
    return torch.from_dlpack(tensor)


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
            if cfg.hflip > 0 and flip_draws(cfg.seed, self.epoch, np.array([sid]), cfg.hflip)[0]:
                x = x.flip(-1)  # the same per-id draw as the DALI backends
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


def drain_pipeline(pipe, source) -> None:
    """Finish an epoch of a persistent pipeline left early, so the next epoch can start: stop the
    batch source, consume the batches DALI already has in flight, reset the pipeline, then drop
    what the source still held. Raises what an in-flight batch raises."""
    source.stop()
    while True:
        try:
            pipe.share_outputs()
        except StopIteration:
            break
        pipe.release_outputs()
        pipe.schedule_run()
    pipe.reset()
    source.cancel()


class EpochLoader:
    """Iterates one rank's batches of one epoch; ``len(loader)`` is equal on every rank.

    ``set_epoch(e, start_batch)`` then ``iter(loader)``; the DALI pipeline (if any) is built at
    the first iteration and kept until ``close()``.
    """

    def __init__(self, cfg: LoaderConfig, backend: str, index: SampleIndex, *, rank: int, world_size: int,
                 local_rank: int, device: torch.device):
        self.cfg, self.backend, self.index = cfg, backend, index
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        val_ids = np.load(cfg.val_ids) if cfg.val_ids is not None and cfg.subset != "all" else None
        self._shard_ids = restrict(index.shard_ids(), cfg.subset, cfg.val_fraction, cfg.val_seed, val_ids)
        counts = [len(s) for s in self._shard_ids]
        self.num_samples = index.num_samples if cfg.subset == "all" else int(sum(counts))
        self.batches_per_epoch = batches_per_epoch(counts, batch_size=cfg.batch_size,
                                                   world_size=world_size, train=cfg.train, affinity=cfg.affinity)
        self.skipped = 0
        self.errors: list[tuple[str, str, str]] = []
        self.pipeline_builds = 0  # DALI pipelines built so far: 1 for a whole run unless a decode failure
        self._reported: set[int] = set()
        self._known_bad: dict[int, str] = {}
        self._main_reader = ShardReader()
        self._pipe = None
        self._source: PlanSource | None = None
        self._epoch_gen = None
        self.epoch, self.start_batch = 0, 0
        self._mean, std = uint8_mean_std(device)
        self._inv_std = 1 / std
        self._dtype = torch_dtype(cfg.dtype)

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
        self._end_epoch()  # an epoch left early is drained first (DALI must reach its end to reset)
        plan = self.plan()
        if len(plan) == 0:
            return iter(())
        loc = self.index.locate(plan.ids)
        gen = self._iter_pil(plan, loc) if self.backend == "pil" else self._iter_dali(plan, loc)
        self._epoch_gen = gen
        return gen

    def _end_epoch(self) -> None:
        gen, self._epoch_gen = self._epoch_gen, None
        if gen is not None:
            gen.close()

    # -- shared

    def _report(self, sid: int, shard: str, key: str, reason: str) -> None:
        self.skipped += 1
        if self.cfg.on_error == "fail":
            raise SampleError(shard, key, reason)
        if sid not in self._reported:
            self._reported.add(sid)
            self.errors.append((shard, key, reason))
            warnings.warn(f"skipping bad sample: shard {shard}, key {key}: {reason}", RuntimeWarning, stacklevel=3)

    def _host_to_device(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)  # pinned: truly asynchronous
        return t.to(self.device)

    def _finish(self, images: torch.Tensor, ids: np.ndarray, valid: np.ndarray, index: int) -> Batch:
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = ((x.float() - self._mean) * self._inv_std).to(self._dtype)
        elif x.dtype != self._dtype:
            x = x.to(self._dtype)
        ids = np.asarray(ids, np.int64).reshape(-1)
        valid = np.asarray(valid, bool).reshape(-1)
        return Batch(x, self._host_to_device(ids), self._host_to_device(valid), index, ids, valid)

    # -- pil

    def _iter_pil(self, plan, loc) -> Iterator[Batch]:
        ds = _PilBatches(self.cfg, self.epoch, loc, plan.valid, self._known_bad)
        pin = self.device.type == "cuda"
        dl = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.cfg.workers,
                                         pin_memory=pin, prefetch_factor=2 if self.cfg.workers else None,
                                         worker_init_fn=_ignore_sigterm if self.cfg.workers else None)
        for b, item in enumerate(dl):
            for sid, shard, key, reason in item["errors"]:
                self._report(int(sid), shard, key, reason)
            yield self._finish(item["images"], item["ids"].numpy(), item["valid"].numpy(), plan.start_batch + b)

    # -- dali

    def _pipeline(self):
        """The loader's pipeline, built once (again only after a decode failure dropped it)."""
        if self._pipe is None:
            gpu = self.backend == "dali"
            self._pipe = _dali_pipeline(self.cfg, self._source, gpu=gpu, device_id=self.local_rank if gpu else None,
                                        seed=_seed(self.cfg.seed, self.rank, bits=31))
            self.pipeline_builds += 1
        return self._pipe

    def _drop_pipeline(self) -> None:
        """Forget the pipeline (its destructor stops its threads), then the inputs it was fed."""
        self._pipe = None
        if self._source is not None:
            self._source.cancel()

    def _iter_dali(self, plan, loc) -> Iterator[Batch]:
        if self._source is None:
            threads = source_threads(self.cfg.workers)
            self._source = PlanSource(threads=threads, read_ahead=max(2, threads + 1), seed=self.cfg.seed,
                                      hflip=self.cfg.hflip, train=self.cfg.train)
        src = self._source
        src.start(loc, plan.valid, epoch=self.epoch, start_batch=plan.start_batch, known_bad=self._known_bad)
        pipe = self._pipeline()
        done = False
        last_failed = -1
        try:
            pipe.schedule_run()  # a fresh epoch: DALI calls the source for its first batches now
            while True:
                try:
                    outs = pipe.share_outputs()
                except StopIteration:
                    done = True
                    break
                except Exception as e:  # a DALI error: typically an image it cannot decode
                    row = (src.fed[0].position if src.fed else plan.start_batch) - plan.start_batch
                    pipe = None  # the last reference goes first: the pipeline stops before its inputs are freed
                    self._drop_pipeline()
                    if row == last_failed or not self._find_undecodable(loc, row, min(len(plan), row + 3)):
                        names = sorted({loc.where((row, j))[0] for j in range(plan.ids.shape[1])})
                        raise RuntimeError(f"DALI failed on batch {plan.start_batch + row} of epoch {self.epoch} "
                                           f"(shards {names}) and PIL finds no new undecodable image there: "
                                           f"{e}") from e
                    last_failed = row  # rebuild at this batch with the culprits marked bad
                    src.start(loc, plan.valid, epoch=self.epoch, start_batch=plan.start_batch, first_row=row,
                              known_bad=self._known_bad)
                    pipe = self._pipeline()
                    pipe.schedule_run()
                    continue
                fed = src.fed.popleft()
                images = _dali_to_torch(outs[0], self.device)
                got = np.asarray(outs[1].as_tensor()).reshape(-1)
                if not np.array_equal(got, fed.ids):
                    raise RuntimeError(f"DALI returned ids {got[:4].tolist()}... for batch {fed.position}, the source "
                                       f"fed {fed.ids[:4].tolist()}...: the feed is out of step")
                pipe.release_outputs()
                src.release(fed)
                pipe.schedule_run()  # feeds the batch PREFETCH_DEPTH ahead
                for sid, shard, key, reason in fed.bad:
                    self._report(sid, shard, key, reason)
                yield self._finish(images, fed.ids, fed.valid, fed.position)
        finally:
            if pipe is not None:
                if done:
                    pipe.reset()
                else:
                    self._drain(pipe)

    def _drain(self, pipe) -> None:
        """Finish an epoch left early (see ``drain_pipeline``); a failing in-flight batch leaves
        the pipeline unusable: it is dropped, and its fed inputs are freed at the next start()."""
        try:
            drain_pipeline(pipe, self._source)
        except Exception:
            self._pipe = None

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
                    continue  # the source already replaces it
                except Exception as e:
                    self._known_bad[sid] = f"decode failed ({type(e).__name__}: {e})"
                    found = True
        return found

    def close(self) -> None:
        """End the epoch in progress, drop the pipeline and the source's threads and files."""
        try:
            self._end_epoch()
        finally:
            self._pipe = None
            if self._source is not None:
                self._source.close()
                self._source = None
            self._main_reader.close()

"""The engine: model, optimizer, LR schedule and precision recipe wrapped by DeepSpeed, with the
DeepSpeed config built and adjusted in one place. ``build_engine`` is the trainer's one call;
``engine_config``/``finish_engine`` are apart so the train-step benchmark builds the same engine
around a bare model.

Precision (``model.precision``, for ``model.dtype`` bf16/fp16): ``autocast`` (default) runs
torch.autocast inside DeepSpeed's forward (its ``torch_autocast`` section) with fp32 master
weights in channels_last; ``deepspeed`` runs DeepSpeed's bf16/fp16 mode (half-precision weights,
NCHW because DeepSpeed broadcasts and flattens parameters as raw bytes).
"""

from __future__ import annotations

import math

import torch

from .deepspeed_config import deepspeed_config
from .dtypes import DTYPES
from .model import build_model



def build_engine(cfg, dist_info, data):
    """Model, optimizer and LR schedule wrapped by DeepSpeed, then the precision recipe's memory
    format and dtypes. Returns (engine, scheduler)."""
    import deepspeed

    # weights are built NCHW: DeepSpeed broadcasts parameters as raw bytes at initialisation, which
    # channels_last weights break (finish_engine converts them afterwards where the recipe allows)
    model = build_model(cfg.model.name, data.num_labels, pretrained=cfg.model.pretrained, channels_last=False,
                        head_dropout=cfg.model.head_dropout)
    if cfg.model.frozen_stages or data.features is not None:
        if not hasattr(model, "freeze"):
            raise ValueError(f"model.frozen_stages needs a model with units (efficientnet_lite0), "
                             f"not {cfg.model.name!r}")
        model.freeze(cfg.model.frozen_stages, from_features=data.features is not None)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])  # frozen units: none
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, data.steps_per_epoch))
    ds_config = engine_config(deepspeed_config(cfg, world_size=dist_info.world_size), cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    finish_engine(engine, cfg)
    return engine, scheduler


def engine_config(ds: dict, cfg) -> dict:
    """The generated DeepSpeed config, adjusted for a loop that never waits on the device:

    * DeepSpeed's throughput timer (on by default when DeepSpeed has no dataloader of its own)
      calls ``synchronize()`` twice per step; it is switched off unless the config sets ``timers``;
    * ``model.precision=autocast`` (bf16/fp16) replaces DeepSpeed's bf16/fp16 mode by its
      ``torch_autocast`` section: fp32 master weights, autocast in the engine's forward;
      ``deepspeed`` keeps DeepSpeed's own bf16/fp16 mode as generated.
    """
    ds = dict(ds)
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    if cfg.model.dtype != "fp32" and cfg.model.precision == "autocast":
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if cfg.model.dtype == "bf16" else "float16"}
    return ds


def finish_engine(engine, cfg) -> None:
    """After ``deepspeed.initialize``: the recipe's memory format and buffer dtypes, then compile.
    With fp32 master weights (autocast, or fp32) the weights go channels_last in place (same Parameter
    objects, so the optimizer follows). DeepSpeed's bf16/fp16 mode keeps NCHW weights (it
    flattens them) and needs the BatchNorm statistics cast like the parameters; channels_last
    inputs still make cuDNN pick its channels_last kernels there."""
    ds_half = DTYPES[cfg.model.dtype] != torch.float32 and cfg.model.precision == "deepspeed"
    if cfg.model.channels_last and not ds_half:
        engine.module.to(memory_format=torch.channels_last)
    if ds_half:
        for buf in engine.module.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(DTYPES[cfg.model.dtype])
    if cfg.model.compile:
        compile_model(engine, cfg.model.compile_mode)


def compile_model(engine, mode: str) -> None:
    """``torch.compile`` of the module in place (DeepSpeed's ``engine.compile``: nn.Module.compile,
    so state_dict keys, checkpoints and resume are those of the eager model), with inductor on
    GPUs and on CPU (its C++ backend). The first steps of each input shape and train/eval mode
    pay the compile time; ``reduce-overhead`` adds CUDA graphs (every step's inputs must then have
    the same shapes: the loaders pad batches to full size)."""
    kwargs = {} if mode == "default" else {"mode": mode}
    engine.compile(compile_kwargs=kwargs)
    if engine.global_rank == 0:
        print(f"[pml-scale] model compiled (torch.compile, mode {mode}); the first steps of each shape compile it",
              flush=True)


def lr_lambda(cfg, steps_per_epoch: int):
    """Warmup (linear) then cosine / one-cycle / constant: the paper's dynamic training scheme."""
    total = max(cfg.run.epochs * steps_per_epoch, 1)
    warm = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    floor = cfg.optim.min_lr_ratio
    kind = cfg.optim.schedule

    def f(step: int) -> float:
        if kind == "onecycle":
            peak = max(int(0.3 * total), 1)
            if step < peak:
                return floor + (1 - floor) * step / peak
            t = (step - peak) / max(total - peak, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        t = (step - warm) / max(total - warm, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def make_optimizer(cfg, params):
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                 betas=tuple(cfg.optim.betas))
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                               momentum=cfg.optim.momentum, nesterov=True)
    raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {cfg.optim.name!r}")


def prepare_images(images: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """The model's input dtype and memory format (under autocast the convolutions cast anyway)."""
    images = images.to(dtype)
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.dim() == 4 else images

"""The DeepSpeed JSON of a run, built from its config: JSON file < generated keys < ``deepspeed.extra``.

Why a module of its own: the schema (``config``) says what a run may set; this says what DeepSpeed
is told, and refuses the keys that would contradict the loader or the trainer's own optimizer.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .config import Config, ConfigError, deep_merge

_FORBIDDEN_DS = ("optimizer", "scheduler")


def deepspeed_config(cfg: Config, *, world_size: int) -> dict:
    """DeepSpeed JSON for this run: JSON file < generated keys < ``deepspeed.extra``.

    No "optimizer"/"scheduler": the trainer passes a torch optimizer and its own schedule,
    so DeepSpeed builds (and JIT-compiles) no optimizer op.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be a positive int, got {world_size!r}")
    ds = cfg.deepspeed
    base: dict = {}
    if ds.config:
        p = Path(ds.config)
        try:
            base = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"deepspeed.config: file not found: {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config: JSON error in {p} line {e.lineno}: {e.msg}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"deepspeed.config: {p} must hold a JSON object")
    mb = cfg.data.batch_size
    generated = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": mb * ds.grad_accum * world_size,
        "gradient_clipping": ds.grad_clip,
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "fp16": {"enabled": cfg.model.dtype == "fp16"},
        "zero_optimization": {"stage": ds.zero_stage},
    }
    out = deep_merge(deep_merge(copy.deepcopy(base), generated), ds.extra)
    for k in _FORBIDDEN_DS:
        if k in out:
            src = "deepspeed.extra" if k in ds.extra else f"deepspeed.config ({ds.config})"
            raise ConfigError(
                f"DeepSpeed key '{k}' in {src} is not supported: the trainer passes a torch "
                f"optimizer and schedule (set optim.* instead)"
            )
    for k, want, name in (
        ("train_micro_batch_size_per_gpu", mb, "data.batch_size"),
        ("gradient_accumulation_steps", ds.grad_accum, "deepspeed.grad_accum"),
        ("train_batch_size", mb * ds.grad_accum * world_size, "data.batch_size x grad_accum x world"),
    ):
        if out.get(k) != want:
            raise ConfigError(
                f"deepspeed.extra sets '{k}'={out.get(k)!r} but the loader uses {want} ({name}); "
                f"set {name} instead"
            )
    return out

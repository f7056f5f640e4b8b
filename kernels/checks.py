"""Host-side validation of the kernel's inputs and scalar arguments, and their conversion to what
the kernels take. Shapes, dtypes and devices only: tensor values are never read (no host sync).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from .pick_hash import launch_key, pick_threshold
from .switches import interpreter_active

P_RULES = ("text", "printed")
PSEUDO_WEIGHTS = ("alpha_beta", "balanced", "capped")  # the kernels' PSEUDO_MODE is the index
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PSEUDO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int64, torch.int32)
NEG_GAMMA_MAX = 8.0  # the range PaperOptions accepts


def check_finite(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a finite float, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite float, got {v!r}")
    return f


def _check_tensors(**named) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_inputs(logits: torch.Tensor, states: torch.Tensor, pseudo: torch.Tensor,
                 sample_ids: torch.Tensor) -> tuple[int, int]:
    """Validate shapes, dtypes and devices; returns (B, L). Values are not scanned (no sync)."""
    _check_tensors(logits=logits, states=states, pseudo=pseudo, sample_ids=sample_ids)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (B, L), got shape {tuple(logits.shape)}")
    B, L = logits.shape
    if B < 1 or L < 1:
        raise ValueError(f"logits must have B >= 1 rows and L >= 1 labels, got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits dtype must be one of float32, bfloat16, float16, got {logits.dtype}")
    check_labels("logits", logits, states, pseudo, sample_ids)
    return B, L


def check_label_inputs(states: torch.Tensor, pseudo: torch.Tensor, sample_ids: torch.Tensor) -> tuple[int, int]:
    """``check_inputs`` without logits (``picked_pseudo_sums``); returns (B, L)."""
    _check_tensors(states=states, pseudo=pseudo, sample_ids=sample_ids)
    if states.dim() != 2 or states.dtype != torch.int8:
        raise ValueError(f"states must be a 2-D int8 tensor (B, L), got shape {tuple(states.shape)} "
                         f"dtype {states.dtype}")
    B, L = states.shape
    if B < 1 or L < 1:
        raise ValueError(f"states must have B >= 1 rows and L >= 1 labels, got shape {tuple(states.shape)}")
    check_labels("states", states, states, pseudo, sample_ids)
    return B, L


def check_labels(ref_name: str, ref: torch.Tensor, states, pseudo, sample_ids) -> None:
    """The checks both entry points share: states, pseudo and ids match ``ref`` (B, L) in shape
    and device, with the kernel's dtypes, on a device the kernels can run on."""
    if states.shape != ref.shape:
        raise ValueError(f"states must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(states.shape)}")
    if states.dtype != torch.int8:
        raise TypeError(f"states must be int8 (1 positive, 0 negative, -1 missing), got {states.dtype}")
    if pseudo.shape != ref.shape:
        raise ValueError(f"pseudo must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(pseudo.shape)}")
    if pseudo.dtype not in PSEUDO_DTYPES:
        raise TypeError(f"pseudo dtype must be one of float32, bfloat16, float16, got {pseudo.dtype}")
    check_ids(sample_ids, ref.shape[0])
    dev = ref.device
    for name, t in (("states", states), ("pseudo", pseudo), ("sample_ids", sample_ids)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {dev}; move all inputs to one device")
    check_device(dev)


def check_ids(sample_ids: torch.Tensor, B: int) -> None:
    if sample_ids.shape != (B,):
        raise ValueError(f"sample_ids must have shape (B,) = ({B},), got {tuple(sample_ids.shape)}")
    if sample_ids.dtype not in ID_DTYPES:
        raise TypeError(f"sample_ids must be int64 or int32, got {sample_ids.dtype}")


def check_device(dev: torch.device) -> None:
    if dev.type == "cpu" and not interpreter_active():
        raise RuntimeError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is "
                           "imported, or pass CUDA tensors")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"tensors must be on a CUDA device (or CPU under TRITON_INTERPRET=1), got {dev}")


def check_neg(neg_gamma, neg_margin) -> tuple[float, float]:
    """(γ⁻, m⁻) as floats: host reals, γ⁻ in [0, NEG_GAMMA_MAX], m⁻ in [0, 1)."""
    out = []
    for name, v in (("neg_gamma", neg_gamma), ("neg_margin", neg_margin)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a host float, got {v!r} ({type(v).__name__})")
        out.append(check_finite(name, v))
    g, m = out
    if not 0.0 <= g <= NEG_GAMMA_MAX:
        raise ValueError(f"neg_gamma (focusing exponent of the negative-side terms) must be in "
                         f"[0, {NEG_GAMMA_MAX:g}], got {neg_gamma!r}")
    if not 0.0 <= m < 1.0:
        raise ValueError(f"neg_margin (probability margin of the negative-side terms) must be in [0, 1), "
                         f"got {neg_margin!r}")
    return g, m


def check_coef(coef, dev: torch.device) -> int:
    """coef must be a (2,) float32 tensor (α, β) on the logits' device; returns its stride."""
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"coef must be a torch.Tensor of shape (2,) holding (alpha, beta), got {type(coef).__name__}")
    if coef.shape != (2,) or coef.dtype != torch.float32:
        raise ValueError(f"coef must be a (2,) float32 tensor holding (alpha, beta), got shape {tuple(coef.shape)} "
                         f"dtype {coef.dtype}")
    if coef.device != dev:
        raise ValueError(f"coef is on {coef.device} but logits is on {dev}; it must be on the logits' device")
    return coef.stride(0)


def num_rows_inv(num_rows, B: int) -> float:
    """1 / the batch divisor (``num_rows``, default B)."""
    if num_rows is None:
        return 1.0 / B
    if isinstance(num_rows, bool) or not isinstance(num_rows, numbers.Real):
        raise TypeError(f"num_rows must be a host int or float > 0 (the batch divisor), got {num_rows!r}")
    n = check_finite("num_rows", num_rows)
    if n <= 0:
        raise ValueError(f"num_rows must be > 0 (the number of valid rows), got {num_rows!r}")
    return 1.0 / n


def _int32_bits(x: int) -> int:
    """uint32 -> the int32 with the same bits (Triton would pass ints >= 2**31 as int64)."""
    return x - (1 << 32) if x >= (1 << 31) else x


@functools.lru_cache(maxsize=256)
def key_bits(seed, epoch) -> int:
    """The launch's pick-hash key as the int32 the kernels take (cached: called every step)."""
    return _int32_bits(launch_key(seed, epoch))


@functools.lru_cache(maxsize=64)
def threshold(q) -> int:
    """The 24-bit pick threshold of ``q`` (cached)."""
    return pick_threshold(q)

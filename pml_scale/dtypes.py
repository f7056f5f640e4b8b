"""The one table of precision names. Configs spell a dtype bf16, fp16 or fp32; torch's own names
(bfloat16, float16, float32) are accepted as aliases where a caller already passes them."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DTYPE_NAMES = (*DTYPES, *ALIASES)


def torch_dtype(name: str) -> torch.dtype:
    """``"fp32"`` or ``"float32"`` -> torch.float32 (KeyError for any other name)."""
    return DTYPES[ALIASES.get(name, name)]

"""The environment switches of the kernel host code, each read where it takes effect.

- ``PML_KERNEL_CONFIG``: force one launch config (a ``LaunchConfig.label()``, e.g.
  ``split:bb1:w4096:nw8:ns1``), no tuning. Default unset: tuned on the GPU, heuristic elsewhere.
  Read when a plan is built.
- ``PML_KERNEL_TUNE``: ``0`` skips the GPU tuner and keeps the heuristic config. Default ``1``.
  Read when a plan is built.
- ``PML_KERNEL_TUNE_VERBOSE``: print the error of each tuning candidate that fails to compile or
  run. Default unset. Read when a candidate fails.
- ``PML_KERNEL_FAST_LAUNCH``: ``1`` calls Triton's compiled launcher directly after the first
  launch (opt-in until checked on a GPU). Default ``0``. Read at import and by ``clear_caches()``.
- ``TRITON_INTERPRET`` (Triton's own): run kernels on CPU tensors; must be set before triton is
  imported. Read per CPU call (the custom op's dispatch) and when a plan is built.

Plans are cached per call signature, so a switch read "when a plan is built" takes effect for
new shapes or after ``pml_scale.kernels.partial_label.clear_caches()``.
"""

from __future__ import annotations

import os

_OFF = ("0", "false", "no", "off")


def interpreter_active() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


def forced_config_label() -> str | None:
    """PML_KERNEL_CONFIG: a config label that overrides the heuristic and the tuner."""
    return os.environ.get("PML_KERNEL_CONFIG", "").strip() or None


def tuning_enabled() -> bool:
    """PML_KERNEL_TUNE (default on): time the candidate configs at a shape's first GPU launch."""
    return os.environ.get("PML_KERNEL_TUNE", "1").strip().lower() not in _OFF


def tune_verbose() -> bool:
    """PML_KERNEL_TUNE_VERBOSE: report candidate configs that fail while tuning."""
    return bool(os.environ.get("PML_KERNEL_TUNE_VERBOSE"))


def fast_launch_requested() -> bool:
    """PML_KERNEL_FAST_LAUNCH (default off): direct launches are opt-in until checked on a GPU:
    before the HookChain fix they never engaged, so the GPU tests that compare them with
    Triton's launcher compared the slow path with itself (H100 run of 2026-11-27; see
    benchmarks/RESULTS.md)."""
    return os.environ.get("PML_KERNEL_FAST_LAUNCH", "0").strip().lower() in ("1", "true", "yes", "on")

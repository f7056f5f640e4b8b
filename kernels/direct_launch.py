"""Launching a Triton kernel, directly through its cached CompiledKernel where that is safe.

After the first launch of a specialisation, ``run_kernel`` calls the compiled launcher itself, as
``JITFunction.run`` does after binding, skipping Triton's per-call argument binding and cache-key
formatting (tens of µs on a host for ~40 arguments). Opt-in: PML_KERNEL_FAST_LAUNCH=1 (see
``switches``), read into ``CACHES.fast_launch``.
"""

from __future__ import annotations

import torch

from .caches import CACHES

try:  # the launch hooks (profilers) that the direct launch must respect
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - triton < 3.4: no direct launches
    _knobs = None


def direct_launch_ok(*tensors) -> bool:
    """Direct launches requested, supported by this triton, and every pointer 16-byte aligned."""
    return CACHES.fast_launch and _knobs is not None and aligned(*tensors)


def _hook_idle(hook) -> bool:
    """No launch hook to call: None (triton < 3.5) or an empty ``HookChain`` (triton 3.5+,
    where the knob is never None; testing ``is None`` there kept every launch on the slow path)."""
    return hook is None or (type(hook).__name__ == "HookChain" and not getattr(hook, "calls", True))


def _launch_hooks_idle() -> bool:
    rt = _knobs.runtime
    return _hook_idle(rt.launch_enter_hook) and _hook_idle(rt.launch_exit_hook)


def aligned(*tensors) -> bool:
    """All data pointers 16-byte aligned: the specialisation the cached kernels were built for."""
    acc = 0
    for t in tensors:
        acc |= t.data_ptr()
    return acc & 15 == 0


def int_spec(v: int) -> tuple:
    """How Triton specialises an int argument: 1 is a constant, else its width and % 16."""
    return (v == 1, v % 16 == 0, -(1 << 31) <= v < (1 << 31))


def run_kernel(fn, grid, args, num_warps, num_stages, key) -> None:
    """``fn[grid](*args)``; with a ``key`` (CUDA, all pointers aligned) the second and later
    launches call the cached CompiledKernel's launcher directly. ``key`` must determine every
    specialisation Triton would compute: kernel, constexprs, options, argument types and the
    int specialisations; the callers build it from the plan (shapes, strides, dtypes, flags),
    the config, and the per-call alignment / int specs."""
    if key is not None:
        ck = CACHES.compiled.get(key)
        if ck is not None and _launch_hooks_idle():
            ck.run(grid[0], grid[1] if len(grid) > 1 else 1, 1,
                   torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice()),
                   ck.function, ck.packed_metadata, None, None, None, *args)
            CACHES.direct_launches += 1
            return
    ck = fn[grid](*args, num_warps=num_warps, num_stages=num_stages)
    if key is not None and ck is not None and hasattr(ck, "packed_metadata"):
        CACHES.compiled[key] = ck

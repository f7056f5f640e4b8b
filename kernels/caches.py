"""Every cache the kernel host code keeps, in one object (``CACHES``) that ``clear_caches()``
resets, together with the switch read at reset time (PML_KERNEL_FAST_LAUNCH)."""

from __future__ import annotations

import torch

from .switches import fast_launch_requested


class KernelCaches:
    """workspaces: (device index, stream) or ("cpu",) -> (int32 ticket counters, fp32 partials);
    sm_count: device index -> SMs; plans: call signature -> LaunchPlan (``launch.get_plan``);
    tuned: tune key -> (LaunchConfig, {label: ms}); compiled: direct-launch key ->
    CompiledKernel; direct_launches: how many launches took the direct path (tests check it
    engages); fast_launch: PML_KERNEL_FAST_LAUNCH as read at the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.workspaces: dict = {}
        self.sm_count: dict = {}
        self.plans: dict = {}
        self.tuned: dict = {}
        self.compiled: dict = {}
        self.direct_launches = 0
        self.fast_launch = fast_launch_requested()


CACHES = KernelCaches()


def workspace(dev: torch.device, n_cnt: int, n_part: int):
    """(counters int32, partials fp32) for the current stream of ``dev``.

    Counters start at zero and every kernel that takes a ticket resets its counter, so the
    buffers are reused without a memset (one per stream: launches on one stream are ordered).
    They grow to the largest request and are then reused: no per-step allocation at a fixed shape.
    """
    if dev.type == "cuda":
        key = (dev.index, torch._C._cuda_getCurrentRawStream(dev.index))
    else:
        key = ("cpu",)
    ws = CACHES.workspaces.get(key)
    if ws is None or ws[0].numel() < n_cnt or ws[1].numel() < n_part:
        old_c, old_p = (ws[0].numel(), ws[1].numel()) if ws is not None else (0, 0)
        cnt = torch.zeros(max(n_cnt, old_c, 64), dtype=torch.int32, device=dev)
        part = torch.empty(max(n_part, old_p, 1024), dtype=torch.float32, device=dev)
        ws = CACHES.workspaces[key] = (cnt, part)
    return ws


def sm_count(dev: torch.device) -> int:
    n = CACHES.sm_count.get(dev.index)
    if n is None:
        n = CACHES.sm_count[dev.index] = torch.cuda.get_device_properties(dev).multi_processor_count
    return n

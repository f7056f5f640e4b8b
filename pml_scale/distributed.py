"""Process-group setup and the few collectives the trainer needs.

One face for the three ways a run starts: the `deepspeed` launcher (one or many nodes), `torchrun`,
or a plain `python launch/train.py` (a world of one). All of them leave RANK / WORLD_SIZE / LOCAL_RANK
in the environment (or nothing, for a plain run); we create the torch process group ourselves (NCCL on
GPUs, gloo on CPU) and DeepSpeed adopts it.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group once (idempotent) and pick this rank's device.
    ``timeout_s`` bounds every collective (torch's default: 30 min): a rank whose peer vanished
    without closing its connections (a lost node) fails after it instead of hanging."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if world == 1:
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def disable_deepspeed_cpu_shm_op() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op (~30-45 s, needs a compiler) the first
    time it wraps a CPU process group. gloo is enough for our CPU runs and tests, so skip it."""
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped (B, ...) tensors from every rank along dim 0, rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm running statistics). DeepSpeed syncs them only
    at start, so each rank's drift apart with its own data; evaluating with rank 0's everywhere
    scores the test set with the statistics best.pt keeps, and makes a resumed run (whose
    checkpoint holds rank 0's) evaluate exactly as an uninterrupted one."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

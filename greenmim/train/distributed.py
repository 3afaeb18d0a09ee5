"""Process-group setup from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...).

NCCL on CUDA, gloo on the CPU. Without ``WORLD_SIZE > 1`` in the environment everything runs in one process. Under
NCCL a gloo group over the same ranks carries the host-side agreements (whether a micro-batch is empty on some rank),
so they need no device sync.
"""
import io
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ['DistributedProcess', 'init_distributed', 'all_reduce_sum', 'all_gather_objects']


@dataclass(frozen=True)
class DistributedProcess:
    """This process's place in the run: its rank among ``world_size`` processes and its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Optional[Any] = None  # gloo group for host tensors under NCCL (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = 'auto') -> DistributedProcess:
    """Join the process group described by the environment (if any) and pick this rank's device."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
        torch.cuda.set_device(local_rank)
        device = f'cuda:{local_rank}'
    control = None
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group('nccl' if str(device).startswith('cuda') else 'gloo')
        if dist.get_backend() != 'gloo':
            control = dist.new_group(backend='gloo')
    return DistributedProcess(rank, world_size, local_rank, torch.device(device), control)


def all_reduce_sum(values: torch.Tensor, process: DistributedProcess, control: bool = False) -> torch.Tensor:
    """Sum of ``values`` over ranks (``values`` itself in one process); ``control``: host tensors over the
    host-side group (no device sync)."""
    if process.distributed:
        values = values.clone()
        dist.all_reduce(values, group=process.control_group if control else None)
    return values


def all_gather_objects(obj, process: DistributedProcess) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` for objects ``torch.load(weights_only=True)`` accepts (tensors
    travel as ``torch.save`` bytes: ``all_gather_object`` cannot unpickle CPU tensors on every torch version)."""
    if not process.distributed:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out = [None] * process.world_size
    dist.all_gather_object(out, buffer.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]

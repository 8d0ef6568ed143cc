"""Single process or DDP under ``torchrun``: which device, which rank, and collectives."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

from train.config import UsageError

__all__ = ["Dist", "resolve_device", "setup"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (rank 0 of 1 without ``torchrun``)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch_dist.all_reduce(value)
        return bool(value.item() > 0)

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA if present, else CPU; a CUDA request without a GPU is a usage error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(
            f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name} was asked for but no CUDA GPU is available to torch "
                f"{torch.__version__}: use --device cpu (or auto), or check the GPU driver"
            )
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: GPU {index} does not exist ({torch.cuda.device_count()} found)"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UsageError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def setup(device_name: str) -> Dist:
    """Read ``torchrun``'s environment, pick the device, start the process group if needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = resolve_device(device_name, local_rank)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=dt.timedelta(minutes=60),  # rank 0 may build the image cache meanwhile
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return Dist(rank, local_rank, world_size, local_world, device)

"""Helpers for torch.distributed that also work in a single process."""
from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist

__all__ = [
    "get_world_size", "get_rank", "get_local_rank", "is_main_process", "synchronize",
    "all_gather", "gather", "broadcast_object", "reduce_dict",
]

_LOCAL_RANK = 0


def _ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if _ready() else 1


def get_rank() -> int:
    return dist.get_rank() if _ready() else 0


def get_local_rank() -> int:
    return _LOCAL_RANK


def set_local_rank(rank: int) -> None:
    global _LOCAL_RANK
    _LOCAL_RANK = rank


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather(data: Any) -> List[Any]:
    """A list with every rank's picklable `data`, in rank order."""
    if get_world_size() == 1:
        return [data]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, data)
    return out


def gather(data: Any, dst: int = 0) -> List[Any]:
    """On `dst`, every rank's `data` in rank order; an empty list elsewhere."""
    if get_world_size() == 1:
        return [data]
    out: List[Any] = [None] * get_world_size() if get_rank() == dst else None  # type: ignore[assignment]
    dist.gather_object(data, out, dst=dst)
    return out if get_rank() == dst else []


def broadcast_object(data: Any, src: int = 0) -> Any:
    """`data` of rank `src` on every rank."""
    if get_world_size() == 1:
        return data
    box = [data]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_dict(values: dict, average: bool = True) -> dict:
    """Scalar tensors summed (or averaged) over ranks, same keys in the same order."""
    world = get_world_size()
    if world == 1:
        return values
    with torch.no_grad():
        names = sorted(values)
        stacked = torch.stack([values[k].detach().float() for k in names])
        dist.all_reduce(stacked)
        if average:
            stacked /= world
        return dict(zip(names, stacked))

"""Helpers for torch.distributed that also work in a single process."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "get_world_size", "get_rank", "get_local_rank", "is_main_process", "synchronize",
    "all_gather", "gather", "broadcast_object", "reduce_dict", "all_reduce_sum",
    "snapshot_training_statistics", "all_reduce_training_statistics",
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


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors over processes in place (no-op in a single process)."""
    if get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


# -- buffers a module updates while training ------------------------------------------------------
# A module lists them in a class attribute `training_statistics = {buffer name: rule}`; the trainer
# snapshots them before each iteration and, after it, combines every process's update since the
# snapshot (DDP alone would keep rank 0's and drop the others'), so 2 processes x b images update
# them as 1 process x 2b does. Rules, with d_r = value on rank r - snapshot:
#   "sum"               snapshot + sum_r d_r                           (counters, sums)
#   "mean"              snapshot + mean_r d_r                          (equal-weight statistics)
#   "weighted:<other>"  snapshot + sum_r w_r d_r / sum_r w_r, w_r = rank r's increment of buffer
#                       <other> (broadcast over trailing dims; rows no rank touched stay). Exact for
#                       an EMA of batch means, snapshot + a (mean_r - snapshot), a equal on every rank.
# Buffers a module updates identically on every process (e.g. an iteration counter) need no rule.

def _marked_buffers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module, str, str]]:
    out = []
    for prefix, m in model.named_modules():
        for name, rule in (getattr(type(m), "training_statistics", None) or {}).items():
            if rule not in ("sum", "mean") and not rule.startswith("weighted:"):
                raise ValueError(f"{type(m).__name__}.training_statistics['{name}']: unknown rule '{rule}' "
                                 f"(sum | mean | weighted:<buffer>)")
            out.append((f"{prefix}.{name}" if prefix else name, m, name, rule))
    return out


def snapshot_training_statistics(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the buffers `model`'s modules mark as `training_statistics` ({} in one process)."""
    if get_world_size() == 1:
        return {}
    return {full: getattr(m, name).detach().clone() for full, m, name, _ in _marked_buffers(model)}


@torch.no_grad()
def all_reduce_training_statistics(model: torch.nn.Module, before: Dict[str, torch.Tensor]) -> None:
    """Replace each marked buffer by the combination of every process's update since `before`
    (see the rules above); every process ends with the same values. No-op in one process."""
    if get_world_size() == 1 or not before:
        return
    marked = _marked_buffers(model)
    deltas = {}
    for full, m, name, _ in marked:
        now = getattr(m, name)
        if now.shape != before[full].shape:
            raise RuntimeError(f"training statistic {full} changed shape during an iteration "
                               f"({tuple(before[full].shape)} -> {tuple(now.shape)}); grow it in on_task_start")
        deltas[full] = now.detach().double() - before[full].double()
    for full, m, name, rule in marked:
        buf, d = getattr(m, name), deltas[full].clone()  # deltas stay local: they weight other buffers
        if rule == "sum" or rule == "mean":
            dist.all_reduce(d)
            if rule == "mean":
                d /= get_world_size()
        else:
            other = rule.split(":", 1)[1]
            key = f"{full.rsplit('.', 1)[0]}.{other}" if "." in full else other
            if key not in deltas:
                raise ValueError(f"{type(m).__name__}.training_statistics['{name}']: weight buffer '{other}' "
                                 f"is not a training statistic of the same module")
            w = deltas[key].reshape(deltas[key].shape + (1,) * (d.dim() - deltas[key].dim()))
            num, den = d * w, w.expand_as(d).clone()
            dist.all_reduce(num)
            dist.all_reduce(den)
            d = torch.where(den != 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
        buf.copy_((before[full].double() + d).to(buf.dtype))

"""Batched NMS that stops once it has kept the boxes a caller uses."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

__all__ = ["batched_nms_topk"]

# torchvision's CPU batched_nms offsets boxes per category ("coordinate trick") up to this many
# box coordinates and runs one NMS per category above it.
_COORDINATE_TRICK_MAX_NUMEL = 4000


def _kernel_dtype(t: Tensor) -> Tensor:
    """The tensor torchvision's NMS kernel sees: half precision is cast to float32, as its autocast
    wrapper does (the kernel itself takes float32 and float64 only)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def batched_nms_topk(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, k: int) -> Tensor:
    """`torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)[:k]`: the same indices in
    the same order (decreasing score).

    Greedy NMS decides a box from the boxes scored above it only, so the first k kept boxes are
    found among the highest-scoring boxes alone; the suppression loop runs over the top 2k boxes
    (in torchvision's own score order, ties included), then 4k, ..., until k are kept. On CPU,
    where torchvision's loop compares each kept box with every later box, this cuts an RPN's NMS
    from all its pre-NMS candidates to about the number of proposals it keeps."""
    n = boxes.shape[0]
    k = max(min(int(k), n), 0)
    if k == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.device.type != "cpu" or boxes.numel() > _COORDINATE_TRICK_MAX_NUMEL or 2 * k >= n:
        return batched_nms(boxes, scores, idxs, iou_threshold)[:k]
    # torchvision's coordinate trick, computed on all boxes as it does (same offsets, same bits)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    dets = _kernel_dtype(boxes + offsets[:, None])
    order = torch.sort(_kernel_dtype(scores), dim=0, descending=True, stable=True)[1]  # as the kernel sorts
    m = 2 * k
    while True:
        top = order[:m]
        # strictly decreasing stand-in scores make the kernel visit `top` in the given order
        rank = torch.arange(m, 0, -1, dtype=dets.dtype, device=dets.device)
        kept = nms(dets[top], rank, iou_threshold)
        if kept.numel() >= k or m == n:
            return top[kept[:k]]
        m = min(2 * m, n)

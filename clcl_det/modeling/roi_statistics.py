"""Statistics heads collect between tasks: the RoI embeddings of a task's ground-truth boxes, summed
over processes. Shared by the heads with an `on_task_data` hook (GaussianReplay,
SemanticPrototypeHead)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..utils import comm

__all__ = ["ground_truth_embeddings", "all_reduce_sum"]


@torch.no_grad()
def ground_truth_embeddings(model: nn.Module, loader: Iterable[List[Dict[str, Any]]]) -> Iterator[Tuple[Tensor, Tensor]]:
    """Per batch of mapped dicts, the RoI embeddings of the ground-truth boxes (N x D, from the
    model's RoI head in eval mode) and their classes (N). Images without boxes are skipped."""
    was_training = model.training
    model.eval()
    try:
        heads = model.roi_heads
        for batch in loader:
            batch = [x for x in batch if not x.get("unreadable") and len(x.get("boxes", ()))]
            if not batch:
                continue
            images = model.preprocess(batch)
            bb = model.backbone(images.tensors)
            ctx = model.make_context(bb["clip_dense"], images.image_sizes)
            boxes = [x["boxes"].to(model.device).float() for x in batch]
            out = heads.predict(heads.pool(bb["features"], boxes, images.image_sizes), boxes, ctx)
            yield out["embeddings"], torch.cat([x["classes"] for x in batch]).to(model.device)
    finally:
        model.train(was_training)


def all_reduce_sum(*tensors: Tensor) -> None:
    """Sum tensors over processes in place (no-op in a single process)."""
    if comm.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)

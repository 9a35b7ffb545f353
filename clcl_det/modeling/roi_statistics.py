"""Statistics heads collect between tasks: features of a task's ground-truth boxes, summed over
processes. Shared by the heads with an `on_task_data` hook (GaussianReplay,
SemanticPrototypeHead) and by the heads that read frozen CLIP region features (SPAHead)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..utils import comm

__all__ = ["FEATURE_SPACES", "clip_region_features", "ground_truth_features", "ground_truth_embeddings",
           "all_reduce_sum"]

FEATURE_SPACES = ("box", "clip", "embed")


def clip_region_features(dense: Tensor, rois: Sequence[Tensor], stride: int) -> Tensor:
    """Frozen CLIP region features: the dense CLIP map averaged inside each box (RoIAlign 1x1),
    L2-normalised (R x D). They depend on the image alone, never on trained parameters."""
    pooled = roi_align(dense, list(rois), output_size=1, spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
    return F.normalize(pooled.flatten(1), dim=-1)


@torch.no_grad()
def ground_truth_features(model: nn.Module, loader: Iterable[List[Dict[str, Any]]],
                          space: str = "embed") -> Iterator[Tuple[Tensor, Tensor]]:
    """Per batch of mapped dicts, features of the ground-truth boxes (N x F, model in eval mode)
    and their classes (N). `space`: "box" = the box-head output that enters the RoI head's
    `embed` layer, "clip" = frozen CLIP region features (`clip_region_features`), "embed" = the
    RoI embeddings. Images without boxes are skipped."""
    if space not in FEATURE_SPACES:
        raise ValueError(f"feature space '{space}' is not one of {' | '.join(FEATURE_SPACES)}")
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
            if space == "clip":
                feats = clip_region_features(ctx.clip_dense, boxes, ctx.clip_stride)
            else:
                feats = heads.box_head(heads.pool(bb["features"], boxes, images.image_sizes))
                if space == "embed":
                    feats = heads.embed(feats)
            yield feats, torch.cat([x["classes"] for x in batch]).to(model.device)
    finally:
        model.train(was_training)


def ground_truth_embeddings(model: nn.Module, loader: Iterable[List[Dict[str, Any]]]) -> Iterator[Tuple[Tensor, Tensor]]:
    """`ground_truth_features` in the RoI-embedding space."""
    return ground_truth_features(model, loader, "embed")


def all_reduce_sum(*tensors: Tensor) -> None:
    """Sum tensors over processes in place (no-op in a single process)."""
    if comm.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)

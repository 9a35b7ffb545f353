"""CL-CLIP's spatial prior per RoI: the cost-volume prior of each class RoIAligned like the RoI
features (or the uniform prior of the "no cost volume" ablation), and the gatings that turn a RoI
feature and a class's prior into that class's pathway."""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import roi_align

from ..context import HeadContext
from ..cost_volume import category_prior

__all__ = ["GATINGS", "Gating", "CostVolumePrior", "UniformPrior"]


def _residual(f: Tensor, m: Tensor, gamma: float) -> Tensor:
    return f * (1 + gamma * m[:, :, None])


def _multiply(f: Tensor, m: Tensor, gamma: float) -> Tensor:
    return f * m[:, :, None]


def _concat(f: Tensor, m: Tensor, gamma: float) -> Tensor:
    return torch.cat([f.expand(-1, m.shape[1], -1, -1, -1), m[:, :, None]], dim=2)


class Gating(NamedTuple):
    """A gating: the class pathways of RoI features f (R x 1 x C x P x P) under the prior m
    (R x S x P x P), given gamma, R x S x (C + extra_channels) x P x P."""
    pathways: Callable[[Tensor, Tensor, float], Tensor]
    extra_channels: int


GATINGS: Dict[str, Gating] = {  # MULTI_EXPERT.GATING
    "residual": Gating(_residual, 0),  # f * (1 + gamma m)
    "multiply": Gating(_multiply, 0),  # f * m
    "concat": Gating(_concat, 1),  # [f, m]
}


def _ranges(task_sizes: Sequence[int], num: int) -> List[Tuple[int, int]]:
    """[start, stop) of each task's classes among the first `num`."""
    out, start = [], 0
    for n in task_sizes:
        if start >= num:
            break
        out.append((start, min(start + n, num)))
        start += n
    return out


class CostVolumePrior:
    """Each class's cost-volume prior, computed task by task (`category_prior` over the task's
    classes and the background) and RoIAligned at the RoI features' resolution."""

    def __init__(self, temperature: float, norm: str, resolution: int):
        self.temperature, self.norm, self.resolution = temperature, norm, resolution

    def maps(self, ctx: HeadContext, task_sizes: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """The prior of every class of the tasks of `task_sizes` classes that is in the vocabulary
        (the first ctx.num_classes), B x K x h x w, and each of these tasks' background column,
        B x T x h x w: a class's map depends on its own task's vocabulary
        and the background only (per class for NORM sigmoid, over its task's classes for softmax), so
        classes added later cannot change it, not even in the last bit."""
        parts, bg = [], []
        for start, stop in _ranges(task_sizes, ctx.num_classes):
            p = category_prior(ctx.clip_dense, ctx.class_embeddings[start:stop], ctx.background_embedding,
                               self.temperature, self.norm)
            parts.append(p[:, :-1])
            bg.append(p[:, -1:])
        return torch.cat(parts, dim=1), torch.cat(bg, dim=1)

    def pooled(self, rois: List[Tensor], ctx: HeadContext, task_sizes: Sequence[int], num: int,
               background: bool = False) -> Tensor:
        """The prior of the first `num` classes (`background`: the first `num` tasks' background
        columns) RoIAligned like the features: R x num x P x P. The maps are computed once per batch
        (cached in ctx.extras)."""
        if "prior" not in ctx.extras:
            ctx.extras["prior"], ctx.extras["bg_prior"] = self.maps(ctx, task_sizes)
        prior = ctx.extras["bg_prior" if background else "prior"][:, :num]
        return roi_align(prior, list(rois), self.resolution, spatial_scale=1.0 / ctx.clip_stride, sampling_ratio=2,
                         aligned=True)


class UniformPrior:
    """The "no cost volume" ablation: 1 / (n + 1) at every cell for each class of an n-class task
    and for its background."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def pooled(self, rois: List[Tensor], ctx: HeadContext, task_sizes: Sequence[int], num: int,
               background: bool = False) -> Tensor:
        """R x num x P x P, like `CostVolumePrior.pooled`."""
        R, P = sum(len(r) for r in rois), self.resolution
        level = torch.cat([ctx.clip_dense.new_full((1 if background else n,), 1.0 / (n + 1))
                           for n in task_sizes])[:num]
        return level[None, :, None, None].expand(R, num, P, P)

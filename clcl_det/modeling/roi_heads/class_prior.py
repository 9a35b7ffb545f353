"""CL-CLIP's spatial prior per RoI: the cost-volume prior of each class RoIAligned like the RoI
features (or the uniform prior of the "no cost volume" ablation), and the gatings that turn a RoI
feature and a class's prior into that class's pathway."""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import roi_align

from ..context import HeadContext
from ..cost_volume import cost_volume, inset_boxes, normalize_prior

__all__ = ["GATINGS", "Gating", "CostVolumePrior", "UniformPrior", "PRIOR_VOCABULARIES"]


_TINY = 1e-12  # the smallest map maximum a normalised gating divides by (an all-zero map stays zero)


def _residual(f: Tensor, m: Tensor, gamma: float) -> Tensor:
    return f * (1 + gamma * m[:, :, None])


def _multiply(f: Tensor, m: Tensor, gamma: float) -> Tensor:
    return f * m[:, :, None]


def _normalized(f: Tensor, m: Tensor, gamma: float) -> Tensor:
    return f * (m / m.amax(dim=(2, 3), keepdim=True).clamp(min=_TINY))[:, :, None]


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
    "normalized": Gating(_normalized, 0),  # f * m / max_RoI(m): where m lies in the RoI, whatever its level
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


PRIOR_VOCABULARIES = ("task", "seen")


class CostVolumePrior:
    """Each class's cost-volume prior, computed task by task and read per RoI in two ways:

    - the map (`pooled`): the prior of every cell (`normalize_prior` of the cell's cosines),
      RoIAligned at the RoI features' resolution; it says where class k lies inside the RoI;
    - the level (`level`): `normalize_prior` of the RoI's mean cosines (the cost volume RoIAligned
      over the RoI moved in by `level_inset` cells on each side, averaged); it says how much the
      RoI as a whole looks like class k.

    A task's prior is normalised over its own classes and the background (`vocabulary` "task") or
    over every class seen up to and including its task and the background ("seen": in a one-class
    task class k is then told apart from the earlier classes' objects too); never over later
    classes, so what an old expert sees does not change when classes are added, not by a bit.
    `temperature` 0 is the CLIP's own: 1 / its logit scale (ctx.clip_logit_scale)."""

    def __init__(self, temperature: float, norm: str, vocabulary: str, level_inset: float, resolution: int):
        if vocabulary not in PRIOR_VOCABULARIES:
            raise ValueError(f"MODEL.CLCLIP.COST_VOLUME.VOCABULARY '{vocabulary}' is not one of {PRIOR_VOCABULARIES}")
        if temperature < 0:
            raise ValueError(f"MODEL.CLCLIP.COST_VOLUME.TEMPERATURE ({temperature}) must be >= 0 (0 = the CLIP's own)")
        self.temperature, self.norm, self.vocabulary, self.resolution = temperature, norm, vocabulary, resolution
        self.level_inset = level_inset

    def _temperature(self, ctx: HeadContext) -> float:
        return self.temperature if self.temperature > 0 else 1.0 / ctx.clip_logit_scale

    def _costs(self, ctx: HeadContext, task_sizes: Sequence[int]) -> List[Tuple[Tensor, int]]:
        """Per task (among the first ctx.num_classes classes): the cosines of its normalising
        vocabulary and the background, B x (n' + 1) x h x w, and where its own classes start in it."""
        out = []
        for start, stop in _ranges(task_sizes, ctx.num_classes):
            lo = start if self.vocabulary == "task" else 0
            text = torch.cat([ctx.class_embeddings[lo:stop], ctx.background_embedding[None]], dim=0)
            out.append((cost_volume(ctx.clip_dense, text), start - lo))
        return out

    def maps(self, ctx: HeadContext, task_sizes: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """The prior of every class of the tasks of `task_sizes` classes that is in the vocabulary
        (the first ctx.num_classes), B x K x h x w, and each of these tasks' background column,
        B x T x h x w."""
        return self._normalized(self._costs(ctx, task_sizes), self._temperature(ctx))

    def _normalized(self, costs: List[Tuple[Tensor, int]], T: float) -> Tuple[Tensor, Tensor]:
        """The classes' and the backgrounds' columns of each task's normalised cosines."""
        parts = [(normalize_prior(c, T, self.norm), own) for c, own in costs]
        return torch.cat([p[:, own:-1] for p, own in parts], dim=1), torch.cat([p[:, -1:] for p, _ in parts], dim=1)

    def _cached(self, ctx: HeadContext, task_sizes: Sequence[int]) -> None:
        """The maps and the per-task cosines, once per batch (in ctx.extras)."""
        if "prior" not in ctx.extras:
            costs = self._costs(ctx, task_sizes)
            ctx.extras["prior"], ctx.extras["bg_prior"] = self._normalized(costs, self._temperature(ctx))
            ctx.extras["prior_costs"] = costs

    def pooled(self, rois: List[Tensor], ctx: HeadContext, task_sizes: Sequence[int], num: int,
               background: bool = False) -> Tensor:
        """The map of the first `num` classes (`background`: the first `num` tasks' background
        columns) RoIAligned like the features: R x num x P x P."""
        self._cached(ctx, task_sizes)
        prior = ctx.extras["bg_prior" if background else "prior"][:, :num]
        return self._roi_align(prior, rois, ctx)

    def levels(self, rois: List[Tensor], ctx: HeadContext, task_sizes: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """The level of every class of the tasks in the vocabulary, R x K, and of each task's
        background, R x T."""
        self._cached(ctx, task_sizes)
        inner = [inset_boxes(r, self.level_inset, ctx.clip_stride) for r in rois]
        pooled = [(self._roi_align(cost, inner, ctx).mean(dim=(2, 3)), own) for cost, own in ctx.extras["prior_costs"]]
        return self._normalized(pooled, self._temperature(ctx))

    def level(self, rois: List[Tensor], ctx: HeadContext, task_sizes: Sequence[int], num: int,
              background: bool = False) -> Tensor:
        """The level of the first `num` classes (`background`: the first `num` tasks' background
        columns): R x num."""
        return self.levels(rois, ctx, task_sizes)[1 if background else 0][:, :num]

    def _roi_align(self, maps: Tensor, rois: List[Tensor], ctx: HeadContext) -> Tensor:
        return roi_align(maps, list(rois), self.resolution, spatial_scale=1.0 / ctx.clip_stride, sampling_ratio=2,
                         aligned=True)


class UniformPrior:
    """The "no cost volume" ablation: 1 / (n + 1) at every cell for each class of an n-class task
    and for its background."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def _levels(self, ctx: HeadContext, task_sizes: Sequence[int], num: int, background: bool) -> Tensor:
        return torch.cat([ctx.clip_dense.new_full((1 if background else n,), 1.0 / (n + 1))
                          for n in task_sizes])[:num]

    def pooled(self, rois: List[Tensor], ctx: HeadContext, task_sizes: Sequence[int], num: int,
               background: bool = False) -> Tensor:
        """R x num x P x P, like `CostVolumePrior.pooled`."""
        R, P = sum(len(r) for r in rois), self.resolution
        return self._levels(ctx, task_sizes, num, background)[None, :, None, None].expand(R, num, P, P)

    def levels(self, rois: List[Tensor], ctx: HeadContext, task_sizes: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """R x K and R x T, like `CostVolumePrior.levels`."""
        R, K = sum(len(r) for r in rois), sum(task_sizes)
        return (self._levels(ctx, task_sizes, K, False)[None].expand(R, K),
                self._levels(ctx, task_sizes, len(task_sizes), True)[None].expand(R, len(task_sizes)))

    def level(self, rois: List[Tensor], ctx: HeadContext, task_sizes: Sequence[int], num: int,
              background: bool = False) -> Tensor:
        """R x num, like `CostVolumePrior.level`."""
        return self._levels(ctx, task_sizes, num, background)[None].expand(sum(len(r) for r in rois), num)

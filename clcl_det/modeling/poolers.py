"""Multi-scale RoIAlign whose CPU gradient is one sparse matrix product per level."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchvision.ops import MultiScaleRoIAlign as _TVMultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format

__all__ = ["MultiScaleRoIAlign", "roi_align_grad", "roi_align_matrix"]


def _axis_taps(start: Tensor, bin_size: Tensor, bins: int, samples: int, size: int) -> Tuple[Tensor, Tensor]:
    """The bilinear taps along one axis of every bin's sample points, as RoIAlign reads them:
    indices and weights R x bins x 2*samples (a sample outside [-1, size] has weight 0)."""
    p = torch.arange(bins, device=start.device, dtype=start.dtype)[None, :, None]
    i = torch.arange(samples, device=start.device, dtype=start.dtype)[None, None, :]
    c = start[:, None, None] + p * bin_size[:, None, None] + (i + 0.5) * bin_size[:, None, None] / samples
    valid = ((c >= -1.0) & (c <= size)).to(c.dtype)
    c = c.clamp(min=0)
    low = c.floor().long()
    last = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(c), c - low.to(c.dtype))
    return torch.cat([low, high], 2), torch.cat([(1 - frac) * valid, frac * valid], 2)


def roi_align_matrix(rois: Tensor, input_shape: Sequence[int], output_size: Tuple[int, int], spatial_scale: float,
                     sampling_ratio: int, aligned: bool = False) -> Tensor:
    """RoIAlign (torchvision's sampling, `sampling_ratio` > 0 points per bin and axis) as a sparse
    matrix (B*H*W) x (R*PH*PW): pooled[r, :, ph, pw] = sum over positions of the matrix entry times
    the input's channels there. `rois`: R x 5 (batch index, x1, y1, x2, y2) in input coordinates."""
    B, _, H, W = input_shape
    PH, PW = output_size
    S = int(sampling_ratio)
    R = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    r = rois.to(torch.promote_types(rois.dtype, torch.float32))
    x0, y0 = r[:, 1] * spatial_scale - offset, r[:, 2] * spatial_scale - offset
    width, height = r[:, 3] * spatial_scale - offset - x0, r[:, 4] * spatial_scale - offset - y0
    if not aligned:  # torchvision's legacy RoIAlign: RoIs at least one cell wide
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    yi, yw = _axis_taps(y0, height / PH, PH, S, H)  # R x PH x 2S
    xi, xw = _axis_taps(x0, width / PW, PW, S, W)  # R x PW x 2S
    batch = rois[:, 0].long()
    position = (batch[:, None, None, None, None] * H + yi[:, :, None, :, None]) * W + xi[:, None, :, None, :]
    weight = yw[:, :, None, :, None] * xw[:, None, :, None, :] / (S * S)  # R x PH x PW x 2S x 2S
    column = torch.arange(R * PH * PW, device=rois.device).view(R, PH, PW, 1, 1).expand_as(position)
    return torch.sparse_coo_tensor(torch.stack([position.reshape(-1), column.reshape(-1)]), weight.reshape(-1),
                                   (B * H * W, R * PH * PW), check_invariants=False)


def roi_align_grad(grad: Tensor, rois: Tensor, input_shape: Sequence[int], spatial_scale: float,
                   sampling_ratio: int, aligned: bool = False) -> Tensor:
    """The gradient of `torchvision.ops.roi_align` (`sampling_ratio` > 0) with respect to its input
    of `input_shape` (B x C x H x W), given the gradient of its output (R x C x PH x PW)."""
    B, C, H, W = input_shape
    R, _, PH, PW = grad.shape
    m = roi_align_matrix(rois.to(grad.dtype), input_shape, (PH, PW), spatial_scale, sampling_ratio, aligned)
    g = torch.sparse.mm(m, grad.permute(0, 2, 3, 1).reshape(R * PH * PW, C))  # B*H*W x C
    return g.view(B, H, W, C).permute(0, 3, 1, 2)


class _PoolWithSparseGrad(torch.autograd.Function):
    """torchvision's multi-scale RoIAlign forward; its input gradient as `roi_align_grad` per level."""

    @staticmethod
    def forward(ctx: Any, pooler: "MultiScaleRoIAlign", names: List[str], boxes: List[Tensor],
                image_shapes: List[Tuple[int, int]], *features: Tensor) -> Tensor:
        out = _TVMultiScaleRoIAlign.forward(pooler, dict(zip(names, features)), boxes, image_shapes)
        ctx.pooler = pooler
        ctx.levels = pooler.map_levels(boxes) if len(features) > 1 else None
        ctx.shapes = [(f.shape, f.dtype) for f in features]
        ctx.save_for_backward(_convert_to_roi_format(boxes))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (rois,) = ctx.saved_tensors
        pooler, grads = ctx.pooler, []
        for level, ((shape, dtype), scale) in enumerate(zip(ctx.shapes, pooler.scales)):
            if not ctx.needs_input_grad[4 + level]:
                grads.append(None)
                continue
            idx = None if ctx.levels is None else torch.where(ctx.levels == level)[0]
            g, r = (grad, rois) if idx is None else (grad[idx], rois[idx])
            g = g.to(torch.promote_types(g.dtype, torch.float32))  # the kernel's dtype under autocast
            grads.append(roi_align_grad(g, r, shape, scale, pooler.sampling_ratio).to(dtype))
        return (None, None, None, None, *grads)


class MultiScaleRoIAlign(_TVMultiScaleRoIAlign):
    """torchvision's `MultiScaleRoIAlign`: the same outputs; on CPU with a fixed sampling ratio its
    input gradient is a sparse matrix product per level (torchvision's CPU backward is a
    single-threaded loop, about a quarter of a Shapes F-ViT training step); the gradient equals
    torchvision's up to float32 rounding."""

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        names = [k for k in x if k in self.featmap_names]  # torchvision's level order: x's
        features = [x[k] for k in names]
        if (self.sampling_ratio <= 0 or not torch.is_grad_enabled() or not any(f.requires_grad for f in features)
                or any(f.device.type != "cpu" for f in features)):
            return super().forward(x, boxes, image_shapes)
        return _PoolWithSparseGrad.apply(self, names, boxes, image_shapes, *features)

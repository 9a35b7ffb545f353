"""The project's MultiScaleRoIAlign pools exactly what torchvision's pools, and its input gradient
(a sparse matrix product per level) equals the gradient of torchvision's RoIAlign kernel."""
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign
from torchvision.ops import roi_align

from clcl_det.modeling.poolers import MultiScaleRoIAlign, roi_align_grad


def _rois(gen, num_images, per_image, extent, dtype=torch.float32):
    """RoIs (batch index, x1, y1, x2, y2) of every size, some reaching past the image and some
    thinner than a cell; image 1 has none."""
    rows = []
    for b in range(num_images):
        n = 0 if b == 1 else per_image
        xy = torch.rand(n, 2, generator=gen, dtype=dtype) * (extent + 20) - 10
        wh = torch.rand(n, 2, generator=gen, dtype=dtype) ** 2 * extent + 0.1
        rows.append(torch.cat([torch.full((n, 1), float(b), dtype=dtype), xy, xy + wh], 1))
    return torch.cat(rows)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio,output_size", [(1, (7, 7)), (2, (5, 5)), (3, (3, 4))])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_grad_equals_torchvision_roi_align_backward(aligned, sampling_ratio, output_size, dtype, tol):
    gen = torch.Generator().manual_seed(sampling_ratio)
    x = torch.randn(3, 6, 20, 24, generator=gen, dtype=dtype, requires_grad=True)
    rois = _rois(gen, 3, 30, 96, dtype)
    y = roi_align(x, rois, output_size, 0.25, sampling_ratio, aligned)
    g = torch.randn(y.shape, generator=gen, dtype=dtype)
    (expected,) = torch.autograd.grad(y, x, g)
    got = roi_align_grad(g, rois, x.shape, 0.25, sampling_ratio, aligned)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=tol * expected.abs().max().item())
    assert expected.abs().max() > 0


def _pool_both(feature_dtype, autocast, sampling_ratio=2):
    """Outputs and input gradients of torchvision's pooler and the project's on the same 4-level
    features, boxes (one image without any) and output gradient."""
    gen = torch.Generator().manual_seed(0)
    feats = OrderedDict((k, torch.randn(3, 8, s, s, generator=gen).to(feature_dtype).requires_grad_())
                        for k, s in (("p2", 64), ("p3", 32), ("p4", 16), ("p5", 8)))
    box_dtype = torch.float64 if feature_dtype == torch.float64 else torch.float32  # torchvision's rule
    boxes = [r[:, 1:].clamp(0, 255) for r in _rois(gen, 3, 40, 250, box_dtype).split([40, 0, 40])]
    boxes = [torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 0.5)], 1) for b in boxes]
    results, g = [], None
    for cls in (TVMultiScaleRoIAlign, MultiScaleRoIAlign):
        pooler = cls(["p2", "p3", "p4", "p5"], 5, sampling_ratio, canonical_scale=56)  # RoIs on every level
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = pooler(feats, boxes, [(256, 256)] * 3)
        g = torch.randn(y.shape, generator=gen).to(y.dtype) if g is None else g
        results.append((y, torch.autograd.grad(y, list(feats.values()), g)))
    return results


@pytest.mark.parametrize("feature_dtype,autocast", [(torch.float32, False), (torch.float64, False),
                                                    (torch.bfloat16, True)])
def test_multiscale_equals_torchvision(feature_dtype, autocast):
    (y_tv, g_tv), (y, g) = _pool_both(feature_dtype, autocast)
    assert torch.equal(y, y_tv)  # torchvision's forward, bit for bit
    levels_with_rois = 0
    for a, b in zip(g, g_tv):
        assert a.dtype == b.dtype == feature_dtype
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[feature_dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tol * max(b.abs().max().item(), 1.0))
        levels_with_rois += bool(b.abs().max() > 0)
    assert levels_with_rois == 4


def test_adaptive_sampling_is_torchvision_itself():
    (y_tv, g_tv), (y, g) = _pool_both(torch.float32, False, sampling_ratio=0)
    assert torch.equal(y, y_tv)
    assert all(torch.equal(a, b) for a, b in zip(g, g_tv))


def test_grad_is_deterministic_on_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = [_pool_both(torch.float32, False)[1][1] for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*grads))

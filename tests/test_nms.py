"""`batched_nms_topk` returns torchvision's `batched_nms(...)[:k]` exactly, ties and autocast
included, while running the suppression loop over about 2k boxes; the RPN built on it proposes
what torchvision's RPN proposes."""
import pytest
import torch
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import batched_nms

import clcl_det.modeling.nms as nms_module
from clcl_det.modeling.nms import batched_nms_topk
from clcl_det.modeling.proposal_generator.rpn import RPN

from conftest import tiny_cfg


def _boxes(n, gen, ties, integer):
    """n boxes in a 128-px image, scores (optionally quantised to 9 values: many ties) and 3 levels."""
    xy = torch.rand(n, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 40 + 1], 1)
    if integer:
        boxes = boxes.round()  # exact duplicates and IoUs that hit the threshold
    scores = torch.rand(n, generator=gen)
    if ties:
        scores = (scores * 8).round() / 8
    return boxes, scores, torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("integer", [False, True])
def test_equals_torchvision_batched_nms(ties, integer):
    gen = torch.Generator().manual_seed(int(ties) * 2 + int(integer))
    for trial in range(60):
        n = int(torch.randint(1, 1300, (1,), generator=gen))  # both of torchvision's CPU regimes (<= / > 1000 boxes)
        boxes, scores, levels = _boxes(n, gen, ties, integer)
        k = int(torch.randint(0, 400, (1,), generator=gen))
        thr = (0.3, 0.5, 0.7)[trial % 3]
        for dtype in (torch.float32, torch.float64):
            b, s = boxes.to(dtype), scores.to(dtype)
            assert torch.equal(batched_nms_topk(b, s, levels, thr, k), batched_nms(b, s, levels, thr)[:k])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what the RPN passes under bfloat16 training
            b, s = boxes.bfloat16(), scores.bfloat16()
            assert torch.equal(batched_nms_topk(b, s, levels, thr, k), batched_nms(b, s, levels, thr)[:k])


def test_empty_and_k_beyond_n():
    empty = torch.zeros(0, 4)
    assert batched_nms_topk(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.7, 10).numel() == 0
    boxes, scores, levels = _boxes(50, torch.Generator().manual_seed(0), True, False)
    assert torch.equal(batched_nms_topk(boxes, scores, levels, 0.7, 1000), batched_nms(boxes, scores, levels, 0.7))


def test_suppression_runs_over_the_top_boxes_only(monkeypatch):
    """An RPN's case (852 candidates, 150 kept): no NMS call sees more than 600 boxes."""
    sizes = []
    real = nms_module.nms

    def spy(dets, scores, thr):
        sizes.append(len(dets))
        return real(dets, scores, thr)

    monkeypatch.setattr(nms_module, "nms", spy)
    boxes, scores, levels = _boxes(852, torch.Generator().manual_seed(1), False, False)
    out = batched_nms_topk(boxes, scores, levels, 0.7, 150)
    assert torch.equal(out, batched_nms(boxes, scores, levels, 0.7)[:150])
    assert sizes and max(sizes) <= 600, sizes


@pytest.mark.parametrize("training", [True, False])
def test_rpn_proposes_what_torchvision_rpn_proposes(training):
    cfg = tiny_cfg(**{"MODEL.RPN.PRE_NMS_TOPK_TRAIN": 300, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 150,
                      "MODEL.RPN.PRE_NMS_TOPK_TEST": 300, "MODEL.RPN.POST_NMS_TOPK_TEST": 50})
    torch.manual_seed(0)
    strides = [4, 8, 16, 32, 64][: len(cfg.MODEL.ANCHOR_GENERATOR.SIZES)]
    rpn = RPN(cfg, 16, strides).train(training)
    per_level = [(128 // s) ** 2 * 3 for s in strides]  # 3 anchors per cell of a 128-px image
    gen = torch.Generator().manual_seed(2)
    n = sum(per_level)
    xy = torch.rand(4, n, 2, generator=gen) * 120 - 4
    proposals = torch.cat([xy, xy + torch.rand(4, n, 2, generator=gen) * 60], 2)
    objectness = (torch.randn(4 * n, 1, generator=gen) * 4).round() / 4  # ties
    sizes = [(128, 128), (128, 96), (100, 128), (128, 128)]
    ours = rpn.filter_proposals(proposals, objectness, sizes, per_level)
    theirs = RegionProposalNetwork.filter_proposals(rpn, proposals, objectness, sizes, per_level)
    for (b, s), (tb, ts) in zip(zip(*ours), zip(*theirs)):
        assert torch.equal(b, tb) and torch.equal(s, ts)
    assert max(len(b) for b in ours[0]) == (150 if training else 50)

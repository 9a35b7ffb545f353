"""RPN on torchvision's anchor generator, head, matcher and box coder, with per-image seeded
sampling and the raw head outputs exposed (for RPN distillation); optionally frozen after the
first task."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from ..continual_module import ContinualModule
from ..nms import batched_nms_topk
from ..sampling import subsample_batch
from .build import PROPOSAL_GENERATOR_REGISTRY

__all__ = ["RPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class RPN(RegionProposalNetwork, ContinualModule):
    """forward(images, features, targets, seeds) -> (proposals per image, losses, raw) where raw
    holds the per-level objectness and deltas of the head. With `MODEL.RPN.FREEZE_AFTER_FIRST_TASK`
    it is frozen at the first task's end and returns no losses from then on."""

    loss_names = ("loss_rpn_cls", "loss_rpn_loc")  # checked against the other modules' (losses/build.py)

    def __init__(self, cfg: Any, in_channels: int, strides: Sequence[int]):
        sizes = [tuple(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
        ratios = [tuple(r) for r in cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS]
        if len(ratios) == 1:
            ratios = ratios * len(sizes)
        if len(sizes) != len(strides):
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.SIZES has {len(sizes)} levels but the backbone gives {len(strides)} "
                f"(strides {list(strides)})"
            )
        anchors = AnchorGenerator(tuple(sizes), tuple(ratios))
        head = RPNHead(in_channels, anchors.num_anchors_per_location()[0])
        r = cfg.MODEL.RPN
        super().__init__(
            anchors, head, fg_iou_thresh=r.IOU_THRESHOLDS[1], bg_iou_thresh=r.IOU_THRESHOLDS[0],
            batch_size_per_image=r.BATCH_SIZE_PER_IMAGE, positive_fraction=r.POSITIVE_FRACTION,
            pre_nms_top_n={"training": r.PRE_NMS_TOPK_TRAIN, "testing": r.PRE_NMS_TOPK_TEST},
            post_nms_top_n={"training": r.POST_NMS_TOPK_TRAIN, "testing": r.POST_NMS_TOPK_TEST},
            nms_thresh=r.NMS_THRESH,
        )
        self.loss_weight = r.LOSS_WEIGHT
        self.freeze_after_first_task = r.FREEZE_AFTER_FIRST_TASK
        self.frozen = False  # set by on_task_end (every loading path replays the task ends)

    def on_task_end(self, task: Any, model: Any) -> None:
        """Freeze at the end of the first task (and keep frozen), if configured."""
        if self.freeze_after_first_task:
            self.requires_grad_(False)
            self.frozen = True

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: List[Tuple[int, int]],
                         num_anchors_per_level: List[int]) -> Tuple[List[Tensor], List[Tensor]]:
        """torchvision's `filter_proposals` (top-n per level, clip, drop small and low-scoring
        boxes, NMS per level, keep the best `post_nms_top_n`) with the same proposals out; its NMS
        stops once it has kept `post_nms_top_n` boxes (`batched_nms_topk`)."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=proposals.device)
                            for i, n in enumerate(num_anchors_per_level)])
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        objectness = objectness[batch_idx, top_n_idx]
        levels = levels[top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]
        probs = torch.sigmoid(objectness)
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, shape in zip(proposals, probs, levels, image_shapes):
            boxes = clip_boxes_to_image(boxes, shape)
            keep = remove_small_boxes(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms_topk(boxes, scores, lvl, self.nms_thresh, self.post_nms_top_n())
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def forward(self, images: ImageList, features: Dict[str, Tensor],
                targets: Optional[List[Dict[str, Tensor]]] = None,
                seeds: Optional[Sequence[Optional[int]]] = None) -> Tuple[List[Tensor], Dict[str, Tensor], Dict[str, Any]]:
        feats = list(features.values())
        objectness, deltas = self.head(feats)
        anchors = self.anchor_generator(images, feats)
        num_per_level = [o[0].numel() for o in objectness]
        raw = {"objectness": objectness, "deltas": deltas}
        obj_flat, deltas_flat = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas_flat.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = self.filter_proposals(proposals, obj_flat, images.image_sizes, num_per_level)
        losses: Dict[str, Tensor] = {}
        if self.training and not self.frozen:
            labels, matched = self.assign_targets_to_anchors(anchors, targets)
            reg_targets = self.box_coder.encode(matched, anchors)
            pos, neg = subsample_batch(labels, self.fg_bg_sampler.batch_size_per_image,
                                       self.fg_bg_sampler.positive_fraction,
                                       seeds or [None] * len(labels), salt=1)
            offsets = torch.cumsum(torch.tensor([0] + [len(a) for a in anchors[:-1]]), 0).tolist()
            pos = torch.cat([p + o for p, o in zip(pos, offsets)])
            neg = torch.cat([n + o for n, o in zip(neg, offsets)])
            sampled = torch.cat([pos, neg])
            labels_flat = torch.cat(labels)
            reg_flat = torch.cat(reg_targets)
            n = max(sampled.numel(), 1)
            box_loss = F.smooth_l1_loss(deltas_flat[pos], reg_flat[pos], beta=1 / 9, reduction="sum") / n
            obj_loss = F.binary_cross_entropy_with_logits(obj_flat.flatten()[sampled], labels_flat[sampled])
            losses = {"loss_rpn_cls": obj_loss * self.loss_weight, "loss_rpn_loc": box_loss * self.loss_weight}
        return boxes, losses, raw

"""F-ViT RoI head: RoIAlign -> convs -> fcs -> embedding, a classification head from
CLS_HEAD_REGISTRY, class-agnostic box regression, and the inference ensemble with dense CLIP."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou, clip_boxes_to_image, generalized_box_iou_loss, roi_align

from ...config import configurable
from ..backbone.clip_vit import get_norm
from ..cls_heads.build import ClsHead, build_cls_head
from ..context import HeadContext
from ..nms import batched_nms_topk
from ..poolers import MultiScaleRoIAlign
from ..continual_module import ContinualModule
from ..sampling import image_generator, subsample_labels
from .build import ROI_HEADS_REGISTRY

__all__ = ["BoxHead", "FViTRoIHeads", "pooled_clip_embeddings"]


class BoxHead(nn.Module):
    """num_conv x (conv3x3, norm, ReLU) then num_fc x (fc, ReLU)."""

    def __init__(self, in_channels: int, resolution: int, num_conv: int, conv_dim: int, num_fc: int,
                 fc_dim: int, norm: str):
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for _ in range(num_conv):
            layers += [nn.Conv2d(c, conv_dim, 3, padding=1, bias=norm in ("", "none")), get_norm(norm, conv_dim),
                       nn.ReLU(inplace=True)]
            c = conv_dim
        self.convs = nn.Sequential(*layers)
        self.conv_out_channels = c
        fcs: List[nn.Module] = []
        d = c * resolution * resolution
        for _ in range(num_fc):
            fcs += [nn.Linear(d, fc_dim), nn.ReLU(inplace=True)]
            d = fc_dim
        self.fcs = nn.Sequential(*fcs)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        return self.fcs(self.convs(x).flatten(1))


def pooled_clip_embeddings(dense: Tensor, rois: Sequence[Tensor], stride: int) -> Tensor:
    """Mean of the dense CLIP map inside each box, L2-normalised (R x D)."""
    pooled = roi_align(dense, list(rois), output_size=1, spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True)
    return F.normalize(pooled.flatten(1), dim=-1)


@ROI_HEADS_REGISTRY.register()
class FViTRoIHeads(ContinualModule):
    """Training: sample RoIs, pool, classify, regress -> losses and the tensors continual losses
    need. Inference: detections {boxes, scores, labels} per image (padded-input coordinates).

    With `unbiased_background` (MODEL.ROI_HEADS.UNBIASED_BACKGROUND), a background RoI of task
    t > 1 is trained towards "background or any old class" (`ctx.background_absorbs`), so
    unlabelled old objects in the new task's images are not taught as background."""

    loss_names = ("loss_cls", "loss_box_reg")  # with the cls head's extras; checked in losses/build.py

    @configurable
    def __init__(self, *, in_channels: int, level_names: Sequence[str], embed_dim: int, cls_head: ClsHead,
                 pooler_resolution: int = 7, sampling_ratio: int = 2, num_conv: int = 4, conv_dim: int = 64,
                 num_fc: int = 2, fc_dim: int = 256, norm: str = "GN", batch_size_per_image: int = 64,
                 positive_fraction: float = 0.25, iou_threshold: float = 0.5, append_gt: bool = True,
                 bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), bbox_loss: str = "smooth_l1",
                 smooth_l1_beta: float = 0.0, cls_loss_weight: float = 1.0, score_thresh: float = 0.01,
                 nms_thresh: float = 0.5, detections_per_image: int = 100, topk_candidates: int = 1000, ensemble: bool = True,
                 ensemble_alpha: float = 0.3, ensemble_temperature: float = 100.0, unbiased_background: bool = False):
        super().__init__()
        self.pooler = MultiScaleRoIAlign(list(level_names[:4]), pooler_resolution, sampling_ratio)
        self.box_head = BoxHead(in_channels, pooler_resolution, num_conv, conv_dim, num_fc, fc_dim, norm)
        self.embed = nn.Linear(self.box_head.out_dim, embed_dim)
        self.bbox_pred = nn.Linear(self.box_head.out_dim, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)
        self.cls_head = cls_head
        self.box_coder = BoxCoder(tuple(bbox_reg_weights))
        if bbox_loss not in ("smooth_l1", "l1", "giou"):
            raise ValueError(f"MODEL.ROI_BOX_HEAD.BBOX_LOSS '{bbox_loss}' is not one of smooth_l1 | l1 | giou")
        self.bbox_loss, self.smooth_l1_beta, self.cls_loss_weight = bbox_loss, smooth_l1_beta, cls_loss_weight
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.iou_threshold, self.append_gt = iou_threshold, append_gt
        self.score_thresh, self.nms_thresh, self.detections_per_image = score_thresh, nms_thresh, detections_per_image
        self.topk_candidates = topk_candidates
        self.ensemble, self.ensemble_alpha, self.ensemble_temperature = ensemble, ensemble_alpha, ensemble_temperature
        self.unbiased_background = unbiased_background

    @classmethod
    def from_config(cls, cfg: Any, in_channels: int, level_names: Sequence[str], embed_dim: int) -> Dict[str, Any]:
        b, r = cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_HEADS
        return {
            "in_channels": in_channels, "level_names": level_names, "embed_dim": embed_dim,
            "cls_head": build_cls_head(cfg, embed_dim),
            "pooler_resolution": b.POOLER_RESOLUTION, "sampling_ratio": b.POOLER_SAMPLING_RATIO,
            "num_conv": b.NUM_CONV, "conv_dim": b.CONV_DIM, "num_fc": b.NUM_FC, "fc_dim": b.FC_DIM,
            "norm": b.NORM, "batch_size_per_image": r.BATCH_SIZE_PER_IMAGE,
            "positive_fraction": r.POSITIVE_FRACTION, "iou_threshold": r.IOU_THRESHOLD,
            "append_gt": r.PROPOSAL_APPEND_GT, "bbox_reg_weights": b.BBOX_REG_WEIGHTS, "bbox_loss": b.BBOX_LOSS,
            "smooth_l1_beta": b.SMOOTH_L1_BETA, "cls_loss_weight": cfg.MODEL.CLS_HEAD.LOSS_WEIGHT,
            "score_thresh": r.SCORE_THRESH_TEST, "nms_thresh": r.NMS_THRESH_TEST,
            "detections_per_image": r.DETECTIONS_PER_IMAGE, "topk_candidates": r.TOPK_CANDIDATES_TEST,
            "ensemble": cfg.MODEL.ENSEMBLE.ENABLED,
            "ensemble_alpha": cfg.MODEL.ENSEMBLE.ALPHA, "ensemble_temperature": cfg.MODEL.ENSEMBLE.CLIP_TEMPERATURE,
            "unbiased_background": r.UNBIASED_BACKGROUND,
        }

    # ------------------------------------------------------------------------------------------
    def sample(self, proposals: List[Tensor], targets: List[Dict[str, Tensor]], num_classes: int,
               seeds: Sequence[Optional[int]]) -> Tuple[List[Tensor], Tensor, Tensor]:
        """Sampled RoIs per image, their labels (background = num_classes) and regression targets."""
        rois, labels, reg = [], [], []
        for props, tgt, seed in zip(proposals, targets, seeds):
            gt_boxes, gt_classes = tgt["boxes"], tgt["labels"]
            if self.append_gt:
                props = torch.cat([props, gt_boxes])
            if gt_boxes.numel() == 0:
                iou_max = torch.zeros(len(props), device=props.device)
                matched = torch.zeros(len(props), dtype=torch.long, device=props.device)
                gt_boxes = props.new_zeros((1, 4))
                gt_classes = torch.full((1,), num_classes, dtype=torch.long, device=props.device)
            else:
                iou_max, matched = box_iou(gt_boxes, props).max(dim=0)
            fg = iou_max >= self.iou_threshold
            pos, neg = subsample_labels(fg.long(), self.batch_size_per_image, self.positive_fraction,
                                        image_generator(seed, 2))
            keep = torch.cat([pos, neg])
            lab = torch.where(fg, gt_classes[matched], torch.full_like(matched, num_classes))[keep]
            rois.append(props[keep])
            labels.append(lab)
            reg.append(self.box_coder.encode_single(gt_boxes[matched[keep]], props[keep]))
        return rois, torch.cat(labels), torch.cat(reg)

    def pool(self, features: Dict[str, Tensor], rois: List[Tensor], image_sizes: List[Tuple[int, int]]) -> Tensor:
        return self.pooler(features, rois, image_sizes)

    def predict(self, pooled: Tensor, rois: List[Tensor], ctx: HeadContext,
                labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Class logits R x (K+1) (background last), box deltas R x 4, embeddings R x D.
        `labels` (training) are the sampled RoIs' labels, for heads that need them."""
        return self.shared_outputs(self.box_head.convs(pooled), rois, ctx)

    def shared_outputs(self, conv_features: Tensor, rois: List[Tensor], ctx: HeadContext) -> Dict[str, Tensor]:
        """`predict` from the output of the box head's convs (R x C x P x P): the fcs, the
        embedding, the class logits and the box deltas."""
        h = self.box_head.fcs(conv_features.flatten(1))
        x = self.embed(h)
        return {"logits": self.cls_head(x, ctx, rois), "deltas": self.bbox_pred(h), "embeddings": x}

    def adjust_labels(self, labels: Tensor, out: Dict[str, Tensor], ctx: HeadContext) -> Tensor:
        """Hook for methods that relabel or ignore (-1) sampled RoIs; identity here."""
        return labels

    def box_losses(self, deltas: Tensor, reg_targets: Tensor, labels: Tensor, rois: List[Tensor],
                   num_classes: int) -> Dict[str, Tensor]:
        fg = (labels >= 0) & (labels < num_classes)
        n = max(labels.numel(), 1)
        if self.bbox_loss == "giou":
            props = torch.cat(rois)[fg]
            pred = self.box_coder.decode_single(deltas[fg], props)
            target = self.box_coder.decode_single(reg_targets[fg], props)
            loss = generalized_box_iou_loss(pred, target, reduction="sum")
        elif self.bbox_loss == "smooth_l1" and self.smooth_l1_beta > 0:
            loss = F.smooth_l1_loss(deltas[fg], reg_targets[fg], beta=self.smooth_l1_beta, reduction="sum")
        else:
            loss = F.l1_loss(deltas[fg], reg_targets[fg], reduction="sum")
        return {"loss_box_reg": loss / n}

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], ctx: HeadContext,
                targets: Optional[List[Dict[str, Tensor]]] = None,
                seeds: Optional[Sequence[Optional[int]]] = None) -> Tuple[Any, Dict[str, Any]]:
        K = ctx.num_classes
        if self.training:
            if self.unbiased_background and ctx.task is not None:
                ctx.background_absorbs = ctx.task.start  # the classes of earlier tasks
            rois, labels, reg_targets = self.sample(proposals, targets, K, seeds or [None] * len(proposals))
            out = self.predict(self.pool(features, rois, ctx.image_sizes), rois, ctx, labels)
            labels = self.adjust_labels(labels, out, ctx)
            losses = {k: v * self.cls_loss_weight for k, v in self.cls_head.losses(out["logits"], labels, out["embeddings"], ctx).items()}
            losses.update(self.box_losses(out["deltas"], reg_targets, labels, rois, K))
            out.update(rois=rois, labels=labels)
            return losses, out
        out = self.predict(self.pool(features, proposals, ctx.image_sizes), proposals, ctx)
        return self.inference(out, proposals, ctx), out

    # ------------------------------------------------------------------------------------------
    def foreground_probabilities(self, out: Dict[str, Tensor], ctx: HeadContext) -> Tensor:
        """R x K: the detector's softmax over [classes, background], background dropped."""
        return out["logits"].softmax(dim=-1)[:, : ctx.num_classes]

    def clip_probabilities(self, clip_emb: Tensor, ctx: HeadContext, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """R x K: the CLIP side of the ensemble, a softmax of the RoIs' scaled cosines (`clip_emb`,
        R x D) with the class texts `start:stop` (default: the vocabulary)."""
        return (self.ensemble_temperature * clip_emb @ ctx.class_embeddings[start:stop].t()).softmax(dim=-1)

    def class_probabilities(self, out: Dict[str, Tensor], rois: List[Tensor], ctx: HeadContext) -> Tensor:
        """R x K foreground probabilities, with the F-ViT ensemble p_det^(1-a) * p_clip^a."""
        probs = self.foreground_probabilities(out, ctx)
        if self.ensemble and self.ensemble_alpha > 0:
            clip_emb = pooled_clip_embeddings(ctx.clip_dense, rois, ctx.clip_stride)
            probs = self.ensemble_scores(probs, self.clip_probabilities(clip_emb, ctx))
        return probs

    def ensemble_scores(self, p_det: Tensor, p_clip: Tensor) -> Tensor:
        """The geometric ensemble p_det^(1-a) * p_clip^a (a = MODEL.ENSEMBLE.ALPHA)."""
        a = self.ensemble_alpha
        return p_det.clamp_min(1e-12) ** (1 - a) * p_clip.clamp_min(1e-12) ** a

    def class_boxes(self, out: Dict[str, Tensor], rois: List[Tensor], ctx: HeadContext) -> Tensor:
        """The decoded boxes of the RoIs: R x 4, one box per RoI for every class (class-agnostic
        regression)."""
        return self.box_coder.decode_single(out["deltas"], torch.cat(rois)) if rois else out["deltas"]

    def inference(self, out: Dict[str, Tensor], rois: List[Tensor], ctx: HeadContext) -> List[Dict[str, Tensor]]:
        probs = self.class_probabilities(out, rois, ctx)
        boxes = self.class_boxes(out, rois, ctx)  # R x 4, or R x K x 4 (a box per class)
        results = []
        for p, b, size in zip(probs.split([len(r) for r in rois]), boxes.split([len(r) for r in rois]), ctx.image_sizes):
            b = clip_boxes_to_image(b, size)
            K = p.shape[1]
            scores = p.flatten()
            keep = torch.nonzero(scores > self.score_thresh).squeeze(1)
            if keep.numel() > self.topk_candidates:
                keep = keep[scores[keep].topk(self.topk_candidates).indices]
            roi_idx, cls_idx = keep // K, keep % K
            bx, sc = (b[roi_idx] if b.dim() == 2 else b[roi_idx, cls_idx]), scores[keep]
            valid = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
            bx, sc, cls_idx = bx[valid], sc[valid], cls_idx[valid]
            kept = batched_nms_topk(bx, sc, cls_idx, self.nms_thresh, self.detections_per_image)
            results.append({"boxes": bx[kept], "scores": sc[kept], "labels": cls_idx[kept]})
        return results

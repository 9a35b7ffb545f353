"""F-ViT: frozen CLIP ViT -> simple pyramid -> FPN -> RPN -> RoI head with a text classifier."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from ..backbone.build import build_backbone
from ..clip.factory import build_clip
from ..context import HeadContext
from ..continual_module import ContinualModule
from ..losses.build import LossInputs, TeacherOutputs, build_continual_losses, check_loss_names, merge_losses
from ..proposal_generator.build import build_proposal_generator
from ..roi_heads.build import build_roi_heads
from ..text import TextEncoder
from .build import META_ARCH_REGISTRY

__all__ = ["FViT"]


def _text_names(cfg: Any) -> Dict[str, str]:
    """The training dataset's `text_names` metadata (class name -> words for the text encoder)."""
    from ...data.catalog import MetadataCatalog

    if not cfg.DATASETS.TRAIN:
        return {}
    return dict(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("text_names", None) or {})


@META_ARCH_REGISTRY.register()
class FViT(ContinualModule):
    """The detector. Takes a list of mapped dicts (``image`` uint8 3xHxW, and in training ``boxes``
    / ``classes`` / ``seed``) and returns a dict of losses (training) or, per image,
    ``{boxes, scores, labels}`` in original image pixels (inference).

    The frozen open_clip model is held outside the module tree: it is not in `parameters()`,
    `state_dict()` or DDP; `.to()` still moves it. The vocabulary (class names, their text
    embeddings) is set per task by its `on_task_start`, which the life-cycle dispatcher
    (`clcl_det.continual.begin_task`) calls before the hooks of its submodules. As the previous
    task's frozen model it implements the `Teacher` interface continual losses use.
    """

    def __init__(self, cfg: Any):
        super().__init__()
        clip, tokenizer = build_clip(cfg)
        object.__setattr__(self, "clip", clip)
        object.__setattr__(self, "teacher", None)
        self.text = TextEncoder(clip, tokenizer, cfg.MODEL.CLIP.TEMPLATES, text_names=_text_names(cfg))
        self.backbone = build_backbone(cfg, clip)
        self.proposal_generator = build_proposal_generator(cfg, self.backbone.out_channels, self.backbone.strides)
        self.roi_heads = build_roi_heads(cfg, self.backbone.out_channels, self.backbone.level_names,
                                         self.backbone.embed_dim)
        self.continual_losses = build_continual_losses(cfg)
        check_loss_names(self)  # two modules returning one loss name are refused here, naming both
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1), persistent=False)
        self.register_buffer("class_embeddings", torch.zeros(0, self.backbone.embed_dim), persistent=False)
        self.register_buffer("background_embedding", self.text.encode_classes([cfg.MODEL.CLIP.BACKGROUND_PROMPT])[0],
                             persistent=False)
        self.image_size = cfg.INPUT.IMAGE_SIZE
        # the frozen CLIP's cosine -> logit factor, as its own zero-shot classifier uses it (<= 100)
        self.clip_logit_scale = float(clip.logit_scale.detach().exp().clamp(max=100.0))
        self.class_names: List[str] = []
        self.task = None

    # -- module plumbing ----------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):  # moves the frozen CLIP along with the detector
        super()._apply(fn, *args, **kwargs)
        self.clip._apply(fn)
        return self

    def __deepcopy__(self, memo: Dict[int, Any]) -> "FViT":
        """Copies share the frozen CLIP, its image tower and the backbone's dense encoder around it
        (teacher snapshots cost only the trainable part)."""
        memo[id(self.clip)] = self.clip
        memo[id(self.text)] = self.text
        for frozen in (self.clip, getattr(self.backbone, "encoder", None)):
            if frozen is not None:
                memo[id(frozen)] = frozen
                for obj in (*frozen.modules(), *frozen.parameters(), *frozen.buffers()):
                    memo[id(obj)] = obj
        if self.teacher is not None:
            memo[id(self.teacher)] = None
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        return new

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def set_teacher(self, teacher: Optional[nn.Module]) -> None:
        """The previous task's frozen model, used by continual losses that need it."""
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)

    # -- vocabulary and continual life cycle ---------------------------------------------------
    def set_vocabulary(self, class_names: Sequence[str]) -> None:
        """Classes the detector scores, in learning order."""
        self.class_names = list(class_names)
        self.class_embeddings = self.text.encode_classes(self.class_names).to(self.device)

    @contextlib.contextmanager
    def vocabulary(self, class_names: Sequence[str]) -> Iterator[None]:
        """Temporarily score another vocabulary (zero-shot evaluation of classes not learned yet)."""
        saved = (self.class_names, self.class_embeddings)
        self.set_vocabulary(class_names)
        try:
            yield
        finally:
            self.class_names, self.class_embeddings = saved

    def on_task_start(self, task: Any, model: nn.Module) -> None:
        """Grow the vocabulary to the task's seen classes (before the submodules' hooks run)."""
        self.task = task
        self.set_vocabulary(task.class_names)

    # -- the Teacher interface (see losses.build.Teacher) --------------------------------------------
    def teacher_features(self, taps: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return self.backbone.pyramid_features(taps)

    def teacher_rpn(self, features: Dict[str, Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        return self.proposal_generator.head(list(features.values()))

    def teacher_roi_logits(self, features: Dict[str, Tensor], rois: List[Tensor], ctx: HeadContext) -> Tensor:
        return self.teacher_roi_outputs(features, rois, ctx)["logits"]

    def teacher_roi_outputs(self, features: Dict[str, Tensor], rois: List[Tensor], ctx: HeadContext) -> Dict[str, Tensor]:
        t_ctx = self.make_context(ctx.clip_dense, ctx.image_sizes)
        return self.roi_heads.predict(self.roi_heads.pool(features, rois, t_ctx.image_sizes), rois, t_ctx)

    def teacher_proposals(self, images: ImageList, features: Dict[str, Tensor]) -> List[Tensor]:
        return self.proposal_generator(images, features)[0]  # the teacher stays in eval mode: inference proposals

    def teacher_parameters(self) -> Dict[str, Tensor]:
        return dict(self.backbone.named_parameters())

    # -- forward --------------------------------------------------------------------------------
    def preprocess(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """Normalise and pad into a batch whose side is a multiple of the backbone's divisibility."""
        div = self.backbone.size_divisibility
        images = [((x["image"].to(self.device).float() / 255.0) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        side_h = max(self.image_size, max(im.shape[1] for im in images))
        side_w = max(self.image_size, max(im.shape[2] for im in images))
        side_h, side_w = -(-side_h // div) * div, -(-side_w // div) * div
        batch = images[0].new_zeros(len(images), 3, side_h, side_w)
        for b, im in zip(batch, images):
            b[:, : im.shape[1], : im.shape[2]].copy_(im)
        return ImageList(batch, [(int(im.shape[1]), int(im.shape[2])) for im in images])

    def make_context(self, clip_dense: Tensor, image_sizes: List[Tuple[int, int]]) -> HeadContext:
        return HeadContext(self.class_embeddings, self.background_embedding, clip_dense,
                           self.backbone.clip_stride, image_sizes, self.task, tuple(self.class_names),
                           clip_logit_scale=self.clip_logit_scale)

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        if not self.class_names:
            raise RuntimeError("the detector has no vocabulary: call clcl_det.continual.begin_task(model, task) "
                               "or set_vocabulary(names)")
        images = self.preprocess(batched_inputs)
        bb = self.backbone(images.tensors)
        features = bb["features"]
        ctx = self.make_context(bb["clip_dense"], images.image_sizes)
        if not self.training:
            proposals, _, _ = self.proposal_generator(images, features)
            detections, _ = self.roi_heads(features, proposals, ctx)
            return self.postprocess(detections, batched_inputs, images.image_sizes)
        targets = []
        for x in batched_inputs:
            labels = x["classes"]  # checked where the loader left it (the host): no device sync
            top = int(labels.max()) if labels.numel() and labels.device.type == "cpu" else -1
            if top >= len(self.class_names):
                raise ValueError(f"{x.get('file_name')}: label {top} outside the vocabulary "
                                 f"of {len(self.class_names)} classes")
            targets.append({"boxes": x["boxes"].to(self.device, non_blocking=True).float(),
                            "labels": labels.to(self.device, non_blocking=True)})
        seeds = [x.get("seed") for x in batched_inputs]
        proposals, losses, rpn_raw = self.proposal_generator(images, features, targets, seeds)
        roi_losses, roi_out = self.roi_heads(features, proposals, ctx, targets, seeds)
        merge_losses(losses, roi_losses, "the RoI heads")
        outputs = LossInputs(backbone=bb, ctx=ctx, rpn=rpn_raw, roi=roi_out, images=images, proposals=proposals,
                             targets=targets)
        teacher = TeacherOutputs(self.teacher, outputs) if self.teacher is not None else None
        for i, loss in enumerate(self.continual_losses):
            merge_losses(losses, loss(self, outputs, batched_inputs, teacher),
                         f"{type(loss).__name__} (continual_losses.{i})")
        return losses

    @staticmethod
    def postprocess(detections: List[Dict[str, Tensor]], batched_inputs: List[Dict[str, Any]],
                    image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Boxes back to each image's original pixels."""
        results = []
        for det, x, (h, w) in zip(detections, batched_inputs, image_sizes):
            sx, sy = x.get("width", w) / w, x.get("height", h) / h
            boxes = det["boxes"] * torch.tensor([sx, sy, sx, sy], device=det["boxes"].device)
            results.append({"boxes": boxes, "scores": det["scores"], "labels": det["labels"]})
        return results


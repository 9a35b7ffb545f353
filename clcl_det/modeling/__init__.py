"""Models. Importing this package registers every builtin backbone, proposal generator, RoI head,
classification head, continual loss and meta-architecture."""
from . import backbone, cls_heads, losses, meta_arch, proposal_generator, roi_heads  # noqa: F401
from .backbone.build import BACKBONE_REGISTRY, build_backbone
from .cls_heads.build import CLS_HEAD_REGISTRY, ClsHead, build_cls_head
from .context import HeadContext
from .continual_module import ContinualModule, LifeCycleOptOut
from .losses.build import (CONTINUAL_LOSS_REGISTRY, ContinualLoss, LossInputs, Teacher, TeacherOutputs,
                           build_continual_losses)
from .meta_arch.build import META_ARCH_REGISTRY, build_model
from .proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY, build_proposal_generator
from .roi_heads.build import ROI_HEADS_REGISTRY, build_roi_heads

__all__ = [
    "BACKBONE_REGISTRY", "CLS_HEAD_REGISTRY", "CONTINUAL_LOSS_REGISTRY", "META_ARCH_REGISTRY",
    "PROPOSAL_GENERATOR_REGISTRY", "ROI_HEADS_REGISTRY", "ClsHead", "ContinualLoss", "ContinualModule", "HeadContext",
    "LifeCycleOptOut", "LossInputs", "Teacher", "TeacherOutputs",
    "build_backbone", "build_cls_head", "build_continual_losses", "build_model", "build_proposal_generator",
    "build_roi_heads",
]

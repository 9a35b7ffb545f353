"""The keys of the methods whose code lives in this package, declared next to it and added to
every config by `get_cfg()` (see `clcl_det.config.register_config`)."""
from ...config import CfgNode as CN
from ...config import register_config

__all__ = ["add_distill_config", "add_sgakt_config"]


@register_config
def add_distill_config(_C: CN) -> None:
    """FasterILODDistill's keys (MODEL.DISTILL)."""
    _C.MODEL.DISTILL = CN()  # Faster-ILOD-style distillation baseline
    _C.MODEL.DISTILL.RPN_WEIGHT = 1.0  # weight of RPN objectness/delta distillation
    _C.MODEL.DISTILL.ROI_WEIGHT = 1.0  # weight of old-class logit distillation (L2 on centred logits)


@register_config
def add_sgakt_config(_C: CN) -> None:
    """SGAKTDistill's keys (MODEL.SGAKT)."""
    _C.MODEL.SGAKT = CN()  # SGAKTDistill (SECA SG-AKT): relevance-weighted distillation from earlier heads
    _C.MODEL.SGAKT.TEMPERATURE = 20.0  # KL distillation temperature (loss scaled by T^2)
    _C.MODEL.SGAKT.WEIGHT = 1.0  # loss weight, multiplied by the task index (0 in the first task)
    _C.MODEL.SGAKT.ATTENTION_TEMPERATURE = 0.1  # softmax temperature of the snapshots' text relevance
    _C.MODEL.SGAKT.RELEVANCE = "max"  # a snapshot's relevance to a RoI label: max | mean cos over its classes

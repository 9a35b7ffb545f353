"""The keys of the methods whose code lives in this package, declared next to it and added to
every config by `get_cfg()` (see `clcl_det.config.register_config`)."""
from ...config import CfgNode as CN
from ...config import register_config

__all__ = ["add_distill_config", "add_sgakt_config"]


@register_config
def add_distill_config(_C: CN) -> None:
    """FasterILODDistill's keys (MODEL.DISTILL)."""
    _C.MODEL.DISTILL = CN()  # FasterILODDistill: the Faster ILOD baseline's three distillation terms
    _C.MODEL.DISTILL.FEATURE_WEIGHT = 1.0  # weight of the FPN feature term (L1 on mean-subtracted maps where teacher > student)
    _C.MODEL.DISTILL.RPN_WEIGHT = 1.0  # weight of the RPN term (objectness where teacher > student, L2, + box deltas)
    _C.MODEL.DISTILL.RPN_BOX_THRESHOLD = 0.1  # RPN box deltas distilled where teacher objectness exceeds the student's by more
    _C.MODEL.DISTILL.ROI_WEIGHT = 1.0  # weight of the RoI term (L2 on centred [old, bg] logits + box deltas, teacher's proposals)
    _C.MODEL.DISTILL.ROI_TOP = 128  # the RoI term samples from the teacher's this many best proposals per image
    _C.MODEL.DISTILL.ROI_SAMPLES = 64  # proposals per image drawn from those for the RoI term


@register_config
def add_sgakt_config(_C: CN) -> None:
    """SGAKTDistill's keys (MODEL.SGAKT)."""
    _C.MODEL.SGAKT = CN()  # SGAKTDistill (SECA SG-AKT): distillation from an aggregated pool of feature-path snapshots
    _C.MODEL.SGAKT.TEMPERATURE = 20.0  # KL on softmax(T * cos(., t_c)) over the current task's classes (no T^2 factor)
    _C.MODEL.SGAKT.WEIGHT = 1.0  # KL weight, multiplied by the task index (0 in the first task)
    _C.MODEL.SGAKT.POOL_SIZE = 5  # snapshots kept at most; when full the least relevant is replaced
    _C.MODEL.SGAKT.MOMENTUM = 0.5  # EMA momentum of each snapshot's accumulated relevance
    _C.MODEL.SGAKT.AGG_WEIGHT = 1.0  # weight of the aggregator's CE (its only training signal)
    _C.MODEL.SGAKT.AGG_SCALE = 50.0  # logit scale of that CE's cosine classifier

"""CL-CLIP's keys, declared next to its RoI head (its continual losses live in ../losses) and
added to every config by `get_cfg()` (see `clcl_det.config.register_config`)."""
from ...config import CfgNode as CN
from ...config import register_config

__all__ = ["add_clclip_config"]


@register_config
def add_clclip_config(_C: CN) -> None:
    """CL-CLIP's keys, all under MODEL.CLCLIP: the multi-expert RoI head (MultiExpertRoIHeads), its
    cost-volume prior, and the FPNDrift, Orthogonality and UnbiasedDistill losses."""
    _C.MODEL.CLCLIP = CN()  # CL-CLIP (MultiExpertRoIHeads + its continual losses): every key of the method
    _C.MODEL.CLCLIP.BG_IGNORE_THRESH = 0.5  # MULTI_EXPERT.BACKGROUND shared: drop background RoIs whose old-class prior exceeds this (>1 = off)
    _C.MODEL.CLCLIP.ORTH_WEIGHT = 0.1  # weight of the orthogonality loss
    _C.MODEL.CLCLIP.DRIFT = CN()
    _C.MODEL.CLCLIP.DRIFT.MODE = "feature"  # feature (pyramid outputs vs teacher) | param (||theta - theta_prev||^2)
    _C.MODEL.CLCLIP.DRIFT.WEIGHT = 1.0  # weight of the drift loss
    _C.MODEL.CLCLIP.DRIFT.PRIOR_WEIGHTED = False  # MODE feature: weight each cell by the earlier classes' highest prior there

    _C.MODEL.CLCLIP.COST_VOLUME = CN()  # dense V.T^T cosine volume and its prior
    _C.MODEL.CLCLIP.COST_VOLUME.TEMPERATURE = 0.0  # T of the prior: sigmoid((C_k - C_bg) / T) or softmax_k(C / T); 0 = 1 / the CLIP's own logit scale
    _C.MODEL.CLCLIP.COST_VOLUME.NORM = "softmax"  # prior per class: sigmoid | softmax (over VOCABULARY + background) | none (raw cosines)
    _C.MODEL.CLCLIP.COST_VOLUME.VOCABULARY = "seen"  # a task's softmax runs over: task (its own classes) | seen (every class up to its task; never later ones)
    _C.MODEL.CLCLIP.COST_VOLUME.LEVEL_INSET = 0.25  # a RoI's prior level averages the cosines of the RoI moved in by this many CLIP cells per side (its object, not its context)
    _C.MODEL.CLCLIP.COST_VOLUME.ENABLED = True  # off = uniform prior (ablation "no cost volume")

    _C.MODEL.CLCLIP.MULTI_EXPERT = CN()  # MultiExpertRoIHeads: per-category expert RoI head
    _C.MODEL.CLCLIP.MULTI_EXPERT.GATING = "normalized"  # where the prior map lies, as the expert input: normalized f*m/max_RoI(m) | multiply f*m | residual f*(1+g*m) | concat [f, m]
    _C.MODEL.CLCLIP.MULTI_EXPERT.PRIOR_LOGIT_WEIGHT = 1.0  # beta: a class's logit gains beta*log(level_k / level_bg), level = the prior of the RoI's mean cosines (0 = off)
    _C.MODEL.CLCLIP.MULTI_EXPERT.GAMMA = 1.0  # g of the residual gating
    _C.MODEL.CLCLIP.MULTI_EXPERT.TOPK = 0  # classes kept per RoI by prior level (0 = all)
    _C.MODEL.CLCLIP.MULTI_EXPERT.EXPERT_DIM = 16  # channels of each expert's convs
    _C.MODEL.CLCLIP.MULTI_EXPERT.FREEZE = True  # freeze a task's experts at its end (off = ablation)
    _C.MODEL.CLCLIP.MULTI_EXPERT.NORM = "GN"  # norm after each expert conv: GN (a group norm over each expert's own channels) | none
    _C.MODEL.CLCLIP.MULTI_EXPERT.POOL_SIZE = 7  # each expert average-pools its map to G x G and flattens it into its fc (1 = global mean)
    _C.MODEL.CLCLIP.MULTI_EXPERT.TRUNK = "box_head"  # what the experts read, trained in the first task and frozen at its end: box_head (the shared branch's box-head convs, no extra compute) | own (TRUNK_CONVS convs of their own)
    _C.MODEL.CLCLIP.MULTI_EXPERT.TRUNK_CONVS = 4  # TRUNK own: conv3x3-GN-ReLU layers at the FPN width (0 = the RoI feature itself)
    _C.MODEL.CLCLIP.MULTI_EXPERT.BOX_REG = "shared"  # shared: every class's box from the shared branch's regressor, which keeps training | task: a task's classes keep the regressor (box-head fcs + bbox_pred) as it was at their task's end, frozen with their experts (needs TRUNK box_head)
    _C.MODEL.CLCLIP.MULTI_EXPERT.BACKGROUND = "task"  # task: a background expert per task, frozen with it, closes its task's softmax | shared: the shared branch's logit closes one softmax
    _C.MODEL.CLCLIP.MULTI_EXPERT.SHARED_CLASS_LOGITS = False  # add the shared branch's class logits to the experts' (on in configs/_base_/Base-CLCLIP-plus.yaml)
    _C.MODEL.CLCLIP.MULTI_EXPERT.SHARED_CLASS_LOSS_WEIGHT = 1.0  # weight of a classification loss on the shared branch's own logits (zero-shot of later classes)

    _C.MODEL.CLCLIP.UNBIASED_DISTILL = CN()  # UnbiasedDistill (the distillation CL-CLIP uses): RPN + KL on [old, background], new classes counted as background
    _C.MODEL.CLCLIP.UNBIASED_DISTILL.RPN_WEIGHT = 1.0  # weight of RPN objectness/delta distillation (0 = off)
    _C.MODEL.CLCLIP.UNBIASED_DISTILL.ROI_WEIGHT = 0.5  # weight of the unbiased RoI logit KL
    _C.MODEL.CLCLIP.UNBIASED_DISTILL.TEMPERATURE = 1.0  # softmax temperature T of the KL (scaled by T^2)

"""The keys of the methods whose code lives in this package, declared next to it and added to
every config by `get_cfg()` (see `clcl_det.config.register_config`)."""
from ...config import CfgNode as CN
from ...config import register_config

__all__ = ["add_spa_config", "add_replay_config", "add_sevpr_config"]


@register_config
def add_spa_config(_C: CN) -> None:
    """SPAHead's keys (MODEL.SPA)."""
    _C.MODEL.SPA = CN()  # SPAHead: description-guided patch selection + OT alignment + task projectors
    _C.MODEL.SPA.DESCRIPTIONS = ""  # class descriptions: a name in datasets/descriptions (voc, coco, shapes), a .json path, or "" = from DATASETS.TRAIN
    _C.MODEL.SPA.FALLBACK_TEMPLATE = "a photo of a {}."  # sentence of a class without descriptions ({} = class name)
    _C.MODEL.SPA.POOLER_RESOLUTION = 7  # dense CLIP patches per RoI: RoIAlign to R x R
    _C.MODEL.SPA.NUM_PATCHES = 16  # patches kept per (RoI, class), ranked by max_j cos(patch, description j)
    _C.MODEL.SPA.EPSILON = 0.1  # entropic regularisation of the OT problem (cost 1 - cos)
    _C.MODEL.SPA.OT_WEIGHT = 1.0  # lambda: logit = tau * (cos(z, t_c) + lambda * s_OT)
    _C.MODEL.SPA.OT_METHOD = "auto"  # POT ot.solve_batch method: sinkhorn (CPU) | log_sinkhorn | auto (sinkhorn on CPU if EPSILON >= 0.05)
    _C.MODEL.SPA.OT_MAX_ITER = 100  # Sinkhorn iterations at most
    _C.MODEL.SPA.OT_TOL = 1e-5  # Sinkhorn stops when the patch marginal's error is below this
    _C.MODEL.SPA.TOPK = 0  # OT only for each RoI's top-k classes by cos(projected region feature, t_c) (0 = all); the others get no OT term
    _C.MODEL.SPA.PAIRS_PER_CALL = 0  # (RoI, class) pairs per batched OT call, whole RoIs (0 = sized by device: utils.device.chunk_elements)
    _C.MODEL.SPA.TASK_PROJECTORS = True  # one Linear(D, D) per task on the frozen CLIP patches/region feature (zero-init residual, frozen after its task)
    _C.MODEL.SPA.COMBINE = "sum"  # SPA logits with the detector's: sum | ensemble ((1-w) log-softmax det + w log-softmax SPA)
    _C.MODEL.SPA.ENSEMBLE_WEIGHT = 0.5  # w of COMBINE ensemble


@register_config
def add_replay_config(_C: CN) -> None:
    """GaussianReplay's keys (MODEL.REPLAY)."""
    _C.MODEL.REPLAY = CN()  # GaussianReplay: per-class Gaussian statistics (box-head output, or frozen CLIP features for SPA), replayed later
    _C.MODEL.REPLAY.INNER_HEAD = "TextClassifier"  # CLS_HEAD_REGISTRY entry that classifies real and replayed features
    _C.MODEL.REPLAY.COV = "full"  # covariance per class: full | diagonal | shared (one pooled covariance)
    _C.MODEL.REPLAY.SHRINKAGE = 1e-4  # added to the covariance's diagonal (s * I)
    _C.MODEL.REPLAY.SAMPLES_PER_CLASS = 8  # pseudo-features drawn per old class per iteration
    _C.MODEL.REPLAY.WEIGHT = 1.0  # weight of the replay classification loss


@register_config
def add_sevpr_config(_C: CN) -> None:
    """SemanticPrototypeHead's keys (MODEL.SEVPR)."""
    _C.MODEL.SEVPR = CN()  # SemanticPrototypeHead (SECA SE-VPR): text-refined visual prototypes
    _C.MODEL.SEVPR.PROTO_WEIGHT = 0.5  # logit = tau * ((1 - w) cos(x, t_c) + w cos(x, refined prototype))
    _C.MODEL.SEVPR.PROTO_LOSS_WEIGHT = 1.0  # weight of CE(tau cos(z_r, refined prototypes)) over the current task's classes
    _C.MODEL.SEVPR.REG_WEIGHT = 1.0  # weight of mean_old (1 - cos(refined prototype at its task's end, now)); 0 = no continual part

"""Every config key, with its default and a one-line comment.

The defaults are the *embedded default*: the F-ViT baseline on Shapes 10+10 with the project's
tiny CLIP, small enough to train on two CPU cores. Method configs (configs/*/clclip_*.yaml, ...)
switch the RoI head, classification head and continual losses; real configs (configs/VOC,
configs/COCO) switch CLIP, data and sizes.
A method's keys sit together under its own node.
"""
from .config import CfgNode as CN

_C = CN()
_C.VERSION = 1  # config format version

_C.OUTPUT_DIR = "./output/default"  # where task_<t>/ folders, logs and the summary go
_C.SEED = 0  # global seed; data order, augmentation and sampling derive from it (negative = random)
_C.DETERMINISTIC = False  # torch.use_deterministic_algorithms + single-threaded data order (bit-identical CPU runs)
_C.PLUGINS = []  # python modules or .py files imported (in every worker) before building: user registrations

# ---------------------------------------------------------------------------------------------
_C.DATASETS = CN()
_C.DATASETS.TRAIN = ("shapes_train",)  # registered dataset names used for training
_C.DATASETS.TEST = ("shapes_test",)  # registered dataset names used for evaluation
_C.DATASETS.SHAPES = CN()  # the synthetic Shapes dataset (generated on first use)
_C.DATASETS.SHAPES.NUM_TRAIN = 2000  # training images generated
_C.DATASETS.SHAPES.NUM_TEST = 500  # test images generated
_C.DATASETS.SHAPES.SEED = 0  # generator seed (the dataset is a pure function of seed and counts)
_C.DATASETS.SHAPES.IMAGE_SIZE = 128  # side of the square generated images, pixels

# ---------------------------------------------------------------------------------------------
_C.CONTINUAL = CN()
_C.CONTINUAL.TASKS = "10+10"  # task string: class counts per task, e.g. 19+1, 10+5+5, 15+1x5
_C.CONTINUAL.CLASS_ORDER = []  # class names in learning order; empty = the dataset's order
_C.CONTINUAL.IMAGE_FILTER = "contains_current"  # contains_current | exclusive (drop images with other tasks' classes)
_C.CONTINUAL.TRAIN_TASKS = 0  # train only the first N tasks (0 = all); later classes are evaluated zero-shot
_C.CONTINUAL.TEACHER = "auto"  # keep the previous task's frozen model: auto (if a loss needs it) | always | never

# ---------------------------------------------------------------------------------------------
_C.INPUT = CN()
_C.INPUT.IMAGE_SIZE = 128  # images are resized (long side) and padded to a square of this side
_C.INPUT.SCALE_JITTER = (1.0, 1.0)  # training scale range (large-scale jitter); crop/pad back to IMAGE_SIZE
_C.INPUT.RANDOM_FLIP = "horizontal"  # horizontal | none
_C.INPUT.MIN_BOX_SIZE = 1.0  # boxes smaller than this (pixels, after augmentation) are dropped

_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = 0  # data loading worker processes (0 = in the main process)
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True  # drop training images without a labelled box of the task

# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.META_ARCHITECTURE = "FViT"  # META_ARCH_REGISTRY entry
_C.MODEL.DEVICE = "auto"  # auto (cuda if available) | cpu | cuda
_C.MODEL.WEIGHTS = ""  # checkpoint to initialise the detector from (not CLIP weights)
_C.MODEL.PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation mean (RGB, 0..1)
_C.MODEL.PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)  # CLIP normalisation std (RGB, 0..1)

_C.MODEL.CLIP = CN()  # the frozen open_clip model
_C.MODEL.CLIP.ARCH = "shapes-tiny"  # open_clip architecture name (e.g. ViT-B-16-quickgelu) or our shapes-tiny
_C.MODEL.CLIP.PRETRAINED = "shapes-tiny"  # open_clip tag, a local checkpoint path, shapes-tiny (built and cached), or "" (random)
_C.MODEL.CLIP.CACHE_DIR = ""  # where built/downloaded CLIP weights are cached ("" = $CLCL_CACHE or ~/.cache/clcl_det)
_C.MODEL.CLIP.TAP_INDICES = []  # ViT blocks (0-based) tapped for the pyramid; empty = 4 evenly spaced, last = final
_C.MODEL.CLIP.TEMPLATES = "imagenet"  # prompt templates ensembled for class text embeddings: imagenet | simple
_C.MODEL.CLIP.BACKGROUND_PROMPT = "background"  # text whose embedding is the background class

_C.MODEL.CLIP.TINY = CN()  # recipe that pretrains the shapes-tiny CLIP on Shapes image-caption pairs
_C.MODEL.CLIP.TINY.ITERS = 300  # optimisation steps
_C.MODEL.CLIP.TINY.BATCH_SIZE = 32  # images per step
_C.MODEL.CLIP.TINY.LR = 1e-3  # AdamW learning rate (cosine decay, warm-up)
_C.MODEL.CLIP.TINY.DENSE_WEIGHT = 1.0  # weight of the patch-to-text dense alignment term
_C.MODEL.CLIP.TINY.SEED = 0  # seed of the recipe (part of the cache key)
_C.MODEL.CLIP.TINY.CROP_BATCH_SIZE = 24  # object crops per step for the crop-caption contrastive term (0 = off)
_C.MODEL.CLIP.TINY.WARMUP_ITERS = 30  # linear learning-rate warm-up steps
_C.MODEL.CLIP.TINY.WEIGHT_DECAY = 0.05  # AdamW weight decay (not on norms, biases, embeddings)
_C.MODEL.CLIP.TINY.OBJECT_WEIGHT = 3.0  # weight of a patch cell fully covered by an object vs a background cell
_C.MODEL.CLIP.TINY.MAX_ZOOM = 1.5  # full images are randomly zoomed in by 1..MAX_ZOOM (and flipped)
_C.MODEL.CLIP.TINY.CROP_CONTEXT = (0.05, 0.4)  # range of context around an object crop, fraction of its side
_C.MODEL.CLIP.TINY.TEMPLATES = "imagenet"  # prompt templates of the training captions: imagenet | simple
_C.MODEL.CLIP.TINY.PROMPTS_PER_CLASS = 2  # templated prompts averaged per class embedding per step
_C.MODEL.CLIP.TINY.MIMETIC_INIT = True  # mimetic initialisation of the ViT's attention (faster learning from scratch)
_C.MODEL.CLIP.TINY.REGION_WEIGHT = 1.0  # weight of the region term: a class's mean cell response must pick the class
_C.MODEL.CLIP.TINY.DENSE_WINDOW = 0  # side (px) of the native-scale windows the dense term trains on (0 = whole images)
_C.MODEL.CLIP.TINY.TEXT_WARMUP_ITERS = 100  # text-only steps first: captions of different classes pulled apart
_C.MODEL.CLIP.TINY.TEXT_WEIGHT = 1.0  # weight of that text-only term during the joint steps
_C.MODEL.CLIP.TINY.EVAL_PERIOD = 0  # steps between quality measurements in tools/pretrain_tiny_clip.py (0 = end only)

_C.MODEL.BACKBONE = CN()
_C.MODEL.BACKBONE.NAME = "CLIPViTBackbone"  # BACKBONE_REGISTRY entry
_C.MODEL.BACKBONE.SCALES = (2.0, 1.0, 0.5, 0.25)  # simple-pyramid scale per CLIP tap (F-ViT: 4, 2, 1, 0.5)
_C.MODEL.BACKBONE.NORM = "LN"  # norm inside the simple pyramid's 4x upsampler: LN | GN | none

_C.MODEL.FPN = CN()
_C.MODEL.FPN.OUT_CHANNELS = 64  # FPN width (256 in the real configs)
_C.MODEL.FPN.NORM = ""  # norm inside the FPN convs: "" | GN

_C.MODEL.PROPOSAL_GENERATOR = CN()
_C.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"  # PROPOSAL_GENERATOR_REGISTRY entry

_C.MODEL.ANCHOR_GENERATOR = CN()
_C.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]  # one list per pyramid level (stride order)
_C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]  # height/width ratios (one list for all levels)

_C.MODEL.RPN = CN()
_C.MODEL.RPN.IOU_THRESHOLDS = (0.3, 0.7)  # below: background, above: foreground
_C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256  # anchors sampled per image for the loss
_C.MODEL.RPN.POSITIVE_FRACTION = 0.5  # fraction of positives among sampled anchors
_C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 600  # proposals kept per level before NMS, training (2000 at 640 px)
_C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 300  # proposals kept per image after NMS, training (1000 at 640 px)
_C.MODEL.RPN.PRE_NMS_TOPK_TEST = 300  # proposals kept per level before NMS, testing (1000 at 640 px)
_C.MODEL.RPN.POST_NMS_TOPK_TEST = 150  # proposals kept per image after NMS, testing (1000 at 640 px)
_C.MODEL.RPN.NMS_THRESH = 0.7  # NMS IoU between proposals
_C.MODEL.RPN.LOSS_WEIGHT = 1.0  # weight of objectness + box regression losses

_C.MODEL.ROI_HEADS = CN()
_C.MODEL.ROI_HEADS.NAME = "FViTRoIHeads"  # ROI_HEADS_REGISTRY entry (MultiExpertRoIHeads for CL-CLIP)
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64  # RoIs sampled per image (512 in the real configs)
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25  # fraction of foreground RoIs
_C.MODEL.ROI_HEADS.IOU_THRESHOLD = 0.5  # IoU for a proposal to be foreground
_C.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = True  # add ground-truth boxes to the proposals in training
_C.MODEL.ROI_HEADS.UNBIASED_BACKGROUND = False  # task t>1: a background RoI is trained towards "background or an old class" (MMA)
_C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.01  # minimum score of a detection
_C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5  # per-class NMS IoU at inference
_C.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE = 100  # detections kept per image
_C.MODEL.ROI_HEADS.TOPK_CANDIDATES_TEST = 1000  # best-scoring (box, class) candidates per image entering NMS

_C.MODEL.ROI_BOX_HEAD = CN()  # the shared F-ViT box head (RoIAlign -> convs -> fcs -> embedding)
_C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7  # RoIAlign output side
_C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 2  # RoIAlign sampling points per bin (0 = adaptive)
_C.MODEL.ROI_BOX_HEAD.NUM_CONV = 4  # 3x3 convs on the pooled feature
_C.MODEL.ROI_BOX_HEAD.CONV_DIM = 64  # their channels (256 in the real configs)
_C.MODEL.ROI_BOX_HEAD.NUM_FC = 2  # fully connected layers after the convs
_C.MODEL.ROI_BOX_HEAD.FC_DIM = 256  # their width (1024 in the real configs)
_C.MODEL.ROI_BOX_HEAD.NORM = "GN"  # norm after each conv: GN | none
_C.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # inverse target stds (0.1, 0.1, 0.2, 0.2)
_C.MODEL.ROI_BOX_HEAD.BBOX_LOSS = "smooth_l1"  # smooth_l1 | l1 | giou
_C.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0  # beta of the smooth L1 loss (0 = L1)

_C.MODEL.CLS_HEAD = CN()  # classification head on RoI embeddings
_C.MODEL.CLS_HEAD.NAME = "TextClassifier"  # CLS_HEAD_REGISTRY entry
_C.MODEL.CLS_HEAD.TEMPERATURE = 50.0  # initial logit scale tau of tau*cos(x, t_k)
_C.MODEL.CLS_HEAD.LEARN_TEMPERATURE = True  # learn tau
_C.MODEL.CLS_HEAD.LEARN_BACKGROUND = False  # learn the background embedding (initialised from its text)
_C.MODEL.CLS_HEAD.LOSS_WEIGHT = 1.0  # weight of the classification loss

_C.MODEL.ENSEMBLE = CN()  # F-ViT inference ensemble p = p_det^(1-a) * p_clip^a
_C.MODEL.ENSEMBLE.ENABLED = True  # use the ensemble at inference
_C.MODEL.ENSEMBLE.ALPHA = 0.3  # weight a of the CLIP score
_C.MODEL.ENSEMBLE.CLIP_TEMPERATURE = 100.0  # logit scale of the RoI-pooled dense CLIP score

_C.MODEL.COST_VOLUME = CN()  # CL-CLIP: dense V.T^T cosine volume and its prior
_C.MODEL.COST_VOLUME.TEMPERATURE = 0.01  # prior = softmax_k(C / T)
_C.MODEL.COST_VOLUME.NORM = "softmax"  # softmax | sigmoid | none
_C.MODEL.COST_VOLUME.ENABLED = True  # off = uniform prior (ablation "no cost volume")

_C.MODEL.MULTI_EXPERT = CN()  # CL-CLIP: per-category expert RoI head
_C.MODEL.MULTI_EXPERT.GATING = "residual"  # residual f*(1+g*m) | multiply f*m | concat [f, m]
_C.MODEL.MULTI_EXPERT.GAMMA = 1.0  # g of the residual gating
_C.MODEL.MULTI_EXPERT.TOPK = 0  # classes kept per RoI by mean prior (0 = all)
_C.MODEL.MULTI_EXPERT.EXPERT_DIM = 16  # channels of each expert's convs
_C.MODEL.MULTI_EXPERT.FREEZE = True  # freeze a task's experts at its end (off = ablation)
_C.MODEL.MULTI_EXPERT.SHARED_CLASS_LOGITS = False  # add the shared branch's class logits to the experts' (on in configs/Base-CLCLIP.yaml)

_C.MODEL.CLCLIP = CN()  # CL-CLIP continual terms
_C.MODEL.CLCLIP.BG_IGNORE_THRESH = 0.5  # drop background RoIs whose old-class prior exceeds this (>1 = off)
_C.MODEL.CLCLIP.ORTH_WEIGHT = 0.1  # weight of the orthogonality loss
_C.MODEL.CLCLIP.DRIFT = CN()
_C.MODEL.CLCLIP.DRIFT.MODE = "feature"  # feature (pyramid outputs vs teacher) | param (||theta - theta_prev||^2)
_C.MODEL.CLCLIP.DRIFT.WEIGHT = 1.0  # weight of the drift loss

_C.MODEL.CONTINUAL_LOSSES = []  # CONTINUAL_LOSS_REGISTRY entries added to the loss (CL-CLIP: FPNDrift, Orthogonality)

_C.MODEL.DISTILL = CN()  # FasterILODDistill: the Faster ILOD baseline's three distillation terms
_C.MODEL.DISTILL.FEATURE_WEIGHT = 1.0  # weight of the FPN feature term (L1 on mean-subtracted maps where teacher > student)
_C.MODEL.DISTILL.RPN_WEIGHT = 1.0  # weight of the RPN term (objectness where teacher > student, L2, + box deltas)
_C.MODEL.DISTILL.RPN_BOX_THRESHOLD = 0.1  # RPN box deltas distilled where teacher objectness exceeds the student's by more
_C.MODEL.DISTILL.ROI_WEIGHT = 1.0  # weight of the RoI term (L2 on centred [old, bg] logits + box deltas, teacher's proposals)
_C.MODEL.DISTILL.ROI_TOP = 128  # the RoI term samples from the teacher's this many best proposals per image
_C.MODEL.DISTILL.ROI_SAMPLES = 64  # proposals per image drawn from those for the RoI term

_C.MODEL.UNBIASED_DISTILL = CN()  # UnbiasedDistill: RPN + KL on [old, background], new classes counted as background
_C.MODEL.UNBIASED_DISTILL.RPN_WEIGHT = 1.0  # weight of RPN objectness/delta distillation (0 = off)
_C.MODEL.UNBIASED_DISTILL.ROI_WEIGHT = 0.5  # weight of the unbiased RoI logit KL (Shapes: 1.0 and 0.25 in MODEL_ZOO.md)
_C.MODEL.UNBIASED_DISTILL.TEMPERATURE = 1.0  # softmax temperature T of the KL (scaled by T^2)

# ---------------------------------------------------------------------------------------------
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = "AdamW"  # AdamW | SGD
_C.SOLVER.BASE_LR = 2e-4  # learning rate at IMS_PER_BATCH (scaled linearly if REFERENCE_BATCH > 0)
_C.SOLVER.REFERENCE_BATCH = 0  # batch BASE_LR was tuned for; >0 scales the lr by IMS_PER_BATCH/REFERENCE_BATCH
_C.SOLVER.MOMENTUM = 0.9  # SGD momentum
_C.SOLVER.BETAS = (0.9, 0.999)  # AdamW betas
_C.SOLVER.WEIGHT_DECAY = 0.1  # weight decay
_C.SOLVER.IMS_PER_BATCH = 8  # total images per iteration over all processes
_C.SOLVER.MAX_ITER = 1000  # iterations per task
_C.SOLVER.LR_SCHEDULER = "cosine"  # cosine | multistep | constant
_C.SOLVER.STEPS = (0.67, 0.89)  # multistep milestones as fractions of MAX_ITER
_C.SOLVER.GAMMA = 0.1  # multistep decay factor
_C.SOLVER.WARMUP_ITERS = 50  # linear warm-up iterations
_C.SOLVER.WARMUP_FACTOR = 0.01  # lr factor at iteration 0 of the warm-up
_C.SOLVER.CLIP_GRAD_NORM = 1.0  # max gradient norm (<= 0 disables)
_C.SOLVER.AMP = True  # mixed precision on CUDA (ignored on CPU)
_C.SOLVER.CHECKPOINT_PERIOD = 500  # iterations between periodic checkpoints
_C.SOLVER.LOG_PERIOD = 20  # iterations between log lines

# ---------------------------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.AP_METHOD = "voc07"  # headline VOC AP definition: voc07 (11-point) | area; both are computed
_C.TEST.ZERO_SHOT = True  # also evaluate not-yet-learned classes zero-shot after each task
_C.TEST.IMS_PER_BATCH = 8  # images per inference batch per process
_C.TEST.EVAL_PERIOD = 0  # evaluate every N iterations inside a task (0 = only at task end)

# ---------------------------------------------------------------------------------------------
# Classification heads and losses of METHOD.md section 4 (SPA, Gaussian replay, SECA)

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
_C.MODEL.SPA.PAIRS_PER_CALL = 0  # (RoI, class) pairs per batched OT call (0 = ~32M gathered elements; raise on a GPU)
_C.MODEL.SPA.TASK_PROJECTORS = True  # one Linear(D, D) per task on the frozen CLIP patches/region feature (zero-init residual, frozen after its task)
_C.MODEL.SPA.COMBINE = "sum"  # SPA logits with the detector's: sum | ensemble ((1-w) log-softmax det + w log-softmax SPA)
_C.MODEL.SPA.ENSEMBLE_WEIGHT = 0.5  # w of COMBINE ensemble

_C.MODEL.REPLAY = CN()  # GaussianReplay: per-class Gaussian statistics (box-head output, or frozen CLIP features for SPA), replayed later
_C.MODEL.REPLAY.INNER_HEAD = "TextClassifier"  # CLS_HEAD_REGISTRY entry that classifies real and replayed features
_C.MODEL.REPLAY.COV = "full"  # covariance per class: full | diagonal | shared (one pooled covariance)
_C.MODEL.REPLAY.SHRINKAGE = 1e-4  # added to the covariance's diagonal (s * I)
_C.MODEL.REPLAY.SAMPLES_PER_CLASS = 8  # pseudo-features drawn per old class per iteration
_C.MODEL.REPLAY.WEIGHT = 1.0  # weight of the replay classification loss

_C.MODEL.SEVPR = CN()  # SemanticPrototypeHead (SECA SE-VPR): text-refined visual prototypes
_C.MODEL.SEVPR.PROTO_WEIGHT = 0.5  # logit = tau * ((1 - w) cos(x, t_c) + w cos(x, refined prototype))
_C.MODEL.SEVPR.PROTO_LOSS_WEIGHT = 1.0  # weight of CE(tau cos(z_r, refined prototypes)) over the current task's classes
_C.MODEL.SEVPR.REG_WEIGHT = 1.0  # weight of mean_old (1 - cos(refined prototype at its task's end, now)); 0 = no continual part

_C.MODEL.SGAKT = CN()  # SGAKTDistill (SECA SG-AKT): distillation from an aggregated pool of feature-path snapshots
_C.MODEL.SGAKT.TEMPERATURE = 20.0  # KL on softmax(T * cos(., t_c)) over the current task's classes (no T^2 factor)
_C.MODEL.SGAKT.WEIGHT = 1.0  # KL weight, multiplied by the task index (0 in the first task)
_C.MODEL.SGAKT.POOL_SIZE = 5  # snapshots kept at most; when full the least relevant is replaced
_C.MODEL.SGAKT.MOMENTUM = 0.5  # EMA momentum of each snapshot's accumulated relevance
_C.MODEL.SGAKT.AGG_WEIGHT = 1.0  # weight of the aggregator's CE (its only training signal)
_C.MODEL.SGAKT.AGG_SCALE = 50.0  # logit scale of that CE's cosine classifier

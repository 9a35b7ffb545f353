"""Every config key, with its default and a one-line comment.

The defaults are the *embedded default*: the F-ViT baseline on Shapes 10+10 with the project's
tiny CLIP, small enough to train on two CPU cores. Method configs (configs/<method>/) switch the
RoI head, classification head and continual losses; the VOC and COCO ones (configs/_base_/Base-VOC,
Base-COCO, Base-FViT-B16) switch CLIP, data and sizes.
This file holds the framework's keys only. A method declares its keys next to its code, in an
`add_<method>_config(cfg)` function registered with `@register_config` (e.g. CL-CLIP's, all under
MODEL.CLCLIP, in clcl_det/modeling/roi_heads/config.py); `get_cfg()` adds every registered
method's keys to a copy of these defaults.
"""
from .config import CfgNode as CN

_C = CN()
_C.VERSION = 1  # config format version

_C.OUTPUT_DIR = "./output/default"  # where task_<t>/ folders, logs and the summary go
_C.SEED = 0  # global seed; every random stream derives from it (utils/seed.py); negative = one random seed, logged
_C.DETERMINISTIC = False  # torch.use_deterministic_algorithms + single-threaded data order (bit-identical CPU runs)
_C.PLUGINS = []  # python modules or .py files imported (in every worker) before building: user registrations
_C.HOOKS = ["TensorBoardWriter"]  # HOOK_REGISTRY entries the trainer runs (clcl_det/engine/hooks.py); plugins register more

# ---------------------------------------------------------------------------------------------
_C.DATASETS = CN()
_C.DATASETS.TRAIN = ("shapes_train",)  # registered dataset names used for training
_C.DATASETS.TEST = ("shapes_test",)  # registered dataset names used for evaluation
_C.DATASETS.SHAPES = CN()  # the synthetic Shapes dataset (generated on first use)
_C.DATASETS.SHAPES.NUM_TRAIN = 2000  # training images generated
_C.DATASETS.SHAPES.NUM_TEST = 500  # test images generated
_C.DATASETS.SHAPES.SEED = 0  # generator seed (the dataset is a pure function of seed and counts)
_C.DATASETS.SHAPES.IMAGE_SIZE = 128  # side of the square generated images, pixels
_C.DATASETS.SHAPES.NUM_VAL = 500  # validation images (shapes_val: tuned values are chosen on it, never on shapes_test)
_C.DATASETS.SHAPES.VAL_SEED = 1000  # generator seed of shapes_val (must differ from SEED: its images are disjoint from train/test)

# ---------------------------------------------------------------------------------------------
_C.CONTINUAL = CN()
_C.CONTINUAL.TASKS = "10+10"  # task string: class counts per task, e.g. 19+1, 10+5+5, 15+1x5
_C.CONTINUAL.CLASS_ORDER = []  # class names in learning order; empty = the dataset's order
_C.CONTINUAL.IMAGE_FILTER = "contains_current"  # contains_current | exclusive (drop images with other tasks' classes) | non_cooccurrence (IOR: task t>1 drops images with earlier tasks' classes)
_C.CONTINUAL.TRAIN_TASKS = 0  # train only the first N tasks (0 = all); later classes are evaluated zero-shot
_C.CONTINUAL.START_TASK = 0  # first task to train (1-based) when MODEL.WEIGHTS holds task START_TASK-1's model; 0 = the task after MODEL.WEIGHTS' (or 1)
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
_C.MODEL.WEIGHTS = ""  # detector checkpoint (a task_<t>/model_final.pth): --eval-only evaluates it; training starts after its task (CONTINUAL.START_TASK)
_C.MODEL.PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation mean (RGB, 0..1)
_C.MODEL.PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)  # CLIP normalisation std (RGB, 0..1)

_C.MODEL.CLIP = CN()  # the frozen open_clip model
_C.MODEL.CLIP.ARCH = "shapes-tiny"  # open_clip architecture name (e.g. ViT-B-16-quickgelu) or our shapes-tiny
_C.MODEL.CLIP.PRETRAINED = "shapes-tiny"  # open_clip tag, a local checkpoint path, shapes-tiny (built and cached), or "" (random)
_C.MODEL.CLIP.CACHE_DIR = ""  # where built/downloaded CLIP weights are cached ("" = $CLCL_CACHE or ~/.cache/clcl_det)
_C.MODEL.CLIP.TAP_INDICES = []  # ViT blocks (0-based) tapped for the pyramid; empty = 4 evenly spaced, last = final
_C.MODEL.CLIP.TEMPLATES = "imagenet"  # prompt templates ensembled for class text embeddings: imagenet | simple
_C.MODEL.CLIP.BACKGROUND_PROMPT = "background"  # text whose embedding is the background class
_C.MODEL.CLIP.FEATURE_CACHE_MB = 0  # keep the frozen CLIP's outputs of up to this many MB of images, keyed by each image's bytes, and reuse them when the same image comes again (0 = off)

# MODEL.CLIP.TINY (the recipe of the shapes-tiny CLIP) is declared by clcl_det/embedded/config.py

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
_C.MODEL.RPN.FREEZE_AFTER_FIRST_TASK = False  # freeze the RPN at the first task's end: later tasks keep its proposals and add no RPN loss (through frozen layers it would only teach the FPN to call unlabelled old objects background)

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

_C.MODEL.CONTINUAL_LOSSES = []  # CONTINUAL_LOSS_REGISTRY entries added to the loss (CL-CLIP: FPNDrift, Orthogonality)

# ---------------------------------------------------------------------------------------------
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = "AdamW"  # AdamW | SGD
_C.SOLVER.BASE_LR = 2e-4  # learning rate at IMS_PER_BATCH (scaled linearly if REFERENCE_BATCH > 0)
_C.SOLVER.REFERENCE_BATCH = 0  # batch BASE_LR was tuned for; >0 scales the lr by IMS_PER_BATCH/REFERENCE_BATCH
_C.SOLVER.MOMENTUM = 0.9  # SGD momentum
_C.SOLVER.BETAS = (0.9, 0.999)  # AdamW betas
_C.SOLVER.WEIGHT_DECAY = 0.1  # weight decay
_C.SOLVER.IMS_PER_BATCH = 8  # total images per iteration over all processes
_C.SOLVER.MAX_ITER = 1000  # iterations per task (with EPOCHS > 0: the reference length WARMUP_ITERS / STEPS are given at)
_C.SOLVER.EPOCHS = 0.0  # per-task budget in epochs of the task's images: ceil(EPOCHS * images / IMS_PER_BATCH) iterations (0 = MAX_ITER)
_C.SOLVER.LR_SCHEDULER = "cosine"  # cosine | multistep | constant
_C.SOLVER.STEPS = (0.67, 0.89)  # multistep milestones as fractions of MAX_ITER
_C.SOLVER.GAMMA = 0.1  # multistep decay factor
_C.SOLVER.WARMUP_ITERS = 50  # linear warm-up iterations
_C.SOLVER.WARMUP_FACTOR = 0.01  # lr factor at iteration 0 of the warm-up
_C.SOLVER.CLIP_GRAD_NORM = 1.0  # max gradient norm (<= 0 disables)
_C.SOLVER.AMP = True  # mixed precision: on CUDA; on CPU only with AMP_DTYPE bfloat16 (float16 is ignored there)
_C.SOLVER.AMP_DTYPE = "float16"  # autocast dtype: float16 (with a GradScaler) | bfloat16 (no scaler; CUDA or CPU)
_C.SOLVER.ACCUM_STEPS = 1  # gradient accumulation: each iteration = ACCUM_STEPS micro-batches of IMS_PER_BATCH/ACCUM_STEPS images
_C.SOLVER.SCALE_SCHEDULE = False  # with REFERENCE_BATCH > 0 also divide MAX_ITER, WARMUP_ITERS, absolute STEPS and CHECKPOINT_PERIOD / EVAL_PERIOD by IMS_PER_BATCH/REFERENCE_BATCH (detectron2 auto_scale_workers)
_C.SOLVER.FIND_UNUSED_PARAMETERS = "auto"  # DDP find_unused_parameters: auto (on if a probe iteration leaves a trainable parameter without gradient) | on | off
_C.SOLVER.CHECKPOINT_PERIOD = 500  # iterations between periodic checkpoints
_C.SOLVER.LOG_PERIOD = 20  # iterations between log lines

# ---------------------------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.AP_METHOD = "voc07"  # headline VOC AP definition: voc07 (11-point) | area; both are computed
_C.TEST.ZERO_SHOT = True  # also evaluate not-yet-learned classes zero-shot after each task
_C.TEST.IMS_PER_BATCH = 8  # images per inference batch per process
_C.TEST.AMP = True  # evaluate under the training autocast (SOLVER.AMP / AMP_DTYPE, same device rule) when training uses it
_C.TEST.EVAL_PERIOD = 0  # also evaluate the seen classes every N iterations inside a task, into task_<t>/eval_iter_<n>/ (0 = only at task end)

"""The keys of the embedded datasets' generated Clutter set (`DATASETS.CLUTTER`) and of the tiny-CLIP
recipe (`MODEL.CLIP.TINY`), declared next to their code."""
from __future__ import annotations

from ..config import CfgNode as CN
from ..config import register_config

__all__ = ["add_embedded_config"]


@register_config
def add_embedded_config(cfg: CN) -> None:
    """Declare `DATASETS.CLUTTER` (the Clutter dataset) and `MODEL.CLIP.TINY` (the recipe that
    pretrains the shapes-tiny CLIP)."""
    _C = cfg
    _C.DATASETS.CLUTTER = CN()  # the synthetic crowded COCO-format Clutter dataset (generated on first use)
    _C.DATASETS.CLUTTER.NUM_TRAIN = 2000  # training images generated
    _C.DATASETS.CLUTTER.NUM_VAL = 500  # validation images (clutter_val: tuned values are chosen on it)
    _C.DATASETS.CLUTTER.NUM_TEST = 500  # test images generated
    _C.DATASETS.CLUTTER.SEED = 0  # generator seed (the dataset is a pure function of seed, counts and size)
    _C.DATASETS.CLUTTER.IMAGE_SIZE = 128  # side of the square generated images, pixels
    _C.MODEL.CLIP.TINY = CN()  # recipe that pretrains the shapes-tiny CLIP on an embedded dataset's images and class names
    _C.MODEL.CLIP.TINY.DATASET = "shapes"  # the embedded dataset it trains on (its train split): shapes | clutter
    _C.MODEL.CLIP.TINY.ITERS = 180  # optimisation steps
    _C.MODEL.CLIP.TINY.BATCH_SIZE = 24  # images per step
    _C.MODEL.CLIP.TINY.LR = 1.5e-3  # AdamW learning rate (cosine decay, warm-up)
    _C.MODEL.CLIP.TINY.DENSE_WEIGHT = 1.0  # weight of the patch-to-text dense alignment term
    _C.MODEL.CLIP.TINY.SEED = 0  # seed of the recipe (part of the cache key)
    _C.MODEL.CLIP.TINY.CROP_BATCH_SIZE = 12  # object crops per step for the crop-caption contrastive term (0 = off)
    _C.MODEL.CLIP.TINY.WARMUP_ITERS = 20  # linear learning-rate warm-up steps
    _C.MODEL.CLIP.TINY.WEIGHT_DECAY = 0.05  # AdamW weight decay (not on norms, biases, embeddings)
    _C.MODEL.CLIP.TINY.OBJECT_WEIGHT = 3.0  # weight of a patch cell fully covered by an object vs a background cell
    _C.MODEL.CLIP.TINY.MAX_ZOOM = 1.5  # full images are randomly zoomed in by 1..MAX_ZOOM (and flipped)
    _C.MODEL.CLIP.TINY.CROP_SIZE = 0  # side (px) the object crops are resized to (0 = the CLIP input size)
    _C.MODEL.CLIP.TINY.CROP_CONTEXT = (0.05, 0.4)  # range of context around an object crop, fraction of its side
    _C.MODEL.CLIP.TINY.TEMPLATES = "imagenet"  # prompt templates of the training captions: imagenet | simple
    _C.MODEL.CLIP.TINY.PROMPTS_PER_CLASS = 2  # templated prompts averaged per class embedding per step
    _C.MODEL.CLIP.TINY.MIMETIC_INIT = True  # mimetic initialisation of the ViT's attention (faster learning from scratch)
    _C.MODEL.CLIP.TINY.REGION_WEIGHT = 1.0  # weight of the region term: a class's mean cell response must pick the class
    _C.MODEL.CLIP.TINY.DENSE_WINDOW = 0  # side (px) of the native-scale windows the dense term trains on (0 = whole images)
    _C.MODEL.CLIP.TINY.TEXT_WARMUP_ITERS = 50  # text-only steps first: captions of different classes pulled apart
    _C.MODEL.CLIP.TINY.TEXT_WEIGHT = 1.0  # weight of that text-only term during the joint steps
    _C.MODEL.CLIP.TINY.EVAL_PERIOD = 0  # steps between quality measurements in tools/pretrain_tiny_clip.py (0 = end only)

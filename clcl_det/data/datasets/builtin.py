"""Registered names of the builtin datasets; their root is $CLCL_DATASETS (default ./datasets),
read when a dataset is loaded, so the variable can be set after import."""
from __future__ import annotations

import os

from ..catalog import DatasetCatalog, MetadataCatalog
from .coco import load_coco_json
from .root import datasets_root
from .voc import VOC_CLASSES, load_voc_instances, text_names

__all__ = ["datasets_root", "COCO_CLASSES", "register_all_builtin"]

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

_VOC = {  # name: (folder, split, year)
    "voc_2007_trainval": ("VOC2007", "trainval", 2007),
    "voc_2007_test": ("VOC2007", "test", 2007),
    "voc_2012_trainval": ("VOC2012", "trainval", 2012),
}
_COCO = {  # name: (images folder, annotation json)
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}


def register_all_builtin() -> None:
    """Register VOC 2007/2012 and COCO 2017 under their builtin names (idempotent)."""
    for name, (folder, split, year) in _VOC.items():
        if name in DatasetCatalog:
            continue
        DatasetCatalog.register(
            name, lambda folder=folder, split=split: load_voc_instances(
                os.path.join(datasets_root(), folder), split, VOC_CLASSES))
        MetadataCatalog.get(name).set(thing_classes=list(VOC_CLASSES), dirname=folder, split=split, year=year,
                                      evaluator_type="pascal_voc", text_names=text_names(VOC_CLASSES))
    for name, (images, ann) in _COCO.items():
        if name in DatasetCatalog:
            continue
        DatasetCatalog.register(
            name, lambda images=images, ann=ann: load_coco_json(
                os.path.join(datasets_root(), ann), os.path.join(datasets_root(), images), list(COCO_CLASSES)))
        MetadataCatalog.get(name).set(thing_classes=list(COCO_CLASSES), evaluator_type="coco")


register_all_builtin()

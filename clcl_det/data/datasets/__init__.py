"""Dataset loaders; importing this package registers the builtin datasets (the embedded Shapes
dataset is registered by `clcl_det.embedded`)."""
from . import builtin  # noqa: F401  (registration)
from .builtin import COCO_CLASSES, datasets_root
from .coco import load_coco_json, register_coco_instances
from .voc import VOC_CLASSES, DatasetMissingError, load_voc_instances, register_pascal_voc

__all__ = [
    "COCO_CLASSES", "VOC_CLASSES", "DatasetMissingError", "datasets_root", "load_coco_json",
    "load_voc_instances", "register_coco_instances", "register_pascal_voc",
]

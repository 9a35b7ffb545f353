"""Dataset loaders; importing this package registers the builtin datasets and Shapes."""
from . import builtin, shapes  # noqa: F401  (registration)
from .builtin import COCO_CLASSES, datasets_root
from .coco import load_coco_json, register_coco_instances
from .voc import VOC_CLASSES, DatasetMissingError, load_voc_instances, register_pascal_voc



def configure_datasets(cfg) -> None:
    """Apply dataset keys of cfg that registered loaders read (the Shapes spec)."""
    shapes.configure_shapes(shapes.ShapesSpec.from_cfg(cfg))


__all__ = [
    "configure_datasets",
    "COCO_CLASSES", "VOC_CLASSES", "DatasetMissingError", "datasets_root", "load_coco_json",
    "load_voc_instances", "register_coco_instances", "register_pascal_voc",
]

"""Data: catalogs, dataset loaders, the continual split, the mapper and the loaders."""
from . import datasets  # noqa: F401  (registers builtin datasets and Shapes)
from .build import build_test_loader, build_train_loader, get_detection_dataset_dicts
from .catalog import BoxMode, DatasetCatalog, Metadata, MetadataCatalog
from .continual import ContinualSplit, SplitError, Task, build_continual_split, parse_task_string
from .mapper import DatasetMapper, ImageReadError, read_image

__all__ = [
    "BoxMode", "ContinualSplit", "DatasetCatalog", "DatasetMapper", "ImageReadError", "Metadata",
    "MetadataCatalog", "SplitError", "Task", "build_continual_split", "build_test_loader",
    "build_train_loader", "get_detection_dataset_dicts", "parse_task_string", "read_image",
]

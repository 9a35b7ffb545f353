"""PASCAL VOC layout (JPEGImages/, Annotations/, ImageSets/Main/<split>.txt) -> dataset dicts."""
from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Sequence

from ..catalog import BoxMode, DatasetCatalog, MetadataCatalog
from ...utils.errors import UserError
from .root import datasets_root

__all__ = ["VOC_CLASSES", "VOC_TEXT_NAMES", "load_voc_instances", "register_pascal_voc", "DatasetMissingError"]

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

# What the CLIP text encoder reads for a VOC class: natural language ("diningtable" would
# tokenise as din/ing/table). Dataset names, files and per-class tables keep the VOC spelling.
VOC_TEXT_NAMES = {
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
}


def text_names(class_names: Sequence[str]) -> Dict[str, str]:
    """The `text_names` metadata of a dataset: class name -> words given to the text encoder."""
    return {c: VOC_TEXT_NAMES.get(c, c) for c in class_names}


class DatasetMissingError(UserError, FileNotFoundError):
    """A dataset directory or index file is not where the catalog expects it."""


def _missing(path: str, what: str) -> DatasetMissingError:
    return DatasetMissingError(
        f"{what} not found at '{path}'. Place the data under $CLCL_DATASETS (now "
        f"'{datasets_root()}') as described in datasets/README.md, "
        f"or set CLCL_DATASETS to the folder that holds it"
    )


def load_voc_instances(dirname: str, split: str, class_names: Sequence[str]) -> List[Dict[str, Any]]:
    """Dataset dicts of a VOC-layout folder. `difficult` objects are kept (flagged) for evaluation.

    Unreadable XML files and objects of unknown classes are skipped with a warning that names the
    file; the counts are logged at the end.
    """
    index = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isdir(dirname):
        raise _missing(dirname, "Dataset directory")
    if not os.path.isfile(index):
        raise _missing(index, f"Image list of split '{split}'")
    with open(index) as f:
        ids = [line.strip() for line in f if line.strip()]
    class_to_id = {c: i for i, c in enumerate(class_names)}
    dicts: List[Dict[str, Any]] = []
    bad_files: List[str] = []
    unknown: Dict[str, int] = {}
    bad_boxes = 0
    for img_id in ids:
        anno_file = os.path.join(dirname, "Annotations", f"{img_id}.xml")
        try:
            tree = ET.parse(anno_file)
            size = tree.find("size")
            height, width = int(size.find("height").text), int(size.find("width").text)
            if height <= 0 or width <= 0:
                raise ValueError(f"image size {width} x {height}")
        except (ET.ParseError, OSError, AttributeError, TypeError, ValueError, RecursionError) as e:
            logger.warning(f"skipping {anno_file}: unreadable annotation ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})")
            bad_files.append(anno_file)
            continue
        annos = []
        for obj in tree.findall("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in class_to_id:
                unknown[name] = unknown.get(name, 0) + 1
                if unknown[name] == 1:
                    logger.warning(f"{anno_file}: object of unknown class '{name}' skipped")
                continue
            try:
                bb = obj.find("bndbox")
                box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                if not all(map(math.isfinite, box)):
                    raise ValueError(f"non-finite coordinate in {box}")
                difficult = int(obj.findtext("difficult") or 0)
            except (AttributeError, TypeError, ValueError):
                bad_boxes += 1
                if bad_boxes == 1:
                    logger.warning(f"{anno_file}: object '{name}' without a valid bndbox / difficult flag skipped")
                continue
            box[0] -= 1.0  # VOC pixel indices are 1-based
            box[1] -= 1.0
            annos.append({
                "bbox": box,
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": class_to_id[name],
                "difficult": difficult,
            })
        dicts.append({
            "file_name": os.path.join(dirname, "JPEGImages", f"{img_id}.jpg"),
            "image_id": img_id,
            "height": height,
            "width": width,
            "annotations": annos,
        })
    if bad_files:
        logger.warning(f"{dirname} [{split}]: skipped {len(bad_files)} image(s) with unreadable annotations")
    if unknown:
        logger.warning(f"{dirname} [{split}]: skipped objects of unknown classes: {unknown}")
    if bad_boxes:
        logger.warning(f"{dirname} [{split}]: skipped {bad_boxes} object(s) without a valid bndbox / difficult flag")
    return dicts


def register_pascal_voc(name: str, dirname: str, split: str, year: int,
                        class_names: Sequence[str] = VOC_CLASSES) -> None:
    """Register a VOC-layout split under `name`."""
    DatasetCatalog.register(name, lambda: load_voc_instances(dirname, split, class_names))
    MetadataCatalog.get(name).set(
        thing_classes=list(class_names), dirname=dirname, year=year, split=split, evaluator_type="pascal_voc",
        text_names=text_names(class_names),
    )

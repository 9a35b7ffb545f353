"""COCO-format json -> dataset dicts (contiguous category ids in category-id order)."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

from ..catalog import BoxMode, DatasetCatalog, MetadataCatalog
from .voc import DatasetMissingError

__all__ = ["load_coco_json", "register_coco_instances", "COCOFormatError"]

logger = logging.getLogger(__name__)


class COCOFormatError(ValueError):
    """A COCO json lacks a required key or holds a malformed entry."""


def _require(entry: Dict[str, Any], keys: Sequence[str], what: str, json_file: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise COCOFormatError(f"{json_file}: {what} {entry.get('id', '?')} lacks key(s) {missing}")


def load_coco_json(json_file: str, image_root: str, class_names: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Dataset dicts of a COCO instances json; crowd boxes are kept with `iscrowd=1`.

    Category ids become contiguous indices in category-id order; if `class_names` is given, the
    json's category names must match it (it is the metadata written at registration).
    """
    if not os.path.isfile(json_file):
        raise DatasetMissingError(
            f"COCO annotation file not found at '{json_file}'. Place COCO under $CLCL_DATASETS/coco "
            f"(see datasets/README.md) or set CLCL_DATASETS"
        )
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise COCOFormatError(f"{json_file} is not valid json: {e}") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise COCOFormatError(f"{json_file} lacks the top-level key '{key}'")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    for c in cats:
        _require(c, ("id", "name"), "category", json_file)
    names = [c["name"] for c in cats]
    if class_names is not None and list(class_names) != names:
        raise COCOFormatError(f"{json_file}: categories {names[:5]}... differ from the registered classes")
    cat_to_contiguous = {c["id"]: i for i, c in enumerate(cats)}

    per_image: Dict[Any, List[Dict[str, Any]]] = {}
    skipped = 0
    for a in data["annotations"]:
        _require(a, ("image_id", "bbox", "category_id"), "annotation", json_file)
        x, y, w, h = a["bbox"]
        if a["category_id"] not in cat_to_contiguous:
            raise COCOFormatError(f"{json_file}: annotation {a.get('id', '?')} has unknown category_id {a['category_id']}")
        if w <= 0 or h <= 0:
            skipped += 1
            continue
        per_image.setdefault(a["image_id"], []).append({
            "bbox": [float(x), float(y), float(x + w), float(y + h)],
            "bbox_mode": BoxMode.XYXY_ABS,
            "category_id": cat_to_contiguous[a["category_id"]],
            "iscrowd": int(a.get("iscrowd", 0)),
        })
    dicts = []
    for img in data["images"]:
        _require(img, ("id", "file_name", "height", "width"), "image", json_file)
        dicts.append({
            "file_name": os.path.join(image_root, img["file_name"]),
            "image_id": img["id"],
            "height": int(img["height"]),
            "width": int(img["width"]),
            "annotations": per_image.get(img["id"], []),
        })
    if skipped:
        logger.warning(f"{json_file}: skipped {skipped} annotation(s) with zero or negative width/height")
    return dicts


def coco_class_names(json_file: str) -> List[str]:
    """Category names of a COCO json in category-id order."""
    with open(json_file) as f:
        cats = json.load(f).get("categories", [])
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def register_coco_instances(name: str, *args: Any, class_names: Optional[Sequence[str]] = None,
                            **kwargs: Any) -> None:
    """Register a COCO-format dataset under `name`, called either way:

        register_coco_instances(name, json_file, image_root, class_names=None)
        register_coco_instances(name, metadata, json_file, image_root)   # detectron2's signature

    `metadata` (a dict, may be empty) is set on MetadataCatalog.get(name); its `thing_classes`
    selects and orders the classes like `class_names`.
    """
    metadata: Dict[str, Any] = {}
    if args and isinstance(args[0], dict):
        metadata, args = dict(args[0]), args[1:]
    elif "metadata" in kwargs:
        metadata = dict(kwargs.pop("metadata") or {})
    names = ["json_file", "image_root", "class_names"]
    values = dict(zip(names, args), **kwargs)
    if class_names is not None:
        values["class_names"] = class_names
    unknown = set(values) - set(names)
    if unknown or "json_file" not in values or "image_root" not in values:
        raise TypeError(f"register_coco_instances('{name}', ...): expected (json_file, image_root[, class_names]) "
                        f"or (metadata, json_file, image_root), got {len(args)} positional and {sorted(kwargs)}")
    json_file, image_root = str(values["json_file"]), str(values["image_root"])
    class_names = values.get("class_names") or metadata.get("thing_classes")
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root,
                                                         list(class_names) if class_names else None))
    meta = MetadataCatalog.get(name).set(**{**metadata, "json_file": json_file, "image_root": image_root,
                                           "evaluator_type": metadata.get("evaluator_type", "coco")})
    if class_names is None and os.path.isfile(json_file):
        class_names = coco_class_names(json_file)
    if class_names is not None:
        meta.set(thing_classes=list(class_names))

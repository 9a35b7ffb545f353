"""COCO-format json -> dataset dicts (contiguous category ids in category-id order)."""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
from typing import Any, Dict, List, Optional, Sequence

from ..catalog import BoxMode, DatasetCatalog, MetadataCatalog
from ...utils.errors import UserError
from .voc import DatasetMissingError

__all__ = ["load_coco_json", "register_coco_instances", "COCOFormatError"]

logger = logging.getLogger(__name__)


class COCOFormatError(UserError, ValueError):
    """A COCO json lacks a required key or holds a malformed entry."""


def _require(entry: Any, keys: Sequence[str], what: str, json_file: str) -> None:
    if not isinstance(entry, dict):
        raise COCOFormatError(f"{json_file}: a {what} entry is a {type(entry).__name__}, not an object: {str(entry)[:60]}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise COCOFormatError(f"{json_file}: {what} {str(entry.get('id', '?'))[:40]} lacks key(s) {missing}")


def _bad(json_file: str, what: str, entry: Dict[str, Any], problem: str) -> COCOFormatError:
    return COCOFormatError(f"{json_file}: {what} {str(entry.get('id', '?'))[:40]} {problem}")


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _hashable_id(v: Any) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def load_coco_json(json_file: str, image_root: str, class_names: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """Dataset dicts of a COCO instances json; crowd boxes are kept with `iscrowd=1`, and each
    annotation keeps the json's `area` (the segment's area, not the box's) for COCO evaluation.

    Category ids become contiguous indices in category-id order; if `class_names` is given, the
    json's category names must match it (it is the metadata written at registration).
    """
    if not os.path.isfile(json_file):
        raise DatasetMissingError(
            f"COCO annotation file not found at '{json_file}'. Place COCO under $CLCL_DATASETS/coco "
            f"(see datasets/README.md) or set CLCL_DATASETS"
        )
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise COCOFormatError(f"{json_file} is not valid json: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise COCOFormatError(f"{json_file}: the top level is a {type(data).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise COCOFormatError(f"{json_file} lacks the top-level key '{key}'")
        if not isinstance(data[key], list):
            raise COCOFormatError(f"{json_file}: '{key}' is a {type(data[key]).__name__}, not a list")
    for c in data["categories"]:
        _require(c, ("id", "name"), "category", json_file)
        if not _hashable_id(c["id"]) or not isinstance(c["name"], str):
            raise _bad(json_file, "category", c, f"has id {c['id']!r} / name {c['name']!r} (expected a number / a string)")
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
    except TypeError:
        raise COCOFormatError(f"{json_file}: category ids mix numbers and strings") from None
    names = [c["name"] for c in cats]
    if class_names is not None and list(class_names) != names:
        raise COCOFormatError(f"{json_file}: categories {names[:5]}... differ from the registered classes")
    cat_to_contiguous = {c["id"]: i for i, c in enumerate(cats)}

    per_image: Dict[Any, List[Dict[str, Any]]] = {}
    skipped = 0
    for a in data["annotations"]:
        _require(a, ("image_id", "bbox", "category_id"), "annotation", json_file)
        bbox = a["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_number, bbox)):
            raise _bad(json_file, "annotation", a, f"has bbox {str(bbox)[:60]} (expected 4 finite numbers x, y, w, h)")
        x, y, w, h = bbox
        if not _hashable_id(a["image_id"]) or not _hashable_id(a["category_id"]):
            raise _bad(json_file, "annotation", a, f"has image_id {str(a['image_id'])[:40]} / category_id "
                       f"{str(a['category_id'])[:40]} (expected numbers)")
        if a["category_id"] not in cat_to_contiguous:
            raise COCOFormatError(f"{json_file}: annotation {a.get('id', '?')} has unknown category_id {a['category_id']}")
        if a.get("iscrowd", 0) not in (0, 1, True, False):
            raise _bad(json_file, "annotation", a, f"has iscrowd {str(a.get('iscrowd'))[:20]} (expected 0 or 1)")
        if w <= 0 or h <= 0:
            skipped += 1
            continue
        anno = {
            "bbox": [float(x), float(y), float(x + w), float(y + h)],
            "bbox_mode": BoxMode.XYXY_ABS,
            "category_id": cat_to_contiguous[a["category_id"]],
            "iscrowd": int(a.get("iscrowd", 0)),
        }
        if a.get("area") is not None:  # the object's (mask) area: what pycocotools' small/medium/large use
            anno["area"] = float(a["area"])
        per_image.setdefault(a["image_id"], []).append(anno)
    dicts = []
    for img in data["images"]:
        _require(img, ("id", "file_name", "height", "width"), "image", json_file)
        if not _hashable_id(img["id"]) or not isinstance(img["file_name"], str):
            raise _bad(json_file, "image", img, f"has id {str(img['id'])[:40]} / file_name {str(img['file_name'])[:40]}")
        if not all(_number(img[k]) and img[k] > 0 and float(img[k]).is_integer() for k in ("height", "width")):
            raise _bad(json_file, "image", img, f"has size {str(img['width'])[:20]} x {str(img['height'])[:20]} "
                       f"(expected positive integers)")
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

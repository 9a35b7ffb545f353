"""`DatasetCatalog` (name -> function returning dataset dicts) and `MetadataCatalog`.

Dataset dicts follow detectron2: ``file_name, height, width, image_id,
annotations=[{bbox, bbox_mode, category_id, difficult?}]`` with XYXY_ABS boxes and contiguous
category ids in the dataset's class order (``MetadataCatalog.get(name).thing_classes``).
"""
from __future__ import annotations

import difflib
import types
from collections import UserDict
from typing import Any, Callable, Dict, List

__all__ = ["DatasetCatalog", "MetadataCatalog", "Metadata", "BoxMode"]


class BoxMode:
    """Box formats used in dataset dicts (the subset detectron2 users meet)."""

    XYXY_ABS = 0
    XYWH_ABS = 1


class _DatasetCatalog(UserDict):
    def register(self, name: str, func: Callable[[], List[Dict[str, Any]]]) -> None:
        if not callable(func):
            raise TypeError("DatasetCatalog.register needs a function returning dataset dicts")
        if name in self:
            raise KeyError(f"Dataset '{name}' is already registered")
        self[name] = func

    def get(self, name: str) -> List[Dict[str, Any]]:  # type: ignore[override]
        if name not in self:
            hint = difflib.get_close_matches(name, list(self.keys()), n=1)
            raise KeyError(
                f"Dataset '{name}' is not registered"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" (registered: {', '.join(sorted(self.keys()))})"
            )
        return self[name]()

    def list(self) -> List[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name)


class Metadata(types.SimpleNamespace):
    """Per-dataset metadata (thing_classes, dirname, split, evaluator_type, ...)."""

    name: str = "N/A"

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def set(self, **kwargs: Any) -> "Metadata":
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self


class _MetadataCatalog(UserDict):
    def get(self, name: str) -> Metadata:  # type: ignore[override]
        if name not in self:
            self[name] = Metadata(name=name)
        return self[name]

    def list(self) -> List[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name)


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()

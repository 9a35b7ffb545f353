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

from ..utils.errors import UserError

__all__ = ["DatasetCatalog", "MetadataCatalog", "Metadata", "BoxMode", "UnknownDatasetError", "check_registered"]


class UnknownDatasetError(UserError, KeyError):
    """A dataset name (e.g. in DATASETS.TRAIN) is not registered; the message names the closest."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


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
            raise UnknownDatasetError(
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


def check_registered(names: Any, config_key: str) -> None:
    """A one-line `UnknownDatasetError` naming `config_key` and the closest registered name if
    one of `names` is not in DatasetCatalog."""
    for name in [names] if isinstance(names, str) else names:
        if name not in DatasetCatalog:
            hint = difflib.get_close_matches(name, DatasetCatalog.list(), n=1, cutoff=0.5)
            raise UnknownDatasetError(
                f"{config_key}: dataset '{name}' is not registered"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" (registered: {', '.join(sorted(DatasetCatalog.list()))}; register yours in a plugin)"
            )

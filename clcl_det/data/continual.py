"""The continual split: a task string -> class order, per-task class ranges and per-task data.

This is the one place where class counts and old/new groups are derived; the model, the
engine and the evaluation all take them from a `ContinualSplit`.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from ..utils.errors import UserError

__all__ = ["Task", "ContinualSplit", "parse_task_string", "build_continual_split", "SplitError"]

IMAGE_FILTERS = ("contains_current", "exclusive", "non_cooccurrence")


class SplitError(UserError, ValueError):
    """The task string, class order or image filter does not fit the dataset."""


def parse_task_string(tasks: str) -> List[int]:
    """'10+10' -> [10, 10]; '15+1x5' (or '15+1×5') -> [15, 1, 1, 1, 1, 1]."""
    sizes: List[int] = []
    for part in str(tasks).replace(" ", "").split("+"):
        m = re.fullmatch(r"(\d+)(?:[x×*](\d+))?", part)
        if not m or int(m.group(1)) <= 0 or (m.group(2) is not None and int(m.group(2)) <= 0):
            raise SplitError(
                f"CONTINUAL.TASKS '{tasks}' is not a task string: write class counts joined by '+', "
                f"e.g. 10+10, 15+5, 10+5+5 or 15+1x5"
            )
        sizes += [int(m.group(1))] * int(m.group(2) or 1)
    return sizes


@dataclass(frozen=True)
class Task:
    """Task `index` (0-based) of a split: it learns classes [start, stop) of the class order."""

    index: int
    start: int
    stop: int
    class_names: Tuple[str, ...]  # every class seen up to and including this task
    all_class_names: Tuple[str, ...]  # the whole class order (for zero-shot evaluation)

    @property
    def num_seen(self) -> int:
        return self.stop

    @property
    def new_classes(self) -> range:
        return range(self.start, self.stop)

    @property
    def old_classes(self) -> range:
        return range(0, self.start)

    @property
    def future_classes(self) -> range:
        return range(self.stop, len(self.all_class_names))

    @property
    def new_class_names(self) -> Tuple[str, ...]:
        return self.class_names[self.start:]


@dataclass(frozen=True)
class ContinualSplit:
    """A class order split into tasks; maps dataset category ids to positions in that order."""

    task_string: str
    task_sizes: Tuple[int, ...]
    class_names: Tuple[str, ...]  # learning order
    dataset_class_names: Tuple[str, ...]  # the dataset's own order (category ids)
    image_filter: str = "contains_current"

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def task(self, t: int) -> Task:
        if not 0 <= t < self.num_tasks:
            raise IndexError(f"task {t} out of range for split '{self.task_string}' ({self.num_tasks} tasks)")
        start = sum(self.task_sizes[:t])
        stop = start + self.task_sizes[t]
        return Task(t, start, stop, self.class_names[:stop], self.class_names)

    def tasks(self) -> List[Task]:
        return [self.task(t) for t in range(self.num_tasks)]

    def task_ranges(self) -> List[range]:
        return [self.task(t).new_classes for t in range(self.num_tasks)]

    def identity(self) -> Dict[str, Any]:
        """What a checkpoint records to check it belongs to this split."""
        return {"tasks": list(self.task_sizes), "class_names": list(self.class_names)}

    def _dataset_to_order(self) -> Dict[int, int]:
        pos = {n: i for i, n in enumerate(self.class_names)}
        return {i: pos[n] for i, n in enumerate(self.dataset_class_names)}

    def remap(self, dicts: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Copies of dataset dicts with `category_id` in learning order (for evaluation)."""
        mapping = self._dataset_to_order()
        out = []
        for d in dicts:
            d = dict(d)
            d["annotations"] = [{**a, "category_id": mapping[a["category_id"]]} for a in d.get("annotations", [])]
            out.append(d)
        return out

    def task_train_dicts(self, dicts: Sequence[Dict[str, Any]], t: int) -> List[Dict[str, Any]]:
        """Training dicts of task t: images with at least one task-t object; only task-t boxes
        are labelled. With `exclusive`, images that also hold other tasks' objects are dropped.
        With `non_cooccurrence` (IOR's COCO protocol, its data_split/create_*_non_cooccurence_json
        scripts), task t > 0 drops the images that hold an object of an earlier task, crowd boxes
        included: every image trains the first task whose class it holds, and no later one."""
        task = self.task(t)
        out = []
        for d in self.remap(dicts):
            annos = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
            current = [a for a in annos if task.start <= a["category_id"] < task.stop]
            if not current:
                continue
            if self.image_filter == "exclusive" and len(current) != len(annos):
                continue
            if self.image_filter == "non_cooccurrence" and any(a["category_id"] < task.start for a in d["annotations"]):
                continue
            d["annotations"] = [copy.copy(a) for a in current]
            out.append(d)
        return out


def build_continual_split(cfg: Any, dataset_class_names: Sequence[str] = None) -> ContinualSplit:
    """The split of cfg.CONTINUAL over the classes of cfg.DATASETS.TRAIN[0] (from MetadataCatalog)."""
    from .catalog import MetadataCatalog

    if dataset_class_names is None:
        names = [MetadataCatalog.get(n).get("thing_classes") for n in cfg.DATASETS.TRAIN]
        if not names or names[0] is None:
            raise SplitError(f"dataset {cfg.DATASETS.TRAIN} has no thing_classes metadata (is it registered?)")
        if any(n != names[0] for n in names):
            raise SplitError(f"DATASETS.TRAIN {cfg.DATASETS.TRAIN} do not share one class list")
        dataset_class_names = names[0]
    dataset_class_names = tuple(dataset_class_names)
    if cfg.CONTINUAL.IMAGE_FILTER not in IMAGE_FILTERS:
        raise SplitError(f"CONTINUAL.IMAGE_FILTER '{cfg.CONTINUAL.IMAGE_FILTER}' is not one of {IMAGE_FILTERS}")
    order = tuple(cfg.CONTINUAL.CLASS_ORDER) or dataset_class_names
    unknown = [c for c in order if c not in dataset_class_names]
    if unknown:
        raise SplitError(
            f"CONTINUAL.CLASS_ORDER names class(es) {unknown} that are not in dataset "
            f"'{cfg.DATASETS.TRAIN[0]}' (classes: {', '.join(dataset_class_names)})"
        )
    if len(set(order)) != len(order) or len(order) != len(dataset_class_names):
        missing = [c for c in dataset_class_names if c not in order]
        raise SplitError(f"CONTINUAL.CLASS_ORDER must list every class once; missing {missing}")
    sizes = parse_task_string(cfg.CONTINUAL.TASKS)
    if sum(sizes) != len(order):
        raise SplitError(
            f"CONTINUAL.TASKS '{cfg.CONTINUAL.TASKS}' adds up to {sum(sizes)} classes but dataset "
            f"'{cfg.DATASETS.TRAIN[0]}' has {len(order)}"
        )
    return ContinualSplit(str(cfg.CONTINUAL.TASKS), tuple(sizes), order, dataset_class_names,
                          cfg.CONTINUAL.IMAGE_FILTER)

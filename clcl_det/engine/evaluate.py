"""Evaluation of a stage (seen classes, and future classes zero-shot) and the run summary."""
from __future__ import annotations

import glob
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

from torch import nn

from ..data import MetadataCatalog, build_test_loader
from ..data.continual import ContinualSplit, Task
from ..evaluation import (COCO_AREA_THRESHOLDS, COCOEvaluator, PascalVOCEvaluator, build_stage, describe_ap, format_stage_table,
                          format_summary, inference_on_dataset, plot_stages, plot_task_matrix, read_json, summarize_stages,
                          write_json)
from ..utils import comm
from ..utils.checkpoint import atomic_write_bytes
from .trainer import eval_autocast

__all__ = ["build_evaluator", "evaluate_stage", "write_summary", "stage_metric_key"]

logger = logging.getLogger(__name__)


def _evaluator_type(cfg: Any) -> str:
    return MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("evaluator_type", "pascal_voc")


def stage_metric_key(cfg: Any) -> str:
    """The per-class metric the stage means are taken over: AP50 (VOC-style) or AP (COCO)."""
    return "AP" if _evaluator_type(cfg) == "coco" else "AP50"


def build_evaluator(cfg: Any, gt_dicts: List[Dict[str, Any]], class_names: Sequence[str],
                    eval_classes: Sequence[int], output_dir: Optional[str] = None):
    """PascalVOCEvaluator or COCOEvaluator, by the test dataset's `evaluator_type` (COCO's
    small / medium / large limits from its `area_thresholds` metadata if it has one); with
    `output_dir` it writes the detections there (coco_instances_results.json)."""
    if _evaluator_type(cfg) == "coco":
        meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        return COCOEvaluator(gt_dicts, class_names, eval_classes, output_dir=output_dir,
                             area_thresholds=meta.get("area_thresholds", COCO_AREA_THRESHOLDS))
    if cfg.TEST.AP_METHOD not in ("voc07", "area"):
        raise ValueError(f"TEST.AP_METHOD '{cfg.TEST.AP_METHOD}' is not one of voc07 | area")
    return PascalVOCEvaluator(gt_dicts, class_names, eval_classes, ap_method=cfg.TEST.AP_METHOD,
                              output_dir=output_dir)


class _Readable:
    """Batches without the images that could not be read (they are left out of the metrics);
    its length is the loader's, so the progress log can show an ETA."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        for batch in self.loader:
            batch = [x for x in batch if not x.get("unreadable")]
            if batch:
                yield batch


def _run(cfg: Any, model: nn.Module, gt_dicts, class_names, eval_classes,
         output_dir: Optional[str] = None) -> Dict[str, Any]:
    evaluator = build_evaluator(cfg, gt_dicts, class_names, eval_classes, output_dir)
    loader = build_test_loader(cfg, gt_dicts)
    device = getattr(model, "device", None) or next(model.parameters()).device
    with eval_autocast(cfg, device):
        res = inference_on_dataset(model, _Readable(loader), evaluator)
    return res.get("bbox", {}) if comm.is_main_process() else {}


def evaluate_stage(cfg: Any, model: nn.Module, split: ContinualSplit, task: Task, gt_dicts: List[Dict[str, Any]],
                   out_dir: str, zero_shot: bool = True, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Evaluate the seen classes (and, with TEST.ZERO_SHOT and `zero_shot`, the future ones with the
    vocabulary grown to every class); write metrics.json, per_class.txt and the seen classes'
    detections (coco_instances_results.json) in `out_dir`; print the table. `extra` (JSON values) is
    kept in the stage record's `extra`."""
    names = list(split.class_names)
    seen = list(range(task.num_seen))
    logger.info(f"evaluating task {task.index + 1}: {len(seen)} seen classes on {len(gt_dicts)} test images")
    res = _run(cfg, model, gt_dicts, names, seen, output_dir=out_dir)
    zs_res: Optional[Dict[str, Any]] = None
    future = list(task.future_classes)
    if cfg.TEST.ZERO_SHOT and zero_shot and future:
        logger.info(f"zero-shot evaluation of the {len(future)} classes not learned yet")
        with model.vocabulary(names):
            zs_res = _run(cfg, model, gt_dicts, names, future).get("per_class", {})
    if not comm.is_main_process():
        return {}
    key = stage_metric_key(cfg)
    ap_method = "coco" if key == "AP" else cfg.TEST.AP_METHOD
    stage = build_stage(task.index, split.task_ranges(), names, res["per_class"], key, describe_ap(key, ap_method),
                        zero_shot=zs_res, extra={"evaluator": {k: v for k, v in res.items() if k != "per_class"},
                                                 **(extra or {})})
    table = format_stage_table(stage, names)
    logger.info(f"results after task {task.index + 1}/{split.num_tasks}:\n{table}")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, "per_class.txt"), (table + "\n").encode())
    write_json(stage, os.path.join(out_dir, "metrics.json"))
    return stage


def write_summary(cfg: Any, split: ContinualSplit, out_dir: str, final: bool = False) -> Dict[str, Any]:
    """Summary over every completed stage in `out_dir` (summary.json / .txt / .png, and the task x
    stage heat-map summary_tasks.png)."""
    if not comm.is_main_process():
        return {}
    stages = [read_json(p) for p in sorted(glob.glob(os.path.join(out_dir, "task_*", "metrics.json")),
                                           key=lambda p: int(os.path.basename(os.path.dirname(p))[5:]))]
    if not stages:
        return {}
    summary = summarize_stages(stages, split.class_names, split.task_ranges())
    text = format_summary(summary)
    empty = {f"task_{s['task'] + 1}": s["extra"]["classes_without_training_images"] for s in stages
             if s.get("extra", {}).get("classes_without_training_images")}
    if any("classes_without_training_images" in s.get("extra", {}) for s in stages):  # training-time stages
        summary["classes_without_training_images"] = empty
    if empty:
        text += (f"\n{sum(map(len, empty.values()))} class(es) had no training image: "
                 + "; ".join(f"{k}: {', '.join(v)}" for k, v in empty.items()))
    write_json(summary, os.path.join(out_dir, "summary.json"))
    atomic_write_bytes(os.path.join(out_dir, "summary.txt"), (text + "\n").encode())
    plot_stages(summary, os.path.join(out_dir, "summary.png"))
    plot_task_matrix(summary, os.path.join(out_dir, "summary_tasks.png"))
    if final:
        logger.info(f"summary of {len(stages)} stage(s) ({cfg.CONTINUAL.TASKS} on {cfg.DATASETS.TRAIN[0]}):\n{text}")
    return summary

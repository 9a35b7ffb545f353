"""Evaluators (VOC, COCO), `inference_on_dataset` and the continual-learning tables."""
from .continual_metrics import (
    build_stage,
    describe_ap,
    format_stage_table,
    format_summary,
    plot_stages,
    plot_task_matrix,
    read_json,
    stage_metrics,
    summarize_stages,
    write_json,
)
from .coco_evaluation import COCO_AREA_THRESHOLDS, COCOEvaluator
from .evaluator import (
    DatasetEvaluator,
    DatasetEvaluators,
    DetectionEvaluatorBase,
    inference_context,
    inference_on_dataset,
)
from .voc_evaluation import AP_METHODS, PascalVOCEvaluator, eval_detections_for_class, match_detections, voc_ap

__all__ = [
    "DatasetEvaluator", "DatasetEvaluators", "DetectionEvaluatorBase", "inference_context",
    "inference_on_dataset", "AP_METHODS", "voc_ap", "match_detections", "eval_detections_for_class",
    "PascalVOCEvaluator", "COCOEvaluator", "COCO_AREA_THRESHOLDS", "describe_ap", "stage_metrics", "build_stage",
    "format_stage_table", "summarize_stages", "format_summary", "plot_stages", "plot_task_matrix", "write_json", "read_json",
]

"""COCO box AP (AP@[.5:.95], AP50, AP75, APs/m/l) with pycocotools, from dataset dicts."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .evaluator import NUM_DETECTIONS, DetectionEvaluatorBase

__all__ = ["COCOEvaluator", "COCO_AREA_THRESHOLDS"]

logger = logging.getLogger(__name__)

_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COCO_AREA_THRESHOLDS = (32.0 ** 2, 96.0 ** 2)  # small < 32^2 <= medium < 96^2 <= large (pixels of object area)


class COCOEvaluator(DetectionEvaluatorBase):
    """COCO-style box AP of `eval_classes` (all classes if None), computed by ``COCOeval``.

    Ground truth is converted to an in-memory COCO object (category id = contiguous class
    index; ``iscrowd`` and ``area`` are kept if the dicts carry them, else area = box area);
    detections become COCO results (XYWH). ``evaluate()`` returns (percent)::

        {"bbox": {"AP": , "AP50": , "AP75": , "APs": , "APm": , "APl": ,
                  "ap_definition": "AP@[.5:.95], COCO 101-point",
                  "per_class": {name: {"AP": , "AP50": , "detections": }}}}

    A metric without GT (e.g. no small objects, or a class absent from the images) is NaN.
    With no detections at all every AP with GT is 0. `area_thresholds` are the object areas that
    separate small / medium / large (COCO's 32^2 and 96^2 pixels by default; a dataset of smaller
    images gives them scaled, as its `area_thresholds` metadata).
    """

    def __init__(
        self,
        gt_dicts: Sequence[Dict[str, Any]],
        class_names: Sequence[str],
        eval_classes: Optional[Sequence[int]] = None,
        max_dets_per_image: int = 100,
        output_dir: Optional[str] = None,
        area_thresholds: Sequence[float] = COCO_AREA_THRESHOLDS,
    ):
        self._max_dets = int(max_dets_per_image)
        small, large = (float(a) for a in area_thresholds)
        if not 0 < small < large:
            raise ValueError(f"COCOEvaluator: area_thresholds must be 0 < small < large, got {tuple(area_thresholds)}")
        self._area_thresholds = (small, large)
        super().__init__(gt_dicts, class_names, eval_classes, output_dir=output_dir)
        self._coco_image_ids = {image_id: i + 1 for i, image_id in enumerate(self._gt)}

    def _coco_gt(self, image_ids: List[Any]) -> COCO:
        images, annotations = [], []
        for image_id in image_ids:
            g = self._gt[image_id]
            cid = self._coco_image_ids[image_id]
            images.append({"id": cid, "height": g["height"], "width": g["width"], "file_name": str(image_id)})
            for box, label, crowd, area in zip(g["boxes"], g["labels"], g["iscrowd"], g["area"]):
                w, h = float(box[2] - box[0]), float(box[3] - box[1])
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": cid,
                    "category_id": int(label),
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": float(area) if area is not None else max(w, 0.0) * max(h, 0.0),
                    "iscrowd": int(crowd),
                })
        coco = COCO()
        coco.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in enumerate(self._class_names)],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def _coco_results(self, predictions: Dict[Any, Dict[str, np.ndarray]]) -> List[Dict[str, Any]]:
        results = []
        for image_id, p in predictions.items():
            cid = self._coco_image_ids[image_id]
            boxes = p["boxes"].astype(np.float64)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            for box, score, label in zip(xywh.tolist(), p["scores"].tolist(), p["labels"].tolist()):
                results.append({"image_id": cid, "category_id": int(label), "bbox": box, "score": float(score)})
        return results

    def evaluate(self) -> Dict[str, Any]:
        predictions = self._gather_predictions()
        if predictions is None:
            return {}
        image_ids = list(predictions)
        coco_gt = self._coco_gt(image_ids)
        results = self._coco_results(predictions)
        if results:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = coco_gt.loadRes(results)
        else:
            logger.warning("COCOEvaluator: no detections at all; every AP with ground truth is 0")
            coco_dt = COCO()
            coco_dt.dataset = {"images": copy.deepcopy(coco_gt.dataset["images"]),
                               "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                               "annotations": []}
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt.createIndex()

        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.params.imgIds = sorted(self._coco_image_ids[i] for i in image_ids)
        coco_eval.params.catIds = list(self._eval_classes)
        coco_eval.params.maxDets = [1, 10, self._max_dets]
        small, large = self._area_thresholds
        top = coco_eval.params.areaRng[0][1]  # pycocotools' "all" upper bound
        coco_eval.params.areaRng = [[0.0, top], [0.0, small], [small, large], [large, top]]
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()

        def pct(x: float) -> float:
            return float(x) * 100.0 if x >= 0 else float("nan")

        result: Dict[str, Any] = {k: pct(coco_eval.stats[i]) for i, k in enumerate(_STATS)}
        result["ap_definition"] = "AP@[.5:.95], COCO 101-point"

        # precision: [IoU thresholds, recall points, classes, area ranges, max dets]; -1 = no GT
        precision = coco_eval.eval["precision"]
        iou50 = int(np.flatnonzero(np.isclose(coco_eval.params.iouThrs, 0.5))[0])
        per_class: Dict[str, Dict[str, float]] = {}
        for k, c in enumerate(coco_eval.params.catIds):
            p_all = precision[:, :, k, 0, -1]
            p_50 = precision[iou50, :, k, 0, -1]
            per_class[self._class_names[c]] = {
                "AP": float(p_all[p_all > -1].mean() * 100) if (p_all > -1).any() else float("nan"),
                "AP50": float(p_50[p_50 > -1].mean() * 100) if (p_50 > -1).any() else float("nan"),
                NUM_DETECTIONS: self._num_detections(predictions, c),
            }
        result["per_class"] = per_class
        no_gt = [n for n, v in per_class.items() if np.isnan(v["AP"])]
        if no_gt:
            logger.info(
                f"COCOEvaluator: no ground truth for {len(no_gt)} class(es) in the evaluated images; "
                f"their AP is NaN and left out of the mean: {', '.join(no_gt)}"
            )
        logger.info(
            f"COCOEvaluator on {len(image_ids)} images, {len(per_class)} classes, "
            f"{len(results)} detections:\n"
            + "\n".join(line for line in summary.getvalue().splitlines() if "Average Precision" in line)
        )
        return {"bbox": result}

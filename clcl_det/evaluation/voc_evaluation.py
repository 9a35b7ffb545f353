"""PASCAL VOC detection AP: both the VOC2007 11-point and the area (VOC2010+) definitions.

Box convention: boxes are continuous XYXY pixel coordinates, the frame of our dataset dicts
(the VOC loader subtracts 1 from the 1-based ``xmin``/``ymin``, like detectron2), so a box's
width is ``x2 - x1`` and areas/IoUs carry **no +1**. This is the same number the VOC devkit
computes with its +1 convention on the original 1-based pixel indices
(``xmax - xmin + 1 == x2 - x1``), and the same detectron2 gets by adding 1 to predicted
``xmin``/``ymin`` before calling its ``voc_eval``.

Matching follows the devkit (``VOCevaldet.m``; detectron2's ``voc_eval``): detections of a
class are taken in decreasing score order; each is compared with *all* GT boxes of its image and
assigned to the one of highest IoU. If that IoU is below the threshold it is a false positive;
if that GT is ``difficult`` the detection is ignored (neither TP nor FP); if that GT was already
matched by a higher-scored detection it is a false positive (duplicate); otherwise it is a true
positive. Difficult GTs do not count as positives. Ties in score keep the input order (stable).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .evaluator import NUM_DETECTIONS, DetectionEvaluatorBase

__all__ = [
    "AP_METHODS", "voc_ap", "box_iou_np", "match_detections", "precision_recall",
    "eval_detections_for_class", "PascalVOCEvaluator",
]

logger = logging.getLogger(__name__)

#: AP definitions understood by `voc_ap`, with the words printed next to the numbers.
AP_METHODS = {
    "voc07": "VOC07 11-point",
    "area": "area under the interpolated PR curve",
}


def voc_ap(recall: np.ndarray, precision: np.ndarray, method: str) -> float:
    """AP from a PR curve (points in decreasing-score order).

    ``"voc07"``: mean over the 11 recall levels ``np.arange(0.0, 1.1, 0.1)`` of the maximum
    precision at recall >= r (0 where no point reaches r), exactly as detectron2's and
    py-faster-rcnn's ``voc_eval``: those levels are floats, so 0.3, 0.6 and 0.7 are
    0.30000000000000004, 0.6000000000000001 and 0.7000000000000001, and a recall landing
    exactly on 0.3 / 0.6 / 0.7 does not reach its level. This is the number published VOC07
    tables were computed with. ``"area"``: area under the curve after making precision
    monotonically non-increasing in recall (VOC2010+).
    """
    if method not in AP_METHODS:
        raise ValueError(f"voc_ap: unknown method '{method}'; expected one of {sorted(AP_METHODS)}")
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"voc_ap: recall {recall.shape} and precision {precision.shape} differ in shape")
    if method == "voc07":
        # the float levels of voc_eval, on purpose (see the docstring)
        best = [precision[recall >= r].max(initial=0.0) for r in np.arange(0.0, 1.1, 0.1)]
        return float(np.sum(best) / 11.0)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of XYXY boxes in continuous coordinates (no +1)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# dets: image_id -> (boxes [N, 4], scores [N]); gts: image_id -> (boxes [M, 4], difficult [M])
Detections = Mapping[Hashable, Tuple[np.ndarray, np.ndarray]]
GroundTruth = Mapping[Hashable, Tuple[np.ndarray, np.ndarray]]


def match_detections(
    dets: Detections, gts: GroundTruth, iou_thresh: float = 0.5
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """VOC matching of one class's detections (see the module docstring).

    Args:
        dets: per image, ``(boxes [N, 4] XYXY, scores [N])``.
        gts: per image, ``(boxes [M, 4] XYXY, difficult bool [M])``; an image absent here has
            no GT of the class.
    Returns:
        ``(scores, tp, fp, npos)``: scores of the non-ignored detections in decreasing order
        with their TP/FP flags (bool arrays), and the number of non-difficult GTs.
    """
    npos = int(sum(int(np.count_nonzero(~np.asarray(d, dtype=bool))) for _, d in gts.values()))
    all_scores: List[np.ndarray] = []
    all_tp: List[np.ndarray] = []
    all_fp: List[np.ndarray] = []
    for image_id, (boxes, scores) in dets.items():
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.size == 0:
            continue
        order = np.argsort(-scores, kind="stable")
        scores = scores[order]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[order]
        gt_boxes, difficult = gts.get(image_id, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        difficult = np.asarray(difficult, dtype=bool).reshape(-1)
        if len(difficult) == 0:
            tp = np.zeros(len(scores), dtype=bool)
            fp = np.ones(len(scores), dtype=bool)
        else:
            iou = box_iou_np(boxes, gt_boxes)
            best = iou.argmax(axis=1)  # first GT on ties, like the devkit
            hit = iou[np.arange(len(best)), best] >= iou_thresh
            ignored = hit & difficult[best]
            candidate = hit & ~ignored
            tp = np.zeros(len(scores), dtype=bool)
            # the first (highest-scored) candidate per GT is the TP; later ones are duplicates
            cand_idx = np.flatnonzero(candidate)
            _, first = np.unique(best[cand_idx], return_index=True)
            tp[cand_idx[first]] = True
            fp = ~tp & ~ignored
            keep = ~ignored
            scores, tp, fp = scores[keep], tp[keep], fp[keep]
        all_scores.append(scores)
        all_tp.append(tp)
        all_fp.append(fp)
    if not all_scores:
        return np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool), npos
    scores = np.concatenate(all_scores)
    order = np.argsort(-scores, kind="stable")
    return scores[order], np.concatenate(all_tp)[order], np.concatenate(all_fp)[order], npos


def precision_recall(tp: np.ndarray, fp: np.ndarray, npos: int) -> Tuple[np.ndarray, np.ndarray]:
    """Recall and precision after each detection (decreasing score); recall is NaN if npos == 0."""
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(fp, dtype=np.float64)
    recall = tp_cum / npos if npos > 0 else np.full_like(tp_cum, np.nan)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return recall, precision


def eval_detections_for_class(
    dets: Detections, gts: GroundTruth, iou_thresh: float = 0.5, method: str = "voc07"
) -> float:
    """VOC AP (fraction in [0, 1]) of one class; NaN if the class has no non-difficult GT.

    `dets` and `gts` are per-image mappings as in `match_detections`; `method` is ``"voc07"``
    or ``"area"`` (see `voc_ap`).
    """
    if method not in AP_METHODS:
        raise ValueError(f"unknown AP method '{method}'; expected one of {sorted(AP_METHODS)}")
    _, tp, fp, npos = match_detections(dets, gts, iou_thresh)
    if npos == 0:
        return float("nan")
    recall, precision = precision_recall(tp, fp, npos)
    return voc_ap(recall, precision, method)


class PascalVOCEvaluator(DetectionEvaluatorBase):
    """PASCAL VOC mAP at one IoU threshold; both AP definitions, one of them the headline.

    ``evaluate()`` returns (percent)::

        {"bbox": {"AP50": headline mAP, "AP50_voc07": ..., "AP50_area": ...,
                  "ap_method": "voc07", "ap_definition": "AP50, VOC07 11-point",
                  "per_class": {name: {"AP50": headline, "AP50_voc07": ..., "AP50_area": ...,
                                       "detections": number of the class's detections}}}}

    (``AP50`` stands for ``AP{100*iou_thresh}``.) Only `eval_classes` are reported; a class
    without a non-difficult GT in the evaluated images gets NaN and is left out of the means.
    """

    def __init__(
        self,
        gt_dicts: Sequence[Dict[str, Any]],
        class_names: Sequence[str],
        eval_classes: Optional[Sequence[int]] = None,
        ap_method: str = "voc07",
        iou_thresh: float = 0.5,
        output_dir: Optional[str] = None,
    ):
        if ap_method not in AP_METHODS:
            raise ValueError(
                f"PascalVOCEvaluator: ap_method '{ap_method}' is not one of {sorted(AP_METHODS)}"
            )
        if not 0.0 < iou_thresh <= 1.0:
            raise ValueError(f"PascalVOCEvaluator: iou_thresh must be in (0, 1], got {iou_thresh}")
        self._ap_method = ap_method
        self._iou_thresh = float(iou_thresh)
        super().__init__(gt_dicts, class_names, eval_classes, output_dir=output_dir)

    def evaluate(self) -> Dict[str, Any]:
        predictions = self._gather_predictions()
        if predictions is None:
            return {}
        prefix = f"AP{round(self._iou_thresh * 100)}"
        image_ids = list(predictions)

        per_class: Dict[str, Dict[str, float]] = {}
        for c in self._eval_classes:
            gts = {}
            for image_id in image_ids:
                g = self._gt[image_id]
                m = g["labels"] == c
                if m.any():
                    gts[image_id] = (g["boxes"][m], g["difficult"][m])
            dets = {}
            for image_id, p in predictions.items():
                m = p["labels"] == c
                if m.any():
                    dets[image_id] = (p["boxes"][m], p["scores"][m])
            _, tp, fp, npos = match_detections(dets, gts, self._iou_thresh)
            if npos == 0:
                aps = {m: float("nan") for m in AP_METHODS}
            else:
                recall, precision = precision_recall(tp, fp, npos)
                aps = {m: 100.0 * voc_ap(recall, precision, m) for m in AP_METHODS}
            per_class[self._class_names[c]] = {
                prefix: aps[self._ap_method],
                **{f"{prefix}_{m}": aps[m] for m in AP_METHODS},
                NUM_DETECTIONS: self._num_detections(predictions, c),
            }

        no_gt = [name for name, v in per_class.items() if np.isnan(v[prefix])]
        if no_gt:
            logger.info(
                f"PascalVOCEvaluator: no (non-difficult) ground truth for {len(no_gt)} class(es) "
                f"in the evaluated images; their AP is NaN and left out of the mean: {', '.join(no_gt)}"
            )

        def mean(key: str) -> float:
            vals = [v[key] for v in per_class.values() if not np.isnan(v[key])]
            return float(np.mean(vals)) if vals else float("nan")

        definition = f"{prefix}, {AP_METHODS[self._ap_method]}"
        result = {
            prefix: mean(prefix),
            **{f"{prefix}_{m}": mean(f"{prefix}_{m}") for m in AP_METHODS},
            "ap_method": self._ap_method,
            "ap_definition": definition,
            "per_class": per_class,
        }
        logger.info(
            f"PascalVOCEvaluator on {len(image_ids)} images, {len(per_class) - len(no_gt)} classes "
            f"with GT: m{prefix} {result[prefix]:.2f} ({definition}); "
            + ", ".join(f"{AP_METHODS[m]}: {result[f'{prefix}_{m}']:.2f}" for m in AP_METHODS)
        )
        return {"bbox": result}

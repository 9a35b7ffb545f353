"""Evaluation: VOC AP (both definitions) against hand-worked cases and a brute-force reference,
COCO AP through pycocotools, continual tables, and distributed (2-process gloo) evaluation."""
from __future__ import annotations

import math
import re
import os
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from clcl_det.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    PascalVOCEvaluator,
    build_stage,
    describe_ap,
    eval_detections_for_class,
    format_stage_table,
    format_summary,
    inference_on_dataset,
    match_detections,
    plot_stages,
    plot_task_matrix,
    read_json,
    stage_metrics,
    summarize_stages,
    voc_ap,
    write_json,
)

# ----------------------------------------------------------------------------------------------
# helpers


def _gt(boxes, difficult=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return boxes, difficult


def _det(boxes, scores):
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)


def _both(dets, gts, iou=0.5):
    return (eval_detections_for_class(dets, gts, iou, method="voc07"),
            eval_detections_for_class(dets, gts, iou, method="area"))


def _dataset_dict(image_id, boxes, labels, difficult=None, size=(200, 300)):
    difficult = difficult or [0] * len(labels)
    return {
        "file_name": f"{image_id}.jpg", "image_id": image_id, "height": size[0], "width": size[1],
        "annotations": [{"bbox": list(map(float, b)), "bbox_mode": 0, "category_id": int(c), "difficult": int(d)}
                        for b, c, d in zip(boxes, labels, difficult)],
    }


def _output(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _same(a, b, tol=1e-9):
    """Recursive equality of result dicts, NaN == NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol
    return a == b


# ----------------------------------------------------------------------------------------------
# voc_ap and matching: hand-worked cases

G1, G2, G3 = [10, 10, 50, 50], [200, 200, 240, 260], [0, 0, 30, 30]


def test_voc_ap_hand_worked_3gt_4det():
    # image a: G1, G2; image b: G3 -> npos = 3
    # scores: d1 .9 on G1 (TP), d2 .8 nowhere (FP), d3 .7 on G3 (TP), d4 .6 on G1 again (dup -> FP)
    # cumulative: d1 R=1/3 P=1 | d2 R=1/3 P=1/2 | d3 R=2/3 P=2/3 | d4 R=2/3 P=1/2
    # 11-point: r in {0,.1,.2,.3}: max P at R>=r = 1 (4 points); r in {.4,.5,.6}: 2/3 (3 points);
    #           r in {.7,...,1}: no point -> 0.  AP = (4*1 + 3*2/3) / 11 = 6/11
    # area: envelope P(R) = 1 on (0,1/3], 2/3 on (1/3,2/3], 0 after -> 1/3*1 + 1/3*2/3 = 5/9
    gts = {"a": _gt([G1, G2]), "b": _gt([G3])}
    dets = {"a": _det([[11, 11, 50, 50], [100, 100, 120, 120], [10, 12, 49, 50]], [0.9, 0.8, 0.6]),
            "b": _det([[1, 0, 30, 31]], [0.7])}
    scores, tp, fp, npos = match_detections(dets, gts)
    assert npos == 3
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.7, 0.6])
    assert tp.tolist() == [True, False, True, False] and fp.tolist() == [False, True, False, True]
    ap07, area = _both(dets, gts)
    assert ap07 == pytest.approx(6 / 11) and area == pytest.approx(5 / 9)
    # the same PR points fed to voc_ap directly
    rec, prec = np.array([1, 1, 2, 2]) / 3, np.array([1, 1 / 2, 2 / 3, 1 / 2])
    assert voc_ap(rec, prec, "voc07") == pytest.approx(6 / 11)
    assert voc_ap(rec, prec, "area") == pytest.approx(5 / 9)


def _voc_eval_11pt(rec, prec):
    """detectron2's / py-faster-rcnn's voc_eval 11-point loop, as written there."""
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap = ap + p / 11.0
    return ap


def test_voc07_ap_recall_exactly_on_03_06_07_follows_np_arange():
    # 10 non-difficult GTs; detections by decreasing score: T T T F T T T F T
    # (R, P): (.1,1) (.2,1) (.3,1) (.3,3/4) (.4,4/5) (.5,5/6) (.6,6/7) (.6,6/8) (.7,7/9)
    # voc_eval's levels np.arange(0., 1.1, .1) hold 0.30000000000000004, 0.6000000000000001 and
    # 0.7000000000000001, above the recalls 3/10, 6/10, 7/10, so those levels take the next point:
    #   r = 0, .1, .2            -> 1            (3 levels)
    #   r = .3+, .4, .5          -> max(4/5, 5/6, 6/7, 6/8, 7/9) = 6/7   (3 levels)
    #   r = .6+                  -> 7/9
    #   r = .7+, .8, .9, 1       -> 0
    # AP = (3 + 3 * 6/7 + 7/9) / 11  (exact i/10 levels would give (4 + 3 * 6/7 + 7/9) / 11)
    # area (unchanged): .3 * 1 + .3 * 6/7 + .1 * 7/9
    gt_boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(10)]
    gts = {"img": _gt(gt_boxes)}
    miss = [200, 200, 210, 210]
    order = [0, 1, 2, None, 3, 4, 5, None, 6]  # GT index hit, None = a false positive
    boxes = [gt_boxes[i] if i is not None else miss for i in order]
    scores = np.linspace(0.9, 0.1, len(order))
    dets = {"img": _det(boxes, scores)}
    ap07, area = _both(dets, gts)
    assert ap07 == pytest.approx((3 + 3 * 6 / 7 + 7 / 9) / 11, abs=1e-12)
    assert area == pytest.approx(0.3 + 0.3 * 6 / 7 + 0.1 * 7 / 9, abs=1e-12)
    _, tp, fp, npos = match_detections(dets, gts)
    rec = np.cumsum(tp) / npos
    prec = np.cumsum(tp) / (np.cumsum(tp) + np.cumsum(fp))
    assert rec[2] == 0.3 and rec[6] == 0.6 and rec[8] == 0.7
    assert ap07 == pytest.approx(_voc_eval_11pt(rec, prec), abs=1e-15)
    # recall ending exactly on 0.3 with precision 1: levels 0, .1, .2 only -> 3/11
    rec, prec = np.array([0.1, 0.2, 3 / 10]), np.ones(3)
    assert voc_ap(rec, prec, "voc07") == pytest.approx(3 / 11)
    assert voc_ap(rec, prec, "area") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="voc07"):
        voc_ap(rec, prec, "voc12")


def test_duplicate_detection_is_false_positive():
    # GTs G1, G2 in one image. d1 .9 on G1 (TP), d2 .8 on G1 (duplicate: FP), d3 .7 on G2 (TP)
    # PR: (1/2, 1), (1/2, 1/2), (1, 2/3)
    # 11-point: r in {0..0.5} (6 points) -> 1; r in {.6..1} (5 points) -> 2/3 -> (6 + 10/3)/11 = 28/33
    # area: 1/2*1 + 1/2*2/3 = 5/6.  Without the duplicate both would be 1.
    gts = {"a": _gt([G1, G2])}
    dets = {"a": _det([[10, 10, 50, 50], [12, 10, 50, 50], [200, 200, 240, 260]], [0.9, 0.8, 0.7])}
    ap07, area = _both(dets, gts)
    assert ap07 == pytest.approx(28 / 33) and area == pytest.approx(5 / 6)
    no_dup = {"a": _det([[10, 10, 50, 50], [200, 200, 240, 260]], [0.9, 0.7])}
    assert _both(no_dup, gts) == (pytest.approx(1.0), pytest.approx(1.0))


def test_duplicate_against_best_overlap_gt_devkit_rule():
    # VOC devkit: a detection is assigned to its highest-IoU GT among *all* GTs; if that one is
    # taken it is a FP even if another, unmatched GT also overlaps >= 0.5.
    # GA=[0,0,100,100], GB=[20,0,120,100]; d1 = GA exactly (TP on GA);
    # d2=[5,0,105,100]: IoU(GA)=95/105=.905, IoU(GB)=85/115=.739 -> best is GA (taken) -> FP.
    # PR: (1/2,1), (1/2,1/2) -> 11-point: r<=.5 -> 1 (6 points) -> 6/11; area: 1/2
    gts = {"a": _gt([[0, 0, 100, 100], [20, 0, 120, 100]])}
    dets = {"a": _det([[0, 0, 100, 100], [5, 0, 105, 100]], [0.9, 0.8])}
    ap07, area = _both(dets, gts)
    assert ap07 == pytest.approx(6 / 11) and area == pytest.approx(0.5)


def test_difficult_gt_neither_positive_nor_penalised():
    # G1 normal, G2 difficult: npos = 1. d1 .9 on G2 (ignored), d2 .8 on G1 (TP),
    # d3 .7 on G2 again (ignored, not a duplicate FP). Only d2 counts: PR (1, 1) -> AP 1 both ways.
    gts = {"a": _gt([G1, G2], [False, True])}
    dets = {"a": _det([[200, 200, 240, 260], [10, 10, 50, 50], [201, 200, 240, 260]], [0.9, 0.8, 0.7])}
    scores, tp, fp, npos = match_detections(dets, gts)
    assert npos == 1 and tp.tolist() == [True] and fp.tolist() == [False]
    assert _both(dets, gts) == (pytest.approx(1.0), pytest.approx(1.0))
    # with G2 not difficult: npos = 2, TP, TP, FP(dup) -> both AP = 1 still; make d1 a miss to
    # see that difficult really removed it: d1 elsewhere -> FP first -> PR (0,0),(1,1/2) for npos=1
    dets_fp = {"a": _det([[100, 100, 120, 120], [10, 10, 50, 50]], [0.9, 0.8])}
    # 11-point: max P at R>=r is 1/2 for every r -> 1/2; area: 1 * 1/2 = 1/2
    assert _both(dets_fp, gts) == (pytest.approx(0.5), pytest.approx(0.5))


def test_class_without_gt_is_nan_and_no_dets_is_zero():
    gts_only_difficult = {"a": _gt([G1], [True])}
    dets = {"a": _det([G1], [0.9])}
    assert all(math.isnan(v) for v in _both(dets, gts_only_difficult))
    assert all(math.isnan(v) for v in _both(dets, {}))
    assert _both({}, {"a": _gt([G1])}) == (0.0, 0.0)


def test_iou_convention_no_plus_one():
    # GT [0,0,10,10] (a VOC box xmin=1..xmax=10 after the loader's -1). Det [0,0,10,4.8]:
    # IoU = 48/100 = .48 < .5 -> FP (with the +1 convention on these numbers it would be
    # 11*5.8/121 = .527 -> TP). Det [0,0,10,5]: IoU = .5 exactly -> TP (>= threshold).
    gts = {"a": _gt([[0, 0, 10, 10]])}
    assert _both({"a": _det([[0, 0, 10, 4.8]], [1.0])}, gts) == (0.0, 0.0)
    assert _both({"a": _det([[0, 0, 10, 5]], [1.0])}, gts) == (1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# brute force


def _ref_match(dets, gts, thr):
    """Obviously-correct VOC devkit loop, pure Python."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    flat = [(float(s), img, i) for img, (bx, sc) in dets.items() for i, s in enumerate(sc)]
    flat.sort(key=lambda x: -x[0])  # stable: image order, then index order on ties
    taken = {img: [False] * len(gts[img][0]) for img in gts}
    npos = sum(int(not d) for _, (_, diff) in gts.items() for d in diff)
    tps, fps = [], []
    for s, img, i in flat:
        box = [float(v) for v in dets[img][0][i]]
        best, best_j = -1.0, -1
        for j, g in enumerate(gts.get(img, ([], []))[0]):
            o = iou(box, [float(v) for v in g])
            if o > best:
                best, best_j = o, j
        if best >= thr:
            if gts[img][1][best_j]:
                continue  # difficult: ignored
            if not taken[img][best_j]:
                taken[img][best_j] = True
                tps.append(1), fps.append(0)
            else:
                tps.append(0), fps.append(1)
        else:
            tps.append(0), fps.append(1)
    return tps, fps, npos


def _ref_ap(tps, fps, npos):
    """Exact AP with Fractions: 11-point as voc_eval (float recall tp / npos against the float
    levels np.arange(0, 1.1, 0.1)), and area = sum_k 1/npos * max P at R >= k/npos."""
    pts, tp, fp = [], 0, 0
    for a, b in zip(tps, fps):
        tp, fp = tp + a, fp + b
        pts.append((Fraction(tp, npos), Fraction(tp, tp + fp)))

    def pmax(r):
        return max([p for rr, p in pts if rr >= r], default=Fraction(0))

    def tp_over_npos(rr):  # voc_eval's float recall (IEEE division is correctly rounded)
        return rr.numerator / rr.denominator

    levels = np.arange(0.0, 1.1, 0.1)
    ap07 = sum(max([p for rr, p in pts if tp_over_npos(rr) >= r], default=Fraction(0)) for r in levels) / 11
    area = sum(pmax(Fraction(k, npos)) for k in range(1, npos + 1)) / npos
    return float(ap07), float(area)


@pytest.mark.parametrize("seed", range(12))
def test_matching_and_ap_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    gts, dets = {}, {}
    for img in range(rng.integers(3, 12)):
        n_gt = int(rng.integers(0, 5))
        xy = rng.uniform(0, 60, size=(n_gt, 2))
        wh = rng.uniform(10, 50, size=(n_gt, 2))
        g = np.concatenate([xy, xy + wh], 1)
        if n_gt:
            gts[img] = (g, rng.random(n_gt) < 0.2)
        n_det = int(rng.integers(0, 7))
        if n_det == 0:
            continue
        d = rng.uniform(0, 60, size=(n_det, 4))
        d[:, 2:] = d[:, :2] + rng.uniform(10, 50, size=(n_det, 2))
        for k in range(n_det):  # most detections jitter a GT, some twice (duplicates)
            if n_gt and rng.random() < 0.75:
                d[k] = g[rng.integers(n_gt)] + rng.normal(0, 4, size=4)
        dets[img] = (d, np.round(rng.random(n_det), 2))  # rounding creates score ties
    thr = [0.5, 0.7][seed % 2]
    tps, fps, npos = _ref_match(dets, gts, thr)
    _, tp, fp, n = match_detections(dets, gts, thr)
    assert n == npos and tp.astype(int).tolist() == tps and fp.astype(int).tolist() == fps
    if npos == 0:
        assert all(math.isnan(v) for v in _both(dets, gts, thr))
    else:
        ap07, area = _both(dets, gts, thr)
        ref07, ref_area = _ref_ap(tps, fps, npos)
        assert ap07 == pytest.approx(ref07, abs=1e-12) and area == pytest.approx(ref_area, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# PascalVOCEvaluator

CLASSES = ["circle", "square", "star"]


def _toy_set():
    gt = [
        _dataset_dict("im0", [G1, G2], [0, 1]),
        _dataset_dict("im1", [G3, G1], [0, 0], difficult=[0, 1]),
        _dataset_dict("im2", [G2], [1]),
    ]
    return gt


def test_voc_evaluator_perfect_detector_is_100_and_no_gt_class_nan():
    gt = _toy_set()
    ev = PascalVOCEvaluator(gt, CLASSES, ap_method="area")
    ev.reset()
    for d in gt:
        annos = [a for a in d["annotations"] if not a["difficult"]]
        ev.process([{"image_id": d["image_id"], "height": 200, "width": 300}],
                   [_output([a["bbox"] for a in annos], [0.9] * len(annos), [a["category_id"] for a in annos])])
    res = ev.evaluate()["bbox"]
    assert res["AP50"] == pytest.approx(100) and res["AP50_voc07"] == pytest.approx(100)
    assert res["AP50_area"] == pytest.approx(100) and res["ap_method"] == "area"
    assert "area under" in res["ap_definition"]
    assert math.isnan(res["per_class"]["star"]["AP50"])  # no GT: NaN, left out of the mean
    assert set(res["per_class"]) == set(CLASSES)


def test_voc_evaluator_matches_per_class_function_and_eval_classes():
    gt = _toy_set()
    preds = {
        "im0": _output([[10, 10, 50, 50], [100, 100, 150, 150], [200, 200, 240, 260]], [0.9, 0.8, 0.3], [0, 0, 1]),
        "im1": _output([[0, 0, 30, 30], [10, 10, 50, 50]], [0.4, 0.95], [0, 0]),  # 2nd: on difficult
        "im2": _output([[0, 0, 5, 5], [200, 200, 240, 259]], [0.99, 0.5], [1, 1]),
    }
    ev = PascalVOCEvaluator(gt, CLASSES, eval_classes=[0, 1], ap_method="voc07")
    ev.reset()
    ev.process([{"image_id": k} for k in preds], list(preds.values()))
    res = ev.evaluate()["bbox"]
    assert set(res["per_class"]) == {"circle", "square"}
    # class 0 by hand: npos=2 (G1 im0, G3 im1); order .95 (difficult, ignored), .9 TP, .8 FP, .4 TP
    # PR: (1/2,1), (1/2,1/2), (1,2/3) -> 11-point 28/33, area 5/6
    assert res["per_class"]["circle"]["AP50_voc07"] == pytest.approx(100 * 28 / 33)
    assert res["per_class"]["circle"]["AP50_area"] == pytest.approx(100 * 5 / 6)
    # class 1: npos=2; .99 FP, .5 TP, .3 TP -> PR (0,0),(1/2,1/2),(1,2/3)
    # 11-point: r<=.5 -> 2/3 (6 pts), r>.5 -> 2/3 (5 pts) -> 2/3; area: 1 * 2/3 = 2/3
    assert res["per_class"]["square"]["AP50"] == pytest.approx(100 * 2 / 3)
    assert res["per_class"]["square"]["AP50_area"] == pytest.approx(100 * 2 / 3)
    # every detection of the class is counted, the one on a difficult GT too
    assert (res["per_class"]["circle"]["detections"], res["per_class"]["square"]["detections"]) == (4, 3)
    assert res["AP50"] == pytest.approx((100 * 28 / 33 + 100 * 2 / 3) / 2)
    assert res["AP50_area"] == pytest.approx((100 * 5 / 6 + 100 * 2 / 3) / 2)


def test_voc_evaluator_rejects_unknown_image_and_bad_label():
    ev = PascalVOCEvaluator(_toy_set(), CLASSES)
    with pytest.raises(KeyError, match="nope"):
        ev.process([{"image_id": "nope"}], [_output([G1], [1.0], [0])])
    with pytest.raises(ValueError, match="label"):
        ev.process([{"image_id": "im0"}], [_output([G1], [1.0], [7])])
    with pytest.raises(ValueError, match="ap_method"):
        PascalVOCEvaluator(_toy_set(), CLASSES, ap_method="coco")


# ----------------------------------------------------------------------------------------------
# COCOEvaluator

def _coco_set():
    return [
        _dataset_dict(1, [[0, 0, 100, 100], [150, 150, 170, 170]], [0, 1]),
        _dataset_dict(2, [[10, 20, 80, 70]], [1]),
    ]


def test_coco_perfect_shifted_and_empty():
    gt = _coco_set()
    perfect = {1: _output([[0, 0, 100, 100], [150, 150, 170, 170]], [0.9, 0.8], [0, 1]),
               2: _output([[10, 20, 80, 70]], [0.7], [1])}
    ev = COCOEvaluator(gt, CLASSES)
    ev.process([{"image_id": k} for k in perfect], list(perfect.values()))
    res = ev.evaluate()["bbox"]
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert res[k] == pytest.approx(100), k
    assert res["per_class"]["circle"] == {"AP": pytest.approx(100), "AP50": pytest.approx(100), "detections": 1}
    assert res["per_class"]["square"]["detections"] == 2
    assert math.isnan(res["per_class"]["star"]["AP"])

    # circle's box shifted to IoU .62 (GT [0,0,100,100], det [0,0,100,62]): a match at
    # IoU thresholds .50/.55/.60 only -> AP = 3/10 * 100 = 30, AP50 = 100.
    # square: image 1 perfect (score .8); image 2 GT [10,20,80,70] (3500 px), det [10,20,80,46]
    # (1820 px) -> IoU .52: a TP at .50 only. At .50: AP 1. At the 9 thresholds .55-.95: PR
    # (1/2, 1), (1/2, 1/2) -> 101-point interpolation: precision 1 at recall 0, .01, ..., .50
    # (51 points), 0 above -> 51/101. AP = (1 + 9 * 51/101) / 10 = 560/1010; AP50 = 100.
    shifted = {1: _output([[0, 0, 100, 62], [150, 150, 170, 170]], [0.9, 0.8], [0, 1]),
               2: _output([[10, 20, 80, 46]], [0.7], [1])}
    ev.reset()
    ev.process([{"image_id": k} for k in shifted], list(shifted.values()))
    res = ev.evaluate()["bbox"]
    assert res["per_class"]["circle"]["AP"] == pytest.approx(30)
    assert res["per_class"]["circle"]["AP50"] == pytest.approx(100)
    assert res["per_class"]["square"]["AP"] == pytest.approx(100 * 560 / 1010)
    assert res["per_class"]["square"]["AP50"] == pytest.approx(100)
    assert res["AP"] == pytest.approx((30 + 100 * 560 / 1010) / 2) and res["AP50"] == pytest.approx(100)

    ev.reset()
    ev.process([{"image_id": 1}, {"image_id": 2}], [_output([], [], []), _output([], [], [])])
    res = ev.evaluate()["bbox"]
    assert res["AP"] == 0.0 and res["per_class"]["circle"]["AP50"] == 0.0
    assert res["per_class"]["circle"]["detections"] == 0


def test_coco_eval_classes_and_crowd():
    gt = _coco_set()
    gt[1]["annotations"].append({"bbox": [100, 100, 190, 190], "bbox_mode": 0, "category_id": 1, "iscrowd": 1})
    preds = {1: _output([[0, 0, 100, 100], [150, 150, 170, 170]], [0.9, 0.8], [0, 1]),
             2: _output([[10, 20, 80, 70], [100, 100, 190, 190]], [0.7, 0.6], [1, 1])}
    ev = COCOEvaluator(gt, CLASSES, eval_classes=[1])
    ev.process([{"image_id": k} for k in preds], list(preds.values()))
    res = ev.evaluate()["bbox"]
    assert set(res["per_class"]) == {"square"}
    # the detection on the crowd region is ignored, not a FP -> still 100
    assert res["AP"] == pytest.approx(100)


# ----------------------------------------------------------------------------------------------
# inference_on_dataset


class _LookupModel(nn.Module):
    """Returns stored predictions by image_id; checks it runs in eval mode without grad."""

    def __init__(self, preds):
        super().__init__()
        self.preds = preds
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, inputs):
        assert not self.training and not torch.is_grad_enabled()
        self.calls += 1
        return [self.preds[x["image_id"]] for x in inputs]


class _Counter(DatasetEvaluator):
    def __init__(self, task):
        self.task = task
        self.n = 0

    def reset(self):
        self.n = 0

    def process(self, inputs, outputs):
        self.n += len(inputs)

    def evaluate(self):
        return {self.task: {"n": self.n}}


def test_inference_on_dataset_restores_mode_and_combines():
    preds = {i: _output([[0, 0, 10, 10]], [0.5], [0]) for i in range(5)}
    model = _LookupModel(preds)
    model.train()
    loader = [[{"image_id": i, "height": 10, "width": 10} for i in (0, 1)],
              [{"image_id": i, "height": 10, "width": 10} for i in (2, 3, 4)]]
    res = inference_on_dataset(model, loader, [_Counter("a"), _Counter("b")], log_period=0.0)
    assert res == {"a": {"n": 5}, "b": {"n": 5}} and model.calls == 2 and model.training
    model.eval()
    inference_on_dataset(model, loader, _Counter("a"))
    assert not model.training
    with pytest.raises(KeyError, match="task 'a'"):
        DatasetEvaluators([_Counter("a"), _Counter("a")]).evaluate()


# ----------------------------------------------------------------------------------------------
# distributed: 2 gloo processes, each half of the images


def _dist_problem():
    rng = np.random.default_rng(7)
    gt, preds = [], {}
    for i in range(16):
        n = int(rng.integers(1, 4))
        xy = rng.uniform(0, 100, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(20, 80, (n, 2))], 1)
        labels = rng.integers(0, 3, n)
        gt.append(_dataset_dict(f"img{i}", boxes.tolist(), labels.tolist(),
                                difficult=(rng.random(n) < 0.15).astype(int).tolist()))
        det = boxes + rng.normal(0, 6, boxes.shape)
        det = np.concatenate([det, det[:1] + 2, rng.uniform(0, 150, (2, 4)) + [0, 0, 30, 30]])
        dl = np.concatenate([labels, labels[:1], rng.integers(0, 3, 2)])
        preds[f"img{i}"] = _output(det.tolist(), rng.random(len(det)).tolist(), dl.tolist())
    return gt, preds


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from clcl_det.utils import comm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        calls, gathered_dets = [], []
        real_gather = comm.gather

        def counting_gather(data, dst=0):
            calls.append(1)
            out = real_gather(data, dst=dst)
            gathered_dets.append(sum(len(p["scores"]) for preds, _ in out for p in preds.values()))
            return out

        comm.gather = counting_gather
        gt, preds = _dist_problem()
        ids = [d["image_id"] for d in gt][rank::world]
        loader = [[{"image_id": i, "height": 200, "width": 300} for i in ids[k:k + 3]] for k in range(0, len(ids), 3)]
        voc = inference_on_dataset(_LookupModel(preds), loader, PascalVOCEvaluator(gt, CLASSES))
        coco = inference_on_dataset(_LookupModel(preds), loader, COCOEvaluator(gt, CLASSES))
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump({"voc": voc, "coco": coco, "calls": len(calls), "dets": gathered_dets}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_two_processes_equal_single(tmp_path):
    import torch.multiprocessing as mp

    gt, preds = _dist_problem()
    single = {}
    for name, ev in (("voc", PascalVOCEvaluator(gt, CLASSES)), ("coco", COCOEvaluator(gt, CLASSES))):
        loader = [[{"image_id": d["image_id"], "height": 200, "width": 300}] for d in gt]
        single[name] = inference_on_dataset(_LookupModel(preds), loader, ev)

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = pickle.load(open(tmp_path / "rank0.pkl", "rb"))
    r1 = pickle.load(open(tmp_path / "rank1.pkl", "rb"))
    assert r1["voc"] == {} and r1["coco"] == {}
    assert _same(r0["voc"], single["voc"]) and _same(r0["coco"], single["coco"])
    # one gather per evaluate() on each rank; rank 0 received every detection exactly once
    # (evaluators keep only eval classes; here all 3 classes are evaluated)
    total = sum(len(p["scores"]) for p in preds.values())
    assert r0["calls"] == 2 and r1["calls"] == 2
    assert r0["dets"] == [total, total] and r1["dets"] == [0, 0]
    # sanity: the problem is not trivial, duplicates would change it
    assert 0 < single["voc"]["bbox"]["AP50"] < 100


# ----------------------------------------------------------------------------------------------
# continual metrics

NAMES = ["c0", "c1", "c2", "c3", "c4", "c5"]
RANGES = [range(0, 2), range(2, 4), range(4, 6)]


def _pc(values):
    return {n: {"AP50": v, "AP50_voc07": v, "AP50_area": v + 1} for n, v in values.items()}


def test_stage_metrics_by_hand():
    pc = _pc({"c0": 60.0, "c1": 40.0, "c2": 30.0, "c3": float("nan")})
    # old = c0, c1 -> 50; new = c2 (c3 NaN left out) -> 30; all = (60+40+30)/3 = 43.33
    m = stage_metrics(pc, NAMES, old=[0, 1], new=[2, 3], key="AP50")
    assert m == {"mAP@B": 50.0, "mAP@N": 30.0, "mAP@A": pytest.approx(130 / 3)}
    assert stage_metrics(pc, NAMES, old=[], new=[0, 1], key="AP50") == {"mAP@A": 50.0}
    with pytest.raises(KeyError, match="c4"):
        stage_metrics(pc, NAMES, old=[0], new=[4], key="AP50")


def _three_stages():
    definition = describe_ap("AP50", "voc07")
    s0 = build_stage(0, RANGES, NAMES, _pc({"c0": 80.0, "c1": 70.0}), "AP50", definition,
                     zero_shot=_pc({"c2": 5.0, "c3": 7.0, "c4": 1.0, "c5": 3.0}))
    s1 = build_stage(1, RANGES, NAMES, _pc({"c0": 85.0, "c1": 50.0, "c2": 60.0, "c3": 40.0}), "AP50", definition,
                     zero_shot=_pc({"c4": 2.0, "c5": 4.0}))
    s2 = build_stage(2, RANGES, NAMES, _pc({"c0": 75.0, "c1": 60.0, "c2": 45.0, "c3": 40.0,
                                            "c4": 70.0, "c5": 50.0}), "AP50", definition)
    return [s0, s1, s2]


def test_build_stage_table_and_summary(tmp_path):
    stages = _three_stages()
    s1 = stages[1]
    assert s1["groups"] == {"old": [0, 1], "new": [2, 3], "future": [4, 5]}
    # old (85+50)/2 = 67.5, new (60+40)/2 = 50, all 235/4 = 58.75, zero-shot (2+4)/2 = 3
    assert s1["summary"] == {"mAP@B": 67.5, "mAP@N": 50.0, "mAP@A": 58.75, "zero_shot_mAP": 3.0}
    table = format_stage_table(s1, NAMES)
    assert "AP50, VOC07 11-point" in table and "Task 2/3" in table
    assert "mAP@B / mAP@N / mAP@A (AP50): 67.50 / 50.00 / 58.75" in table
    for word in ("old", "new", "zero-shot", "AP50_area"):
        assert word in table
    assert "first task" in format_stage_table(stages[0], NAMES)

    # round trip through JSON (NaN -> null) as the engine would store metrics.json
    stages[2]["per_class"]["c5"]["AP50_area"] = float("nan")
    for t, s in enumerate(stages):
        write_json(s, str(tmp_path / f"task_{t}" / "metrics.json"))
    loaded = [read_json(str(tmp_path / f"task_{t}" / "metrics.json")) for t in range(3)]
    assert loaded[2]["per_class"]["c5"]["AP50_area"] is None

    summary = summarize_stages(loaded, NAMES, RANGES)
    assert [s["mAP@A"] for s in summary["stages"]] == [75.0, 58.75, pytest.approx(340 / 6)]
    # B = the first task's classes c0, c1: (75 + 60)/2; N = every class added after it, c2..c5:
    # (45 + 40 + 70 + 50)/4 (MMA/ABR), not the last task's alone
    assert summary["stages"][2]["mAP@B"] == pytest.approx(135 / 2)
    assert summary["stages"][2]["mAP@N"] == pytest.approx(205 / 4)
    assert summary["mean_mAP@A"] == pytest.approx((75.0 + 58.75 + 340 / 6) / 3)
    # task x stage matrix: rows tasks (c0-c1, c2-c3, c4-c5), columns stages
    tm = summary["task_matrix"]
    assert tm["tasks"] == ["1-2", "3-4", "5-6"]
    assert tm["mAP"] == [[75.0, 67.5, 67.5], [None, 50.0, 42.5], [None, None, 60.0]]
    assert tm["zero_shot"] == [[None, None, None], [6.0, None, None], [2.0, 3.0, None]]
    assert loaded[2]["task_mAP"] == [67.5, 42.5, 60.0]
    # forgetting = best earlier AP - final AP:
    # c0: max(80, 85) - 75 = 10 (best at task 1); c1: max(70, 50) - 60 = 10 (best at task 0)
    # c2: 60 - 45 = 15; c3: 40 - 40 = 0; mean = 35/4 = 8.75. c4, c5 are new in the final task.
    f = summary["forgetting"]
    assert set(f) == {"c0", "c1", "c2", "c3"}
    assert (f["c0"]["forgetting"], f["c0"]["best_task"]) == (10.0, 1)
    assert (f["c1"]["forgetting"], f["c1"]["best_task"]) == (10.0, 0)
    assert f["c2"]["forgetting"] == 15.0 and f["c3"]["forgetting"] == 0.0
    assert summary["mean_forgetting"] == 8.75
    # zero-shot AP of classes not yet learned
    assert summary["zero_shot"]["c4"] == [1.0, 2.0, None] and summary["zero_shot"]["c2"] == [5.0, None, None]
    assert summary["stages"][0]["zero_shot_mAP"] == 4.0 and "zero_shot_mAP" not in summary["stages"][2]
    text = format_summary(summary)
    assert "mAP@A" in text and "forgetting" in text and "(5.00)" in text and "8.75" in text
    assert "first task's classes" in text and "Task x stage matrix" in text
    assert f"Mean mAP@A over 3 stages: {(75.0 + 58.75 + 340 / 6) / 3:.2f}" in text
    assert re.search(r"task 2 \(3-4\) +\| +\(6\.00\) +\| +50\.00 +\| +42\.50", text)
    # a two-task summary prints what it printed before: no matrix, no mean line
    two = summarize_stages(loaded[:2], NAMES[:4], [range(0, 2), range(2, 4)])
    two_text = format_summary(two)
    assert "Task x stage matrix" not in two_text and "Mean mAP@A" not in two_text
    assert "B = old classes, N = new classes of the task" in two_text

    png = tmp_path / "plots" / "stages.png"
    plot_stages(summary, str(png))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert os.listdir(png.parent) == ["stages.png"]  # no temporary file left
    heat = tmp_path / "plots" / "tasks.png"
    plot_task_matrix(summary, str(heat))
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_json(summary, str(tmp_path / "summary.json"))
    assert read_json(str(tmp_path / "summary.json"))["mean_forgetting"] == 8.75


def test_summary_partial_run_and_bad_order():
    stages = _three_stages()[:2]
    summary = summarize_stages(stages, NAMES, RANGES)
    # final stage = task 1: old classes c0, c1 -> forgetting c0: 80 - 85 = -5, c1: 70 - 50 = 20
    assert summary["forgetting"]["c0"]["forgetting"] == -5.0 and summary["forgetting"]["c1"]["forgetting"] == 20.0
    with pytest.raises(ValueError, match="increasing"):
        summarize_stages(stages[::-1], NAMES, RANGES)


def test_zero_shot_without_detections_is_not_printed_as_zero(tmp_path):
    """A future class the model gave no detection is 'n/a (no detections scored)' in the stage table,
    the summary's text and JSON (null + note, left out of the means), not 0.00; a class that was scored
    and missed everything still reads 0.00."""
    definition = describe_ap("AP50", "voc07")

    def zs(values, dets):
        return {n: {**v, "detections": dets[n]} for n, v in _pc(values).items()}

    s0 = build_stage(0, RANGES, NAMES, _pc({"c0": 80.0, "c1": 70.0}), "AP50", definition,
                     zero_shot=zs({"c2": 6.0, "c3": 0.0, "c4": 0.0, "c5": 0.0}, {"c2": 9, "c3": 4, "c4": 0, "c5": 0}))
    s1 = build_stage(1, RANGES, NAMES, _pc({"c0": 85.0, "c1": 50.0, "c2": 60.0, "c3": 40.0}), "AP50", definition,
                     zero_shot=zs({"c4": 0.0, "c5": 0.0}, {"c4": 0, "c5": 0}))
    # a class without ground truth (NaN AP, detections or not) neither counts as unscored nor hides the rest
    no_gt = build_stage(1, RANGES, NAMES, s1["per_class"], "AP50", definition,
                        zero_shot=zs({"c4": 0.0, "c5": float("nan")}, {"c4": 0, "c5": 3}))
    assert no_gt["summary"]["zero_shot_note"] == "no detections scored"
    assert summarize_stages([s0, no_gt], NAMES, RANGES)["stages"][1]["zero_shot_note"] == "no detections scored"
    s2 = build_stage(2, RANGES, NAMES, _pc({n: 50.0 for n in NAMES}), "AP50", definition)
    # scored classes: c2 6, c3 0 (scored, all wrong) -> mean 3; c4, c5 left out and named by the note
    assert s0["summary"]["zero_shot_mAP"] == 3.0
    assert s0["summary"]["zero_shot_note"] == "2 of 4 classes left out: no detections scored"
    assert s0["zero_shot"]["c4"] == {"AP50": None, "AP50_voc07": None, "AP50_area": None, "detections": 0,
                                     "note": "no detections scored"}
    assert s0["zero_shot"]["c3"]["AP50"] == 0.0 and "note" not in s0["zero_shot"]["c3"]
    assert math.isnan(s1["summary"]["zero_shot_mAP"]) and s1["summary"]["zero_shot_note"] == "no detections scored"
    table = format_stage_table(s1, NAMES)
    assert re.search(r"\| c4 +\| zero-shot +\| n/a \(no detections scored\)", table)
    assert "zero-shot mAP of 2 future classes: n/a (no detections scored)" in table
    assert "detections" not in table.splitlines()[2]  # the count is not an AP column
    t0 = format_stage_table(s0, NAMES)
    assert re.search(r"\| c3 +\| zero-shot +\| +0\.00 \|", t0)
    assert "zero-shot mAP of 4 future classes: 3.00 (2 of 4 classes left out: no detections scored)" in t0

    for t, s in enumerate([s0, s1, s2]):
        write_json(s, str(tmp_path / f"task_{t}" / "metrics.json"))
    loaded = [read_json(str(tmp_path / f"task_{t}" / "metrics.json")) for t in range(3)]
    assert loaded[1]["summary"]["zero_shot_mAP"] is None and loaded[1]["zero_shot"]["c5"]["AP50"] is None
    summary = summarize_stages(loaded, NAMES, RANGES)
    assert summary["stages"][1]["zero_shot_note"] == "no detections scored"
    assert math.isnan(summary["stages"][1]["zero_shot_mAP"]) and summary["stages"][0]["zero_shot_mAP"] == 3.0
    assert summary["zero_shot"]["c4"] == [None, None, None] and summary["zero_shot"]["c3"] == [0.0, None, None]
    assert summary["zero_shot_notes"] == {n: ["no detections scored", "no detections scored", None] for n in ("c4", "c5")}
    tm = summary["task_matrix"]
    assert tm["zero_shot"][2] == [None, None, None] and tm["zero_shot"][1] == [3.0, None, None]
    assert tm["zero_shot_notes"] == [[None] * 3, [None] * 3, ["no detections scored"] * 2 + [None]]
    write_json(summary, str(tmp_path / "summary.json"))
    stored = read_json(str(tmp_path / "summary.json"))
    assert stored["stages"][1]["zero_shot_mAP"] is None and stored["stages"][1]["zero_shot_note"] == "no detections scored"
    text = format_summary(summary)
    assert re.search(r"2/3 +\| +58\.75 +\| +67\.50 +\| +50\.00 +\| +n/a \(no detections scored\)", text)
    assert re.search(r"task 3 \(5-6\) +\| +\(n/a: no detections scored\) +\| +\(n/a: no detections scored\) +\| +50\.00", text)
    assert re.search(r"\| c4 +\| +\(n/a: no detections scored\) +\| +\(n/a: no detections scored\) +\| +50\.00", text)
    assert re.search(r"\| c3 +\| +\(0\.00\) +\| +40\.00", text)  # scored and wrong: a real 0
    assert "(0.00)" not in re.search(r"\| c4 .*", text).group(0)
    plot_stages(summary, str(tmp_path / "stages.png"))
    plot_task_matrix(summary, str(tmp_path / "tasks.png"))
    assert (tmp_path / "stages.png").read_bytes()[:8] == (tmp_path / "tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_describe_ap():
    assert describe_ap("AP50", "area") == "AP50, area under the interpolated PR curve"
    assert describe_ap("AP", "coco") == "AP@[.5:.95], COCO 101-point"
    with pytest.raises(ValueError, match="voc12"):
        describe_ap("AP50", "voc12")

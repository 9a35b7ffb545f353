"""`DatasetEvaluator` protocol and `inference_on_dataset` (detectron2 semantics).

A model in eval mode maps a batch ``inputs`` (list of dicts with at least ``image_id``,
``height``, ``width``) to ``outputs``: one dict per image with ``boxes`` (FloatTensor[N, 4],
XYXY in original-image pixels), ``scores`` (FloatTensor[N]) and ``labels`` (LongTensor[N],
contiguous class indices). Evaluators accumulate per-rank predictions in ``process`` and gather
them to rank 0 once in ``evaluate``; non-main ranks return ``{}``.
"""
from __future__ import annotations

import datetime
import logging
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..utils import comm

__all__ = [
    "DatasetEvaluator", "DatasetEvaluators", "DetectionEvaluatorBase", "inference_on_dataset", "NUM_DETECTIONS",
    "inference_context",
]

logger = logging.getLogger(__name__)


class DatasetEvaluator:
    """Base class: ``reset()``, then ``process()`` per batch, then ``evaluate()``.

    ``evaluate()`` returns ``{task: {metric: value}}`` (e.g. ``{"bbox": {"AP50": 71.2}}``) on
    the main process and ``{}`` on the other ranks. It is collective: every rank must call it.
    """

    def reset(self) -> None:
        """Forget everything processed so far (called before inference)."""

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        """Accumulate one batch of model inputs and the matching outputs."""

    def evaluate(self) -> Dict[str, Any]:
        """Metrics over everything processed on all ranks (``{}`` on non-main ranks)."""
        return {}


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators run on the same outputs; their result dicts are merged.

    Two evaluators reporting the same task key (e.g. both ``"bbox"``) is an error.
    """

    def __init__(self, evaluators: Sequence[DatasetEvaluator]):
        super().__init__()
        self._evaluators = list(evaluators)

    def reset(self) -> None:
        for evaluator in self._evaluators:
            evaluator.reset()

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        for evaluator in self._evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> Dict[str, Any]:
        results: Dict[str, Any] = {}
        for evaluator in self._evaluators:
            result = evaluator.evaluate() or {}
            if comm.is_main_process():
                for key, value in result.items():
                    if key in results:
                        raise KeyError(
                            f"DatasetEvaluators: two evaluators report the task '{key}' "
                            f"({type(evaluator).__name__} is the second); combine evaluators of "
                            f"different tasks only"
                        )
                    results[key] = value
        return results


@contextmanager
def inference_context(model: nn.Module) -> Iterator[None]:
    """Switch `model` to eval mode inside the block; restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _maybe_len(obj: Any) -> Optional[int]:
    try:
        return len(obj)
    except TypeError:
        return None


def inference_on_dataset(
    model: nn.Module,
    data_loader: Iterable[List[Dict[str, Any]]],
    evaluator: Union[DatasetEvaluator, Sequence[DatasetEvaluator], None],
    log_period: float = 5.0,
) -> Dict[str, Any]:
    """Run `model` on every batch of `data_loader` (this rank's shard) and evaluate.

    The model runs in eval mode under ``torch.no_grad()``; its previous train/eval mode is
    restored afterwards. Progress (images done / estimated total, seconds per image, ETA) is
    logged at most every `log_period` seconds; the first few batches are excluded from timing.

    Returns:
        ``evaluator.evaluate()`` (``{}`` on non-main ranks or without an evaluator).
    """
    if evaluator is None:
        evaluator = DatasetEvaluators([])
    elif not isinstance(evaluator, DatasetEvaluator):
        evaluator = DatasetEvaluators(evaluator)

    num_batches = _maybe_len(data_loader)
    logger.info(
        f"Start inference on {num_batches if num_batches is not None else 'an unknown number of'} "
        f"batches (this rank; {comm.get_world_size()} process(es))"
    )
    evaluator.reset()

    num_warmup = min(5, num_batches - 1) if num_batches else 5
    num_images = 0
    timed_images = 0
    compute_time = 0.0
    start = time.perf_counter()
    timed_start = start
    last_log = start
    batch_idx = -1

    with inference_context(model), torch.no_grad():
        for batch_idx, inputs in enumerate(data_loader):
            if batch_idx == num_warmup:
                timed_start = time.perf_counter()
                timed_images = 0
                compute_time = 0.0

            t0 = time.perf_counter()
            outputs = model(inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            compute_time += time.perf_counter() - t0
            if len(outputs) != len(inputs):
                raise ValueError(
                    f"inference_on_dataset: the model returned {len(outputs)} outputs for a batch "
                    f"of {len(inputs)} images (batch {batch_idx})"
                )
            evaluator.process(inputs, outputs)

            num_images += len(inputs)
            if batch_idx >= num_warmup:
                timed_images += len(inputs)

            now = time.perf_counter()
            if now - last_log >= log_period and timed_images > 0:
                last_log = now
                sec_per_img = (now - timed_start) / timed_images
                msg = f"Inference: {num_images}"
                if num_batches is not None:
                    est_total = round(num_images / (batch_idx + 1) * num_batches)
                    eta = datetime.timedelta(seconds=int(sec_per_img * max(est_total - num_images, 0)))
                    msg += f"/~{est_total} images, {sec_per_img:.4f} s/img "
                    msg += f"(model {compute_time / timed_images:.4f} s/img), ETA {eta}"
                else:
                    msg += f" images, {sec_per_img:.4f} s/img (model {compute_time / timed_images:.4f} s/img)"
                logger.info(msg)

    total_time = time.perf_counter() - start
    timed = max(timed_images, 1)
    logger.info(
        f"Inference done: {num_images} images in {batch_idx + 1} batches, "
        f"{datetime.timedelta(seconds=int(total_time))} total "
        f"({(time.perf_counter() - timed_start) / timed:.4f} s/img after warm-up, "
        f"model {compute_time / timed:.4f} s/img) on this rank"
    )

    results = evaluator.evaluate()
    return results if results is not None else {}


def _to_numpy(x: Any, dtype: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.numpy() if x.dtype != torch.bfloat16 else x.float().numpy()
    return np.asarray(x, dtype=dtype)


# per-class key of the box evaluators' results: how many detections of the class were evaluated
# (0 = the model scored nothing for it, so its AP says nothing about how well it scores the class)
NUM_DETECTIONS = "detections"


class DetectionEvaluatorBase(DatasetEvaluator):
    """Shared part of the box evaluators: ground truth from dataset dicts, per-image predictions.

    Ground truth is read once from `gt_dicts` (detectron2 dataset dicts; ``category_id`` in
    ``0..len(class_names)-1``; boxes XYXY_ABS or XYWH_ABS). ``process`` keeps, per image, the
    detections of the evaluated classes as compact CPU numpy arrays (boxes float32 [N, 4] XYXY,
    scores float32 [N], labels int32 [N]); ``_gather_predictions`` collects them on rank 0 with
    one ``comm.gather``. Metrics are computed over the images that were processed.
    """

    def __init__(
        self,
        gt_dicts: Sequence[Dict[str, Any]],
        class_names: Sequence[str],
        eval_classes: Optional[Sequence[int]] = None,
        output_dir: Optional[str] = None,
    ):
        super().__init__()
        self._output_dir = output_dir
        self._class_names = list(class_names)
        num_classes = len(self._class_names)
        if eval_classes is None:
            eval_classes = range(num_classes)
        bad = [c for c in eval_classes if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: eval_classes {bad} are not indices of class_names "
                f"(0..{num_classes - 1})"
            )
        self._eval_classes = sorted({int(c) for c in eval_classes})
        self._gt = self._read_ground_truth(gt_dicts, num_classes)
        self.reset()

    def _read_ground_truth(self, gt_dicts: Sequence[Dict[str, Any]], num_classes: int) -> Dict[Any, Dict[str, Any]]:
        from ..data.catalog import BoxMode

        gt: Dict[Any, Dict[str, Any]] = {}
        for d in gt_dicts:
            image_id = d["image_id"]
            if image_id in gt:
                raise ValueError(f"{type(self).__name__}: image_id {image_id!r} appears twice in gt_dicts")
            annos = d.get("annotations", [])
            boxes = np.zeros((len(annos), 4), dtype=np.float64)
            labels = np.zeros(len(annos), dtype=np.int64)
            for i, a in enumerate(annos):
                box = np.asarray(a["bbox"], dtype=np.float64)
                mode = a.get("bbox_mode", BoxMode.XYXY_ABS)
                if mode == BoxMode.XYWH_ABS:
                    box = np.array([box[0], box[1], box[0] + box[2], box[1] + box[3]])
                elif mode != BoxMode.XYXY_ABS:
                    raise ValueError(f"{type(self).__name__}: image {image_id!r}: unsupported bbox_mode {mode}")
                boxes[i] = box
                labels[i] = int(a["category_id"])
                if not 0 <= labels[i] < num_classes:
                    raise ValueError(
                        f"{type(self).__name__}: image {image_id!r} has category_id {labels[i]} outside "
                        f"0..{num_classes - 1}; map dataset ids to contiguous class indices first"
                    )
            gt[image_id] = {
                "height": d.get("height"),
                "width": d.get("width"),
                "boxes": boxes,
                "labels": labels,
                "difficult": np.array([bool(a.get("difficult", 0)) for a in annos], dtype=bool),
                "iscrowd": np.array([int(a.get("iscrowd", 0)) for a in annos], dtype=np.int64),
                "area": [a.get("area") for a in annos],
            }
        return gt

    def reset(self) -> None:
        self._predictions: Dict[Any, Dict[str, np.ndarray]] = {}
        self._duplicates = 0

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        if len(inputs) != len(outputs):
            raise ValueError(f"{type(self).__name__}.process: {len(inputs)} inputs but {len(outputs)} outputs")
        keep = np.asarray(self._eval_classes, dtype=np.int64)
        num_classes = len(self._class_names)
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            if image_id not in self._gt:
                raise KeyError(
                    f"{type(self).__name__}: image_id {image_id!r} of the model input is not in the "
                    f"evaluator's gt_dicts (was the evaluator built for another dataset?)"
                )
            boxes = _to_numpy(out["boxes"], np.float32).reshape(-1, 4)
            scores = _to_numpy(out["scores"], np.float32).reshape(-1)
            labels = _to_numpy(out["labels"], np.int64).reshape(-1)
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(
                    f"{type(self).__name__}: image {image_id!r}: boxes/scores/labels lengths differ "
                    f"({len(boxes)}/{len(scores)}/{len(labels)})"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(
                    f"{type(self).__name__}: image {image_id!r}: predicted label outside 0..{num_classes - 1}"
                )
            mask = np.isin(labels, keep)
            if image_id in self._predictions:
                self._duplicates += 1
            self._predictions[image_id] = {
                "boxes": boxes[mask],
                "scores": scores[mask],
                "labels": labels[mask].astype(np.int32),
            }

    @staticmethod
    def _num_detections(predictions: Dict[Any, Dict[str, np.ndarray]], c: int) -> int:
        """Detections of class `c` over all processed images."""
        return int(sum(np.count_nonzero(p["labels"] == c) for p in predictions.values()))

    def _gather_predictions(self) -> Optional[Dict[Any, Dict[str, np.ndarray]]]:
        """All ranks' predictions merged on the main process (``None`` elsewhere); collective."""
        gathered = comm.gather((self._predictions, self._duplicates), dst=0)
        if not comm.is_main_process():
            return None
        merged: Dict[Any, Dict[str, np.ndarray]] = {}
        duplicates = 0
        for preds, dup in gathered:
            duplicates += dup
            for image_id, p in preds.items():
                if image_id in merged:
                    duplicates += 1
                    continue
                merged[image_id] = p
        if duplicates:
            logger.warning(
                f"{type(self).__name__}: {duplicates} image(s) were processed more than once; "
                f"each image is counted once"
            )
        if self._output_dir:
            self._write_results(merged)
        if len(merged) < len(self._gt):
            logger.warning(
                f"{type(self).__name__}: predictions for {len(merged)} of {len(self._gt)} images; "
                f"metrics cover the processed images only"
            )
        return merged

    def _write_results(self, predictions: Dict[Any, Dict[str, np.ndarray]]) -> None:
        """`output_dir`/coco_instances_results.json: the evaluated detections in the COCO results
        format (detectron2's file): image_id, category_id (the class index in `class_names`),
        bbox [x, y, w, h] in original image pixels, score."""
        import json
        import os

        from ..utils.checkpoint import atomic_write_bytes

        results = []
        for image_id, p in predictions.items():
            key = image_id.item() if isinstance(image_id, np.generic) else image_id
            boxes = p["boxes"].astype(np.float64)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            for box, score, label in zip(xywh.tolist(), p["scores"].tolist(), p["labels"].tolist()):
                results.append({"image_id": key, "category_id": int(label), "bbox": box, "score": float(score)})
        os.makedirs(self._output_dir, exist_ok=True)
        atomic_write_bytes(os.path.join(self._output_dir, "coco_instances_results.json"), json.dumps(results).encode())

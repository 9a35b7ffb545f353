"""`Predictor`: a trained model of one task run on single images (detectron2's DefaultPredictor)."""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from ..config import CfgNode, ConfigError
from ..utils.checkpoint import load_checkpoint_file

__all__ = ["Predictor", "trained_tasks"]

ImageLike = Union[str, Path, np.ndarray, torch.Tensor]


def trained_tasks(output_dir: str) -> List[int]:
    """Task numbers (1-based) with a task_<t>/model_final.pth in `output_dir`, ascending."""
    found = []
    for p in glob.glob(os.path.join(output_dir, "task_*", "model_final.pth")):
        m = re.fullmatch(r"task_(\d+)", os.path.basename(os.path.dirname(p)))
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


class Predictor:
    """The model after one task, on one image at a time.

        predictor = Predictor.from_run("output/clclip_shapes_10+10")          # the last trained task
        predictor = Predictor.from_run("output/clclip_shapes_10+10", task=1)  # the model after task 1
        predictor = Predictor(cfg)                                            # cfg.MODEL.WEIGHTS
        out = predictor("image.jpg")   # or an RGB uint8 HxWx3 array, or a uint8 3xHxW tensor
        out["boxes"], out["scores"], out["labels"], out["class_names"]

    The model is rebuilt as the run grew it (`ContinualRunner.load_task_model`): the vocabulary
    is every class seen up to that task. Boxes are XYXY in the input image's pixels, sorted by
    score; detections below `score_thresh` (default MODEL.ROI_HEADS.SCORE_THRESH_TEST) are dropped.
    """

    def __init__(self, cfg: CfgNode, weights: Optional[str] = None, score_thresh: Optional[float] = None):
        from .loop import ContinualRunner
        from ..data.mapper import DatasetMapper

        weights = weights or cfg.MODEL.WEIGHTS
        if not weights:
            raise ConfigError("Predictor: no weights (set MODEL.WEIGHTS to a task_<t>/model_final.pth, "
                              "or use Predictor.from_run(OUTPUT_DIR))")
        if not os.path.isfile(weights):
            raise ConfigError(f"Predictor: weights file '{weights}' does not exist")
        self.cfg = cfg.clone()
        self.cfg.freeze()
        task = int(load_checkpoint_file(weights).get("task", -1))
        runner = ContinualRunner(self.cfg)
        if not 0 <= task < runner.split.num_tasks:
            raise ConfigError(f"Predictor: {weights} names no task of CONTINUAL.TASKS '{self.cfg.CONTINUAL.TASKS}'")
        self.model = runner.load_task_model(task, weights).eval()
        self.task = runner.split.task(task)
        self.class_names: List[str] = list(self.task.class_names)
        self.weights = weights
        self.score_thresh = self.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST if score_thresh is None else score_thresh
        self.mapper = DatasetMapper(self.cfg, is_train=False)

    @classmethod
    def from_run(cls, output_dir: str, task: int = -1, opts: Optional[List[str]] = None,
                 score_thresh: Optional[float] = None) -> "Predictor":
        """The model after `task` (1-based, as in task_<t>/; -1 = the last trained task) of the run in
        `output_dir`, with the run's config.yaml (its plugins imported) and `opts` overrides."""
        from ..engine.defaults import setup_cfg

        cfg_path = os.path.join(output_dir, "config.yaml")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"'{output_dir}' is not a run folder: no config.yaml in it")
        done = trained_tasks(output_dir)
        if not done:
            raise ConfigError(f"'{output_dir}' has no trained task yet (no task_<t>/model_final.pth)")
        t = done[-1] if task == -1 else task
        if t not in done:
            raise ConfigError(f"task {task} of '{output_dir}' is not trained; trained: {', '.join(map(str, done))}")
        cfg = setup_cfg(cfg_path, ["OUTPUT_DIR", output_dir, *(opts or [])])
        return cls(cfg, os.path.join(output_dir, f"task_{t}", "model_final.pth"), score_thresh=score_thresh)

    @staticmethod
    def _as_array(image: ImageLike) -> np.ndarray:
        from ..data.mapper import read_image

        if isinstance(image, (str, Path)):
            return read_image(str(image))
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] not in (1, 3):
                raise ValueError(f"Predictor: a tensor image must be 3xHxW (or 1xHxW), got {tuple(image.shape)}")
            if image.is_floating_point():  # torchvision convention: floats in 0..1
                image = (image.clamp(0, 1) * 255).round()
            image = image.to(torch.uint8).expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"Predictor: an array image must be RGB HxWx3, got shape {image.shape}")
        return np.ascontiguousarray(image.astype(np.uint8))

    @torch.no_grad()
    def __call__(self, image: ImageLike) -> Dict[str, Any]:
        """Detections of one image: boxes (FloatTensor[N, 4] XYXY pixels), scores, labels (class
        indices) and class_names (their names), on the CPU, best first."""
        array = self._as_array(image)
        h, w = array.shape[:2]
        inputs = self.mapper({"image": array, "height": h, "width": w, "image_id": 0,
                              "file_name": str(image) if isinstance(image, (str, Path)) else ""})
        out = self.model([inputs])[0]
        keep = out["scores"] >= self.score_thresh
        order = torch.argsort(out["scores"][keep], descending=True)
        boxes, scores, labels = (out[k][keep][order].cpu() for k in ("boxes", "scores", "labels"))
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        return {"boxes": boxes, "scores": scores, "labels": labels,
                "class_names": [self.class_names[int(i)] for i in labels]}

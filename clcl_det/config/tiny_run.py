"""The tiny run: config overrides that shrink any config to a few-second CPU run (random-weight
tiny CLIP, 24/12 Shapes images, small heads, a few iterations). Used by the tests, by
tools/kill_resume_check.py and by the example plugin, so the three run the same setup."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["TINY_RUN", "tiny_run_overrides"]

TINY_RUN: Dict[str, Any] = {
    "MODEL.CLIP.PRETRAINED": "",  # random weights: no pretraining, no download
    "MODEL.CLIP.TEMPLATES": "simple",
    "DATASETS.SHAPES.NUM_TRAIN": 24, "DATASETS.SHAPES.NUM_TEST": 12,
    "MODEL.FPN.OUT_CHANNELS": 32, "MODEL.ROI_BOX_HEAD.CONV_DIM": 16, "MODEL.ROI_BOX_HEAD.NUM_CONV": 1,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 100,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 100, "MODEL.RPN.POST_NMS_TOPK_TEST": 50,
    "SOLVER.IMS_PER_BATCH": 4, "SOLVER.MAX_ITER": 4, "SOLVER.WARMUP_ITERS": 2,
    "SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.LOG_PERIOD": 2, "TEST.IMS_PER_BATCH": 4,
}


def tiny_run_overrides(changes: Optional[Dict[str, Any]] = None) -> List[str]:
    """`TINY_RUN` updated with `changes`, as a flat KEY VALUE list for `merge_from_list`,
    `setup_cfg` or a command line."""
    merged = {**TINY_RUN, **(changes or {})}
    return [str(x) for k, v in merged.items() for x in (k, v)]

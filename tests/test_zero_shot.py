"""Zero-shot scoring of the classes that have no expert yet, through whole tiny CL-CLIP runs."""
import math
import os

import pytest

from clcl_det.config.tiny_run import tiny_run_overrides
from clcl_det.data import build_continual_split, get_detection_dataset_dicts
from clcl_det.evaluation import read_json

from conftest import run_tiny, tiny_cfg

# task 2 trains a single class on images that show every class (as each step of 15+1x5 does), with
# enough steps for the shared branch to learn what that task's labels teach it; task 3 is only
# evaluated (zero-shot), so it is not trained
TINY_3_TASKS = {"CONTINUAL.TASKS": "10+1+9", "CONTINUAL.TRAIN_TASKS": 2, "SOLVER.MAX_ITER": 12,
                "SOLVER.BASE_LR": 0.005, "SOLVER.WARMUP_ITERS": 0, "MODEL.CLCLIP.MULTI_EXPERT.EXPERT_DIM": 4}


@pytest.mark.parametrize("config", ["clclip/clclip_shapes_15+1x5.yaml", "clclip_plus/clclip_plus_shapes_15+1x5.yaml"])
def test_classes_without_an_expert_are_scored_after_every_task(config, shapes_root, tmp_path):
    """After tasks 1 and 2 of a 3-task run, task 3's classes get detections on the test images (scores
    above the score threshold, so non-zero) and a finite zero-shot AP: the shared branch still scores
    the classes that have no expert once earlier tasks have finished. (With a random-weight CLIP the
    text embeddings say little, so only some of them are scored.)"""
    out = str(tmp_path / "run")
    cfg = tiny_cfg(out)
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs", config))
    cfg.merge_from_list(tiny_run_overrides({"OUTPUT_DIR": out, **TINY_3_TASKS}))
    run_tiny(cfg)
    split = build_continual_split(cfg)
    task3 = split.task(2)
    objects = sum(task3.start <= a["category_id"] < task3.stop
                  for d in split.remap(get_detection_dataset_dicts(cfg.DATASETS.TEST)) for a in d["annotations"])
    assert objects > 0
    for t in (1, 2):
        stage = read_json(os.path.join(out, f"task_{t}", "metrics.json"))
        zs = {n: stage["zero_shot"][n] for n in task3.new_class_names}
        # scored: at least as many detections (each above SCORE_THRESH_TEST > 0) as there are task-3
        # objects to find, not a stray one
        detections = sum(v["detections"] for v in zs.values())
        assert detections >= objects, f"after task {t}: {detections} detections for {objects} task-3 objects"
        scored = [v["AP50"] for v in zs.values() if v["detections"] > 0 and v["AP50"] is not None]
        assert scored and all(math.isfinite(ap) for ap in scored), f"after task {t}: no finite zero-shot AP"
        assert math.isfinite(stage["summary"]["zero_shot_mAP"])

"""The heads alone and inside CL-CLIP, the Faster-ILOD baseline and the CL-CLIP ablations of configs/Shapes run end to end
(two tasks, one iteration each, tiny sizes) — the configs MODEL_ZOO.md reports, as shipped."""
import json
import math
import os

import pytest

from conftest import run_tiny, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["spa_10+10", "replay_10+10", "sevpr_10+10", "seca_10+10", "secapp_10+10", "distill_10+10",
           "clclip_spa_10+10", "clclip_replay_10+10", "clclip_sevpr_10+10", "clclip_seca_10+10",
           "clclip_secapp_10+10", "finetune_unbiased_10+10"] + [
    f"clclip_10+10_{a}" for a in ("no_cost_volume", "no_freeze", "no_drift", "no_orth")] + [
    "clclip_plus_10+10"] + [f"clclip_plus_10+10_{a}" for a in ("no_shared_logits", "no_unbiased_bg", "no_distill", "no_bg_ignore")]


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_config_trains_two_tasks(name, shapes_root, tmp_path):
    cfg = tiny_cfg(str(tmp_path / name))
    cfg.merge_from_file(os.path.join(REPO, "configs", "Shapes", f"{name}.yaml"))
    # the file's own CLIP, schedule and output folder, replaced again for the test (random tiny CLIP)
    cfg.merge_from_list(["MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES", "simple", "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(tmp_path / name),
                         "INPUT.IMAGE_SIZE", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16"])
    summary = run_tiny(cfg)
    assert [s["task"] for s in summary["stages"]] == [0, 1]
    with open(os.path.join(str(tmp_path / name), "task_2", "train_metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    losses = {k: v for k, v in last.items() if k.startswith("loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    if cfg.MODEL.CONTINUAL_LOSSES:
        assert any(k not in ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc") for k in losses), losses

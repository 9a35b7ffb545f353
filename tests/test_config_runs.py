"""The heads alone and inside CL-CLIP, the Faster-ILOD baseline and the CL-CLIP ablations on Shapes run end to end
(two tasks, one iteration each, tiny sizes) — the configs MODEL_ZOO.md reports, as shipped."""
import json
import math
import os

import pytest

from conftest import run_tiny, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["spa/spa_shapes_10+10", "replay/replay_shapes_10+10", "seca/sevpr_shapes_10+10", "seca/seca_shapes_10+10",
           "seca/secapp_shapes_10+10", "faster_ilod/distill_shapes_10+10", "fvit/finetune_unbiased_shapes_10+10"] + [
    f"clclip_plus/clclip_plus_{h}_shapes_10+10" for h in ("spa", "replay", "sevpr", "seca", "secapp")] + [
    f"clclip/clclip_shapes_10+10_{a}" for a in ("no_cost_volume", "no_freeze", "no_drift", "no_orth")] + [
    "clclip_plus/clclip_plus_shapes_10+10"] + [
    f"clclip_plus/clclip_plus_shapes_10+10_{a}" for a in ("no_shared_logits", "no_unbiased_bg", "no_distill", "no_bg_ignore")]


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_config_trains_two_tasks(name, shapes_root, tmp_path):
    cfg = tiny_cfg(str(tmp_path / name))
    cfg.merge_from_file(os.path.join(REPO, "configs", f"{name}.yaml"))
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

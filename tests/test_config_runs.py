"""The Shapes method configs run end to end as shipped (two tasks, one iteration each,
tiny sizes) and train exactly the losses their modules declare; each ablation (`*_no_<part>.yaml`)
is its parent config with only the ablated part changed, so it is checked as that config
difference (and, for a loss left out, as the loss no longer declared by the built model)."""
import glob
import json
import math
import os

import pytest
import yaml

from clcl_det.config import get_cfg
from clcl_det.continual import ContinualRunner
from clcl_det.engine import default_setup
from clcl_det.modeling import build_model
from clcl_det.modeling.losses.build import CONTINUAL_LOSS_REGISTRY

from conftest import tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
RUNS = ["spa/spa_shapes_10+10", "replay/replay_shapes_10+10", "seca/sevpr_shapes_10+10", "seca/seca_shapes_10+10",
        "seca/secapp_shapes_10+10", "faster_ilod/distill_shapes_10+10"] + [
    f"clclip_plus/clclip_plus_{h}_shapes_10+10" for h in ("spa", "replay", "sevpr", "seca", "secapp")] + [
    "fvit/finetune_unbiased_shapes_10+10", "clclip_plus/clclip_plus_shapes_10+10"]
DETECTOR_LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}


def _declared_losses(model):
    """Every loss name a module of the model declares (`loss_names`)."""
    return {n for m in model.modules() for n in (getattr(type(m), "loss_names", ()) or ())}


@pytest.mark.parametrize("name", RUNS)
def test_shapes_config_trains_two_tasks(name, shapes_root, tmp_path, monkeypatch):
    """Two tasks run; task 2's losses are finite, each continual loss of the config returns its
    losses there, and no loss appears that no module of the model declares."""
    import clcl_det.engine.evaluate as evaluate

    monkeypatch.setattr(evaluate, "plot_stages", lambda *a, **k: None)  # no test here reads the plots
    monkeypatch.setattr(evaluate, "plot_task_matrix", lambda *a, **k: None)
    cfg = tiny_cfg(str(tmp_path / name))
    cfg.merge_from_file(os.path.join(CONFIGS, f"{name}.yaml"))
    # the file's own CLIP, schedule and output folder, replaced again for the test (random tiny CLIP)
    cfg.merge_from_list(["MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES", "simple", "SOLVER.MAX_ITER", "1",
                         "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(tmp_path / name), "INPUT.IMAGE_SIZE", "64",
                         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16"])
    cfg.freeze()
    default_setup(cfg)
    runner = ContinualRunner(cfg)
    summary = runner.run()
    declared = _declared_losses(runner.model) | DETECTOR_LOSSES
    assert [s["task"] for s in summary["stages"]] == [0, 1]
    with open(os.path.join(str(tmp_path / name), "task_2", "train_metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    losses = {k: v for k, v in last.items() if k.startswith("loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    assert set(losses) <= declared, f"losses no module declares: {set(losses) - declared}"
    for loss in cfg.MODEL.CONTINUAL_LOSSES:
        assert set(CONTINUAL_LOSS_REGISTRY.get(loss).loss_names) & set(losses), f"{loss} returned nothing in task 2"


def test_clutter_ior_config_runs_and_reports_coco_ap(shapes_root, tmp_path, monkeypatch):
    """CL-CLIP on Clutter IOR 40+40 as shipped (80 classes, non-co-occurrence filter, top-k experts), shrunk
    to one iteration per task on a generated 16-image Clutter: its stages are COCO AP with B / N / A and
    the overall COCO numbers of the seen classes."""
    import clcl_det.engine.evaluate as evaluate

    monkeypatch.setattr(evaluate, "plot_stages", lambda *a, **k: None)
    monkeypatch.setattr(evaluate, "plot_task_matrix", lambda *a, **k: None)
    out = str(tmp_path / "clutter")
    cfg = tiny_cfg(out)
    cfg.merge_from_file(os.path.join(CONFIGS, "clclip", "clclip_clutter_ior_40+40.yaml"))
    cfg.merge_from_list(["MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES", "simple", "SOLVER.MAX_ITER", "1",
                         "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", out, "INPUT.IMAGE_SIZE", "64",
                         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "DATASETS.CLUTTER.NUM_TRAIN", "16",
                         "DATASETS.CLUTTER.NUM_VAL", "1", "DATASETS.CLUTTER.NUM_TEST", "4", "TEST.ZERO_SHOT", "False"])
    cfg.freeze()
    default_setup(cfg)
    summary = ContinualRunner(cfg).run()
    assert [s["task"] for s in summary["stages"]] == [0, 1] and summary["metric"] == "AP"
    assert "COCO 101-point" in summary["ap_definition"] and len(summary["class_names"]) == 80
    with open(os.path.join(out, "task_2", "metrics.json")) as f:
        stage = json.load(f)
    assert set(stage["summary"]) >= {"mAP@B", "mAP@N", "mAP@A"}
    assert set(stage["extra"]["evaluator"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert "COCO box AP of the seen classes" in open(os.path.join(out, "task_2", "per_class.txt")).read()


# -- ablations: the parent config with only the ablated part changed ---------------------------------------
def _without(loss):
    return {"MODEL.CONTINUAL_LOSSES": lambda parent, ablation: loss in parent and ablation == [x for x in parent if x != loss]}


ABLATED = {  # suffix -> {key: check(parent value, ablation value)}
    "no_cost_volume": {"MODEL.CLCLIP.COST_VOLUME.ENABLED": lambda p, a: p is True and a is False},
    "no_freeze": {"MODEL.CLCLIP.MULTI_EXPERT.FREEZE": lambda p, a: p is True and a is False,
                  "MODEL.RPN.FREEZE_AFTER_FIRST_TASK": lambda p, a: p is True and a is False},
    "no_drift": _without("FPNDrift"),
    "no_orth": _without("Orthogonality"),
    "no_distill": _without("UnbiasedDistill"),
    "no_shared_logits": {"MODEL.CLCLIP.MULTI_EXPERT.SHARED_CLASS_LOGITS": lambda p, a: p is True and a is False},
    "no_unbiased_bg": {"MODEL.ROI_HEADS.UNBIASED_BACKGROUND": lambda p, a: p is True and a is False},
    "no_bg_ignore": {"MODEL.CLCLIP.BG_IGNORE_THRESH": lambda p, a: p <= 1.0 < a},
    "no_replay": {"MODEL.REPLAY.WEIGHT": lambda p, a: p > 0 and a == 0},
    "no_reg": {"MODEL.SEVPR.REG_WEIGHT": lambda p, a: p > 0 and a == 0},
}
ABLATIONS = sorted(os.path.relpath(p, os.path.join(REPO, "configs"))
                   for p in glob.glob(os.path.join(REPO, "configs", "**", "*_no_*.yaml"), recursive=True))


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _load(path):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    return cfg


def test_every_ablation_is_checked():
    assert len(ABLATIONS) >= 16
    unknown = [a for a in ABLATIONS if os.path.basename(a)[:-5].split("_no_")[-1] not in {k[3:] for k in ABLATED}]
    assert not unknown, f"ablations without a declared difference in ABLATED: {unknown}"


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablation_differs_from_its_parent_only_in_the_ablated_part(ablation):
    path = os.path.join(REPO, "configs", ablation)
    with open(path) as f:
        base = yaml.safe_load(f)["_BASE_"]
    assert isinstance(base, str), f"{ablation}: an ablation inherits one parent config, not {base}"
    parent, child = _flat(_load(os.path.join(os.path.dirname(path), base))), _flat(_load(path))
    expected = ABLATED["no_" + os.path.basename(ablation)[:-5].split("_no_")[-1]]
    differing = {k for k in parent if parent[k] != child[k]} - {"OUTPUT_DIR"}
    assert differing == set(expected), f"{ablation} vs {base}: {sorted(differing)}"
    for key, check in expected.items():
        assert check(parent[key], child[key]), (key, parent[key], child[key])
    assert child["OUTPUT_DIR"] != parent["OUTPUT_DIR"]


@pytest.mark.parametrize("name,loss,names", [("clclip/clclip_shapes_10+10_no_drift", "FPNDrift", {"loss_drift"}),
                                             ("clclip/clclip_shapes_10+10_no_orth", "Orthogonality", {"loss_orth"}),
                                             ("clclip_plus/clclip_plus_shapes_10+10_no_distill", "UnbiasedDistill",
                                              {"loss_distill_rpn", "loss_distill_roi"})])
def test_ablation_without_a_loss_builds_a_model_without_it(name, loss, names):
    """The model of the ablation declares none of the left-out loss's names (so, by the runs
    above, cannot return them); its parent's does."""
    def declared(cfg_name):
        cfg = tiny_cfg()
        cfg.merge_from_file(os.path.join(CONFIGS, f"{cfg_name}.yaml"))
        cfg.merge_from_list(["MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES", "simple"])
        return _declared_losses(build_model(cfg))

    assert not names & declared(name)
    assert names <= declared(name.rsplit("_no_", 1)[0])

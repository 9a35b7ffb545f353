"""The continual engine: a whole run, resume across the task boundary and mid-task, eval-only,
refusing another run's directory, plugins from outside the package."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from clcl_det.continual import ContinualRunner, RunStateError
from clcl_det.engine import setup_cfg
from clcl_det.modeling import build_model

from conftest import final_state, run_tiny, same_state, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cfg, resume=False):
    return run_tiny(cfg, resume)


def _cfg(out):
    return tiny_cfg(out, DETERMINISTIC="True")


def _metrics(out, t):
    with open(os.path.join(out, f"task_{t}", "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def full_run(reference_run):
    return reference_run


def test_full_run_writes_every_stage(full_run):
    out, summary = full_run
    for t in (1, 2):
        for f in ("model_final.pth", "metrics.json", "per_class.txt"):
            assert os.path.isfile(os.path.join(out, f"task_{t}", f))
    for f in ("summary.json", "summary.txt", "summary.png", "config.yaml", "log.txt"):
        assert os.path.isfile(os.path.join(out, f))
    assert [s["task"] for s in summary["stages"]] == [0, 1]
    m2 = _metrics(out, 2)
    assert set(m2["summary"]) >= {"mAP@B", "mAP@N", "mAP@A"} and m2["groups"]["old"] == list(range(10))
    assert _metrics(out, 1)["zero_shot"], "future classes are evaluated zero-shot after task 1"


def test_resume_across_task_boundary_and_mid_task(full_run, tmp_path):
    out, _ = full_run
    ref = _metrics(out, 2)
    # 1) killed right after task 1 was complete
    a = str(tmp_path / "a")
    shutil.copytree(out, a)
    shutil.rmtree(os.path.join(a, "task_2"))
    _run(_cfg(a), resume=True)
    assert _metrics(a, 2)["per_class"] == ref["per_class"] and same_state(final_state(out), final_state(a))
    # 2) killed in the middle of task 2 (after the iteration-1 checkpoint)
    b = str(tmp_path / "b")
    shutil.copytree(out, b)
    d = os.path.join(b, "task_2")
    for f in os.listdir(d):
        if f not in ("model_0000001.pth",):
            os.remove(os.path.join(d, f))
    with open(os.path.join(d, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    _run(_cfg(b), resume=True)
    assert _metrics(b, 2)["per_class"] == ref["per_class"] and same_state(final_state(out), final_state(b))
    # 3) killed during the evaluation of task 2
    c = str(tmp_path / "c")
    shutil.copytree(out, c)
    os.remove(os.path.join(c, "task_2", "metrics.json"))
    _run(_cfg(c), resume=True)
    assert _metrics(c, 2)["per_class"] == ref["per_class"]


def test_refuses_to_overwrite_or_mix_runs(full_run, tmp_path):
    out, _ = full_run
    with pytest.raises(RunStateError, match="already holds a run; pass --resume"):
        _run(_cfg(out))
    cfg = _cfg(out)
    cfg.merge_from_list(["CONTINUAL.TASKS", "15+5"])
    with pytest.raises(RunStateError, match=r"different config \(CONTINUAL.TASKS: '10\+10' -> '15\+5'"):
        _run(cfg, resume=True)


def test_eval_only_reproduces_metrics(full_run, tmp_path):
    out, _ = full_run
    ref = _metrics(out, 2)
    cfg = _cfg(str(tmp_path / "e"))
    cfg.merge_from_list(["MODEL.WEIGHTS", os.path.join(out, "task_2", "model_final.pth")])
    cfg.freeze()
    ContinualRunner(cfg).evaluate()
    with open(os.path.join(str(tmp_path / "e"), "eval_1", "task_2", "metrics.json")) as f:
        assert json.load(f)["per_class"] == ref["per_class"]
    other = _cfg(str(tmp_path / "f"))
    other.merge_from_list(["CONTINUAL.TASKS", "15+5", "MODEL.WEIGHTS", os.path.join(out, "task_2", "model_final.pth")])
    other.freeze()
    from clcl_det.utils.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"belongs to split 10\+10"):
        ContinualRunner(other).evaluate()


PLUGIN = textwrap.dedent('''
    """A user's method, registered from outside the package."""
    from clcl_det.modeling import CLS_HEAD_REGISTRY
    from clcl_det.modeling.cls_heads.text_classifier import TextClassifier

    @CLS_HEAD_REGISTRY.register()
    class ScaledTextClassifier(TextClassifier):
        def forward(self, x, ctx, rois=None):
            return 0.5 * super().forward(x, ctx, rois)

    def add_config(cfg):
        cfg.MODEL.CLS_HEAD.USER_SCALE = 0.5  # a key the plugin declares
''')


def test_plugin_from_a_file_outside_the_package(tmp_path):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(PLUGIN)
    cfg = setup_cfg("", ["MODEL.CLS_HEAD.NAME", "ScaledTextClassifier", "MODEL.CLIP.PRETRAINED", "",
                         "MODEL.CLS_HEAD.USER_SCALE", "0.25"], plugins=[str(plugin)])
    assert cfg.MODEL.CLS_HEAD.USER_SCALE == 0.25 and cfg.PLUGINS == [str(plugin)]
    model = build_model(cfg)
    assert type(model.roi_heads.cls_head).__name__ == "ScaledTextClassifier"
    # the same through a YAML's PLUGINS key, relative to the YAML
    (tmp_path / "x.yaml").write_text("PLUGINS: ['my_method.py']\nMODEL:\n  CLS_HEAD:\n    NAME: ScaledTextClassifier\n")
    assert setup_cfg(str(tmp_path / "x.yaml")).MODEL.CLS_HEAD.NAME == "ScaledTextClassifier"


def test_cli_errors_are_one_line(tmp_path, shapes_root):
    def cli(*args):
        r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), *args],
                           capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
        return r.returncode, r.stderr.strip().splitlines()

    code, err = cli("--config", "fvit/finetune_shapes_10+10.yaml", "SOLVER.MAX_ITR", "3")
    assert code == 2 and err[-1] == ("clcl_det: error: Unknown config key 'SOLVER.MAX_ITR' (command-line "
                                      "override); did you mean 'SOLVER.MAX_ITER'?") and len(err) == 1
    code, err = cli("--config", "fvit/finetune_shapes_10+10.yaml", "CONTINUAL.TASKS", "10+5", "MODEL.CLIP.PRETRAINED", "")
    assert code == 2 and "adds up to 15 classes" in err[-1] and len(err) == 1
    env_missing = str(tmp_path / "nowhere")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config",
                        "fvit/finetune_voc_10+10.yaml", "MODEL.CLIP.PRETRAINED", "", "OUTPUT_DIR", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                       env={**os.environ, "CLCL_DATASETS": env_missing})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "CLCL_DATASETS" in last and env_missing in last


def test_evaluation_runs_under_the_training_autocast_with_close_detections():
    """SOLVER.AMP (bf16, which autocasts on a CPU too): evaluation runs under the same autocast
    unless TEST.AMP is off, and its best detections are those of fp32 within bf16 precision."""
    import torch
    from torchvision.ops import box_iou

    from clcl_det.continual import begin_task
    from clcl_det.data.continual import Task
    from clcl_det.engine.evaluate import eval_autocast

    names = tuple(f"class {i}" for i in range(6))
    cfg = tiny_cfg(**{"SOLVER.AMP": "True", "SOLVER.AMP_DTYPE": "bfloat16", "INPUT.IMAGE_SIZE": "64"})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    begin_task(model, Task(0, 0, 6, names, names))
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g), "height": 64, "width": 64}
              for _ in range(2)]
    with torch.no_grad():
        fp32 = model(images)
        with eval_autocast(cfg, torch.device("cpu")):
            amp = model(images)
        off = cfg.clone()
        off.TEST.AMP = False
        with eval_autocast(off, torch.device("cpu")):
            model(images)
    assert seen == [False, True, False]
    for a, b in zip(fp32, amp):  # near-ties of an untrained model may reorder a few: 8 of the best 10
        assert len(a["boxes"]) >= 10
        matched = 0
        for box, score, label in zip(a["boxes"][:10], a["scores"][:10], a["labels"][:10]):
            match = (b["labels"] == label) & (box_iou(box[None], b["boxes"].float())[0] > 0.8)
            matched += int(bool(match.any()) and float((b["scores"][match].float() - score).abs().min()) < 0.02)
        assert matched >= 8, matched


def test_default_setup_sets_cudnn_for_bit_identical_runs(tmp_path):
    """DETERMINISTIC: cuDNN benchmark off, deterministic algorithms on; otherwise benchmark on and
    the deterministic settings of an earlier setup undone (the conftest fixture restores them)."""
    import torch

    from clcl_det.engine import default_setup

    for det in (True, False):
        cfg = tiny_cfg(str(tmp_path / str(det)), DETERMINISTIC=str(det))
        default_setup(cfg)
        assert torch.backends.cudnn.benchmark is (not det) and torch.backends.cudnn.deterministic is det
        assert torch.are_deterministic_algorithms_enabled() is det

"""The continual contract: a method written outside the package (a head and a loss with their own
keys and hooks) takes part in the life cycle through the one dispatcher; misspelt hooks fail."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from clcl_det.continual import LifeCycleError, begin_task, continual_modules
from clcl_det.data.continual import Task
from clcl_det.engine import load_plugins, setup_cfg
from clcl_det.modeling import ContinualModule
from clcl_det.modeling.continual_module import HookNameError
from clcl_det.config.tiny_run import tiny_run_overrides

from conftest import run_tiny

PLUGIN = '''
from clcl_det.config import CfgNode
from clcl_det.modeling import CLS_HEAD_REGISTRY, CONTINUAL_LOSS_REGISTRY, ContinualLoss
from clcl_det.modeling.cls_heads.text_classifier import TextClassifier

CALLS = []  # (who, hook, task index[, images seen])
SEEN = set()  # (task index, teacher given, loss weight) as the loss saw them in training


def add_config(cfg):
    cfg.MODEL.HOOKED = CfgNode()  # the test method's keys
    cfg.MODEL.HOOKED.LOSS_WEIGHT = 0.5  # weight of its loss


@CLS_HEAD_REGISTRY.register()
class HookedHead(TextClassifier):
    def on_task_start(self, task, model):
        CALLS.append(("head", "start", task.index))

    def on_task_end(self, task, model):
        CALLS.append(("head", "end", task.index))

    def on_task_data(self, task, model, loader):
        CALLS.append(("head", "data", task.index, sum(len(batch) for batch in loader)))


@CONTINUAL_LOSS_REGISTRY.register()
class HookedLoss(ContinualLoss):
    needs_teacher = True

    def __init__(self, cfg):
        super().__init__()
        self.weight = cfg.MODEL.HOOKED.LOSS_WEIGHT

    def on_task_start(self, task, model):
        CALLS.append(("loss", "start", task.index))

    def on_task_end(self, task, model):
        CALLS.append(("loss", "end", task.index))

    def forward(self, model, outputs, batched_inputs, teacher):
        SEEN.add((outputs.ctx.task.index, teacher is not None, self.weight))
        if teacher is None:
            return {}
        old = teacher.roi_logits().shape[1] - 1  # the teacher, through its declared interface
        diff = outputs.roi["logits"][:, :old] - teacher.roi_logits()[:, :old]
        return {"loss_hooked": self.weight * diff.pow(2).mean()}
'''


def test_plugin_head_and_loss_hooks_run_once_per_task_in_order(shapes_root, tmp_path):
    path = tmp_path / "hooked_method.py"
    path.write_text(PLUGIN)
    out = str(tmp_path / "run")
    opts = tiny_run_overrides({"SOLVER.MAX_ITER": 2, "SOLVER.CHECKPOINT_PERIOD": 100, "TEST.ZERO_SHOT": False,
                               "INPUT.IMAGE_SIZE": 64, "MODEL.CLS_HEAD.NAME": "HookedHead",
                               "MODEL.CONTINUAL_LOSSES": "['HookedLoss']", "MODEL.HOOKED.LOSS_WEIGHT": 0.25,
                               "OUTPUT_DIR": out})
    cfg = setup_cfg("", opts, plugins=[str(path)])
    cfg.defrost()
    run_tiny(cfg)
    plugin = load_plugins([str(path)])[0]
    n0, n1 = [c[3] for c in plugin.CALLS if c[1] == "data"]
    assert n0 > 0 and n1 > 0
    assert plugin.CALLS == [
        ("head", "start", 0), ("loss", "start", 0), ("head", "end", 0), ("loss", "end", 0), ("head", "data", 0, n0),
        ("head", "start", 1), ("loss", "start", 1), ("head", "end", 1), ("loss", "end", 1), ("head", "data", 1, n1),
    ]
    # the loss read its own key; the teacher (kept because the loss declared it) came from task 2 on
    assert plugin.SEEN == {(0, False, 0.25), (1, True, 0.25)}


def test_misspelt_or_misdeclared_hooks_fail_loudly():
    with pytest.raises(HookNameError, match=r"on_task_strat is not a continual hook; did you mean 'on_task_start'"):
        class Typo(ContinualModule):  # noqa: F841
            def on_task_strat(self, task, model):
                pass
    with pytest.raises(HookNameError, match=r"need_teacher.*did you mean 'needs_teacher'"):
        class Typo2(ContinualModule):  # noqa: F841
            need_teacher = True
    with pytest.raises(HookNameError, match=r"on_task_data must take \(self, task, model, loader\)"):
        class WrongArgs(ContinualModule):  # noqa: F841
            def on_task_data(self, task, model):
                pass

    class Fine(ContinualModule):
        def on_task_start(self, task, model):
            self.started = task.index

    class DuckTyped(nn.Module):  # hooks without the contract would silently never run
        def on_task_start(self, task, model):
            pass

    task = Task(0, 0, 1, ("a",), ("a",))
    good = nn.Sequential(nn.Linear(1, 1), Fine())
    begin_task(good, task)
    assert good[1].started == 0 and continual_modules(good) == [good[1]]
    with pytest.raises(LifeCycleError, match="DuckTyped defines on_task_start but does not subclass"):
        begin_task(nn.Sequential(Fine(), DuckTyped()), task)
    assert torch.is_tensor(good[0].weight)

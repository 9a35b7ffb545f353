"""The continual loop around a method with a teacher: CONTINUAL.TEACHER decides whether the
previous task's model reaches the losses, a run killed in the middle of task 2 resumes to the same
weights bit for bit (the teacher rebuilt from task 1's final model), and a config.yaml written
before a key existed still resumes."""
import copy
import os
import shutil

import pytest
import yaml

from clcl_det.config import CfgNode
from clcl_det.continual import ContinualRunner
from clcl_det.continual.loop import config_differences
import clcl_det.engine.evaluate as evaluate
from clcl_det.engine import default_setup
from clcl_det.engine.hooks import HookBase

from conftest import final_state, same_state, tiny_cfg

DRIFT = {"MODEL.ROI_HEADS.NAME": "MultiExpertRoIHeads", "MODEL.CLCLIP.MULTI_EXPERT.EXPERT_DIM": 4,
         "MODEL.CONTINUAL_LOSSES": "['FPNDrift']"}


class _Stop(Exception):
    pass


class TeacherRecord(HookBase):
    """Per training step: (task index, a teacher is set, the losses of the step); with `stop`,
    the run is stopped after the first step it records."""

    def __init__(self, stop=False):
        self.steps, self.stop = [], stop

    def after_step(self):
        model = self.runner.model
        self.steps.append((model.task.index, model.teacher is not None, set(self.trainer.latest)))
        if self.stop:
            raise _Stop


def _run(out, teacher="auto", resume=False, stop=False, **overrides):
    cfg = tiny_cfg(out, **{"DETERMINISTIC": True, "SOLVER.MAX_ITER": 2, "SOLVER.CHECKPOINT_PERIOD": 1,
                           "SOLVER.IMS_PER_BATCH": 2, "INPUT.IMAGE_SIZE": 64, "CONTINUAL.TEACHER": teacher,
                           **overrides})
    cfg.freeze()
    default_setup(cfg)
    runner = ContinualRunner(cfg, resume=resume)
    record = TeacherRecord(stop)
    runner.register_hooks([record])
    with pytest.MonkeyPatch.context() as mp:  # no test here reads the plots
        mp.setattr(evaluate, "plot_stages", lambda *a, **k: None)
        mp.setattr(evaluate, "plot_task_matrix", lambda *a, **k: None)
        try:
            runner.run()
        except _Stop:
            pass
    return record.steps


@pytest.fixture(scope="module")
def drift_run(shapes_root, tmp_path_factory):
    """CL-CLIP's head with FPN drift (a loss that needs the teacher), 2 tasks of 2 iterations."""
    out = str(tmp_path_factory.mktemp("drift") / "run")
    return out, _run(out, **DRIFT)


def test_teacher_modes_give_the_losses_their_teacher(drift_run, tmp_path):
    """auto: a loss that needs the teacher gets it from task 2 on (loss_drift in every step of
    task 2, never in task 1); never: no teacher and no loss_drift; always: a teacher even for a
    method without a teacher loss; another value is refused naming the key. (The last three
    start at task 2 from the first run's task 1 and stop after one step.)"""
    out, steps = drift_run
    assert [(t, has) for t, has, _ in steps] == [(0, False), (0, False), (1, True), (1, True)]
    assert [("loss_drift" in losses) for _, _, losses in steps] == [False, False, True, True]
    task1 = {"MODEL.WEIGHTS": os.path.join(out, "task_1", "model_final.pth"), "CONTINUAL.START_TASK": 2}
    never = _run(str(tmp_path / "never"), "never", stop=True, **DRIFT, **task1)
    assert [(t, has) for t, has, _ in never] == [(1, False)] and "loss_drift" not in never[0][2]
    no_loss = {**DRIFT, "MODEL.CONTINUAL_LOSSES": "[]"}
    assert _run(str(tmp_path / "always"), "always", stop=True, **no_loss, **task1) == [(1, True, never[0][2])]
    assert _run(str(tmp_path / "auto"), "auto", stop=True, **no_loss, **task1)[0][:2] == (1, False)
    with pytest.raises(ValueError, match="CONTINUAL.TEACHER 'sometimes'"):
        _run(str(tmp_path / "bad"), "sometimes", stop=True, **DRIFT, **task1)


def test_mid_task_resume_with_a_teacher_is_bit_identical(drift_run, tmp_path):
    """Killed after task 2's first iteration (only its checkpoint left): the resumed run rebuilds
    the teacher from task 1's final model, trains the remaining iteration and ends with the
    uninterrupted run's weights, bit for bit, and its loss_drift in the resumed step."""
    out, steps = drift_run
    b = str(tmp_path / "b")
    shutil.copytree(out, b)
    d = os.path.join(b, "task_2")
    for f in os.listdir(d):
        if f not in ("model_0000000.pth", "config.yaml"):
            os.remove(os.path.join(d, f))
    with open(os.path.join(d, "last_checkpoint"), "w") as f:
        f.write("model_0000000.pth")
    resumed = _run(b, resume=True, **DRIFT)
    assert [(t, has) for t, has, _ in resumed] == [(1, True)]  # one step left, with its teacher
    assert same_state(final_state(out), final_state(b))


def test_resume_accepts_keys_missing_from_an_old_config_yaml(drift_run, tmp_path):
    """A run's config.yaml written before a key existed (here two CL-CLIP keys and one of the
    trainer) resumes; a key it holds with another value is still refused."""
    out, _ = drift_run
    new = CfgNode.load_yaml_with_base(os.path.join(out, "config.yaml"))
    old = copy.deepcopy(new)
    for section, key in (("MODEL.CLCLIP.MULTI_EXPERT", "BOX_REG"), ("MODEL.CLCLIP", "BG_IGNORE_THRESH"),
                         ("SOLVER", "MAX_ITER")):
        node = old
        for part in section.split("."):
            node = node[part]
        del node[key]
    assert config_differences(old, new) == []
    changed = copy.deepcopy(new)
    changed["SEED"] = int(new["SEED"]) + 1
    assert config_differences(old, changed) == [f"SEED: {new['SEED']!r} -> {changed['SEED']!r}"]
    b = str(tmp_path / "b")
    shutil.copytree(out, b)
    with open(os.path.join(b, "config.yaml"), "w") as f:
        yaml.safe_dump(old, f)
    steps = _run(b, resume=True, **DRIFT)  # every task complete: nothing to train, nothing refused
    assert steps == [] and same_state(final_state(out), final_state(b))

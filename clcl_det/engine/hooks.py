"""Training hooks (detectron2's `HookBase` shape) and the builtin ones: TensorBoard, evaluation
inside a task (TEST.EVAL_PERIOD).

The trainer of a task calls, in one loop over its hooks, `before_step()` / `after_step()` around
every iteration (`self.trainer` is the current `TaskTrainer`: `.iter`, `.max_iter`, `.latest`
losses, `.optimizer`, `.model`); the continual runner calls `after_task(task)` once a task is
trained and `after_evaluation(task, stage, tag)` after each evaluation (`stage` is the record
written to metrics.json; `tag` is "stage" at a task's end, "iter_<n>" during a task).

A plugin adds a hook by registering it and naming it in `HOOKS`:

    @HOOK_REGISTRY.register()
    class PrintLoss(HookBase):
        def __init__(self, cfg): ...
        def after_step(self):
            print(self.trainer.iter, self.trainer.latest)
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any, Callable, Dict, List, Optional

from ..utils import comm
from ..utils.registry import Registry, lookup

__all__ = ["HookBase", "HOOK_REGISTRY", "build_hooks", "TensorBoardWriter", "PeriodicEvaluation", "CallbackHook"]

logger = logging.getLogger(__name__)

HOOK_REGISTRY = Registry("HOOK")
HOOK_REGISTRY.__doc__ = """Training hooks named in cfg.HOOKS: (cfg) -> HookBase."""


class HookBase:
    """Base class of hooks; every method is optional. `trainer` is set by the task's trainer
    before its first `before_step`; `runner` (the ContinualRunner) by the runner."""

    trainer: Any = None
    runner: Any = None

    def before_step(self) -> None:
        """Before iteration `self.trainer.iter` of the current task."""

    def after_step(self) -> None:
        """After iteration `self.trainer.iter` (losses in `self.trainer.latest`)."""

    def after_task(self, task: Any) -> None:
        """After task `task` was trained (before its evaluation)."""

    def after_evaluation(self, task: Any, stage: Dict[str, Any], tag: str) -> None:
        """After an evaluation of the model of `task`; `stage` as in metrics.json."""


class CallbackHook(HookBase):
    """A hook from a plain function called after every step with the iteration number."""

    def __init__(self, fn: Callable[[int], None]):
        self.fn = fn

    def after_step(self) -> None:
        self.fn(self.trainer.iter)


def build_hooks(cfg: Any) -> List[HookBase]:
    """The hooks named in cfg.HOOKS (HOOK_REGISTRY entries built with cfg), plus
    PeriodicEvaluation when TEST.EVAL_PERIOD > 0."""
    hooks = [lookup(HOOK_REGISTRY, name, "HOOKS")(cfg) for name in cfg.HOOKS]
    if cfg.TEST.EVAL_PERIOD > 0:
        hooks.append(PeriodicEvaluation(cfg))
    return hooks


def global_step(cfg: Any, task_index: int, it: int) -> int:
    """One step axis over the whole run: task t's iteration `it` is t * MAX_ITER + it + 1."""
    return task_index * cfg.SOLVER.MAX_ITER + it + 1


@HOOK_REGISTRY.register()
class TensorBoardWriter(HookBase):
    """Event files in OUTPUT_DIR (main process): `loss/*`, `total_loss` and `lr` every LOG_PERIOD
    iterations on the run's global step; `stage/<metric>` (mAP@B, mAP@N, mAP@A, ...) after each
    task's evaluation at step = task number; `eval_iter/<metric>` for TEST.EVAL_PERIOD evaluations.
    Without the tensorboard package it warns once and writes nothing."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._writer = None
        self._failed = False

    @property
    def writer(self):
        if self._writer is None and not self._failed and comm.is_main_process():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's SummaryWriter needs the tensorboard package
                self._failed = True
                warnings.warn("TensorBoardWriter: the tensorboard package is not installed; no event files "
                              "are written (pip install tensorboard)", stacklevel=2)
                return None
            os.makedirs(self.cfg.OUTPUT_DIR, exist_ok=True)
            self._writer = SummaryWriter(log_dir=self.cfg.OUTPUT_DIR)
        return self._writer

    def after_step(self) -> None:
        tr = self.trainer
        if (tr.iter + 1) % self.cfg.SOLVER.LOG_PERIOD and tr.iter != tr.max_iter - 1:
            return
        w = self.writer
        if w is None:
            return
        step = global_step(self.cfg, tr.task_index, tr.iter)
        losses = {k: v for k, v in tr.latest.items() if k.startswith("loss")}
        for k, v in losses.items():
            w.add_scalar(f"loss/{k}", v, step)
        w.add_scalar("total_loss", sum(losses.values()), step)
        w.add_scalar("lr", tr.optimizer.param_groups[0]["lr"], step)
        w.flush()

    def after_evaluation(self, task: Any, stage: Dict[str, Any], tag: str) -> None:
        w = self.writer
        if w is None or not stage:
            return
        if tag == "stage":
            prefix, step = "stage", task.index + 1
        else:
            prefix, step = "eval_iter", global_step(self.cfg, task.index, int(tag.split("_")[-1]) - 1)
        for k, v in stage.get("summary", {}).items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                w.add_scalar(f"{prefix}/{k}", v, step)
        w.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class PeriodicEvaluation(HookBase):
    """TEST.EVAL_PERIOD > 0: evaluate the seen classes every EVAL_PERIOD iterations inside a task,
    into task_<t>/eval_iter_<n>/ (metrics.json, per_class.txt, coco_instances_results.json). The
    task's end is evaluated by the runner as always."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.period = cfg.TEST.EVAL_PERIOD

    def after_step(self) -> None:
        tr = self.trainer
        n = tr.iter + 1
        if n % self.period or n == tr.max_iter or self.runner is None:
            return
        from .evaluate import evaluate_stage

        runner = self.runner
        task = runner.split.task(tr.task_index)
        tag = f"iter_{n}"
        out = os.path.join(runner.task_dir(task.index), f"eval_{tag}")
        # zero-shot classes are left to the task's end
        stage = evaluate_stage(self.cfg, tr.model, runner.split, task, runner.test_dicts(), out, zero_shot=False)
        runner.call_hooks("after_evaluation", task, stage, tag)
        tr.model.train()

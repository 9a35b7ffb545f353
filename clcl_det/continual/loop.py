"""The continual run: tasks 1..T in one process group, resumable at any point.

OUTPUT_DIR/
  config.yaml                 the run's config (checked against the config of a --resume)
  task_<t>/                   t = 1..T
    model_<iter>.pth          periodic checkpoints (model, optimizer, scheduler, iteration)
    model_final.pth           the model after task t and its between-task steps
    metrics.json              stage results (written last: the task is complete)
    per_class.txt             the per-class table
  summary.json / .txt / .png  every completed stage
"""
from __future__ import annotations

import copy
import glob
import logging
import os
import time
from typing import Any, Dict, List, Optional

from torch import nn

from ..config import CfgNode
from ..data import build_continual_split, build_test_loader, build_train_loader, get_detection_dataset_dicts
from ..data.continual import ContinualSplit, Task
from ..engine.defaults import prepare_embedded_assets, seed_all_rng
from ..modeling import build_model
from ..utils import comm
from ..utils.checkpoint import CheckpointError, DetectionCheckpointer, atomic_write_bytes, load_checkpoint_file
from ..engine.evaluate import evaluate_stage, write_summary

__all__ = ["ContinualRunner", "RunStateError"]

logger = logging.getLogger(__name__)

# keys whose change makes a run in OUTPUT_DIR a different experiment
_IDENTITY_NODES = ("MODEL", "CONTINUAL", "DATASETS", "INPUT", "SEED")


class RunStateError(RuntimeError):
    """OUTPUT_DIR holds something that does not belong to this run."""


def _flat(cfg: Any, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


class ContinualRunner:
    """Builds the split, the model and the data of cfg; `run()` trains and evaluates every task,
    `evaluate()` re-evaluates the tasks already trained."""

    def __init__(self, cfg: CfgNode, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        prepare_embedded_assets(cfg)
        self.split: ContinualSplit = build_continual_split(cfg)
        self._model: Optional[nn.Module] = None
        self.out = cfg.OUTPUT_DIR
        self._train_dicts: Optional[List[Dict[str, Any]]] = None
        self._test_dicts: Optional[List[Dict[str, Any]]] = None
        n = cfg.CONTINUAL.TRAIN_TASKS or self.split.num_tasks
        if not 0 < n <= self.split.num_tasks:
            raise ValueError(f"CONTINUAL.TRAIN_TASKS {n} is not within 1..{self.split.num_tasks}")
        self.num_train_tasks = n

    @property
    def model(self) -> nn.Module:
        """Built on first use, after the data was found (a missing dataset fails fast)."""
        if self._model is None:
            self._model = build_model(self.cfg)
        return self._model

    # -- files -----------------------------------------------------------------------------------
    def task_dir(self, t: int) -> str:
        return os.path.join(self.out, f"task_{t + 1}")

    def final_path(self, t: int) -> str:
        return os.path.join(self.task_dir(t), "model_final.pth")

    def status(self, t: int) -> str:
        """evaluated | trained | partial | new"""
        d = self.task_dir(t)
        if os.path.isfile(self.final_path(t)):
            return "evaluated" if os.path.isfile(os.path.join(d, "metrics.json")) else "trained"
        return "partial" if os.path.isfile(os.path.join(d, "last_checkpoint")) else "new"

    def _check_output_dir(self) -> None:
        """A fresh run must not overwrite another run; a resumed run must be the same experiment."""
        cfg_path = os.path.join(self.out, "config.yaml")
        has_run = any(self.status(t) != "new" for t in range(self.split.num_tasks))
        if os.path.isfile(cfg_path) and (self.resume or has_run):
            old = _flat(CfgNode.load_yaml_with_base(cfg_path) or {})
            new = _flat(self.cfg)
            diff = [k for k in new if k.split(".")[0] in _IDENTITY_NODES and k in old and old[k] != new[k]]
            if diff and (self.resume or has_run):
                shown = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in diff[:4])
                raise RunStateError(
                    f"OUTPUT_DIR {self.out} holds a run of a different config ({shown}"
                    f"{', ...' if len(diff) > 4 else ''}); use another OUTPUT_DIR"
                )
        if has_run and not self.resume:
            raise RunStateError(
                f"OUTPUT_DIR {self.out} already holds a run; pass --resume to continue it, or choose another "
                f"OUTPUT_DIR (nothing was overwritten)"
            )
        if comm.is_main_process():
            atomic_write_bytes(cfg_path, self.cfg.dump().encode())
            for tmp in glob.glob(os.path.join(self.out, "**", ".*.tmp"), recursive=True):
                os.remove(tmp)  # left by a process killed while writing; the real files are intact

    # -- data ------------------------------------------------------------------------------------
    def train_dicts(self) -> List[Dict[str, Any]]:
        if self._train_dicts is None:
            self._train_dicts = get_detection_dataset_dicts(self.cfg.DATASETS.TRAIN)
        return self._train_dicts

    def test_dicts(self) -> List[Dict[str, Any]]:
        if self._test_dicts is None:
            self._test_dicts = self.split.remap(get_detection_dataset_dicts(self.cfg.DATASETS.TEST))
        return self._test_dicts

    # -- checkpoints ----------------------------------------------------------------------------
    def _meta(self, t: int, stage: str) -> Dict[str, Any]:
        return {"task": t, "stage": stage, "split": self.split.identity()}

    def _check_meta(self, path: str, ckpt: Dict[str, Any], t: Optional[int] = None) -> None:
        if ckpt.get("split") != self.split.identity():
            theirs = ckpt.get("split", {})
            raise CheckpointError(
                f"checkpoint {path} belongs to split {'+'.join(map(str, theirs.get('tasks', ['?'])))} "
                f"({len(theirs.get('class_names', []))} classes), not to CONTINUAL.TASKS "
                f"'{self.split.task_string}' of this config"
            )
        if t is not None and ckpt.get("task") != t:
            raise CheckpointError(f"checkpoint {path} is from task {ckpt.get('task', -1) + 1}, expected task {t + 1}")

    def load_final(self, t: int) -> None:
        path = self.final_path(t)
        ckpt = load_checkpoint_file(path)
        self._check_meta(path, ckpt, t)
        incompatible = self.model.load_state_dict(ckpt["model"], strict=False)
        if incompatible.missing_keys or incompatible.unexpected_keys:
            raise CheckpointError(f"{path} does not fit the model: missing {incompatible.missing_keys[:5]}, "
                                  f"unexpected {incompatible.unexpected_keys[:5]}")
        logger.info(f"loaded {path}")

    def _needs_teacher(self) -> bool:
        mode = self.cfg.CONTINUAL.TEACHER
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"CONTINUAL.TEACHER '{mode}' is not one of auto | always | never")
        if mode == "auto":
            return any(getattr(m, "needs_teacher", False) for m in self.model.modules())
        return mode == "always"

    # -- one task -----------------------------------------------------------------------------------
    def train_task(self, task: Task, resume_partial: bool) -> None:
        from ..engine.trainer import TaskTrainer

        t = task.index
        dicts = self.split.task_train_dicts(self.train_dicts(), t)
        logger.info(f"task {t + 1}/{self.split.num_tasks}: classes {task.start + 1}-{task.stop} "
                    f"({', '.join(task.new_class_names)}); {len(dicts)} training images")
        trainer = TaskTrainer(
            self.cfg, self.model, lambda start: build_train_loader(self.cfg, dicts, task=t, start_iter=start),
            self.task_dir(t), extra_meta={"label": f"[task {t + 1}/{self.split.num_tasks}] ",
                                          "checkpoint": self._meta(t, "train")})
        if resume_partial:
            path = trainer.checkpointer.get_checkpoint_file()
            ckpt_meta = load_checkpoint_file(path)
            self._check_meta(path, ckpt_meta, t)
            del ckpt_meta
            trainer.resume(path)
        trainer.train()
        self.model.end_task(task)
        for m in [m for m in self.model.modules() if callable(getattr(m, "on_task_data", None))]:
            m.on_task_data(task, self.model, build_test_loader(self.cfg, dicts))
        if comm.is_main_process():
            DetectionCheckpointer(self.model, self.task_dir(t)).save("model_final", **self._meta(t, "final"))
        comm.synchronize()

    def _begin_task(self, t: int) -> None:
        """Grow the model for task t; what it creates is seeded by (SEED, t) alone, so a resumed
        run creates the very parameters an uninterrupted one did."""
        seed_all_rng((max(self.cfg.SEED, 0) * 1000 + t + 1) % 2**31)
        self.model.begin_task(self.split.task(t))

    def _replay_structure(self, upto: int) -> None:
        """Grow and freeze the model as tasks 0..upto-1 did, then load task upto-1's final weights."""
        for t in range(upto):
            self._begin_task(t)
            self.model.end_task(self.split.task(t))
        if upto > 0:
            self.load_final(upto - 1)

    # -- entry points -------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        self._check_output_dir()
        start = time.perf_counter()
        self.train_dicts(), self.test_dicts()
        todo = [t for t in range(self.num_train_tasks) if self.status(t) != "evaluated"]
        first = todo[0] if todo else self.num_train_tasks
        if first > 0:
            logger.info(f"tasks 1..{first} already complete in {self.out}")
        self._replay_structure(first)
        needs_teacher = self._needs_teacher()
        for t in range(first, self.num_train_tasks):
            task = self.split.task(t)
            t0 = time.perf_counter()
            teacher = copy.deepcopy(self.model) if (t > 0 and needs_teacher) else None
            self._begin_task(t)
            self.model.set_teacher(teacher)
            status = self.status(t)
            if status in ("new", "partial"):
                self.train_task(task, resume_partial=status == "partial")
            else:
                self.load_final(t)
                self.model.end_task(task)
            self.model.set_teacher(None)
            del teacher
            evaluate_stage(self.cfg, self.model, self.split, task, self.test_dicts(), self.task_dir(t))
            write_summary(self.cfg, self.split, self.out)
            logger.info(f"task {t + 1} done in {time.perf_counter() - t0:.0f} s")
        summary = write_summary(self.cfg, self.split, self.out, final=True)
        logger.info(f"run complete in {time.perf_counter() - start:.0f} s; results in {self.out}")
        return summary

    def evaluate(self) -> Dict[str, Any]:
        """Evaluate MODEL.WEIGHTS (its task) or every trained task of OUTPUT_DIR."""
        self.test_dicts()
        if self.cfg.MODEL.WEIGHTS:
            path = self.cfg.MODEL.WEIGHTS
            ckpt = load_checkpoint_file(path)
            self._check_meta(path, ckpt)
            t = int(ckpt["task"])
            for i in range(t + 1):
                self._begin_task(i)
                self.model.end_task(self.split.task(i))
            self.model.load_state_dict(ckpt["model"], strict=False)
            out_dir = os.path.join(self.out, "eval")
            return evaluate_stage(self.cfg, self.model, self.split, self.split.task(t), self.test_dicts(), out_dir)
        trained = [t for t in range(self.split.num_tasks) if os.path.isfile(self.final_path(t))]
        if not trained:
            raise RunStateError(f"--eval-only: no trained task in {self.out} (and MODEL.WEIGHTS is empty)")
        for t in range(max(trained) + 1):
            task = self.split.task(t)
            self._begin_task(t)
            if t in trained:
                self.load_final(t)
                self.model.end_task(task)
                evaluate_stage(self.cfg, self.model, self.split, task, self.test_dicts(), self.task_dir(t))
            else:
                self.model.end_task(task)
        return write_summary(self.cfg, self.split, self.out, final=True)


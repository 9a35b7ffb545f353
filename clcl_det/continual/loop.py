"""The continual run: tasks 1..T in one process group, resumable at any point.

OUTPUT_DIR/
  config.yaml                 the config the run was started with (a --resume must match it)
  task_<t>/                   t = 1..T
    config.yaml               the config this task was trained with
    model_<iter>.pth          periodic checkpoints (model, optimizer, scheduler, iteration)
    model_final.pth           the model after task t and its between-task steps
    metrics.json              stage results (written last: the task is complete)
    per_class.txt             the per-class table
  summary.json / .txt / .png  every completed stage; summary_tasks.png the task x stage heat-map
  eval_<n>/                   one --eval-only evaluation: config.yaml, task_<t>/metrics.json, summary
"""
from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Dict, List, Optional

from torch import nn

from ..config import CfgNode, ConfigError
from ..data import build_continual_split, build_test_loader, build_train_loader, get_detection_dataset_dicts
from ..data.catalog import check_registered
from ..data.continual import ContinualSplit, Task
from ..engine.defaults import prepare_embedded_assets, seed_all_rng
from ..modeling import build_model
from ..utils import comm
from ..utils.errors import UserError
from ..utils.seed import derive_seed
from ..utils.checkpoint import (CheckpointError, DetectionCheckpointer, atomic_write_bytes, check_fit,
                                load_checkpoint_file, remove_leftover_temp_files)
from ..engine.evaluate import evaluate_stage, write_summary
from . import lifecycle
from ..engine.hooks import HookBase, build_hooks

__all__ = ["ContinualRunner", "RunStateError", "IDENTITY_EXCLUDED", "config_differences"]

logger = logging.getLogger(__name__)

# The config keys a --resume may change: none of them changes what the run computes. Every other key
# (MODEL, SOLVER, DATASETS, INPUT, CONTINUAL, TEST, SEED, ...) must equal the run's config.yaml.
IDENTITY_EXCLUDED = {
    "OUTPUT_DIR": "where the run is kept; a moved folder holds the same run",
    "SOLVER.LOG_PERIOD": "how often a log line is printed",
    "SOLVER.CHECKPOINT_PERIOD": "where a resume may start; a resumed run sees the batches of an uninterrupted one",
    "DATALOADER.NUM_WORKERS": "speed only: every training batch is a function of (SEED, task, iteration)",
    "CONTINUAL.TRAIN_TASKS": "how many tasks to train now; raising it continues the same run",
    "MODEL.CLIP.TINY.EVAL_PERIOD": "quality measurements of tools/pretrain_tiny_clip.py",
}


class RunStateError(UserError, RuntimeError):
    """OUTPUT_DIR holds something that does not belong to this run."""


def _flat(cfg: Any, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(old: Any, new: Any) -> List[str]:
    """Keys (outside IDENTITY_EXCLUDED) whose value differs between two configs, as 'KEY: old -> new'."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in b if k in a and k not in IDENTITY_EXCLUDED and a[k] != b[k]]


class ContinualRunner:
    """Builds the split, the model and the data of cfg; `run()` trains and evaluates every task,
    `evaluate()` re-evaluates the tasks already trained."""

    def __init__(self, cfg: CfgNode, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        prepare_embedded_assets(cfg)
        check_registered(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        check_registered(cfg.DATASETS.TEST, "DATASETS.TEST")
        self.split: ContinualSplit = build_continual_split(cfg)
        self._model: Optional[nn.Module] = None
        self.out = cfg.OUTPUT_DIR
        self._train_dicts: Optional[List[Dict[str, Any]]] = None
        self._test_dicts: Optional[List[Dict[str, Any]]] = None
        n = cfg.CONTINUAL.TRAIN_TASKS or self.split.num_tasks
        if not 0 < n <= self.split.num_tasks:
            raise ValueError(f"CONTINUAL.TRAIN_TASKS {n} is not within 1..{self.split.num_tasks}")
        self.num_train_tasks = n
        self.hooks: List[HookBase] = []
        self.register_hooks(build_hooks(cfg))

    def register_hooks(self, hooks: List[HookBase]) -> None:
        """Add hooks (HookBase) to the ones of cfg.HOOKS; call before `run()`."""
        for h in hooks:
            h.runner = self
        self.hooks.extend(hooks)

    def call_hooks(self, name: str, *args: Any) -> None:
        for h in self.hooks:
            getattr(h, name)(*args)

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
            diff = config_differences(CfgNode.load_yaml_with_base(cfg_path) or {}, self.cfg)
            if diff:
                raise RunStateError(
                    f"OUTPUT_DIR {self.out} holds a run of a different config ({', '.join(diff[:4])}"
                    f"{f', ... {len(diff)} keys in all' if len(diff) > 4 else ''}); use another OUTPUT_DIR"
                )
        if has_run and not self.resume:
            raise RunStateError(
                f"OUTPUT_DIR {self.out} already holds a run; pass --resume to continue it, or choose another "
                f"OUTPUT_DIR (nothing was overwritten)"
            )
        if comm.is_main_process():
            remove_leftover_temp_files(self.out)  # left by a process killed while writing
            if not (self.resume and os.path.isfile(cfg_path)):  # a resume keeps the config the run began with
                atomic_write_bytes(cfg_path, self.cfg.dump().encode())

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

    def _load_weights(self, path: str, state: Dict[str, Any]) -> None:
        """Load `state` into the model; a missing or unexpected key is refused in one line naming a few."""
        try:
            incompatible = self.model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise CheckpointError(f"{path} does not fit the model of this config: {' '.join(str(e).split())[:300]}") from None
        check_fit(path, incompatible.missing_keys, incompatible.unexpected_keys)
        logger.info(f"loaded {path}")

    def load_final(self, t: int, path: Optional[str] = None) -> None:
        path = path or self.final_path(t)
        ckpt = load_checkpoint_file(path)
        self._check_meta(path, ckpt, t)
        self._load_weights(path, ckpt["model"])

    def _needs_teacher(self) -> bool:
        mode = self.cfg.CONTINUAL.TEACHER
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"CONTINUAL.TEACHER '{mode}' is not one of auto | always | never")
        if mode == "auto":
            return lifecycle.needs_teacher(self.model)
        return mode == "always"

    # -- one task -----------------------------------------------------------------------------------
    def train_task(self, task: Task, resume_partial: bool) -> None:
        from ..engine.trainer import TaskTrainer, task_schedule

        t = task.index
        dicts = self.split.task_train_dicts(self.train_dicts(), t)
        cfg = task_schedule(self.cfg, len(dicts))  # SOLVER.EPOCHS: the budget follows the task's images
        task_cfg = os.path.join(self.task_dir(t), "config.yaml")
        if comm.is_main_process() and not os.path.isfile(task_cfg):  # a resumed task keeps its first config
            atomic_write_bytes(task_cfg, self.cfg.dump().encode())
        logger.info(f"task {t + 1}/{self.split.num_tasks}: classes {task.start + 1}-{task.stop} "
                    f"({', '.join(task.new_class_names)}); {len(dicts)} training images, "
                    f"{cfg.SOLVER.MAX_ITER} iterations")
        trainer = TaskTrainer(
            cfg, self.model, lambda start: build_train_loader(cfg, dicts, task=t, start_iter=start),
            self.task_dir(t), extra_meta={"label": f"[task {t + 1}/{self.split.num_tasks}] ",
                                          "checkpoint": self._meta(t, "train"),
                                          "iters_after_task": (self.num_train_tasks - t - 1) * self.cfg.SOLVER.MAX_ITER},
            hooks=self.hooks)
        if resume_partial:
            path = trainer.checkpointer.get_checkpoint_file()
            ckpt_meta = load_checkpoint_file(path)
            self._check_meta(path, ckpt_meta, t)
            del ckpt_meta
            trainer.resume(path)
        trainer.train()
        lifecycle.end_task(self.model, task)
        lifecycle.task_data(self.model, task, lambda: build_test_loader(self.cfg, dicts))
        if comm.is_main_process():
            DetectionCheckpointer(self.model, self.task_dir(t)).save("model_final", **self._meta(t, "final"))
        comm.synchronize()
        self.call_hooks("after_task", task)

    def classes_without_training_images(self, t: int) -> List[str]:
        """Names of task t's new classes that no training image of the task shows (warned)."""
        task = self.split.task(t)
        shown = {a["category_id"] for d in self.split.task_train_dicts(self.train_dicts(), t) for a in d["annotations"]}
        missing = [task.all_class_names[c] for c in task.new_classes if c not in shown]
        if missing:
            logger.warning(f"task {t + 1}: {len(missing)} class(es) without a training image in "
                           f"{list(self.cfg.DATASETS.TRAIN)}: {', '.join(missing)} (they are learned from nothing)")
        return missing

    def _begin_task(self, t: int) -> None:
        """Grow the model for task t; what it creates is seeded by (SEED, t) alone, so a resumed
        run creates the very parameters an uninterrupted one did."""
        seed_all_rng(derive_seed(self.cfg.SEED, t + 1))
        lifecycle.begin_task(self.model, self.split.task(t))

    def _replay_structure(self, upto: int) -> None:
        """Grow and freeze the model as tasks 0..upto-1 did, then load task upto-1's final weights."""
        for t in range(upto):
            self._begin_task(t)
            lifecycle.end_task(self.model, self.split.task(t))
        if upto > 0:
            self.load_final(upto - 1)

    def load_task_model(self, t: int, weights: Optional[str] = None) -> nn.Module:
        """The model after task `t` (0-based) of a fresh runner: grown and frozen as tasks 1..t+1
        did, with that task's final weights (task_<t+1>/model_final.pth of OUTPUT_DIR, or `weights`;
        the checkpoint's split and task are checked). Its vocabulary is the classes seen by then."""
        if not 0 <= t < self.split.num_tasks:
            raise ConfigError(f"task {t + 1} is not within 1..{self.split.num_tasks} of CONTINUAL.TASKS "
                              f"'{self.split.task_string}'")
        if getattr(self.model, "task", None) is not None:
            raise RuntimeError("load_task_model needs a fresh ContinualRunner (its model already has tasks)")
        for i in range(t + 1):
            self._begin_task(i)
            lifecycle.end_task(self.model, self.split.task(i))
        self.load_final(t, weights)
        return self.model

    def start_task(self) -> int:
        """The first task (0-based) this run trains: CONTINUAL.START_TASK - 1, where MODEL.WEIGHTS
        holds the final model of the task before it (its split is checked); 0 without weights."""
        weights, start = self.cfg.MODEL.WEIGHTS, self.cfg.CONTINUAL.START_TASK
        if not weights:
            if start > 1:
                raise ConfigError(f"CONTINUAL.START_TASK {start} needs MODEL.WEIGHTS: the model_final.pth of "
                                  f"task {start - 1}")
            return 0
        if not os.path.isfile(weights):
            raise ConfigError(f"MODEL.WEIGHTS '{weights}' does not exist")
        ckpt = load_checkpoint_file(weights)
        self._check_meta(weights, ckpt)
        t = int(ckpt.get("task", -1))
        if ckpt.get("stage") != "final":
            raise CheckpointError(f"MODEL.WEIGHTS {weights} is a mid-task checkpoint of task {t + 1}; training "
                                  f"starts from a task's model_final.pth (or continue that run with --resume)")
        start = start or t + 2
        if start != t + 2:
            raise CheckpointError(f"MODEL.WEIGHTS {weights} holds the model after task {t + 1}: it starts task "
                                  f"{t + 2}, not CONTINUAL.START_TASK {start}")
        if start > self.num_train_tasks:
            raise ConfigError(f"MODEL.WEIGHTS {weights} holds the model after task {t + 1}: no task is left to "
                              f"train (CONTINUAL.TASKS '{self.split.task_string}'); use --eval-only to evaluate it")
        return start - 1

    # -- entry points -------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        self._check_output_dir()
        start = time.perf_counter()
        start_task = self.start_task()
        self.train_dicts(), self.test_dicts()
        todo = [t for t in range(start_task, self.num_train_tasks) if self.status(t) != "evaluated"]
        first = todo[0] if todo else self.num_train_tasks
        if first > start_task:
            logger.info(f"tasks {start_task + 1}..{first} already complete in {self.out}")
        if first == start_task > 0:
            logger.info(f"starting at task {start_task + 1} from MODEL.WEIGHTS {self.cfg.MODEL.WEIGHTS}")
            self.load_task_model(start_task - 1, self.cfg.MODEL.WEIGHTS)
        else:
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
                lifecycle.end_task(self.model, task)
            self.model.set_teacher(None)
            del teacher
            stage = evaluate_stage(self.cfg, self.model, self.split, task, self.test_dicts(), self.task_dir(t),
                                   extra={"classes_without_training_images": self.classes_without_training_images(t)})
            self.call_hooks("after_evaluation", task, stage, "stage")
            write_summary(self.cfg, self.split, self.out)
            logger.info(f"task {t + 1} done in {time.perf_counter() - t0:.0f} s")
        summary = write_summary(self.cfg, self.split, self.out, final=True)
        logger.info(f"run complete in {time.perf_counter() - start:.0f} s; results in {self.out}")
        return summary

    def _new_eval_dir(self) -> str:
        """A new OUTPUT_DIR/eval_<n> (n = 1, 2, ...): an evaluation never overwrites earlier results."""
        path = ""
        if comm.is_main_process():
            n = 1
            while True:
                path = os.path.join(self.out, f"eval_{n}")
                try:
                    os.makedirs(path)
                    break
                except FileExistsError:
                    n += 1
            atomic_write_bytes(os.path.join(path, "config.yaml"), self.cfg.dump().encode())
        return comm.broadcast_object(path)

    def evaluate(self) -> Dict[str, Any]:
        """Evaluate MODEL.WEIGHTS (its task) or every trained task of OUTPUT_DIR; the results go to a
        new OUTPUT_DIR/eval_<n>/ (task_<t>/metrics.json, summary), never over the training-time ones."""
        self.test_dicts()
        if self.cfg.MODEL.WEIGHTS:
            path = self.cfg.MODEL.WEIGHTS
            ckpt = load_checkpoint_file(path)
            self._check_meta(path, ckpt)
            t = int(ckpt["task"])
            for i in range(t + 1):
                self._begin_task(i)
                lifecycle.end_task(self.model, self.split.task(i))
            self._load_weights(path, ckpt["model"])
            out_dir = self._new_eval_dir()
            logger.info(f"--eval-only: results of {path} go to {out_dir}")
            stage = evaluate_stage(self.cfg, self.model, self.split, self.split.task(t), self.test_dicts(),
                                   os.path.join(out_dir, f"task_{t + 1}"))
            write_summary(self.cfg, self.split, out_dir)
            return stage
        trained = [t for t in range(self.split.num_tasks) if os.path.isfile(self.final_path(t))]
        if not trained:
            raise RunStateError(f"--eval-only: no trained task in {self.out} (and MODEL.WEIGHTS is empty)")
        out_dir = self._new_eval_dir()
        logger.info(f"--eval-only: results of the {len(trained)} trained task(s) go to {out_dir}")
        for t in range(max(trained) + 1):
            task = self.split.task(t)
            self._begin_task(t)
            if t in trained:
                self.load_final(t)
                lifecycle.end_task(self.model, task)
                evaluate_stage(self.cfg, self.model, self.split, task, self.test_dicts(),
                               os.path.join(out_dir, f"task_{t + 1}"))
            else:
                lifecycle.end_task(self.model, task)
        return write_summary(self.cfg, self.split, out_dir, final=True)

#!/usr/bin/env python
"""Speed ratios measured in one run on the same images (times are noisy; ratios are what count).

    python tools/benchmark.py clclip               # CL-CLIP / F-ViT inference, ViT-B-16 at 640 px, 20 and 80 classes
    python tools/benchmark.py clclip --size 320 --classes 20
    python tools/benchmark.py clclip MODEL.CLCLIP.MULTI_EXPERT.TOPK 0     # CL-CLIP options to compare
    python tools/benchmark.py train                # training iterations/s and peak memory, VOC 10+10 task 1
    python tools/benchmark.py train --iters 20 SOLVER.IMS_PER_BATCH 16 SOLVER.AMP_DTYPE bfloat16
    python tools/benchmark.py steps                # training step time of the shipped Shapes configs
    python tools/benchmark.py steps --iters 30 --configs clclip/clclip_shapes_10+10.yaml fvit/finetune_shapes_10+10.yaml
    python tools/benchmark.py steps --configs fvit/finetune_shapes_10+10.yaml fvit/finetune_clutter_ior_40+40.yaml \
        clclip/clclip_shapes_10+10.yaml clclip/clclip_clutter_ior_40+40.yaml   # Clutter's steps over Shapes'
    python tools/benchmark.py steps --configs fvit/finetune_clutter_ior_40+40.yaml -- MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 64

`steps` trains each config as `tools/train_net.py` would (its data, the embedded tiny CLIP, the
trainer) for a few iterations of task 1 and of task 2 and prints the median step time of each
task and its ratio to the first config's (F-ViT fine-tuning by default); old and new code are
compared by running the same command in both trees.

`train` runs the trainer (TaskTrainer: the config's optimizer, AMP, accumulation) of
configs/clclip/clclip_voc_10+10.yaml (ViT-B-16, random weights, 640 px) on random images with random boxes
on MODEL.DEVICE (auto: the GPU if there is one), so the same command measures a CPU or a GPU.

F-ViT is configs/fvit/finetune_{voc,coco}_*.yaml, CL-CLIP configs/clclip/clclip_{voc,coco}_*.yaml (20 classes:
VOC 10+10, 80: COCO 40+40), both with random ViT-B-16 weights on the same random images, each as it
is evaluated after the last task of its split (CL-CLIP: both tasks' experts and box regressors).
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from clcl_det.continual import begin_task, end_task
from clcl_det.data.continual import Task, build_continual_split
from clcl_det.engine import setup_cfg
from clcl_det.engine.hooks import HookBase
from clcl_det.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepClock(HookBase):
    """Each training step's wall time (before_step -> after_step: data loading is not counted) and
    the time at its end; `sync` (e.g. torch.cuda.synchronize) runs before a step's end is read."""

    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.durations: List[float] = []
        self.ends: List[float] = []
        self._start = 0.0
        self._sync = sync

    def before_step(self) -> None:
        self._start = time.perf_counter()

    def after_step(self) -> None:
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        self.durations.append(now - self._start)
        self.ends.append(now)


def _images(n: int, size: int, seed: int = 0) -> List[Dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
             "height": size, "width": size} for _ in range(n)]


def _model(config: str, opts: List[str], num_classes: int):
    """The config's model as it is evaluated after the last task of its split (every task grown
    and finished: CL-CLIP's experts and per-task box regressors frozen), random weights."""
    cfg = setup_cfg(os.path.join(REPO, "configs", config), ["MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES",
                                                            "simple", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    split = build_continual_split(cfg, tuple(f"class {i}" for i in range(num_classes)))
    for t in range(split.num_tasks):
        begin_task(model, split.task(t))
        end_task(model, split.task(t))
    return model


def clclip(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(f"CL-CLIP / F-ViT inference time, ViT-B-16 (random weights), {args.size} px, batch {args.batch}, "
          f"{args.repeats} timed runs each (median), {torch.get_num_threads()} threads")
    for k in args.classes:
        data = "VOC" if k <= 20 else "COCO"
        split = "10+10" if k <= 20 else "40+40"
        opts = ["INPUT.IMAGE_SIZE", str(args.size)]
        # the shipped configs of each method, so the ratio is the one a user gets
        models = {"F-ViT": _model(f"fvit/finetune_{data.lower()}_{split}.yaml", opts, k),
                  "CL-CLIP": _model(f"clclip/clclip_{data.lower()}_{split}.yaml", opts + list(args.opts), k)}
        if k == args.classes[0]:
            me = models["CL-CLIP"].roi_heads
            print(f"  CL-CLIP head: expert dim {me.experts.expert_dim}, "
                  f"top-k {me.topk or 'all'} classes per RoI")
        images = _images(args.batch, args.size)
        times: Dict[str, List[float]] = {n: [] for n in models}
        with torch.no_grad():
            for name, m in models.items():  # warm-up
                m(images)
            for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                for name, m in models.items():
                    t0 = time.perf_counter()
                    m(images)
                    times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"  {k:3d} classes: F-ViT {med['F-ViT'] / args.batch:.3f} s/img, CL-CLIP {med['CL-CLIP'] / args.batch:.3f} "
              f"s/img -> ratio {med['CL-CLIP'] / med['F-ViT']:.2f}")
        del models


def _train_batches(n: int, size: int, num_classes: int, seed: int = 0):
    """An endless stream of batches of `n` mapped training samples (random pixels, 1-4 random boxes)."""
    from clcl_det.continual.gpu_check import synthetic_batch

    k = seed
    while True:
        yield synthetic_batch(n, size, (0, num_classes), seed=k)
        k += 1


def train(args: argparse.Namespace) -> None:
    import resource
    import tempfile

    from clcl_det.data.datasets import VOC_CLASSES
    from clcl_det.engine import TaskTrainer

    torch.set_num_threads(args.threads)
    warmup = 1
    cfg = setup_cfg(os.path.join(REPO, "configs", args.config), [
        "MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES", "simple", "INPUT.IMAGE_SIZE", str(args.size),
        "SOLVER.MAX_ITER", str(args.iters + warmup), "SOLVER.CHECKPOINT_PERIOD", "100000000",
        "SOLVER.LOG_PERIOD", str(args.iters + warmup), "HOOKS", "[]", *args.opts])
    torch.manual_seed(0)
    model = build_model(cfg)
    names = tuple(VOC_CLASSES)
    begin_task(model, Task(0, 0, 10, names[:10], names))
    dev = model.device
    per_step = cfg.SOLVER.IMS_PER_BATCH // cfg.SOLVER.ACCUM_STEPS

    clock = StepClock(torch.cuda.synchronize if dev.type == "cuda" else None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TaskTrainer(cfg, model, lambda start: _train_batches(per_step, args.size, 10), tmp, hooks=[clock])
        trainer.train()
    timed = clock.ends[-1] - clock.ends[warmup - 1]
    its = args.iters / timed
    if dev.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB CUDA (max_memory_allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (whole process)"
    amp = f"AMP {cfg.SOLVER.AMP_DTYPE}" if trainer.use_amp else "fp32"
    print(f"train {args.config} (ViT-B-16 random weights), {args.size} px, batch {cfg.SOLVER.IMS_PER_BATCH}"
          f"{f' in {cfg.SOLVER.ACCUM_STEPS} micro-batches' if cfg.SOLVER.ACCUM_STEPS > 1 else ''}, {amp}, "
          f"device {dev}{'' if dev.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}")
    print(f"  {args.iters} timed iterations after {warmup} warm-up: {its:.3f} it/s "
          f"({its * cfg.SOLVER.IMS_PER_BATCH:.2f} images/s), peak memory {peak}")


SHAPES_STEP_CONFIGS = ["fvit/finetune_shapes_10+10.yaml", "clclip/clclip_shapes_10+10.yaml", "spa/spa_shapes_10+10.yaml"]


def _config_step_times(config: str, iters: int, warmup: int, opts: List[str], warm_cache: bool = False) -> List[float]:
    """Median step time of each of the first two tasks of `config`, trained from scratch (with
    `warm_cache`, each task's batches go through the model once untimed first, so the frozen
    CLIP's feature cache holds them, as it does after a run's first epochs)."""
    import copy
    import tempfile

    from clcl_det.continual import ContinualRunner, lifecycle
    from clcl_det.data.build import build_train_loader
    from clcl_det.engine import TaskTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = setup_cfg(os.path.join(REPO, "configs", config), [
            "SOLVER.MAX_ITER", str(iters + warmup), "SOLVER.CHECKPOINT_PERIOD", "100000000",
            "SOLVER.LOG_PERIOD", "100000000", "HOOKS", "[]", "OUTPUT_DIR", tmp, *opts])
        torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
        runner = ContinualRunner(cfg)
        model, split = runner.model, runner.split
        medians = []
        for t in range(min(2, split.num_tasks)):
            task = split.task(t)
            teacher = copy.deepcopy(model) if t > 0 and lifecycle.needs_teacher(model) else None
            lifecycle.begin_task(model, task)
            model.set_teacher(teacher)
            dicts = split.task_train_dicts(runner.train_dicts(), t)
            data_fn = lambda start, d=dicts, t=t: build_train_loader(cfg, d, task=t, start_iter=start)  # noqa: E731
            if warm_cache:  # the same batches once before: the frozen CLIP's outputs come from its cache
                TaskTrainer(cfg, model, data_fn, os.path.join(tmp, f"warm_{t + 1}")).train()
            clock = StepClock()
            trainer = TaskTrainer(cfg, model, data_fn, os.path.join(tmp, f"task_{t + 1}"), hooks=[clock])
            trainer.train()
            lifecycle.end_task(model, task)
            model.set_teacher(None)
            medians.append(statistics.median(clock.durations[warmup:]))
    return medians


def steps(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(f"training step time (median of {args.iters} steps after {args.warmup} warm-up, data loading excluded), "
          f"{torch.get_num_threads()} threads")
    if args.warm_cache:
        print("  the timed batches were seen once before (MODEL.CLIP.FEATURE_CACHE_MB: the frozen CLIP's outputs are cached)")
    rows = [(c, _config_step_times(c, args.iters, args.warmup, list(args.opts), args.warm_cache)) for c in args.configs]
    ref = rows[0][1]
    for config, med in rows:
        print(f"  {config:32s} " + "  ".join(
            f"task {t + 1} {m:.3f} s ({m / ref[min(t, len(ref) - 1)]:.2f}x {os.path.basename(rows[0][0])})"
            for t, m in enumerate(med)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("clclip", help="CL-CLIP inference time over F-ViT's")
    c.add_argument("--size", type=int, default=640)
    c.add_argument("--classes", type=int, nargs="+", default=[20, 80])
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--threads", type=int, default=torch.get_num_threads())
    c.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the CL-CLIP model")
    c.set_defaults(func=clclip)
    t = sub.add_parser("train", help="training iterations/s and peak memory (VOC 10+10 task 1)")
    t.add_argument("--config", default="clclip/clclip_voc_10+10.yaml", help="config under configs/")
    t.add_argument("--size", type=int, default=640)
    t.add_argument("--iters", type=int, default=10, help="timed iterations (after one warm-up iteration)")
    t.add_argument("--threads", type=int, default=torch.get_num_threads())
    t.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides (e.g. SOLVER.IMS_PER_BATCH 16)")
    t.set_defaults(func=train)
    s = sub.add_parser("steps", help="training step time of shipped configs (default: Shapes'), tasks 1 and 2, ratio to the first")
    s.add_argument("--configs", nargs="+", default=SHAPES_STEP_CONFIGS, help="configs under configs/; the first is the reference")
    s.add_argument("--iters", type=int, default=20, help="timed steps per task")
    s.add_argument("--warmup", type=int, default=3, help="untimed steps per task, first")
    s.add_argument("--threads", type=int, default=torch.get_num_threads())
    s.add_argument("--warm-cache", action="store_true",
                   help="train on each task's timed batches once before timing them (a warm feature cache)")
    s.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of every config")
    s.set_defaults(func=steps)
    args = p.parse_args(argv)
    if args.opts[:1] == ["--"]:  # `--configs A B -- KEY VALUE`: "--" only ends the list of configs
        args.opts = args.opts[1:]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

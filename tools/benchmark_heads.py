#!/usr/bin/env python
"""Training-step time of the SPA head relative to the text classifier, measured in one run.

Detectors that differ only in MODEL.CLS_HEAD.NAME (and MODEL.SPA.TOPK; same seed, so the same
weights elsewhere) take optimizer steps in turn on the same Shapes images (rendered in memory)
with every class of the dataset in the vocabulary. Printed: each one's median step time and its
ratio to the text classifier's, as the median over rounds of the per-round ratio (the steps of
a round run back to back, so a shared machine's changing load cancels out).

    python tools/benchmark_heads.py
    python tools/benchmark_heads.py --topk 0 5 --steps 20
    python tools/benchmark_heads.py --config-file configs/spa/spa_shapes_10+10.yaml --head GaussianReplay
"""
import argparse
import statistics
import sys
import time
from typing import Any, Dict, List

import numpy as np
import torch

from clcl_det.continual import begin_task
from clcl_det.data.continual import Task
from clcl_det.embedded.shapes import SHAPES_CLASSES, ShapesSpec, render_image
from clcl_det.engine import setup_cfg
from clcl_det.engine.trainer import build_optimizer
from clcl_det.modeling import build_model
from clcl_det.utils.seed import derive_seed


def shapes_batch(n: int, size: int, seed: int) -> List[Dict[str, Any]]:
    """n training-style inputs from the Shapes generator (no files written)."""
    spec = ShapesSpec(num_train=n, num_test=0, seed=seed, image_size=size)
    out = []
    for i in range(n):
        image, _, objects = render_image(spec, "train", i)
        out.append({"image": torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()),
                    "boxes": torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4),
                    "classes": torch.tensor([o.category_id for o in objects], dtype=torch.long),
                    "seed": 1000 + i})
    return out


def build(cfg_file: str, opts: List[str], head: str):
    cfg = setup_cfg(cfg_file, ["MODEL.CLIP.PRETRAINED", "", *opts, "MODEL.CLS_HEAD.NAME", head])
    torch.manual_seed(derive_seed(cfg.SEED))
    model = build_model(cfg)
    begin_task(model, Task(0, 0, len(SHAPES_CLASSES), SHAPES_CLASSES, SHAPES_CLASSES))
    model.train()
    return cfg, model, build_optimizer(cfg, model)


def step(model, optimizer, batch) -> float:
    t0 = time.perf_counter()
    losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", help="base config (default: the embedded Shapes defaults)")
    parser.add_argument("--head", default="SPAHead", help="head compared with TextClassifier")
    parser.add_argument("--topk", type=int, nargs="*", default=None,
                        help="MODEL.SPA.TOPK values to time, one detector each (default: the config's)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (medians reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, base, base_opt = build(args.config_file, args.opts, "TextClassifier")
    others = {}
    for k in (args.topk if args.topk else [None]):
        name = args.head if k is None else f"{args.head} TOPK {k}"
        others[name] = build(args.config_file, [*args.opts, *([] if k is None else ["MODEL.SPA.TOPK", str(k)])],
                             args.head)[1:]
    batch = shapes_batch(cfg.SOLVER.IMS_PER_BATCH, cfg.INPUT.IMAGE_SIZE, cfg.DATASETS.SHAPES.SEED)
    times: Dict[str, List[float]] = {"TextClassifier": [], **{k: [] for k in others}}
    for i in range(args.warmup + args.steps):  # rounds: every detector steps once, back to back
        t = {"TextClassifier": step(base, base_opt, batch)}
        t.update({k: step(m, opt, batch) for k, (m, opt) in others.items()})
        if i >= args.warmup:
            for k, v in t.items():
                times[k].append(v)
    print(f"training step, {cfg.SOLVER.IMS_PER_BATCH} images x {cfg.INPUT.IMAGE_SIZE} px, "
          f"{cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE} RoIs/image, {len(SHAPES_CLASSES)} classes, "
          f"{args.steps} rounds, {torch.get_num_threads()} threads")
    for k, v in times.items():
        ratio = statistics.median(b / a for a, b in zip(times["TextClassifier"], v))
        print(f"  {k:<22} {statistics.median(v) * 1000:8.1f} ms/step   ratio to TextClassifier {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

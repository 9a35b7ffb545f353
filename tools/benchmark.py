#!/usr/bin/env python
"""Speed ratios measured in one run on the same images (times are noisy; ratios are what count).

    python tools/benchmark.py clclip               # CL-CLIP / F-ViT inference, ViT-B-16 at 640 px, 20 and 80 classes
    python tools/benchmark.py clclip --size 320 --classes 20
    python tools/benchmark.py clclip MODEL.CLCLIP.MULTI_EXPERT.TOPK 0     # CL-CLIP options to compare

F-ViT is configs/{VOC,COCO}/finetune_*.yaml, CL-CLIP configs/{VOC,COCO}/clclip_*.yaml (20 classes:
VOC, 80: COCO), both with random ViT-B-16 weights on the same random images.
"""
import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

from clcl_det.continual import begin_task
from clcl_det.data.continual import Task
from clcl_det.engine import setup_cfg
from clcl_det.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n: int, size: int, seed: int = 0) -> List[Dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
             "height": size, "width": size} for _ in range(n)]


def _model(config: str, opts: List[str], num_classes: int):
    cfg = setup_cfg(os.path.join(REPO, "configs", config), ["MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES",
                                                            "simple", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    names = tuple(f"class {i}" for i in range(num_classes))
    begin_task(model, Task(0, 0, num_classes, names, names))
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
        models = {"F-ViT": _model(f"{data}/finetune_{split}.yaml", opts, k),
                  "CL-CLIP": _model(f"{data}/clclip_{split}.yaml", opts + list(args.opts), k)}
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


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

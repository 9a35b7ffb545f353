#!/usr/bin/env python
"""Run a trained model on images: each image is written with its detections drawn (boxes, class
names, scores), and detections.json lists them.

    python tools/demo.py --run output/clclip_shapes_10+10 --input a.png b.png --output demo_out
    python tools/demo.py --run output/clclip_shapes_10+10 --task 1 --input images/ --output demo_out
    python tools/demo.py --config-file configs/clclip/clclip_shapes_10+10.yaml --input a.png --output demo_out \\
        MODEL.WEIGHTS output/clclip_shapes_10+10/task_2/model_final.pth

Config overrides are KEY VALUE pairs after the options, as for tools/train_net.py (`--opts` before
them is still accepted).
"""
import argparse
import glob
import json
import os
import re
import sys
from typing import List, Optional, Sequence

import torch
from torchvision.utils import draw_bounding_boxes

from clcl_det.config import ConfigError
from clcl_det.data.mapper import read_image
from clcl_det.continual import Predictor
from clcl_det.engine import setup_cfg
from clcl_det.utils.errors import run_cli

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="OUTPUT_DIR", help="a run folder (its config.yaml and task_<t>/model_final.pth)")
    src.add_argument("--config-file", "--config", dest="config_file", metavar="FILE",
                     help="a config; the weights are MODEL.WEIGHTS (an override)")
    p.add_argument("--task", type=int, default=-1, help="with --run: the task whose model runs (1-based; "
                   "default -1 = the last trained task)")
    p.add_argument("--input", nargs="+", required=True, metavar="IMG",
                   help="image files, folders of images, or glob patterns")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the drawn images and detections.json")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="detections below this score are dropped")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="python module or .py file to import first (user methods); repeatable")
    p.add_argument("--opts", dest="opts_flag", nargs=argparse.REMAINDER, default=[], help=argparse.SUPPRESS)  # deprecated
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs (or KEY=VALUE), "
                   "after the options, e.g. MODEL.WEIGHTS out/task_2/model_final.pth")
    return p


_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+(=.*)?$")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The parser's arguments, with the overrides that `--input`'s list swallowed moved to `opts`."""
    args = get_parser().parse_args(argv)
    first = next((i for i, x in enumerate(args.input) if _KEY.match(x)), None)
    if first is not None:
        args.input, args.opts = args.input[:first], args.input[first:] + list(args.opts or [])
    args.opts = list(args.opts or []) + list(args.opts_flag or [])
    if not args.input:
        get_parser().error("--input needs at least one image")
    return args


def expand_inputs(items: List[str]) -> List[str]:
    """Files, folders (their images) and glob patterns -> image paths, in the given order."""
    out: List[str] = []
    for item in items:
        if os.path.isdir(item):
            out += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(item):
            out.append(item)
        else:
            matches = sorted(glob.glob(item))
            if not matches:
                raise ConfigError(f"--input '{item}': no such file, folder or matching pattern")
            out += matches
    return out


def draw(image: torch.Tensor, det: dict, class_names: List[str]) -> torch.Tensor:
    """`image` (uint8 3xHxW) with one colour per class, labelled 'name score'."""
    palette = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
               "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000"]
    if len(det["boxes"]) == 0:
        return image
    labels = [f"{n} {s:.2f}" for n, s in zip(det["class_names"], det["scores"].tolist())]
    colors = [palette[int(c) % len(palette)] for c in det["labels"]]
    return draw_bounding_boxes(image, det["boxes"], labels=labels, colors=colors,
                               width=max(1, round(max(image.shape[1:]) / 200)))


def main(args: argparse.Namespace) -> None:
    if args.run:
        predictor = Predictor.from_run(args.run, task=args.task, opts=args.opts,
                                       score_thresh=args.confidence_threshold)
    else:
        cfg = setup_cfg(args.config_file, args.opts, args.plugin)
        predictor = Predictor(cfg, score_thresh=args.confidence_threshold)
    paths = expand_inputs(args.input)
    os.makedirs(args.output, exist_ok=True)
    record = {"weights": predictor.weights, "task": predictor.task.index + 1, "class_names": predictor.class_names,
              "confidence_threshold": args.confidence_threshold, "images": {}}
    for path in paths:
        array = read_image(path)
        det = predictor(array)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
        drawn = draw(image, det, predictor.class_names)
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        from PIL import Image

        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(os.path.join(args.output, name))
        record["images"][path] = [
            {"bbox": [round(float(v), 2) for v in box], "score": round(float(s), 4), "label": int(c), "class_name": n}
            for box, s, c, n in zip(det["boxes"].tolist(), det["scores"], det["labels"], det["class_names"])]
        print(f"{path}: {len(det['boxes'])} detection(s) -> {os.path.join(args.output, name)}")
    with open(os.path.join(args.output, "detections.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    args = parse_args()
    if args.run:
        from clcl_det.engine import load_plugins

        load_plugins(args.plugin)
    sys.exit(run_cli(lambda: main(args)))

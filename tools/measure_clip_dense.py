#!/usr/bin/env python
"""Measure a CLIP on Shapes test (or val) images, or on any registered dataset (`--dataset`): dense hit rate and zero-shot crop accuracy, per class.

    python tools/measure_clip_dense.py                          # the cached tiny CLIP (built if missing)
    python tools/measure_clip_dense.py --weights /tmp/tiny.pt --num-images 200
    python tools/measure_clip_dense.py --templates simple MODEL.CLIP.TINY.ITERS 300
    python tools/measure_clip_dense.py --split val MODEL.CLIP.TINY.ITERS 100   # choose recipes on val
    python tools/measure_clip_dense.py --dataset clutter_val --config-file configs/_base_/Base-Clutter.yaml

Dense hit rate: per ground-truth box, the class with the highest mean response of the cost volume
V.T^T over the box's patch cells must be the box's class (chance 1/20 on Shapes, 1/80 on Clutter). Crop accuracy: the box
cropped square with 10 % context, resized to the CLIP input size, classified by `encode_image`.
"""
import argparse
import logging
import sys

from clcl_det.embedded.shapes import SHAPES_SPLITS
from clcl_det.engine.defaults import setup_cfg
from clcl_det.utils.errors import run_cli
from clcl_det.utils.logger import setup_logger

logger = logging.getLogger("clcl_det.tools.measure_clip_dense")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", "--config", dest="config_file", default="", metavar="FILE",
                   help="YAML config (default: the embedded default)")
    p.add_argument("--weights", default="", metavar="PATH",
                   help="a checkpoint of MODEL.CLIP.ARCH (default: MODEL.CLIP.PRETRAINED, i.e. the cached tiny CLIP)")
    p.add_argument("--split", default="test", choices=list(SHAPES_SPLITS),
                   help="Shapes split to measure on (val = shapes_val, for choosing a recipe)")
    p.add_argument("--dataset", default="", metavar="NAME",
                   help="a registered dataset to measure on instead of a Shapes split, e.g. clutter_val")
    p.add_argument("--num-images", type=int, default=0, metavar="N", help="first N images of the split (0 = all)")
    p.add_argument("--templates", default="", choices=["", "imagenet", "simple"],
                   help="prompt templates of the class embeddings (default: MODEL.CLIP.TEMPLATES)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    setup_logger(name="clcl_det")
    opts = list(args.opts or [])
    if args.weights:
        opts += ["MODEL.CLIP.PRETRAINED", args.weights]
    cfg = setup_cfg(args.config_file, opts)
    from clcl_det.data.catalog import MetadataCatalog
    from clcl_det.embedded.quality import format_report, measure_on_dataset, measure_on_shapes
    from clcl_det.engine.defaults import prepare_embedded_assets
    from clcl_det.modeling.clip.factory import build_clip

    prepare_embedded_assets(cfg)
    model, tokenizer = build_clip(cfg)
    templates = args.templates or cfg.MODEL.CLIP.TEMPLATES
    if args.dataset:
        res = measure_on_dataset(cfg, model, tokenizer, args.dataset, num_images=args.num_images or None,
                                 templates=templates)
    else:
        res = measure_on_shapes(cfg, model, tokenizer, num_images=args.num_images or None, templates=templates,
                                split=args.split)
    name = args.dataset or f"shapes_{args.split}"
    print(f"CLIP {cfg.MODEL.CLIP.ARCH} ({cfg.MODEL.CLIP.PRETRAINED or 'random weights'}), "
          f"{templates} templates, {int(res['dense_hit_rate'].total.sum())} boxes of {name}")
    print(format_report(res, MetadataCatalog.get(name).thing_classes))


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(parse_args())))

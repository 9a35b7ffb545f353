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
Prior: CL-CLIP's cost-volume prior per box as its head reads a RoI, at MODEL.CLCLIP.COST_VOLUME's
TEMPERATURE, NORM and LEVEL_INSET (or --prior-temperature): hit rate, prior of the box's class, entropy and
calibration error of the level, and the hit rate of the per-cell map averaged over the box.
Mixed boxes: the share of boxes that another class's object covers by >= 10 % / 25 % of their area
(where a class-specific spatial prior has two classes to tell apart inside one RoI).
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
    p.add_argument("--prior-temperature", type=float, action="append", default=None, metavar="T",
                   help="a temperature of the prior report, repeatable (0 = 1 / the CLIP's logit scale; default: "
                        "MODEL.CLCLIP.COST_VOLUME.TEMPERATURE)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    setup_logger(name="clcl_det")
    opts = list(args.opts or [])
    if args.weights:
        opts += ["MODEL.CLIP.PRETRAINED", args.weights]
    cfg = setup_cfg(args.config_file, opts)
    from clcl_det.data.catalog import DatasetCatalog, MetadataCatalog
    from clcl_det.embedded.quality import (format_prior_report, format_report, measure_on_dataset, measure_prior,
                                           mixed_box_share)
    from clcl_det.embedded.shapes import ShapesSpec, register_shapes
    from clcl_det.modeling.text import TextEncoder
    from clcl_det.engine.defaults import prepare_embedded_assets
    from clcl_det.modeling.clip.factory import build_clip

    prepare_embedded_assets(cfg)
    model, tokenizer = build_clip(cfg)
    templates = args.templates or cfg.MODEL.CLIP.TEMPLATES
    name = args.dataset or register_shapes(ShapesSpec.from_cfg(cfg))[args.split]
    res = measure_on_dataset(cfg, model, tokenizer, name, num_images=args.num_images or None, templates=templates)
    print(f"CLIP {cfg.MODEL.CLIP.ARCH} ({cfg.MODEL.CLIP.PRETRAINED or 'random weights'}), "
          f"{templates} templates, {int(res['dense_hit_rate'].total.sum())} boxes of {name}")
    class_names = MetadataCatalog.get(name).thing_classes
    print(format_report(res, class_names))
    dicts = DatasetCatalog.get(name)
    dicts = dicts[:args.num_images] if args.num_images else dicts
    n, shares = mixed_box_share(dicts)
    print(f"mixed boxes: of {n} boxes, " + ", ".join(f"{share:.1%} are covered >= {f:.0%} by another class's object"
                                                     for f, share in shares.items()))
    text = TextEncoder(model, tokenizer, templates)
    classes = text.encode_classes(class_names)
    background = text.encode_classes([cfg.MODEL.CLIP.BACKGROUND_PROMPT])[0]
    norm = cfg.MODEL.CLCLIP.COST_VOLUME.NORM
    scale = float(model.logit_scale.exp().clamp(max=100.0))
    for T in args.prior_temperature or [cfg.MODEL.CLCLIP.COST_VOLUME.TEMPERATURE]:
        q = measure_prior(model, classes, background, dicts, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, T, norm,
                          cfg.MODEL.CLCLIP.COST_VOLUME.LEVEL_INSET)
        print(format_prior_report(q, T if T > 0 else 1.0 / scale, norm) + (" (the CLIP's own T)" if T <= 0 else ""))


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(parse_args())))

#!/usr/bin/env python
"""Build (or rebuild) the project's tiny CLIP and print the path of its checkpoint.

    python tools/pretrain_tiny_clip.py                      # the cached default, built if missing
    python tools/pretrain_tiny_clip.py --force MODEL.CLIP.TINY.ITERS 300
    python tools/pretrain_tiny_clip.py --output /tmp/tiny.pt --eval-images 200

The checkpoint is a plain open_clip state_dict:
`open_clip.create_model("shapes-tiny", pretrained=PATH, weights_only=True)` loads it. With
MODEL.CLIP.TINY.EVAL_PERIOD > 0 the dense hit rate and crop accuracy on Shapes test images are
logged during training (measurement only; the recipe never trains on test images).
"""
import argparse
import logging
import sys
from typing import Any

from clcl_det.engine.defaults import setup_cfg
from clcl_det.utils.errors import run_cli
from clcl_det.utils.logger import setup_logger

logger = logging.getLogger("clcl_det.tools.pretrain_tiny_clip")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", "--config", dest="config_file", default="", metavar="FILE",
                   help="YAML config (default: the embedded default)")
    p.add_argument("--output", default="", metavar="PATH",
                   help="write the checkpoint here instead of the cache (always trains)")
    p.add_argument("--force", action="store_true", help="rebuild the cached checkpoint even if it exists")
    p.add_argument("--eval-images", type=int, default=0, metavar="N",
                   help="after training, measure on the first N Shapes test images (0 = no measurement, "
                        "unless MODEL.CLIP.TINY.EVAL_PERIOD > 0: then all of them)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p.parse_args(argv)


def _eval_fn(cfg: Any, num_images: int):
    """A monitoring callback for `pretrain_tiny_clip` that logs the quality on test images."""
    import open_clip

    from clcl_det.modeling.clip.quality import format_report, measure_on_shapes

    tokenizer = open_clip.get_tokenizer(cfg.MODEL.CLIP.ARCH)

    def fn(model, step: int) -> None:
        res = measure_on_shapes(cfg, model, tokenizer, num_images=num_images or None)
        final = step == cfg.MODEL.CLIP.TINY.ITERS
        logger.info(f"step {step}: " + (format_report(res) if final else
                    f"dense hit rate {res['dense_hit_rate'].overall:.1%}, "
                    f"crop accuracy {res['crop_accuracy'].overall:.1%}"))

    return fn


def main(args: argparse.Namespace) -> None:
    setup_logger(name="clcl_det")
    cfg = setup_cfg(args.config_file, args.opts)
    from clcl_det.modeling.clip.pretrain import ensure_shapes_tiny, pretrain_tiny_clip

    measure = args.eval_images > 0 or cfg.MODEL.CLIP.TINY.EVAL_PERIOD > 0
    eval_fn = _eval_fn(cfg, args.eval_images) if measure else None
    if args.output:
        pretrain_tiny_clip(cfg, args.output, eval_fn=eval_fn)
        path = args.output
    else:
        path = ensure_shapes_tiny(cfg, force=args.force, eval_fn=eval_fn)
    print(path)


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(parse_args())))

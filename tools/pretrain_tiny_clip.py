#!/usr/bin/env python
"""Build (or rebuild) the project's tiny CLIP and print the path of its checkpoint.

    python tools/pretrain_tiny_clip.py --verify             # rebuild the packaged default, compare its sha256
    python tools/pretrain_tiny_clip.py --verify --config-file configs/_base_/Base-Clutter.yaml   # the Clutter one
    python tools/pretrain_tiny_clip.py --verify --output clcl_det/embedded/assets/shapes-tiny.pt  # and repair it
    python tools/pretrain_tiny_clip.py MODEL.CLIP.TINY.ITERS 300   # another recipe: built into the cache
    python tools/pretrain_tiny_clip.py --force MODEL.CLIP.TINY.ITERS 300
    python tools/pretrain_tiny_clip.py --output /tmp/tiny.pt --eval-images 200

The default recipe's checkpoint ships in the package (clcl_det/embedded/assets/shapes-tiny.pt), and
so does the Clutter recipe's (clutter-tiny.pt: MODEL.CLIP.TINY.DATASET clutter, as
configs/_base_/Base-Clutter.yaml sets it); each is checked by its sha256 whenever it is loaded;
`--verify` builds the config's recipe again (about 4 / 10 minutes) and says whether the bytes match
the packaged ones. Any other recipe (a MODEL.CLIP.TINY or DATASETS.SHAPES
key changed) is built on first use into $CLCL_CACHE.

The recipe runs in a child process under pinned numerics (AVX2 kernels, MKL_CBWR, two threads:
`clcl_det.embedded.tiny_clip.pinned_env`), so the checkpoint has the same bytes on every x86-64
CPU with AVX2; its path and sha256 are printed. The checkpoint is a plain open_clip state_dict:
`open_clip.create_model("shapes-tiny", pretrained=PATH, weights_only=True)` loads it. With
MODEL.CLIP.TINY.EVAL_PERIOD > 0 the dense hit rate and crop accuracy on Shapes test images are
logged during training (measurement only; the recipe never trains on test images).
"""
import argparse
import os
import logging
import sys

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
    p.add_argument("--verify", action="store_true",
                   help="rebuild the recipe (into --output, or a temporary file) and compare its sha256 with the "
                        "packaged checkpoint's (an error if they differ)")
    p.add_argument("--eval-images", type=int, default=0, metavar="N",
                   help="after training, measure on the first N Shapes test images (0 = no measurement, "
                        "unless MODEL.CLIP.TINY.EVAL_PERIOD > 0: then all of them)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    setup_logger(name="clcl_det")
    cfg = setup_cfg(args.config_file, args.opts)
    from clcl_det.embedded.tiny_clip import (PACKAGED, TinyCLIPChecksumError, build_pinned, ensure_shapes_tiny,
                                             file_sha256, recipe_digest)

    if args.verify:
        import tempfile

        if recipe_digest(cfg) not in PACKAGED:
            raise TinyCLIPChecksumError(f"--verify: no packaged checkpoint has this recipe (digest {recipe_digest(cfg)}; "
                                        f"packaged: {', '.join(PACKAGED)})")
        name, released, _ = PACKAGED[recipe_digest(cfg)]
        with tempfile.TemporaryDirectory() as tmp:
            path = args.output or os.path.join(tmp, name)
            build_pinned(cfg, path, eval_images=args.eval_images)
            digest = file_sha256(path)
        if digest != released:
            raise TinyCLIPChecksumError(f"rebuilt sha256 {digest} differs from the packaged {name}'s {released}")
        print(f"rebuilt sha256 {digest}: matches the packaged checkpoint {name}")
        return
    if args.output:
        build_pinned(cfg, args.output, eval_images=args.eval_images)
        path = args.output
    else:
        path = ensure_shapes_tiny(cfg, force=args.force, eval_images=args.eval_images)
    print(path, file_sha256(path))


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(parse_args())))

#!/usr/bin/env python
"""Train and evaluate a whole continual task sequence (or evaluate one with --eval-only).

    python tools/train_net.py --config configs/clclip/clclip_shapes_10+10.yaml
    python tools/train_net.py --config VOC_10+10.yaml --num-gpus 8
    python tools/train_net.py --config-file X.yaml --resume
"""
import sys

from clcl_det.config import ConfigError
from clcl_det.continual import ContinualRunner
from clcl_det.engine import default_argument_parser, default_setup, launch, setup_cfg
from clcl_det.utils.errors import run_cli


def setup(args):
    """get_cfg + plugins + config file + KEY VALUE overrides; logging and seeds."""
    cfg = setup_cfg(args.config_file, args.opts, args.plugin)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    runner = ContinualRunner(cfg, resume=args.resume)
    return runner.evaluate() if args.eval_only else runner.run()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    sys.exit(run_cli(lambda: launch(main, args.num_gpus, num_machines=args.num_machines,
                                    machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))))

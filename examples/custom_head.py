#!/usr/bin/env python
"""A classification head written outside the package, registered and trained on a tiny Shapes set.

`MarginTextClassifier` is F-ViT's cosine classifier with an additive cosine margin (CosFace) on the
ground-truth class while training: logits use tau * (cos - m) for the labelled class, which pulls
RoI embeddings closer to their class's text embedding than plain cross-entropy does.

Use it like any method of the registry:

    python tools/train_net.py --plugin examples/custom_head.py --config fvit/finetune_shapes_10+10.yaml \\
        MODEL.CLS_HEAD.NAME MarginTextClassifier MODEL.MARGIN_HEAD.MARGIN 0.2

or from Python (this module imported as a plugin, e.g. by `setup_cfg(..., plugins=[path])`):
`run(output_dir)`. Running this file trains for a few iterations on a tiny Shapes set with a
random tiny CLIP (no download) and prints the metrics:

    python examples/custom_head.py [OUTPUT_DIR]
"""
import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clcl_det.config import CfgNode, configurable
from clcl_det.config.tiny_run import tiny_run_overrides
from clcl_det.modeling import CLS_HEAD_REGISTRY, HeadContext
from clcl_det.modeling.cls_heads.text_classifier import TextClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# A tiny, fast setup (the tests' tiny run): random tiny CLIP, 24/12 Shapes images, small heads,
# a few iterations, the first task only.
TINY = tiny_run_overrides({
    "SOLVER.MAX_ITER": 6, "SOLVER.CHECKPOINT_PERIOD": 1000, "CONTINUAL.TRAIN_TASKS": 1, "TEST.ZERO_SHOT": False,
    "MODEL.CLS_HEAD.NAME": "MarginTextClassifier",
})


def add_config(cfg: CfgNode) -> None:
    """The keys this method adds (setup_cfg calls it for every plugin before reading configs)."""
    cfg.MODEL.MARGIN_HEAD = CfgNode()
    cfg.MODEL.MARGIN_HEAD.MARGIN = 0.1  # cosine margin m subtracted from the labelled class in training


@CLS_HEAD_REGISTRY.register()
class MarginTextClassifier(TextClassifier):
    """TextClassifier whose training loss uses tau * (cos - m) for the ground-truth class."""

    @configurable
    def __init__(self, *, margin: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.margin = margin

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> Dict[str, Any]:
        return {**super().from_config(cfg, embed_dim), "margin": cfg.MODEL.MARGIN_HEAD.MARGIN}

    def losses(self, logits: Tensor, labels: Tensor, x: Tensor, ctx: HeadContext) -> Dict[str, Tensor]:
        valid = labels >= 0
        if not bool(valid.any()):
            return {"loss_cls": logits.sum() * 0.0}
        fg = valid & (labels < ctx.num_classes)  # background keeps its plain logit
        shift = torch.zeros_like(logits)
        shift[fg, labels[fg]] = self.scale() * self.margin
        return {"loss_cls": F.cross_entropy((logits - shift)[valid], labels[valid])}


def run(output_dir: str, opts: Sequence[str] = ()) -> Dict[str, Any]:
    """Train and evaluate the tiny setup through the public API; the run's summary."""
    from clcl_det.continual import ContinualRunner
    from clcl_det.engine import default_setup, setup_cfg

    cfg = setup_cfg("", [*TINY, "OUTPUT_DIR", output_dir, *opts], plugins=[os.path.abspath(__file__)])
    default_setup(cfg)
    return ContinualRunner(cfg).run()


def _print_summary(output_dir: str) -> None:
    with open(os.path.join(output_dir, "task_1", "metrics.json")) as f:
        stage = json.load(f)
    with open(os.path.join(output_dir, "task_1", "train_metrics.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    losses = {k: round(v, 4) for k, v in last.items() if k.startswith("loss")}
    print(f"MarginTextClassifier trained {last['iteration'] + 1} iterations; last losses {losses}")
    print(f"task 1 metrics: {stage['summary']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run tools/train_net.py with this file as a plugin (a separate process registers the head
    once; this process already registered it by running the file) and print the metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    output_dir = argv[0] if argv else os.path.join("output", "example_custom_head")
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--plugin", os.path.abspath(__file__),
           *TINY, "OUTPUT_DIR", output_dir]
    code = subprocess.call(cmd)
    if code == 0:
        _print_summary(output_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())

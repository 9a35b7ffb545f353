"""tools/benchmark.py's command line: KEY VALUE overrides reach the configs, also after a list of configs."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import benchmark  # noqa: E402


def test_steps_takes_overrides_after_the_list_of_configs():
    args = benchmark.parse_args(["steps", "--configs", "a.yaml", "b.yaml", "--", "SOLVER.MAX_ITER", "5"])
    assert args.configs == ["a.yaml", "b.yaml"] and args.opts == ["SOLVER.MAX_ITER", "5"]
    args = benchmark.parse_args(["steps", "--iters", "3", "SOLVER.MAX_ITER", "5"])
    assert args.configs == benchmark.SHAPES_STEP_CONFIGS and args.opts == ["SOLVER.MAX_ITER", "5"]
    assert benchmark.parse_args(["clclip", "--", "MODEL.CLCLIP.MULTI_EXPERT.TOPK", "0"]).opts == [
        "MODEL.CLCLIP.MULTI_EXPERT.TOPK", "0"]

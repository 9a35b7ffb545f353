#!/usr/bin/env python
"""Tabulate finished runs for MODEL_ZOO.md: mAP@B / mAP@N / mAP@A after the last task.

    python tools/zoo_table.py --split 10+10 output/shapes/finetune_10+10 output/shapes/clclip_10+10 output/shapes/joint

A run trained on one task (joint, zero-shot) is grouped by --split: B = the split's first task's
classes, N = the rest (for zero-shot runs N is the zero-shot AP of the classes never trained).
"""
import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional

from clcl_det.data.continual import parse_task_string


def _mean(values: List[Optional[float]]) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


def row(run_dir: str, split: str) -> Dict[str, Any]:
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    names = s["class_names"]
    last = s["stages"][-1]
    label = os.path.basename(os.path.normpath(run_dir))
    if s["num_tasks"] > 1 and last["task"] == s["num_tasks"] - 1:  # a continual run, complete
        return {"run": label, "B": last.get("mAP@B"), "N": last.get("mAP@N"), "A": last.get("mAP@A"),
                "stages": [st.get("mAP@A") for st in s["stages"]]}
    first = parse_task_string(split)[0]
    final = {n: v[-1] for n, v in s["per_class"].items()}
    zero = {n: v[-1] for n, v in s.get("zero_shot", {}).items()}
    vals = [final.get(n) if final.get(n) is not None else zero.get(n) for n in names]
    return {"run": label, "B": _mean(vals[:first]), "N": _mean(vals[first:]), "A": _mean(vals), "stages": []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", required=True, help="task string the B/N groups of single-task runs follow")
    p.add_argument("runs", nargs="+", help="OUTPUT_DIRs of finished runs")
    args = p.parse_args(argv)
    print("| run | mAP@B | mAP@N | mAP@A | mAP@A per stage |")
    print("| --- | --- | --- | --- | --- |")
    for r in args.runs:
        x = row(r, args.split)
        f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"  # noqa: E731
        print(f"| {x['run']} | {f(x['B'])} | {f(x['N'])} | {f(x['A'])} | {' / '.join(f(v) for v in x['stages'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

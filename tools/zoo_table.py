#!/usr/bin/env python
"""Tabulate finished runs for MODEL_ZOO.md: mAP@B / mAP@N / mAP@A after the last task.

B = the first task's classes, N = every class added after the first task, A = all (MMA / ABR
convention; for two tasks: old / new). When a run has more than two tasks the table adds the
mean of mAP@A over the stages and each task's mAP after the last stage.

    python tools/zoo_table.py --split 10+10 output/finetune_shapes_10+10 output/clclip_shapes_10+10 output/joint_shapes

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
        tm = s.get("task_matrix", {})
        return {"run": label, "B": last.get("mAP@B"), "N": last.get("mAP@N"), "A": last.get("mAP@A"),
                "stages": [st.get("mAP@A") for st in s["stages"]],
                "base_stages": [st.get("mAP@B", st.get("mAP@A")) if i else st.get("mAP@A")
                                for i, st in enumerate(s["stages"])], "num_tasks": s["num_tasks"],
                "mean_A": s.get("mean_mAP@A"), "tasks": [row[-1] for row in tm.get("mAP", [])]}
    first = parse_task_string(split)[0]
    final = {n: v[-1] for n, v in s["per_class"].items()}
    zero = {n: v[-1] for n, v in s.get("zero_shot", {}).items()}
    vals = [final.get(n) if final.get(n) is not None else zero.get(n) for n in names]
    return {"run": label, "B": _mean(vals[:first]), "N": _mean(vals[first:]), "A": _mean(vals), "stages": [],
            "base_stages": [],
            "num_tasks": s["num_tasks"], "mean_A": None, "tasks": []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", required=True, help="task string the B/N groups of single-task runs follow")
    p.add_argument("runs", nargs="+", help="OUTPUT_DIRs of finished runs")
    args = p.parse_args(argv)
    rows = [row(r, args.split) for r in args.runs]
    multi = any(x["num_tasks"] > 2 for x in rows)
    f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"  # noqa: E731
    if multi:
        print("| run | mAP@B | mAP@N | mAP@A | mAP@A per stage | mean mAP@A | per-task mAP after the last task |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
    else:
        print("| run | mAP@B | mAP@N | mAP@A | mAP@A per stage |")
        print("| --- | --- | --- | --- | --- |")
    for x in rows:
        line = f"| {x['run']} | {f(x['B'])} | {f(x['N'])} | {f(x['A'])} | {' / '.join(f(v) for v in x['stages'])} |"
        if multi:
            line += f" {f(x['mean_A'])} | {' / '.join(f(v) for v in x['tasks']) or '-'} |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

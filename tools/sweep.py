#!/usr/bin/env python
"""Run a list of configs x seeds, several processes at once, and tabulate them for MODEL_ZOO.md.

    python tools/sweep.py --out output/sweep_10+10 --seeds 0 1 --jobs 2 --threads 1 --split 10+10 \\
        configs/fvit/finetune_shapes_10+10.yaml configs/clclip/clclip_shapes_10+10.yaml configs/fvit/joint_shapes.yaml

Each (config, seed) trains with tools/train_net.py into OUT/<config name>/seed<seed> (a config
named twice with different overrides: give it a label, `LABEL=path.yaml`). At most --jobs runs at
once, each with --threads threads (OMP/MKL/torch) and, with --pin, its own CPU cores. The sweep
resumes: a run whose summary.json covers every task is skipped, a started one continues with
--resume from its last checkpoint, so re-running the same command after an interruption only
does what is left. Overrides after `--` go to every run (e.g. `-- SOLVER.MAX_ITER 200`).

When all runs are done, OUT/table.md holds the command that made it and one row per config, the
mean ± sample standard deviation over its seeds: mAP@B | mAP@N | mAP@A after the last task, the
mean of mAP@A over the stages (three tasks or more) and, for a config named `<base>_<variant>`,
its mAP@A minus the base row's. OUT/table.csv holds every metric tools/zoo_table.py reads from a
run (each stage's mAP@A and mAP@B, each task's mAP at the end: mean, std) and OUT/base_map.png
the first task's classes through the stages. `--table-only` rewrites them from what is finished,
without training: MODEL_ZOO.md's tables are rewritten this way from their committed run records
(each run's summary.json and config.yaml).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path[:0] = [TOOLS, REPO]

import zoo_table  # noqa: E402  (tools/zoo_table.py: the per-run metrics)


class Run:
    """One (config, seed): its output folder and state."""

    def __init__(self, label: str, config: str, seed: int, out_root: str):
        self.label, self.config, self.seed = label, config, seed
        self.dir = os.path.join(out_root, label, f"seed{seed}")

    def complete(self) -> bool:
        """summary.json holds a stage for every task the run trains (CONTINUAL.TRAIN_TASKS, or all)."""
        try:
            with open(os.path.join(self.dir, "summary.json")) as f:
                s = json.load(f)
            return len(s["stages"]) == (_train_tasks_limit(self.dir) or s["num_tasks"])
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def started(self) -> bool:
        return os.path.isfile(os.path.join(self.dir, "config.yaml"))


def _train_tasks_limit(run_dir: str) -> int:
    """CONTINUAL.TRAIN_TASKS of the run's saved config (0 = all)."""
    from clcl_det.config import CfgNode

    cfg = CfgNode.load_yaml_with_base(os.path.join(run_dir, "config.yaml")) or {}
    return int(cfg.get("CONTINUAL", {}).get("TRAIN_TASKS", 0) or 0)


def parse_configs(items: Sequence[str]) -> List[Tuple[str, str]]:
    """`path.yaml` or `LABEL=path.yaml` -> (label, path); labels must be unique."""
    out, seen = [], set()
    for it in items:
        label, _, path = it.rpartition("=") if "=" in it else ("", "", it)
        path = path if os.path.isfile(path) else os.path.join(REPO, path)
        if not os.path.isfile(path):
            raise SystemExit(f"sweep: config '{it}' not found")
        path = os.path.abspath(path)  # the runs start in the repository root
        label = label or os.path.splitext(os.path.basename(path))[0]
        if label in seen:
            raise SystemExit(f"sweep: two configs are labelled '{label}'; name one LABEL=path.yaml")
        seen.add(label)
        out.append((label, path))
    return out


def command(run: Run, opts: Sequence[str], python: str = sys.executable) -> List[str]:
    cmd = [python, os.path.join(TOOLS, "train_net.py"), "--config-file", run.config]
    if run.started():
        cmd.append("--resume")
    return cmd + list(opts) + ["SEED", str(run.seed), "OUTPUT_DIR", run.dir]


def _env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _cores(slot: int, threads: int) -> Optional[set]:
    avail = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not avail:
        return None
    return {avail[(slot * threads + i) % len(avail)] for i in range(threads)}


def run_all(runs: List[Run], opts: Sequence[str], jobs: int, threads: int, pin: bool,
            log=print) -> List[Run]:
    """Run what is not complete, at most `jobs` at a time; returns the runs that failed."""
    todo = [r for r in runs if not r.complete()]
    for r in runs:
        if r not in todo:
            log(f"[sweep] done already: {r.label} seed {r.seed}")
    active: Dict[int, Tuple[Run, subprocess.Popen, Any, float]] = {}  # slot -> run
    failed: List[Run] = []
    while todo or active:
        for slot in range(jobs):
            if slot in active or not todo:
                continue
            r = todo.pop(0)
            os.makedirs(r.dir, exist_ok=True)
            cmd = command(r, opts)
            logf = open(os.path.join(r.dir, "sweep.log"), "a")
            logf.write(f"$ {shlex.join(cmd)}\n")
            logf.flush()
            cores = _cores(slot, threads) if pin else None
            pre = (lambda c=cores: os.sched_setaffinity(0, c)) if cores else None
            p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=_env(threads), cwd=REPO,
                                 preexec_fn=pre)
            log(f"[sweep] start {r.label} seed {r.seed}{' (resume)' if '--resume' in cmd else ''}"
                f"{f' on cores {sorted(cores)}' if cores else ''} -> {r.dir}")
            active[slot] = (r, p, logf, time.time())
        time.sleep(0.2)
        for slot, (r, p, logf, t0) in list(active.items()):
            if p.poll() is None:
                continue
            logf.close()
            del active[slot]
            if p.returncode == 0 and r.complete():
                log(f"[sweep] done {r.label} seed {r.seed} in {time.time() - t0:.0f} s")
            else:
                failed.append(r)
                log(f"[sweep] FAILED {r.label} seed {r.seed} (exit {p.returncode}); see {r.dir}/sweep.log")
    return failed


# -- table ------------------------------------------------------------------------------------------
def _fmt(values: List[float]) -> str:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"


def aggregate(groups: List[Tuple[str, List[str]]], split: str) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Per label: mean/std over its run folders of every scalar metric of zoo_table.row and of
    each entry of its per-stage lists. Returns the metric columns and one dict per label."""
    rows, columns = [], []
    for label, dirs in groups:
        per = [zoo_table.row(d, split) for d in dirs]
        out: Dict[str, Any] = {"run": label, "seeds": len(per), "values": {}}
        for x in per:
            for k, v in x.items():
                if k in ("run", "num_tasks"):  # not metrics
                    continue
                if isinstance(v, (list, tuple)):
                    for i, s in enumerate(v):
                        out["values"].setdefault(f"{k}[{i + 1}]", []).append(s)
                elif isinstance(v, (int, float)) or v is None:
                    out["values"].setdefault(k, []).append(v)
        for k in out["values"]:
            if k not in columns:
                columns.append(k)
        rows.append(out)
    return columns, rows


def _header(k: str) -> str:
    names = {"B": "mAP@B", "N": "mAP@N", "A": "mAP@A", "mean_A": "mean mAP@A over stages"}
    if "[" in k:
        base, i = k[:-1].split("[")
        if base == "tasks":
            return f"task {i} mAP at the end"
        return f"{ {'stages': 'mAP@A', 'base_stages': 'mAP@B'}.get(base, base)} after task {i}"
    return names.get(k, k)


def base_curves(groups: List[Tuple[str, List[str]]], split: str) -> List[Tuple[str, List[float], List[float], int]]:
    """Per label with at least two stages: (label, mean, sample std, seeds) of the first task's
    classes' mAP (mAP@B; mAP@A after task 1) after every stage, over its runs."""
    curves = []
    for label, dirs in groups:
        per = [zoo_table.row(d, split)["base_stages"] for d in dirs]
        per = [p for p in per if len(p) > 1]
        if per:
            n = min(len(p) for p in per)
            stages = [[p[i] for p in per] for i in range(n)]
            curves.append((label, [statistics.mean(v) for v in stages],
                           [statistics.stdev(v) if len(v) > 1 else 0.0 for v in stages], len(per)))
    return curves


def write_base_plot(groups: List[Tuple[str, List[str]]], split: str, png_path: str) -> bool:
    """`base_curves` as one PNG, the spread as error bars. False if no run has two stages."""
    curves = base_curves(groups, split)
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clcl_det.utils.checkpoint import atomic_write

    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    for label, mean, std, n in curves:
        ax.errorbar(range(1, len(mean) + 1), mean, yerr=std, marker="o", capsize=3, label=f"{label} ({n} seeds)")
    ax.set_xlabel("after task")
    ax.set_ylabel("mAP of the first task's classes (AP50)")
    ax.set_title(f"Base classes through the stages ({split})")
    ax.set_xticks(range(1, max(len(c[1]) for c in curves) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside the axes, never over a curve
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def _link(label: str, config: str) -> str:
    """The row's name linked to its config, relative to the repository root (where MODEL_ZOO.md is)."""
    rel = os.path.relpath(os.path.abspath(config), REPO)
    return f"[{label}]({rel})" if not rel.startswith("..") else label


def _base_row(label: str, labels: Sequence[str]) -> Optional[str]:
    """An ablation's base row: the longest other label that, followed by '_', starts this one."""
    bases = [x for x in labels if x != label and label.startswith(x + "_")]
    return max(bases, key=len) if bases else None


def markdown_table(groups: List[Tuple[str, List[str]]], split: str, configs: Dict[str, str]) -> str:
    """One row per label, mean ± sample std over its seeds: mAP@B | mAP@N | mAP@A after the last task,
    the mean of mAP@A over the stages when a run has three tasks or more, and, when a label extends
    another one's (`<base>_<variant>`), its mAP@A minus the base row's."""
    columns, rows = aggregate(groups, split)
    labels = [r["run"] for r in rows]
    multi = any(zoo_table.row(d, split)["num_tasks"] > 2 for _, dirs in groups for d in dirs[:1])
    bases = {r["run"]: _base_row(r["run"], labels) for r in rows}
    seeds = max(r["seeds"] for r in rows)
    head = ["config", "mAP@B", "mAP@N", "mAP@A"] + (["mean mAP@A over stages"] if multi else [])
    head += ["Δ mAP@A"] if any(bases.values()) else []
    md = io.StringIO()
    md.write("| " + " | ".join(head) + " |\n| " + " | ".join("---" for _ in head) + " |\n")
    mean_a = {r["run"]: _mean(r["values"].get("A", [])) for r in rows}
    for r in rows:
        name = _link(r["run"], configs.get(r["run"], "")) if r["run"] in configs else r["run"]
        if r["seeds"] != seeds:
            name += f" ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})"
        cells = [name] + [_fmt(r["values"].get(k, [])) for k in ("B", "N", "A")]
        if multi:
            cells.append(_fmt(r["values"].get("mean_A", [])))
        if "Δ mAP@A" in head:
            base = bases[r["run"]]
            cells.append(f"{mean_a[r['run']] - mean_a[base]:+.1f} vs {base}" if base else "")
        md.write("| " + " | ".join(cells) + " |\n")
    return md.getvalue()


def _mean(values: List[Optional[float]]) -> float:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.mean(v) if v else float("nan")


def write_tables(groups: List[Tuple[str, List[str]]], split: str, md_path: str, csv_path: str,
                 cmdline: str, configs: Optional[Dict[str, str]] = None) -> str:
    """table.md (the command, then `markdown_table`) and table.csv (every metric of every stage:
    mean, std; the seeds)."""
    columns, rows = aggregate(groups, split)
    text = f"    {cmdline}\n\n" + markdown_table(groups, split, configs or {})
    with open(md_path, "w") as f:
        f.write(text)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["run", "seeds"] + [f"{_header(c)} {s}" for c in columns for s in ("mean", "std")])
        for r in rows:
            cells = []
            for c in columns:
                v = [x for x in r["values"].get(c, []) if x is not None and not math.isnan(x)]
                cells += [f"{statistics.mean(v):.2f}" if v else "", f"{statistics.stdev(v):.2f}" if len(v) > 1 else ""]
            w.writerow([r["run"], r["seeds"]] + cells)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the command that makes the table (--table-only rewrites the same table from the finished runs)
    cmdline = "python tools/sweep.py " + shlex.join(a for a in argv if a != "--table-only")
    opts: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, opts = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --out DIR [options] CONFIG [CONFIG ...] [-- KEY VALUE ...]")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML configs (path, or LABEL=path)")
    p.add_argument("--out", required=True, help="root folder: OUT/<label>/seed<s>/ per run, OUT/table.{md,csv}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="SEED values (default: 0)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="threads per run (default: 1)")
    p.add_argument("--pin", action="store_true", help="pin each running job to its own CPU core(s)")
    p.add_argument("--split", default="", help="task string grouping single-task runs (joint) into B/N "
                   "(default: CONTINUAL.TASKS of the first config)")
    p.add_argument("--table-only", action="store_true", help="only rewrite the table from finished runs")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be at least 1")
    configs = parse_configs(args.configs)
    args.out = os.path.abspath(args.out)
    runs = [Run(label, path, s, args.out) for label, path in configs for s in args.seeds]
    failed: List[Run] = []
    if not args.table_only:
        failed = run_all(runs, opts, args.jobs, args.threads, args.pin)
    split = args.split or _task_string(configs[0][1], opts)
    groups = [(label, [r.dir for r in runs if r.label == label and r.complete()]) for label, _ in configs]
    groups = [(label, dirs) for label, dirs in groups if dirs]
    if groups:
        text = write_tables(groups, split, os.path.join(args.out, "table.md"), os.path.join(args.out, "table.csv"),
                            cmdline, dict(configs))
        print(text, end="")
        if write_base_plot(groups, split, os.path.join(args.out, "base_map.png")):
            print(f"[sweep] base classes per stage: {os.path.join(args.out, 'base_map.png')}")
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: " + ", ".join(f"{r.label} seed {r.seed}" for r in failed),
              file=sys.stderr)
        return 1
    return 0


def _task_string(config: str, opts: Sequence[str]) -> str:
    """CONTINUAL.TASKS of a config (with the sweep's overrides)."""
    from clcl_det.engine import setup_cfg

    return setup_cfg(config, list(opts)).CONTINUAL.TASKS


if __name__ == "__main__":
    sys.exit(main())

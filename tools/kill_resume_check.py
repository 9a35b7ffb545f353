#!/usr/bin/env python
"""Kill a continual run with SIGKILL at random moments, resume it, and check that it ends exactly
where an uninterrupted run ends (the long variant of tests/test_reliability.py).

    python tools/kill_resume_check.py                    # 5 trials, up to 3 kills each, tiny 10+10 run
    python tools/kill_resume_check.py --trials 10 --kills 4 --seed 1
    python tools/kill_resume_check.py --config-file configs/clclip/clclip_shapes_10+10.yaml
    python tools/kill_resume_check.py --trials 6 --kills 3 --tasks 5+5+5+5   # a 4-task run

Each run is `tools/train_net.py` in deterministic mode on CPU with a tiny random-weight CLIP on a
small Shapes set (generated in a temporary CLCL_DATASETS), so the whole check takes minutes. The
reference run is timed; every trial starts the same run, kills it after a uniformly random share
of that time, restarts it with `--resume` (killing it again up to --kills times), lets it finish,
and compares every task's final weights (bit for bit), metrics and the stage summary with the
reference, and that no temporary file of an interrupted write (`.<name>.<random>.tmp`) is left.
Exit status 0 = every trial identical.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from clcl_det.config.tiny_run import tiny_run_overrides  # noqa: E402
from clcl_det.utils.checkpoint import leftover_temp_files  # noqa: E402  (the one temp-file naming)
# the tiny run of the tests (random CLIP weights, small sizes, 2 checkpoints per task), 6 iterations
TINY = tiny_run_overrides({"SOLVER.MAX_ITER": 6, "SOLVER.LOG_PERIOD": 1, "DETERMINISTIC": True})


def _command(config: str, out: str, resume: bool, extra: List[str]) -> List[str]:
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py")]
    if config:
        cmd += ["--config-file", config]
    if resume:
        cmd.append("--resume")
    return cmd + TINY + extra + ["OUTPUT_DIR", out]


def _run(cmd: List[str], env: Dict[str, str], log: str, kill_after: Optional[float] = None) -> Optional[int]:
    """Run cmd (output appended to log); SIGKILL it after kill_after seconds. Its return code."""
    with open(log, "a") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
    return p.returncode


def _last_line(log: str) -> str:
    with open(log) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][-90:] if lines else ""


def _final(out: str) -> Dict[str, object]:
    """Everything that must match: final weights of every task, per-task metrics, the summary."""
    res: Dict[str, object] = {}
    t = 1
    while os.path.isdir(os.path.join(out, f"task_{t}")):
        d = os.path.join(out, f"task_{t}")
        res[f"task_{t}/weights"] = torch.load(os.path.join(d, "model_final.pth"), map_location="cpu",
                                             weights_only=True)["model"]
        with open(os.path.join(d, "metrics.json")) as f:
            m = json.load(f)
        res[f"task_{t}/metrics"] = {k: m.get(k) for k in ("per_class", "summary", "zero_shot")}
        t += 1
    with open(os.path.join(out, "summary.json")) as f:
        res["summary"] = json.load(f)["stages"]
    return res


def _same(a: Dict[str, object], b: Dict[str, object]) -> List[str]:
    diff = [k for k in a if k not in b] + [k for k in b if k not in a]
    for k in a:
        if k in b:
            if k.endswith("/weights"):
                wa, wb = a[k], b[k]
                if wa.keys() != wb.keys() or not all(torch.equal(wa[n], wb[n]) for n in wa):
                    diff.append(k)
            elif json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True):
                diff.append(k)
    return diff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", "--config", dest="config", default="", help="YAML (default: embedded default)")
    p.add_argument("--trials", type=int, default=5, help="interrupted runs to check")
    p.add_argument("--kills", type=int, default=3, help="most SIGKILLs per trial (1..kills, random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--tasks", default="", help="CONTINUAL.TASKS of every run, e.g. 5+5+5+5 (default: the config's)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="more KEY VALUE overrides for every run")
    args = p.parse_args(argv)
    if args.tasks:
        args.opts = ["CONTINUAL.TASKS", args.tasks] + list(args.opts)
    rng = random.Random(args.seed)
    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="kill_resume_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, CLCL_DATASETS=os.path.join(work, "datasets"), PYTHONUNBUFFERED="1")
    ref = os.path.join(work, "reference")
    started = time.perf_counter()  # the whole check, reference runs included
    rc = _run(_command(args.config, ref, False, args.opts), env, ref + ".log")
    if rc != 0:
        print(f"the reference run failed (exit {rc}); see {ref}.log")
        return 1
    # the kill times are drawn from a second, warm run's duration (the first one also generated the dataset)
    warm = time.perf_counter()
    rc = _run(_command(args.config, ref + "_timing", False, args.opts), env, ref + "_timing.log")
    duration = time.perf_counter() - warm
    if rc != 0:
        print(f"the timing run failed (exit {rc}); see {ref}_timing.log")
        return 1
    expected = _final(ref)
    tasks = sum(k.endswith("/weights") for k in expected)
    print(f"reference run: {duration:.1f} s; {tasks} tasks; work folder {work}")
    print("| trial | kills at (s) | where the last kill landed | resumes | identical |")
    print("| --- | --- | --- | --- | --- |")
    failures = 0
    for trial in range(args.trials):
        out = os.path.join(work, f"trial_{trial}")
        log = out + ".log"
        times, where = [], ""
        for k in range(rng.randint(1, args.kills)):
            t = round(rng.uniform(0.05, 0.95) * duration, 1)
            rc = _run(_command(args.config, out, k > 0, args.opts), env, log, kill_after=t)
            if rc != -signal.SIGKILL:  # finished before the kill
                break
            times.append(t)
            where = _last_line(log)
        rc = _run(_command(args.config, out, True, args.opts), env, log)
        diff = ["exit code %s" % rc] if rc != 0 else _same(expected, _final(out))
        half = leftover_temp_files(out)
        diff += [f"left {len(half)} temporary file(s)"] if half else []
        failures += bool(diff)
        print(f"| {trial} | {', '.join(map(str, times)) or '-'} | {where.replace('|', '/')} | {len(times)} | "
              f"{'yes' if not diff else 'NO: ' + ', '.join(diff)} |", flush=True)
    print(f"{args.trials - failures}/{args.trials} interrupted runs identical to the reference "
          f"({time.perf_counter() - started:.0f} s in all)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Is this machine's GPU ready for clcl_det? One command, a report to paste into an issue.

    python tools/gpu_check.py                      # on a GPU: ViT-B-16 (random weights), 640 px, 4 and 8 images
    python tools/gpu_check.py --profile small      # the same checks at the CPU test suite's size
    python tools/gpu_check.py --scenarios voc_spa --out report.md

Checks per scenario (clcl_det/continual/gpu_check.py): placement of every parameter and buffer
after a task switch, finite losses and gradients, host syncs per iteration, fp16 / bf16 against
fp32 losses, it/s and peak memory, a checkpoint round trip, a mid-task resume and which bit-exact
properties hold on the device. Exit status 1 if a check fails.
"""
import argparse
import sys

from clcl_det.continual.gpu_check import PROFILES, SCENARIOS, format_report, header, run_gpu_check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="auto", choices=["auto", *PROFILES], help="auto: full on a GPU, small on a CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--out", default="", help="also write the report to this file")
    args = p.parse_args(argv)
    lines = [header(args.profile, args.device)]
    print(lines[0], flush=True)

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    checks = run_gpu_check(args.profile, args.device, args.scenarios, log)
    log(format_report(checks))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())

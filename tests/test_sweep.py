"""tools/sweep.py: configs x seeds in parallel processes, resume of what is finished, and the
mean/std table (checked against the runs' own summary.json)."""
import csv
import json
import os
import statistics
import sys

from conftest import tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import sweep  # noqa: E402


def test_sweep_runs_seeds_resumes_and_tabulates(shapes_root, tmp_path, capsys):
    cfg = tiny_cfg("", **{"SOLVER.MAX_ITER": 1, "INPUT.IMAGE_SIZE": 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16,
                          "DATASETS.SHAPES.NUM_TEST": 4, "CONTINUAL.TRAIN_TASKS": 1,
                          "TEST.ZERO_SHOT": False})
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    out = tmp_path / "sweep"
    args = ["--out", str(out), "--seeds", "0", "1", "--jobs", "2", "--threads", "1", f"tiny={config}"]
    assert sweep.main(args) == 0
    runs = [out / "tiny" / f"seed{s}" for s in (0, 1)]
    # each run trained with its own seed, in its own folder
    seeds = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert all(len(s["stages"]) == 1 for s in seeds)
    assert "SEED: 1" in (runs[1] / "config.yaml").read_text()
    # the table: mean and sample std over the two seeds of mAP@A (the one trained task's classes)
    vals = []
    for s in seeds:
        final = [v[-1] for v in s["per_class"].values()]
        x = [v for v in final if v is not None and v == v]
        vals.append(sum(x) / len(x))
    with open(out / "table.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["run"] == "tiny")
    assert row["seeds"] == "2"
    assert float(row["mAP@A mean"]) == round(statistics.mean(vals), 2)
    assert float(row["mAP@A std"]) == round(statistics.stdev(vals), 2)
    md = (out / "table.md").read_text()
    assert md.startswith("    python tools/sweep.py --out") and "| config | mAP@B | mAP@N | mAP@A |\n" in md
    a = f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"
    assert f"| tiny | {a} | - | {a} |" in md  # one task: its classes are the base classes
    # resume: a finished run is skipped; an unfinished one continues with --resume
    os.remove(runs[1] / "summary.json")
    os.remove(runs[1] / "task_1" / "metrics.json")
    capsys.readouterr()
    assert sweep.main(args) == 0
    log = capsys.readouterr().out
    assert "done already: tiny seed 0" in log and "start tiny seed 1 (resume)" in log
    assert (runs[0] / "sweep.log").read_text().count("$ ") == 1
    started = [line for line in (runs[1] / "sweep.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(started) == 2 and "--resume" not in started[0] and "--resume" in started[1]
    assert (runs[1] / "summary.json").is_file()


def _summary(run_dir, stages, names=("a", "b", "c")):
    os.makedirs(run_dir)
    summary = {"num_tasks": len(stages), "class_names": list(names), "per_class": {}, "task_matrix": {},
               "stages": [dict(task=i, **st) for i, st in enumerate(stages)]}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    return str(run_dir)


def test_base_curves_mean_and_spread_over_seeds(tmp_path):
    """The per-stage base-class curve: mAP@A after task 1 (only base classes then), mAP@B after; mean
    and sample std over the label's seeds; written as one PNG."""
    a0 = _summary(tmp_path / "a0", [{"mAP@A": 60.0}, {"mAP@A": 50.0, "mAP@B": 40.0}, {"mAP@A": 45.0, "mAP@B": 30.0}])
    a1 = _summary(tmp_path / "a1", [{"mAP@A": 70.0}, {"mAP@A": 55.0, "mAP@B": 50.0}, {"mAP@A": 50.0, "mAP@B": 20.0}])
    curves = sweep.base_curves([("a", [a0, a1])], "1+1+1")
    assert len(curves) == 1
    label, mean, std, n = curves[0]
    assert (label, n) == ("a", 2) and mean == [65.0, 45.0, 25.0]
    assert std == [statistics.stdev([60.0, 70.0]), statistics.stdev([40.0, 50.0]), statistics.stdev([30.0, 20.0])]
    png = tmp_path / "base.png"
    assert sweep.write_base_plot([("a", [a0, a1])], "1+1+1", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_links_configs_and_gives_ablations_a_delta(tmp_path):
    """An ablation row (`<base>_<variant>`) shows its mAP@A minus its base row's; rows link their config
    relative to the repository root; the mean over stages appears for three tasks or more."""
    st = lambda a: [{"mAP@A": a}, {"mAP@A": a, "mAP@B": a - 10, "mAP@N": a + 10}, {"mAP@A": a, "mAP@B": 1.0, "mAP@N": 2.0}]
    base = [_summary(tmp_path / f"b{s}", st(60.0 + s)) for s in (0, 1)]
    abl = [_summary(tmp_path / f"a{s}", st(50.0 + s)) for s in (0, 1)]
    configs = {"m_x": os.path.join(REPO, "configs", "spa", "spa_shapes_10+10.yaml")}
    md = sweep.markdown_table([("m_x", base), ("m_x_no_y", abl)], "1+1+1", configs)
    lines = md.splitlines()
    assert lines[0] == "| config | mAP@B | mAP@N | mAP@A | mean mAP@A over stages | Δ mAP@A |"
    assert lines[2].startswith("| [m_x](configs/spa/spa_shapes_10+10.yaml) | 1.0 ± 0.0 | 2.0 ± 0.0 | 60.5 ± 0.7 |")
    assert lines[3].startswith("| m_x_no_y |") and lines[3].endswith("| -10.0 vs m_x |")

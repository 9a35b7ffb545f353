"""Continual-learning tables: base / incremental / all means per stage, the task x stage
matrix, forgetting, zero-shot AP.

Tasks are 0-based here (``task_ranges[t]`` are the classes learned in task ``t``); printed
text says "task t+1/T". After task t the classes are grouped as **old** (tasks < t),
**new** (task t), **seen** = old + new, and **future** (tasks > t; evaluated zero-shot if the
engine asks for it).

The means follow the MMA / ABR convention ("1-15 / 16-20" on 15+1x5): **mAP@B** is the mean
over the *first* task's classes (base), **mAP@N** over every class added after the first task
(incremental: tasks 1..t), **mAP@A** over all seen classes. For two tasks B / N are the old /
new classes; from the third task on, N holds every later task's classes, not the last one's.

Stage record (``build_stage``; what ``OUTPUT_DIR/task_<t>/metrics.json`` holds; NaN is written
as ``null``)::

    {
      "task": 1,                    # 0-based index into task_ranges
      "num_tasks": 2,
      "metric": "AP50",             # per-class key the means are taken over
      "ap_definition": "AP50, VOC07 11-point",
      "groups": {"old": [0, ..., 9], "new": [10, ..., 19], "future": []},   # class indices
      "per_class": {"aeroplane": {"AP50": 71.2, "AP50_voc07": 71.2, "AP50_area": 73.0}, ...},
                                    # seen classes, as the evaluator returned them
      "zero_shot": {"cow": {"AP50": 3.1, ..., "detections": 41}, ...},   # future classes; {} if not
                                    # evaluated; a class the model gave no detection has null APs
                                    # and "note": "no detections scored" (left out of the means)
      "summary": {"mAP@B": 70.1, "mAP@N": 60.2, "mAP@A": 65.1, "zero_shot_mAP": 3.1},
                                    # B = task 0's classes, N = tasks 1..t; absent at task 0;
                                    # zero_shot_mAP only with zero_shot (null, with "zero_shot_note",
                                    # when classes had no detection scored)
      "task_mAP": [70.1, 60.2],     # mean AP of each learned task's classes (tasks 0..t)
      "task_classes": [[0, ..., 9], [10, ..., 19]],   # class indices of tasks 0..t
      "extra": {...}                # anything else the engine stores (iteration, evaluator results)
    }

``summarize_stages`` turns the list of stage records into::

    {
      "metric": "AP50", "ap_definition": "...", "num_tasks": 2, "class_names": [...],
      "stages": [{"task": 0, "mAP@A": .., "mAP@B": .., "mAP@N": .., "zero_shot_mAP": ..,
                  "zero_shot_note": ..}, ...],   # note only where future classes had no detection
      "mean_mAP@A": mean of mAP@A over the stages,
      "task_matrix": {"tasks": ["1-10", "11-20"],     # classes of each task (1-based)
                      "mAP": [[task 0 after stage 0, after stage 1, ...], ...],   # None before learned
                      "zero_shot": [[...], ...],      # zero-shot mAP of a task's classes before learned
                      "zero_shot_notes": [[...], ...]},   # "no detections scored" where none of them was
      "per_class": {name: [AP after task 0, AP after task 1, ...]},   # None before learned
      "zero_shot": {name: [zero-shot AP at each stage, None once learned / not evaluated / unscored]},
      "zero_shot_notes": {name: ["no detections scored" where unscored, else None]},   # such classes only
      "forgetting": {name: {"best": , "best_task": , "final": , "forgetting": }},
                                    # classes learned before the final stage
      "mean_forgetting": float
    }
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from tabulate import tabulate

from ..utils.checkpoint import atomic_write, atomic_write_bytes
from .evaluator import NUM_DETECTIONS

__all__ = [
    "describe_ap", "stage_metrics", "build_stage", "format_stage_table", "summarize_stages",
    "format_summary", "plot_stages", "plot_task_matrix", "write_json", "read_json",
]

_AP_WORDS = {
    "voc07": "VOC07 11-point",
    "area": "area under the interpolated PR curve",
    "coco": "COCO 101-point",
}


def describe_ap(key: str, ap_method: str) -> str:
    """Words for an AP definition, e.g. ``describe_ap("AP50", "voc07") -> "AP50, VOC07 11-point"``.

    `ap_method` is ``"voc07"``, ``"area"`` or ``"coco"``; ``"AP"`` with ``"coco"`` reads
    ``"AP@[.5:.95], COCO 101-point"``.
    """
    if ap_method not in _AP_WORDS:
        raise ValueError(f"describe_ap: unknown ap_method '{ap_method}'; expected one of {sorted(_AP_WORDS)}")
    name = "AP@[.5:.95]" if key == "AP" else key
    return f"{name}, {_AP_WORDS[ap_method]}"


def _num(x: Any) -> float:
    """A stored metric as float (None, i.e. JSON null, is NaN)."""
    return float("nan") if x is None else float(x)


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _value(per_class: Mapping[str, Mapping[str, Any]], name: str, key: str) -> float:
    if name not in per_class:
        raise KeyError(f"no per-class result for class '{name}' (have: {', '.join(per_class) or 'none'})")
    if key not in per_class[name]:
        raise KeyError(f"per-class result of '{name}' has no '{key}' (keys: {', '.join(per_class[name])})")
    return _num(per_class[name][key])


# why a zero-shot AP is null although the class has ground truth: the model gave it no detection,
# so its AP (0 by definition) does not measure how the model scores it
UNSCORED = "no detections scored"


def _unscored_as_null(result: Mapping[str, Any]) -> Dict[str, Any]:
    """A per-class evaluator result with its APs nulled and a note if the class had no detection."""
    out = dict(result)
    if out.get(NUM_DETECTIONS) != 0:
        return out
    aps = [k for k, v in out.items() if k != NUM_DETECTIONS and isinstance(v, (int, float)) and not math.isnan(v)]
    if aps:
        out.update({k: None for k in aps}, note=UNSCORED)
    return out


def _unscored(results: Mapping[str, Mapping[str, Any]]) -> List[str]:
    return [n for n, v in results.items() if v.get("note") == UNSCORED]


def _zero_shot_note(unscored: int, evaluated: int) -> str:
    """Why a zero-shot mean is missing or leaves classes out."""
    if unscored == evaluated:
        return UNSCORED
    return f"{unscored} of {evaluated} classes left out: {UNSCORED}"


def stage_metrics(
    per_class: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    old: Sequence[int],
    new: Sequence[int],
    key: str,
) -> Dict[str, float]:
    """``{"mAP@B": mean over old, "mAP@N": mean over new, "mAP@A": mean over old + new}``.

    The stage records pass the first task's classes as `old` and every later seen class as
    `new` (module docstring). Means are over classes, NaN (no GT) left out. Without old classes
    (first task) only ``mAP@A`` is returned.
    """
    old_vals = [_value(per_class, class_names[c], key) for c in old]
    new_vals = [_value(per_class, class_names[c], key) for c in new]
    out: Dict[str, float] = {}
    if len(old_vals):
        out["mAP@B"] = _nanmean(old_vals)
        out["mAP@N"] = _nanmean(new_vals)
    out["mAP@A"] = _nanmean(old_vals + new_vals)
    return out


def _base_incremental(t: int, task_ranges: Sequence[Sequence[int]]) -> Dict[str, List[int]]:
    """B = the first task's classes, N = the classes of tasks 1..t (both empty-safe at t = 0)."""
    if t == 0:
        return {"base": [], "incremental": [int(c) for c in task_ranges[0]]}
    return {"base": [int(c) for c in task_ranges[0]],
            "incremental": [int(c) for r in task_ranges[1:t + 1] for c in r]}


def _task_means(t: int, task_ranges: Sequence[Sequence[int]], values: Mapping[str, Any],
                class_names: Sequence[str], key: str) -> List[float]:
    """Mean AP of each task 0..t's classes in a per-class result (NaN left out)."""
    return [_nanmean([_value(values, class_names[c], key) for c in task_ranges[k]]) for k in range(t + 1)]


def _groups(t: int, task_ranges: Sequence[Sequence[int]]) -> Dict[str, List[int]]:
    if not 0 <= t < len(task_ranges):
        raise ValueError(f"task index {t} outside 0..{len(task_ranges) - 1}")
    return {
        "old": [int(c) for r in task_ranges[:t] for c in r],
        "new": [int(c) for c in task_ranges[t]],
        "future": [int(c) for r in task_ranges[t + 1:] for c in r],
    }


def build_stage(
    t: int,
    task_ranges: Sequence[Sequence[int]],
    class_names: Sequence[str],
    per_class: Mapping[str, Mapping[str, Any]],
    key: str,
    ap_definition: str,
    zero_shot: Optional[Mapping[str, Mapping[str, Any]]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The stage record after task `t` (structure in the module docstring).

    `per_class` is the evaluator's ``per_class`` on the seen classes (extra classes are
    ignored); `zero_shot` the same for future classes, if they were evaluated.
    """
    groups = _groups(t, task_ranges)
    seen = groups["old"] + groups["new"]
    bn = _base_incremental(t, task_ranges)
    summary = stage_metrics(per_class, class_names, bn["base"], bn["incremental"], key)
    zs: Dict[str, Dict[str, Any]] = {}
    if zero_shot:
        zs = {class_names[c]: _unscored_as_null(zero_shot[class_names[c]]) for c in groups["future"]
              if class_names[c] in zero_shot}
        if zs:
            summary["zero_shot_mAP"] = _nanmean([_value(zs, n, key) for n in zs])
            if _unscored(zs):  # out of the classes with ground truth
                with_gt = [n for n in zs if n in _unscored(zs) or not math.isnan(_value(zs, n, key))]
                summary["zero_shot_note"] = _zero_shot_note(len(_unscored(zs)), len(with_gt))
    return {
        "task": int(t),
        "num_tasks": len(task_ranges),
        "metric": key,
        "ap_definition": ap_definition,
        "groups": groups,
        "per_class": {class_names[c]: dict(per_class[class_names[c]]) for c in seen},
        "zero_shot": zs,
        "summary": summary,
        "task_mAP": _task_means(t, task_ranges, per_class, class_names, key),
        "task_classes": [[int(c) for c in r] for r in task_ranges[:t + 1]],
        "extra": dict(extra or {}),
    }


def _fmt(x: Any) -> str:
    x = _num(x)
    return "nan" if math.isnan(x) else f"{x:.2f}"


def _fmt_zero_shot(value: Any, note: Optional[str]) -> str:
    """A zero-shot mean or AP; "n/a (no detections scored)" where nothing was scored."""
    if note == UNSCORED:
        return f"n/a ({UNSCORED})"
    return _fmt(value) + (f" ({note})" if note else "")


def _span(classes: Sequence[int]) -> str:
    if not classes:
        return "none"
    c = sorted(classes)
    if c == list(range(c[0], c[-1] + 1)):
        return f"{c[0]}-{c[-1]}" if len(c) > 1 else f"{c[0]}"
    return ",".join(map(str, c))


def format_stage_table(stage: Mapping[str, Any], class_names: Sequence[str], tablefmt: str = "github") -> str:
    """Per-class table of one stage record: class, group (old / new / zero-shot), AP columns.

    The header names the task, the AP definition and the class groups; the last line is
    ``mAP@B / mAP@N / mAP@A`` (and the zero-shot mean when present), followed, for a COCO
    evaluation, by the overall AP / AP50 / AP75 / APs / APm / APl of the seen classes.
    """
    key = stage["metric"]
    groups = stage["groups"]
    per_class, zero_shot = stage["per_class"], stage.get("zero_shot") or {}
    columns = [key] + sorted({k for v in list(per_class.values()) + list(zero_shot.values())
                              for k in v if k not in (key, NUM_DETECTIONS) and isinstance(v[k], (int, float, type(None)))})
    rows = []
    for group, label, source in (("old", "old", per_class), ("new", "new", per_class),
                                 ("future", "zero-shot", zero_shot)):
        for c in groups[group]:
            name = class_names[c]
            if name in source:
                note = source[name].get("note") if group == "future" else None
                rows.append([c, name, label] + [_fmt_zero_shot(source[name].get(k), note) for k in columns])
    t, T = stage["task"], stage["num_tasks"]
    header = (
        f"Task {t + 1}/{T} — {stage['ap_definition']} (percent); "
        f"classes old: {_span(groups['old'])}, new: {_span(groups['new'])}"
        + (f", zero-shot: {_span([c for c in groups['future'] if class_names[c] in zero_shot])}"
           if zero_shot else "")
    )
    table = tabulate(rows, headers=["id", "class", "group"] + columns, tablefmt=tablefmt,
                     disable_numparse=True, colalign=("right", "left", "left") + ("right",) * len(columns))
    s = stage["summary"]
    if "mAP@B" in s:
        last = f"mAP@B / mAP@N / mAP@A ({key}): {_fmt(s['mAP@B'])} / {_fmt(s['mAP@N'])} / {_fmt(s['mAP@A'])}"
        if T > 2:  # multi-step: say which classes B and N are, and each task's mean
            ranges = stage.get("task_classes") or [stage["groups"]["old"], stage["groups"]["new"]]
            last += (f" (B = task 1 classes {_span(ranges[0])}, N = classes {_span([c for r in ranges[1:] for c in r])}"
                     f" of task{'s 2-' if t > 1 else ' '}{t + 1}); per task: "
                     + ", ".join(f"task {k + 1} {_fmt(v)}" for k, v in enumerate(stage.get("task_mAP", []))))
    else:
        last = f"mAP@A ({key}, first task: no old classes): {_fmt(s['mAP@A'])}"
    if "zero_shot_mAP" in s:
        last += (f"; zero-shot mAP of {len(zero_shot)} future classes: "
                 f"{_fmt_zero_shot(s['zero_shot_mAP'], s.get('zero_shot_note'))}")
    coco = (stage.get("extra") or {}).get("evaluator") or {}
    if all(k in coco for k in _COCO_STATS):  # COCOEvaluator's overall numbers on the seen classes
        last += "\nCOCO box AP of the seen classes (percent): " + ", ".join(f"{k} {_fmt(coco[k])}" for k in _COCO_STATS)
    return f"{header}\n{table}\n{last}"


_COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def summarize_stages(
    stages: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    task_ranges: Sequence[Sequence[int]],
) -> Dict[str, Any]:
    """Across-stage summary (structure in the module docstring) of stage records in task order.

    Groups are recomputed from `task_ranges`. Forgetting of a class learned before the final
    stage = its best AP at an earlier stage (from the task it was learned on) − its AP at the
    final stage. Stages need not start at task 0 (e.g. a resumed run), but must be increasing.
    """
    if not stages:
        raise ValueError("summarize_stages: no stage records")
    tasks = [int(s["task"]) for s in stages]
    if tasks != sorted(set(tasks)):
        raise ValueError(f"summarize_stages: stage tasks must be increasing and unique, got {tasks}")
    key = stages[-1]["metric"]
    num_stages = len(stages)
    per_class: Dict[str, List[Optional[float]]] = {n: [None] * num_stages for n in class_names}
    zero_shot: Dict[str, List[Optional[float]]] = {n: [None] * num_stages for n in class_names}
    zs_notes: Dict[str, List[Optional[str]]] = {n: [None] * num_stages for n in class_names}
    rows: List[Dict[str, Any]] = []
    for i, stage in enumerate(stages):
        t = int(stage["task"])
        g = _groups(t, task_ranges)
        row: Dict[str, Any] = {"task": t}
        bn = _base_incremental(t, task_ranges)
        row.update(stage_metrics(stage["per_class"], class_names, bn["base"], bn["incremental"], key))
        for c in g["old"] + g["new"]:
            per_class[class_names[c]][i] = _value(stage["per_class"], class_names[c], key)
        zs = stage.get("zero_shot") or {}
        zs_vals = []
        for c in g["future"]:
            if class_names[c] in zs:
                zero_shot[class_names[c]][i] = _value(zs, class_names[c], key)
                zs_notes[class_names[c]][i] = zs[class_names[c]].get("note")
                zs_vals.append(zero_shot[class_names[c]][i])
        if zs_vals:
            row["zero_shot_mAP"] = _nanmean(zs_vals)
            unscored = [c for c in g["future"] if zs_notes[class_names[c]][i] == UNSCORED]
            if unscored:  # out of the classes with ground truth
                row["zero_shot_note"] = _zero_shot_note(len(unscored), len(unscored) + sum(not math.isnan(v) for v in zs_vals))
        rows.append(row)

    final_groups = _groups(tasks[-1], task_ranges)
    forgetting: Dict[str, Dict[str, Any]] = {}
    for c in final_groups["old"]:
        name = class_names[c]
        earlier = [(v, tasks[i]) for i, v in enumerate(per_class[name][:-1])
                   if v is not None and not math.isnan(v)]
        final = per_class[name][-1]
        if not earlier or final is None or math.isnan(final):
            continue
        best, best_task = max(earlier, key=lambda x: x[0])
        forgetting[name] = {"best": best, "best_task": best_task, "final": final, "forgetting": best - final}

    def _null(v: Optional[float]) -> Optional[float]:
        return None if v is None or math.isnan(v) else v

    def _task_mean(values: Sequence[Optional[float]], k: int) -> Optional[float]:
        vals = [values[c] for c in task_ranges[k]]
        return None if all(v is None for v in vals) else _null(_nanmean([_num(v) for v in vals]))

    def _task_unscored(i: int, k: int) -> Optional[str]:
        """UNSCORED where every zero-shot-evaluated class of task k at stage i had no detection."""
        notes = [zs_notes[class_names[c]][i] for c in task_ranges[k] if class_names[c] in (stages[i].get("zero_shot") or {})]
        return UNSCORED if notes and all(n == UNSCORED for n in notes) else None

    learned_m, zs_m = [], []
    for k in range(len(task_ranges)):
        learned_m.append([_task_mean([per_class[n][i] for n in class_names], k) if k <= tasks[i] else None
                          for i in range(num_stages)])
        zs_m.append([_task_mean([zero_shot[n][i] for n in class_names], k) if k > tasks[i] else None
                     for i in range(num_stages)])
    zs_m_notes = [[_task_unscored(i, k) if k > tasks[i] else None for i in range(num_stages)]
                  for k in range(len(task_ranges))]

    return {
        "metric": key,
        "ap_definition": stages[-1]["ap_definition"],
        "num_tasks": len(task_ranges),
        "class_names": list(class_names),
        "stages": rows,
        "mean_mAP@A": _nanmean([_num(r["mAP@A"]) for r in rows]),
        "task_matrix": {"tasks": [_span([c + 1 for c in r]) for r in task_ranges], "stage_tasks": tasks,
                        "mAP": learned_m, "zero_shot": zs_m, "zero_shot_notes": zs_m_notes},
        "per_class": {n: [_null(v) for v in vals] for n, vals in per_class.items()},
        "zero_shot": {n: [_null(v) for v in vals] for n, vals in zero_shot.items()
                      if any(v is not None for v in vals) or any(zs_notes[n])},
        "zero_shot_notes": {n: notes for n, notes in zs_notes.items() if any(notes)},
        "forgetting": forgetting,
        "mean_forgetting": _nanmean([f["forgetting"] for f in forgetting.values()]),
    }


def _zero_shot_cell(value: Optional[float], note: Optional[str]) -> str:
    """A zero-shot cell of the summary's matrices: "(AP)", "(n/a: no detections scored)" or "-"."""
    if note == UNSCORED:
        return f"(n/a: {UNSCORED})"
    return f"({_fmt(value)})" if value is not None else "-"


def format_summary(summary: Mapping[str, Any], tablefmt: str = "github") -> str:
    """Text of a `summarize_stages` result: per-stage means, per-class AP matrix, forgetting."""
    key, T = summary["metric"], summary["num_tasks"]
    stages = summary["stages"]
    has_zs = any("zero_shot_mAP" in s for s in stages)
    heads = ["after task", "mAP@A", "mAP@B", "mAP@N"] + (["zero-shot mAP"] if has_zs else [])
    rows = [[f"{s['task'] + 1}/{T}", _fmt(s["mAP@A"]),
             _fmt(s["mAP@B"]) if "mAP@B" in s else "-", _fmt(s["mAP@N"]) if "mAP@N" in s else "-"]
            + ([_fmt_zero_shot(s["zero_shot_mAP"], s.get("zero_shot_note")) if "zero_shot_mAP" in s else "-"]
               if has_zs else [])
            for s in stages]
    multi = T > 2
    parts = [
        f"Continual summary — {summary['ap_definition']} (percent); "
        + ("B = first task's classes, N = every class added after it, A = all seen" if multi else
           "B = old classes, N = new classes of the task, A = all seen"),
        tabulate(rows, headers=heads, tablefmt=tablefmt, disable_numparse=True,
                 colalign=("left",) + ("right",) * (len(heads) - 1)),
    ]
    if multi and "task_matrix" in summary:
        tm = summary["task_matrix"]
        heads_t = ["classes of"] + [f"after task {s['task'] + 1}" for s in stages]
        rows_t = []
        zs_notes = tm.get("zero_shot_notes") or [[None] * len(stages) for _ in tm["tasks"]]
        for k, label in enumerate(tm["tasks"]):
            cells = [_fmt(v) if v is not None else _zero_shot_cell(z, note)
                     for v, z, note in zip(tm["mAP"][k], tm["zero_shot"][k], zs_notes[k])]
            rows_t.append([f"task {k + 1} ({label})"] + cells)
        parts.append(f"Task x stage matrix: m{key} of each task's classes after each task "
                     f"(zero-shot mAP of not-yet-learned tasks in parentheses)")
        parts.append(tabulate(rows_t, headers=heads_t, tablefmt=tablefmt, disable_numparse=True,
                              colalign=("left",) + ("right",) * len(stages)))
        parts.append(f"Mean mAP@A over {len(stages)} stages: {_fmt(summary['mean_mAP@A'])}")
    task_heads = [f"task {s['task'] + 1}" for s in stages]
    matrix = []
    for name in summary["class_names"]:
        learned = summary["per_class"][name]
        zs = summary["zero_shot"].get(name, [None] * len(stages))
        notes = summary.get("zero_shot_notes", {}).get(name, [None] * len(stages))
        if all(v is None for v in learned) and all(v is None for v in zs) and not any(notes):
            continue
        cells = [_fmt(v) if v is not None else _zero_shot_cell(z, note)
                 for v, z, note in zip(learned, zs, notes)]
        f = summary["forgetting"].get(name)
        matrix.append([name] + cells + [_fmt(f["forgetting"]) if f else "-"])
    parts.append(f"Per-class {key} after each task (zero-shot AP of not-yet-learned classes in parentheses)")
    parts.append(tabulate(matrix, headers=["class"] + task_heads + ["forgetting"], tablefmt=tablefmt,
                          disable_numparse=True, colalign=("left",) + ("right",) * (len(task_heads) + 1)))
    if summary["forgetting"]:
        parts.append(
            f"Forgetting (best earlier {key} − final {key}), mean over "
            f"{len(summary['forgetting'])} old classes: {_fmt(summary['mean_forgetting'])}"
        )
    return "\n".join(parts)


def plot_stages(summary: Mapping[str, Any], path: str) -> None:
    """PNG of mAP@A / mAP@B / mAP@N (and zero-shot mAP if present) per task, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = summary["stages"]
    x = [s["task"] + 1 for s in stages]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, label, style in (("mAP@A", "all seen (A)", "o-"), ("mAP@B", "first task's classes (B)", "s--"),
                               ("mAP@N", "classes added later (N)", "^--"),
                               ("zero_shot_mAP", "zero-shot (future)", "x:")):
        ys = [_num(s.get(name)) for s in stages]
        if any(not math.isnan(y) for y in ys):
            ax.plot(x, ys, style, label=label)
    for xi, s in zip(x, stages):  # a zero-shot mean that is missing because nothing was scored
        if s.get("zero_shot_note") == UNSCORED:
            ax.annotate(f"zero-shot:\nn/a ({UNSCORED})", (xi, 0.0), xycoords=("data", "axes fraction"),
                        xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=6,
                        color="grey")
    ax.set_xlabel("after task")
    ax.set_ylabel(f"m{summary['metric']} (%)")
    ax.set_xticks(x)
    ax.set_title(summary["ap_definition"], fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def plot_task_matrix(summary: Mapping[str, Any], path: str) -> None:
    """Heat-map PNG of the task x stage matrix (mAP of each task's classes after each task),
    values written in the cells, zero-shot cells in parentheses; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tm = summary["task_matrix"]
    learned = np.array([[_num(v) for v in row] for row in tm["mAP"]], dtype=float)
    zs = np.array([[_num(v) for v in row] for row in tm["zero_shot"]], dtype=float)
    zs_notes = tm.get("zero_shot_notes") or [[None] * len(row) for row in tm["zero_shot"]]
    n_tasks, n_stages = learned.shape
    fig = Figure(figsize=(1.2 + 0.9 * n_stages, 1.0 + 0.5 * n_tasks), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(learned), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for k in range(n_tasks):
        for i in range(n_stages):
            if not math.isnan(learned[k, i]):
                ax.text(i, k, f"{learned[k, i]:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if learned[k, i] < 60 else "black")
            elif not math.isnan(zs[k, i]):
                ax.text(i, k, f"({zs[k, i]:.1f})", ha="center", va="center", fontsize=6, color="grey")
            elif zs_notes[k][i] == UNSCORED:
                ax.text(i, k, "(n/a: no\ndetections)", ha="center", va="center", fontsize=5, color="grey")
    ax.set_xticks(range(n_stages))
    ax.set_xticklabels([str(t + 1) for t in tm.get("stage_tasks", range(n_stages))])
    ax.set_yticks(range(n_tasks))
    ax.set_yticklabels([f"task {k + 1} ({c})" for k, c in enumerate(tm["tasks"])], fontsize=7)
    ax.set_xlabel("after task")
    ax.set_title(f"m{summary['metric']} per task; {summary['ap_definition']}", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return _nan_to_none(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, range)):
        return [_nan_to_none(v) for v in obj]
    return obj


def write_json(obj: Any, path: str) -> None:
    """Write `obj` as indented JSON atomically (tmp + rename); NaN becomes ``null``."""
    text = json.dumps(_nan_to_none(obj), indent=2, allow_nan=False)
    atomic_write_bytes(path, text.encode())


def read_json(path: str) -> Any:
    """Read a file written by `write_json` (``null`` metrics stay None; the functions here read them as NaN)."""
    with open(path) as f:
        return json.load(f)

"""Reliability: a run killed at chosen points resumes to the uninterrupted result; bad input is
refused or skipped as documented; checkpoints are safe to load; same seed, same metrics."""
import errno
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from clcl_det.config import ConfigError, get_cfg
from clcl_det.continual import RunStateError
from clcl_det.data.build import _TrainBatches, sanitize_dicts
from clcl_det.data.datasets.coco import COCOFormatError, load_coco_json
from clcl_det.data.datasets.voc import load_voc_instances
from clcl_det.data.mapper import DatasetMapper, ImageReadError
from clcl_det.engine.trainer import NonFiniteLossError
from clcl_det.utils.checkpoint import (TMP_PATTERN, CheckpointError, atomic_torch_save, atomic_write_bytes,
                                      leftover_temp_files, load_checkpoint_file)

from conftest import final_state, run_tiny, same_state, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process that runs the tiny sequence and SIGKILLs itself at a chosen point.
CHILD = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import tiny_cfg, run_tiny
    point, out = sys.argv[1], sys.argv[2]
    calls = {{"n": 0}}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "checkpoint_write":  # the 2nd periodic checkpoint of task 2, half written
        import clcl_det.utils.checkpoint as ck
        real = ck.torch.save
        def save(obj, f, *a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                f.write(b"PK\\x03\\x04 half a checkpoint")
                f.flush()
                die()
            return real(obj, f, *a, **k)
        ck.torch.save = save
    elif point == "evaluation":  # while task 2 is evaluated
        import clcl_det.engine.evaluate as ev
        real_inf = ev.inference_on_dataset
        def inf(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                die()
            return real_inf(*a, **k)
        ev.inference_on_dataset = inf
    elif point == "mid_iteration":  # after the backward of task 2's 2nd iteration, before the step
        real_step = torch.optim.AdamW.step
        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 6:
                die()
            return real_step(self, *a, **k)
        torch.optim.AdamW.step = step
    elif point == "between_tasks":  # task 1 complete, task 2 not started
        import clcl_det.continual.loop as loop
        real_sum = loop.write_summary
        def summ(*a, **k):
            r = real_sum(*a, **k)
            die()
        loop.write_summary = summ
    run_tiny(tiny_cfg(out, DETERMINISTIC="True"))
''')


@pytest.mark.parametrize("point", ["checkpoint_write", "evaluation", "mid_iteration", "between_tasks"])
def test_killed_run_resumes_to_the_same_result(point, reference_run, tmp_path):
    ref_out, _ = reference_run
    out = str(tmp_path / "run")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.join(REPO, "tests")))
    r = subprocess.run([sys.executable, str(script), point, out], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    # nothing half-written is visible under a real name
    for dirpath, _, files in os.walk(out):
        for f in files:
            if f.endswith(".pth"):
                load_checkpoint_file(os.path.join(dirpath, f))
    assert os.path.isfile(os.path.join(out, "task_1", "metrics.json"))
    run_tiny(tiny_cfg(out, DETERMINISTIC="True"), resume=True)
    assert same_state(final_state(ref_out), final_state(out))
    for t in (1, 2):
        with open(os.path.join(ref_out, f"task_{t}", "metrics.json")) as a, \
                open(os.path.join(out, f"task_{t}", "metrics.json")) as b:
            assert json.load(a)["per_class"] == json.load(b)["per_class"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert [s["task"] for s in summary["stages"]] == [0, 1]
    assert not leftover_temp_files(out)


def test_same_seed_same_metrics(reference_run, tmp_path):
    ref_out, _ = reference_run
    out = str(tmp_path / "again")
    run_tiny(tiny_cfg(out, DETERMINISTIC="True"))
    assert same_state(final_state(ref_out), final_state(out))


# -- bad input ----------------------------------------------------------------------------------

def _voc_folder(root, objects_xml, image_ok=True, xml_text=None):
    from PIL import Image

    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    ids = ["good", "bad"]
    for i in ids:
        Image.new("RGB", (40, 30), (200, 10, 10)).save(os.path.join(root, "JPEGImages", f"{i}.jpg"))
        text = ("<annotation><size><width>40</width><height>30</height></size>" + objects_xml + "</annotation>")
        if i == "bad" and xml_text is not None:
            text = xml_text
        with open(os.path.join(root, "Annotations", f"{i}.xml"), "w") as f:
            f.write(text)
    if not image_ok:
        with open(os.path.join(root, "JPEGImages", "bad.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(os.path.join(root, "ImageSets", "Main", "train.txt"), "w") as f:
        f.write("\n".join(ids))
    return root


OBJ = "<object><name>{}</name><difficult>0</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"


def test_truncated_xml_and_unknown_class_are_skipped_with_counts(tmp_path, caplog):
    root = _voc_folder(str(tmp_path / "v"), OBJ.format("cat", 2, 2, 20, 20) + OBJ.format("unicorn", 1, 1, 5, 5),
                       xml_text="<annotation><size><width>40</wid")
    dicts = load_voc_instances(root, "train", ["cat", "dog"])
    assert [d["image_id"] for d in dicts] == ["good"] and len(dicts[0]["annotations"]) == 1
    text = caplog.text
    assert "bad.xml" in text and "skipped 1 image(s) with unreadable annotations" in text
    assert "unknown class 'unicorn'" in text and "'unicorn': 1" in text


def test_boxes_outside_or_empty_are_clipped_or_dropped(caplog):
    dicts = [{"image_id": 1, "height": 30, "width": 40, "annotations": [
        {"bbox": [-5, -5, 20, 20], "category_id": 0}, {"bbox": [10, 10, 10, 25], "category_id": 0},
        {"bbox": [30, 20, 90, 90], "category_id": 1}, {"bbox": [50, 40, 60, 45], "category_id": 1}]},
        {"image_id": 2, "height": 30, "width": 40, "annotations": []}]
    out = sanitize_dicts(dicts, "toy")
    assert [a["bbox"] for a in out[0]["annotations"]] == [[0.0, 0.0, 20, 20], [30, 20, 40.0, 30.0]]
    assert out[1]["annotations"] == []
    assert "clipped 3 box(es)" in caplog.text and "dropped 2 of zero area" in caplog.text


def test_empty_annotation_list_is_evaluated_but_not_trained_on(tmp_path):
    from clcl_det.data.continual import ContinualSplit, parse_task_string

    root = _voc_folder(str(tmp_path / "v"), OBJ.format("cat", 2, 2, 20, 20),
                       xml_text="<annotation><size><width>40</width><height>30</height></size></annotation>")
    dicts = sanitize_dicts(load_voc_instances(root, "train", ["cat", "dog"]), "toy")
    assert [(d["image_id"], len(d["annotations"])) for d in dicts] == [("good", 1), ("bad", 0)]
    split = ContinualSplit("1+1", tuple(parse_task_string("1+1")), ("cat", "dog"), ("cat", "dog"))
    assert [d["image_id"] for d in split.task_train_dicts(dicts, 0)] == ["good"]  # nothing to learn in 'bad'


def test_corrupt_jpeg_in_training_is_replaced_and_counted(tmp_path, caplog):
    root = _voc_folder(str(tmp_path / "v"), OBJ.format("cat", 2, 2, 20, 20), image_ok=False)
    dicts = load_voc_instances(root, "train", ["cat"])
    mapper = DatasetMapper(is_train=True, image_size=32)
    with pytest.raises(ImageReadError, match="bad.jpg"):
        mapper(dicts[1], np.random.default_rng(0))
    stream = _TrainBatches(dicts, mapper, total_batch=2, seed=0, task=0, start_iter=0, rank=0, world=1)
    batch = stream.batch(0)
    assert len(batch) == 2 and all(x["file_name"].endswith("good.jpg") for x in batch)
    assert stream.skipped == 1 and "bad.jpg" in caplog.text


def test_coco_json_with_missing_keys(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg", "height": 5}], "annotations": [],
                             "categories": [{"id": 1, "name": "cat"}]}))
    with pytest.raises(COCOFormatError, match=r"a.json: image 1 lacks key\(s\) \['width'\]"):
        load_coco_json(str(f), str(tmp_path))
    f.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(COCOFormatError, match="lacks the top-level key 'annotations'"):
        load_coco_json(str(f), str(tmp_path))


def test_config_with_wrong_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("SOLVER:\n  BASE_LR: fast\n")
    with pytest.raises(ConfigError, match=r"SOLVER.BASE_LR.*c.yaml.*a number.*'fast'"):
        get_cfg().merge_from_file(str(f))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapes_root, tmp_path, monkeypatch):
    from clcl_det.modeling.proposal_generator import rpn

    out = str(tmp_path / "nan")
    real = rpn.F.binary_cross_entropy_with_logits
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        v = real(*a, **k)
        return v * float("nan") if calls["n"] == 4 else v  # iteration 3 of task 1

    monkeypatch.setattr(rpn.F, "binary_cross_entropy_with_logits", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: non-finite loss loss_rpn_cls=nan"):
        run_tiny(tiny_cfg(out))
    assert os.path.isfile(os.path.join(out, "task_1", "model_0000001.pth"))
    assert open(os.path.join(out, "task_1", "last_checkpoint")).read() == "model_0000001.pth"


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pth")
    atomic_torch_save({"x": torch.ones(2)}, path)

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("clcl_det.utils.checkpoint.torch.save", full)
    with pytest.raises(CheckpointError, match="no space left.*model.pth.*untouched"):
        atomic_torch_save({"x": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_file(path)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["model.pth"]


def test_resume_directory_of_another_config(reference_run):
    out, _ = reference_run
    cfg = tiny_cfg(out, DETERMINISTIC="True")
    cfg.merge_from_list(["MODEL.FPN.OUT_CHANNELS", "16"])
    with pytest.raises(RunStateError, match="MODEL.FPN.OUT_CHANNELS: 32 -> 16"):
        run_tiny(cfg, resume=True)


# -- security of inputs ---------------------------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoints_load_weights_only(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_checkpoint_file(path)


def test_dataset_names_cannot_write_outside_output_dir(shapes_root, tmp_path):
    """Class names and image ids end up in tables and JSON, never in file paths."""
    from clcl_det.data import DatasetCatalog, MetadataCatalog

    names = [f"../../escape{i}" for i in range(20)]
    from clcl_det.embedded.shapes import SHAPES_CLASSES, ShapesSpec, ensure_shapes
    root = ensure_shapes(ShapesSpec.from_cfg(tiny_cfg()))
    dicts = load_voc_instances(root, "test", SHAPES_CLASSES)
    for n in ("evil_train", "evil_test"):
        if n not in DatasetCatalog:
            DatasetCatalog.register(n, lambda: [dict(d, image_id="../../" + d["image_id"]) for d in dicts])
            MetadataCatalog.get(n).set(thing_classes=names, evaluator_type="pascal_voc")
    out = tmp_path / "inner" / "out"
    out.parent.mkdir()
    before = set(os.listdir(tmp_path))
    run_tiny(tiny_cfg(str(out), **{"DATASETS.TRAIN": "('evil_train',)", "DATASETS.TEST": "('evil_test',)"}))
    assert set(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "inner") == ["out"]
    assert "../../escape3" in open(out / "task_1" / "per_class.txt").read()


# -- one atomic writer; the run folder's identity; eval-only; loss names --------------------------

REPO_SRC = [os.path.join(REPO, d) for d in ("clcl_det", "tools")]


def test_one_atomic_writer_in_the_code():
    """Every rename-into-place of the project goes through utils/checkpoint.atomic_write (and the
    Shapes generator's folder, with the same temp naming)."""
    found = []
    for root in REPO_SRC:
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f)).read()
                    for word in ("os.replace(", "os.rename(", "mkstemp("):
                        if word in text:
                            found.append(f"{os.path.relpath(os.path.join(dirpath, f), REPO)}: {word}")
    assert sorted(found) == ["clcl_det/embedded/shapes.py: os.rename(", "clcl_det/utils/checkpoint.py: mkstemp(",
                             "clcl_det/utils/checkpoint.py: os.replace("]


def _killed_before_rename(monkeypatch, write):
    """Run `write` as if the process died between writing its temporary file and renaming it."""
    def die(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(os, "replace", die)
        m.setattr(os, "unlink", lambda *a, **k: None)  # a killed process does not clean up
        with pytest.raises(KeyboardInterrupt):
            write()


def test_every_kind_of_leftover_is_removed_on_resume(reference_run, tmp_path, monkeypatch):
    """Checkpoint, tag, json, text, yaml and png writes leave `.<name>.<random>.tmp` when killed;
    `--resume` (with only an excluded key changed) removes them all and keeps the run's config.yaml."""
    from clcl_det.evaluation import plot_stages, read_json, write_json
    from clcl_det.utils.checkpoint import DetectionCheckpointer

    ref, _ = reference_run
    out = str(tmp_path / "run")
    shutil.copytree(ref, out)
    config_before = open(os.path.join(out, "config.yaml"), "rb").read()
    summary = read_json(os.path.join(out, "summary.json"))
    writes = {
        "model_final.pth": lambda: atomic_torch_save({"x": torch.ones(1)}, os.path.join(out, "task_2", "model_final.pth")),
        "model_0000001.pth": lambda: DetectionCheckpointer(torch.nn.Linear(1, 1), os.path.join(out, "task_1")).save(
            "model_0000001"),
        "metrics.json": lambda: write_json({"a": 1}, os.path.join(out, "task_1", "metrics.json")),
        "summary.txt": lambda: atomic_write_bytes(os.path.join(out, "summary.txt"), b"half"),
        "config.yaml": lambda: atomic_write_bytes(os.path.join(out, "task_2", "config.yaml"), b"half"),
        "summary.png": lambda: plot_stages(summary, os.path.join(out, "summary.png")),
    }
    for name, write in writes.items():
        _killed_before_rename(monkeypatch, write)
    left = leftover_temp_files(out)
    assert sorted(os.path.basename(p).split(".tmp")[0].rsplit(".", 1)[0][1:] for p in left) == sorted(writes)
    assert all(fnmatch.fnmatch(os.path.basename(p), TMP_PATTERN) for p in left)
    cfg = tiny_cfg(out, DETERMINISTIC="True", **{"SOLVER.LOG_PERIOD": "1"})  # excluded from the identity check
    run_tiny(cfg, resume=True)
    assert leftover_temp_files(out) == []
    assert open(os.path.join(out, "config.yaml"), "rb").read() == config_before  # provenance kept
    assert same_state(final_state(ref), final_state(out))


def test_each_task_keeps_its_config_and_another_solver_is_refused(reference_run):
    from clcl_det.config import CfgNode
    from clcl_det.continual.loop import IDENTITY_EXCLUDED, _flat

    out, _ = reference_run
    root = _flat(CfgNode.load_yaml_with_base(os.path.join(out, "config.yaml")))
    for t in (1, 2):
        assert _flat(CfgNode.load_yaml_with_base(os.path.join(out, f"task_{t}", "config.yaml"))) == root
    assert "SOLVER.BASE_LR" not in IDENTITY_EXCLUDED and "OUTPUT_DIR" in IDENTITY_EXCLUDED
    cfg = tiny_cfg(out, DETERMINISTIC="True", **{"SOLVER.BASE_LR": "0.001", "TEST.ZERO_SHOT": "False"})
    with pytest.raises(RunStateError, match=r"SOLVER.BASE_LR: 0.0002 -> 0.001, TEST.ZERO_SHOT: True -> False\)"):
        run_tiny(cfg, resume=True)


def test_eval_only_refuses_a_checkpoint_that_does_not_fit(reference_run, tmp_path):
    from clcl_det.continual import ContinualRunner

    ref, _ = reference_run
    ckpt = load_checkpoint_file(os.path.join(ref, "task_2", "model_final.pth"))
    dropped = list(ckpt["model"])[:4]  # state_dict order, the order load_state_dict reports them
    for k in dropped:
        ckpt["model"].pop(k)
    ckpt["model"]["bogus.weight"] = torch.zeros(1)
    bad = str(tmp_path / "bad.pth")
    atomic_torch_save(ckpt, bad)
    cfg = tiny_cfg(str(tmp_path / "e"), **{"MODEL.WEIGHTS": bad})
    cfg.freeze()
    with pytest.raises(CheckpointError) as e:
        ContinualRunner(cfg).evaluate()
    msg = str(e.value)
    assert "\n" not in msg and f"missing keys 4 ({', '.join(dropped[:3])}, ...)" in msg
    assert "unexpected keys 1 (bogus.weight)" in msg and not os.path.exists(tmp_path / "e" / "eval_1")


def test_resume_refuses_a_periodic_checkpoint_that_does_not_fit(tmp_path):
    from clcl_det.utils.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(torch.nn.Linear(2, 2), str(tmp_path)).save("model_0000001")
    path = str(tmp_path / "model_0000001.pth")
    with pytest.raises(CheckpointError, match=r"model_0000001.pth does not fit the model of this config: missing keys 0 "
                                              r"\(\), unexpected keys 0 \(\), keys of another shape 2 \(weight, bias\)"):
        DetectionCheckpointer(torch.nn.Linear(2, 3), str(tmp_path)).load(path)
    with pytest.raises(CheckpointError, match=r"missing keys 4 \(0.weight, 0.bias, 1.weight, ...\), unexpected keys 2 \(weight, bias\)$"):
        DetectionCheckpointer(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), str(tmp_path)).load(path)


def test_eval_only_writes_a_new_folder_and_keeps_training_results(reference_run, tmp_path):
    from clcl_det.continual import ContinualRunner

    ref, _ = reference_run
    out = str(tmp_path / "run")
    shutil.copytree(ref, out)
    os.remove(os.path.join(out, "task_2", "model_final.pth"))  # only task 1 is trained: one evaluation (speed)
    before = {t: open(os.path.join(out, f"task_{t}", "metrics.json"), "rb").read() for t in (1, 2)}
    summary_before = open(os.path.join(out, "summary.json"), "rb").read()
    cfg = tiny_cfg(out, DETERMINISTIC="True", **{"TEST.ZERO_SHOT": "False"})  # seen classes are enough here
    cfg.freeze()
    runner = ContinualRunner(cfg)
    runner.evaluate()
    for t in (1, 2):
        assert open(os.path.join(out, f"task_{t}", "metrics.json"), "rb").read() == before[t]
    fresh = json.load(open(os.path.join(out, "eval_1", "task_1", "metrics.json")))
    assert fresh["per_class"] == json.loads(before[1])["per_class"]
    assert open(os.path.join(out, "summary.json"), "rb").read() == summary_before
    assert sorted(os.listdir(os.path.join(out, "eval_1"))) == ["config.yaml", "summary.json", "summary.png",
                                                               "summary.txt", "summary_tasks.png", "task_1"]
    assert runner._new_eval_dir() == os.path.join(out, "eval_2")  # the next evaluation gets its own folder


def test_duplicate_loss_names_are_refused_when_the_model_is_built(shapes_root):
    from clcl_det.config import ConfigError
    from clcl_det.modeling import build_model
    from clcl_det.modeling.losses.build import CONTINUAL_LOSS_REGISTRY, ContinualLoss, merge_losses

    if "DriftTwin" not in CONTINUAL_LOSS_REGISTRY:
        @CONTINUAL_LOSS_REGISTRY.register()
        class DriftTwin(ContinualLoss):
            loss_names = ("loss_drift",)

            def __init__(self, cfg):
                super().__init__()

    from clcl_det.engine import prepare_embedded_assets
    cfg = tiny_cfg(**{"MODEL.CONTINUAL_LOSSES": "['FPNDrift', 'DriftTwin']"})
    prepare_embedded_assets(cfg)
    with pytest.raises(ConfigError, match=r"loss 'loss_drift' is returned by both FPNDrift \(continual_losses.0\) "
                                          r"and DriftTwin \(continual_losses.1\)"):
        build_model(cfg)
    # the two distillation baselines together: distinct names, so both are kept
    model = build_model(tiny_cfg(**{"MODEL.CONTINUAL_LOSSES": "['FasterILODDistill', 'UnbiasedDistill']"}))
    assert [type(m).__name__ for m in model.continual_losses] == ["FasterILODDistill", "UnbiasedDistill"]
    losses = {"loss_cls": torch.ones(())}
    with pytest.raises(ConfigError, match=r"\['loss_cls'\] of X"):
        merge_losses(losses, {"loss_cls": torch.zeros(())}, "X")

"""Reliability: a run killed at chosen points resumes to the uninterrupted result; bad input is
refused or skipped as documented; checkpoints are safe to load; same seed, same metrics."""
import errno
import json
import os
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
from clcl_det.utils.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint_file

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
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]


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

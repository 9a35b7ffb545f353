"""Fuzzing the input path: seeded random corruptions of VOC XML, COCO json and JPEG files go through
the loaders (and the mapper), then a short run on a dataset with corrupted files. Every case must be
loaded (a bad entry skipped and counted) or refused with a one-line user error; never another
exception, never a lost or half-written output file."""
import copy
import io
import json
import logging
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clcl_det.data.build import _TrainBatches, build_test_loader, sanitize_dicts
from clcl_det.data.datasets.coco import load_coco_json
from clcl_det.data.datasets.voc import load_voc_instances
from clcl_det.data.mapper import DatasetMapper
from clcl_det.utils.checkpoint import leftover_temp_files, load_checkpoint_file
from clcl_det.utils.errors import user_errors

from conftest import run_tiny, tiny_cfg

SEED = 20261202
CLASSES = ["cat", "dog", "bird"]
JUNK = ["", "-5", "0", "nan", "inf", "-inf", "1e309", "abc", "3.5", "99999999999999999999", "\u00e9\u00e8",
        "<x>", "&amp;", "-0", " 7 "]


def _valid_xml(rng):
    objs = "".join(
        f"<object><name>{rng.choice(CLASSES)}</name><difficult>{rng.randint(0, 1)}</difficult><bndbox>"
        f"<xmin>{rng.randint(1, 15)}</xmin><ymin>{rng.randint(1, 10)}</ymin><xmax>{rng.randint(20, 40)}</xmax>"
        f"<ymax>{rng.randint(15, 30)}</ymax></bndbox></object>" for _ in range(rng.randint(1, 3)))
    return f"<annotation><size><width>40</width><height>30</height><depth>3</depth></size>{objs}</annotation>"


def _corrupt_bytes(rng, data: bytes) -> bytes:
    """One random byte-level corruption: truncate, flip bytes, delete / duplicate a span, junk, empty."""
    kind = rng.randrange(7)
    n = len(data)
    if kind == 0:
        return data[:rng.randrange(n)]
    if kind == 1:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(n)] = rng.randrange(256)
        return bytes(b)
    if kind == 2:
        i = rng.randrange(n)
        return data[:i] + data[i + rng.randint(1, 40):]
    if kind == 3:
        i, j = sorted(rng.randrange(n) for _ in range(2))
        return data[:j] + data[i:j] + data[j:]
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    if kind == 5:
        return b""
    i = rng.randrange(n)
    return data[:i] + b"\xff\xfe\x00\xc3" + data[i:]


def _corrupt_xml(rng, text: str) -> bytes:
    if rng.random() < 0.4:
        return _corrupt_bytes(rng, text.encode())
    # structural: a value replaced by junk, or a tag removed
    import re
    if rng.random() < 0.6:
        spans = [m.span(1) for m in re.finditer(r">([^<>]*)</", text)]
        i, j = rng.choice(spans)
        return (text[:i] + rng.choice(JUNK) + text[j:]).encode()
    tag = rng.choice(["size", "width", "height", "bndbox", "xmin", "ymax", "name", "difficult", "object"])
    return re.sub(rf"<{tag}>.*?</{tag}>", "", text, count=1, flags=re.S).encode()


def _valid_coco(rng):
    images = [{"id": i, "file_name": "img.jpg", "height": 30, "width": 40} for i in range(1, 4)]
    anns = [{"id": 10 + k, "image_id": rng.randint(1, 3), "category_id": rng.randint(1, 3), "iscrowd": 0,
             "bbox": [rng.randint(0, 10), rng.randint(0, 10), rng.randint(1, 25), rng.randint(1, 15)]}
            for k in range(5)]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    return {"images": images, "annotations": anns, "categories": cats}


JSON_JUNK = [None, "x", -1, 0, 1e308, True, [], {}, [1, 2], "nan", float("inf"), float("nan"), [1, 2, 3, "4"], 3.5]


def _corrupt_coco(rng, data) -> bytes:
    if rng.random() < 0.3:
        return _corrupt_bytes(rng, json.dumps(data).encode())
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        # walk down to a random container and delete or replace one of its entries
        node, parent_key = data, None
        while True:
            keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            k = rng.choice(keys)
            if isinstance(node[k], (dict, list)) and node[k] and rng.random() < 0.7:
                node = node[k]
                continue
            if rng.random() < 0.4 and isinstance(node, dict):
                del node[k]
            else:
                node[k] = rng.choice(JSON_JUNK)
            break
    if rng.random() < 0.05:
        data = [data]
    return json.dumps(data).encode()  # NaN / Infinity are written as the json module reads them


def _jpeg_bytes(rng) -> bytes:
    arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _corrupt_jpeg(rng, data: bytes) -> bytes:
    if rng.random() < 0.15:  # a frame header claiming a huge image (decompression bomb)
        i = data.find(b"\xff\xc0")
        if i >= 0:
            b = bytearray(data)
            b[i + 5:i + 9] = bytes([0xff, 0xff, 0xff, 0xff])
            return bytes(b)
    return _corrupt_bytes(rng, data)


class _Cases:
    """Runs cases; anything but success or a one-line user error is recorded as a failure."""

    def __init__(self):
        self.counts = {"loaded": 0, "refused": 0}
        self.failures = []

    def run(self, name, fn):
        try:
            fn()
            self.counts["loaded"] += 1
        except user_errors() as e:
            msg = str(e)
            if not msg or "\n" in msg or "Traceback" in msg:
                self.failures.append(f"{name}: refusal not one line: {msg!r}")
            self.counts["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the failure being looked for
            self.failures.append(f"{name}: {type(e).__name__}: {e}")


def _map_all(dicts):
    train = DatasetMapper(is_train=True, image_size=32)
    test = DatasetMapper(is_train=False, image_size=32)
    for d in sanitize_dicts(dicts, "fuzz"):
        x = train(d, np.random.default_rng(0))
        assert torch.isfinite(x["boxes"]).all()
        test(d)


def test_fuzzed_annotations_and_images_are_loaded_or_refused(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("clcl_det"), "propagate", True)  # a run's logger setup turns it off
    caplog.set_level(logging.WARNING)
    rng = random.Random(SEED)
    cases = _Cases()
    good_jpeg = _jpeg_bytes(rng)
    # VOC XML: one folder, every case a fresh annotation of image 'a'
    voc = tmp_path / "voc"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / d).mkdir(parents=True)
    (voc / "JPEGImages" / "a.jpg").write_bytes(good_jpeg)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    n_xml = 100
    for i in range(n_xml):
        (voc / "Annotations" / "a.xml").write_bytes(_corrupt_xml(rng, _valid_xml(rng)))
        cases.run(f"xml {i}", lambda: _map_all(load_voc_instances(str(voc), "train", CLASSES)))
    # COCO json
    coco = tmp_path / "coco"
    coco.mkdir()
    (coco / "img.jpg").write_bytes(good_jpeg)
    n_json = 80
    for i in range(n_json):
        (coco / "a.json").write_bytes(_corrupt_coco(rng, _valid_coco(rng)))
        cases.run(f"json {i}", lambda: _map_all(load_coco_json(str(coco / "a.json"), str(coco))))
    # JPEG: read for training (skipped and counted) and for evaluation (left out)
    n_jpeg = 60
    skipped = unreadable = 0
    for i in range(n_jpeg):
        (voc / "JPEGImages" / "b.jpg").write_bytes(_corrupt_jpeg(rng, _jpeg_bytes(rng)))
        dicts = [{"file_name": str(voc / "JPEGImages" / n), "image_id": n, "height": 30, "width": 40,
                  "annotations": [{"bbox": [2.0, 2.0, 20.0, 20.0], "category_id": 0}]} for n in ("b.jpg", "a.jpg")]
        stream = _TrainBatches(dicts, DatasetMapper(is_train=True, image_size=32), total_batch=2, seed=i, task=0,
                               start_iter=0, rank=0, world=1)
        cases.run(f"jpeg {i} (train)", lambda: stream.batch(0))
        skipped += stream.skipped
        cfg = tiny_cfg()
        batches = []
        cases.run(f"jpeg {i} (test)", lambda: batches.extend(build_test_loader(cfg, dicts[:1])))
        unreadable += sum(bool(x.get("unreadable")) for b in batches for x in b)
    assert n_xml + n_json + n_jpeg >= 200
    assert not cases.failures, "\n".join(cases.failures[:10])
    # both outcomes happen (the corruptions are not all harmless, nor all fatal) and skips are counted
    assert cases.counts["refused"] > 10 and cases.counts["loaded"] > 100, cases.counts
    assert 0 < skipped == unreadable < n_jpeg
    assert "skipped 1 image(s) with unreadable annotations" in caplog.text
    assert "using the next image instead" in caplog.text and "left out of the evaluation" in caplog.text


def _register(name, root, split, classes):
    from clcl_det.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_voc_instances(root, split, classes))
    MetadataCatalog.get(name).set(thing_classes=list(classes), evaluator_type="pascal_voc")


def _complete_outputs(out):
    """Every file under `out` is complete: checkpoints load, json parses, no temporary file is left."""
    assert not leftover_temp_files(out)
    for dirpath, _, files in os.walk(out):
        for f in files:
            p = os.path.join(dirpath, f)
            if f.endswith(".pth"):
                load_checkpoint_file(p)
            elif f.endswith(".json"):
                json.load(open(p))
            elif f.endswith(".png"):
                Image.open(p).load()


def test_short_run_on_a_fuzzed_dataset(shapes_root, tmp_path):
    """A run on Shapes with corrupted XML and JPEG files, and one class whose boxes were all removed:
    it completes, skipping (and counting) the bad files, warning about the class without training
    image and counting it in the summary; a dataset with nothing readable is refused in one line."""
    from clcl_det.embedded.shapes import SHAPES_CLASSES, ShapesSpec, ensure_shapes

    rng = random.Random(SEED + 1)
    src = ensure_shapes(ShapesSpec.from_cfg(tiny_cfg()))
    root = str(tmp_path / "fuzzed")
    shutil.copytree(src, root)
    ann, img = os.path.join(root, "Annotations"), os.path.join(root, "JPEGImages")
    train_ids = open(os.path.join(root, "ImageSets", "Main", "train.txt")).read().split()
    empty = SHAPES_CLASSES[3]
    import re
    for i in train_ids:  # no box of one task-1 class in training
        p = os.path.join(ann, f"{i}.xml")
        text = open(p).read()
        open(p, "w").write(re.sub(rf"<object>\s*<name>{re.escape(empty)}</name>.*?</object>", "", text, flags=re.S))
    bad_xml, bad_jpg = rng.sample(train_ids, 4), rng.sample(train_ids, 3)
    for i in bad_xml:
        p = os.path.join(ann, f"{i}.xml")
        data = open(p, "rb").read()
        open(p, "wb").write(_corrupt_bytes(rng, data)[:20])  # at most 20 bytes: unreadable
    for i in bad_jpg:
        open(os.path.join(img, f"{i}.jpg"), "wb").write(b"\xff\xd8\xff\xe0 not a jpeg any more")
    _register("fuzz_train", root, "train", SHAPES_CLASSES)
    _register("fuzz_test", root, "test", SHAPES_CLASSES)
    out = str(tmp_path / "out")
    opts = {"DATASETS.TRAIN": "('fuzz_train',)", "DATASETS.TEST": "('fuzz_test',)", "CONTINUAL.TRAIN_TASKS": "1",
            "SOLVER.MAX_ITER": "2", "TEST.ZERO_SHOT": "False"}
    run_tiny(tiny_cfg(out, **opts))
    _complete_outputs(out)
    # independently: the task-1 classes that no readable training XML names
    import xml.etree.ElementTree as ET
    named = set()
    for i in train_ids:
        try:
            named |= {o.findtext("name") for o in ET.parse(os.path.join(ann, f"{i}.xml")).findall("object")}
        except ET.ParseError:
            pass
    expected = [c for c in SHAPES_CLASSES[:10] if c not in named]
    assert empty in expected
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["classes_without_training_images"] == {"task_1": expected}
    assert (f"{len(expected)} class(es) had no training image: task_1: {', '.join(expected)}"
            in open(os.path.join(out, "summary.txt")).read())
    log = open(os.path.join(out, "log.txt")).read()
    assert f"class(es) without a training image in ['fuzz_train']: {', '.join(expected)}" in log
    assert "skipped 4 image(s) with unreadable annotations" in log
    # nothing readable at all: refused in one line, the files already written stay complete
    for i in train_ids:
        open(os.path.join(ann, f"{i}.xml"), "w").write("<annotation><size>")
    out2 = str(tmp_path / "out2")
    with pytest.raises(user_errors()) as e:
        run_tiny(tiny_cfg(out2, **opts))
    assert "fuzz_train" in str(e.value) and "\n" not in str(e.value)
    _complete_outputs(out2)

"""The Shapes generator: class order, determinism, VOC round trip, caching, locking, registration."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os

import numpy as np
import pytest

from clcl_det.data.catalog import DatasetCatalog, MetadataCatalog
from clcl_det.embedded import shapes as S
from clcl_det.embedded.shapes import (
    SHAPE_COLOURS, SHAPE_KINDS, SHAPES_CLASSES, ShapesSpec, caption_for, ensure_shapes,
    register_shapes, render_image, shapes_root,
)
from clcl_det.data.datasets.voc import load_voc_instances

SPEC = ShapesSpec(num_train=12, num_test=6, seed=3)


@pytest.fixture
def datasets_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLCL_DATASETS", str(tmp_path / "datasets"))
    return tmp_path / "datasets"


def _tree_digest(root: str) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_class_order_shares_colours_and_shapes_across_tasks():
    assert len(SHAPES_CLASSES) == 20 == len(set(SHAPES_CLASSES))
    split = [n.split(" ") for n in SHAPES_CLASSES]
    assert all(c in SHAPE_COLOURS and s in SHAPE_KINDS for c, s in split)
    for first in (10, 15, 19):  # 10+10, 15+5, 19+1
        old, new = split[:first], split[first:]
        assert all(any(c == oc for oc, _ in old) and any(s == os_ for _, os_ in old) for c, s in new)
        if first == 19:
            continue
        # the first task does not use up a colour (4 shapes) or a shape (5 colours)
        assert max(sum(c == col for c, _ in old) for col in SHAPE_COLOURS) < len(SHAPE_KINDS)
        assert max(sum(s == kind for _, s in old) for kind in SHAPE_KINDS) < len(SHAPE_COLOURS)


def test_render_is_a_pure_function_of_spec_split_index():
    a_img, a_mask, a_obj = render_image(SPEC, "train", 5)
    b_img, b_mask, b_obj = render_image(SPEC, "train", 5)
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img)) and np.array_equal(a_mask, b_mask)
    assert a_obj == b_obj
    assert not np.array_equal(np.asarray(a_img), np.asarray(render_image(SPEC, "test", 5)[0]))
    assert not np.array_equal(np.asarray(a_img), np.asarray(render_image(ShapesSpec(12, 6, seed=4), "train", 5)[0]))
    with pytest.raises(IndexError):
        render_image(SPEC, "test", 6)


def test_objects_boxes_and_class_map_agree():
    counts = []
    for i in range(SPEC.num_train):
        img, mask, objects = render_image(SPEC, "train", i)
        assert img.size == (128, 128) and mask.shape == (128, 128)
        assert 1 <= len(objects) <= 5
        counts.append(len(objects))
        for o in objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert 12 <= max(x1 - x0, y1 - y0) <= 90
            assert (mask[y0:y1, x0:x1] == o.category_id + 1).any()
        # every labelled pixel lies inside a box of its class
        for k in set(np.unique(mask)) - {0}:
            covered = np.zeros_like(mask, dtype=bool)
            for o in objects:
                if o.category_id + 1 == k:
                    x0, y0, x1, y1 = o.box
                    covered[y0:y1, x0:x1] = True
            assert covered[mask == k].all()
    assert len(set(counts)) > 1  # a varying number of objects per image


def test_voc_round_trip(datasets_dir):
    root = ensure_shapes(SPEC)
    assert root == shapes_root(SPEC) and os.path.basename(root) == "shapes_s3_n12-6_128"
    for split, n in (("train", 12), ("test", 6)):
        dicts = load_voc_instances(root, split, SHAPES_CLASSES)
        assert len(dicts) == n
        for i, d in enumerate(dicts):
            _, _, objects = render_image(SPEC, split, i)
            assert (d["height"], d["width"]) == (128, 128) and os.path.isfile(d["file_name"])
            assert len(d["annotations"]) == len(objects)
            for a, o in zip(d["annotations"], objects):
                assert a["category_id"] == o.category_id and 0 <= a["category_id"] < 20
                assert a["bbox"] == [float(v) for v in o.box]  # 1-based VOC pixels -> XYXY_ABS
                assert a["difficult"] == 0
                x0, y0, x1, y1 = a["bbox"]
                assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    with open(os.path.join(root, "spec.json")) as f:
        assert json.load(f)["num_train"] == 12


def test_generation_is_byte_identical(tmp_path, monkeypatch):
    digests = []
    for name in ("a", "b"):
        monkeypatch.setenv("CLCL_DATASETS", str(tmp_path / name))
        digests.append(_tree_digest(ensure_shapes(SPEC)))
    assert digests[0] == digests[1] and len(digests[0]) == 3 * 18 + 3  # jpg/xml/png per image, 2 lists, spec


def test_ensure_reuses_and_repairs(datasets_dir, monkeypatch):
    root = ensure_shapes(SPEC)
    calls = []
    original = S._write_split
    monkeypatch.setattr(S, "_write_split", lambda *a: (calls.append(a[1]), original(*a)))
    assert ensure_shapes(SPEC) == root and calls == []  # complete: reused
    os.remove(os.path.join(root, "spec.json"))  # an interrupted generation leaves no marker
    open(os.path.join(root, "JPEGImages", "stale.jpg"), "w").close()
    assert ensure_shapes(SPEC) == root and calls == ["train", "test"]
    assert not os.path.exists(os.path.join(root, "JPEGImages", "stale.jpg"))
    assert [p for p in os.listdir(datasets_dir) if p.endswith(".tmp")] == []  # the one temp naming: .<name>.<random>.tmp


def _child(log_path: str, out_q) -> None:
    original = S._write_split

    def logged(spec, split, root, progress):
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()} {split}\n")
        original(spec, split, root, progress)

    S._write_split = logged
    out_q.put(ensure_shapes(SPEC))


def test_concurrent_processes_generate_once(datasets_dir, tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    log = str(tmp_path / "calls.txt")
    procs = [ctx.Process(target=_child, args=(log, q)) for _ in range(3)]
    for p in procs:
        p.start()
    roots = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    with open(log) as f:
        calls = [line.split() for line in f.read().splitlines()]
    assert [split for _, split in calls] == ["train", "test"] and calls[0][0] == calls[1][0]  # one process
    assert set(roots) == {shapes_root(SPEC)}
    assert len(load_voc_instances(roots[0], "train", SHAPES_CLASSES)) == 12


def test_registration_and_metadata(datasets_dir):
    assert register_shapes() == {"train": "shapes_train", "test": "shapes_test", "val": "shapes_val"}  # idempotent
    assert {"shapes_train", "shapes_test"} <= set(DatasetCatalog.list())
    names = register_shapes(SPEC)  # a variant has its own names; the config names stay the default
    assert names == {"train": "shapes_s3_n12-6_128_train", "test": "shapes_s3_n12-6_128_test", "val": "shapes_val"}
    assert len(DatasetCatalog.get(names["test"])) == 6
    meta = MetadataCatalog.get(names["test"])
    assert meta.thing_classes == list(SHAPES_CLASSES) and meta.evaluator_type == "pascal_voc"
    assert meta.dirname == shapes_root(SPEC) and meta.split == "test"
    assert MetadataCatalog.get("shapes_test").dirname == shapes_root(ShapesSpec())
    try:
        register_shapes(SPEC, alias=True)  # what a run with DATASETS.SHAPES = SPEC does
        assert len(DatasetCatalog.get("shapes_test")) == 6
        assert MetadataCatalog.get("shapes_test").dirname == shapes_root(SPEC)
    finally:
        register_shapes(ShapesSpec(), alias=True)
    assert MetadataCatalog.get("shapes_test").dirname == shapes_root(ShapesSpec())


def test_spec_from_cfg_and_default_root(datasets_dir):
    from clcl_det.config import get_cfg

    cfg = get_cfg()
    assert ShapesSpec.from_cfg(cfg) == ShapesSpec()
    assert shapes_root(ShapesSpec()) == os.path.join(str(datasets_dir), "shapes")
    cfg.merge_from_list(["DATASETS.SHAPES.NUM_TRAIN", "12", "DATASETS.SHAPES.NUM_TEST", "6", "DATASETS.SHAPES.SEED", "3"])
    assert ShapesSpec.from_cfg(cfg) == SPEC
    with pytest.raises(ValueError, match="IMAGE_SIZE"):
        ShapesSpec(image_size=16)


def test_caption_for():
    assert caption_for(["red circle"]) == "a photo of a red circle."
    assert caption_for(["red circle", "blue square", "red circle", "green cross"]) == \
        "a photo of a red circle, a blue square and a green cross."


def test_clip_quality_measures_on_the_val_split(datasets_dir):
    """`measure_on_shapes(split="val")` (tools/measure_clip_dense.py --split val, for choosing a tiny-CLIP
    recipe) counts the boxes of shapes_val's own images, not those of the test split."""
    import torch

    from clcl_det.config import get_cfg
    from clcl_det.embedded.quality import measure_on_shapes
    from clcl_det.modeling.clip.factory import create_open_clip

    import open_clip

    cfg = get_cfg()
    cfg.merge_from_list(["DATASETS.SHAPES.NUM_TRAIN", "2", "DATASETS.SHAPES.NUM_TEST", "3",
                         "DATASETS.SHAPES.NUM_VAL", "4", "MODEL.CLIP.TEMPLATES", "simple"])
    torch.manual_seed(0)
    model, tok = create_open_clip("shapes-tiny", None), open_clip.get_tokenizer("shapes-tiny")
    spec = ShapesSpec.from_cfg(cfg)
    for split, (root, name) in {"val": (spec.val_spec(), "test"), "test": (spec, "test")}.items():
        boxes = sum(len(d["annotations"]) for d in load_voc_instances(ensure_shapes(root), name, SHAPES_CLASSES))
        res = measure_on_shapes(cfg, model, tok, split=split)
        assert int(res["dense_hit_rate"].total.sum()) == int(res["crop_accuracy"].total.sum()) == boxes
    val = load_voc_instances(ensure_shapes(spec.val_spec()), "test", SHAPES_CLASSES)
    test = load_voc_instances(ensure_shapes(spec), "test", SHAPES_CLASSES)
    assert len(val) == 4 and len(test) == 3
    assert [a["bbox"] for a in val[0]["annotations"]] != [a["bbox"] for a in test[0]["annotations"]]

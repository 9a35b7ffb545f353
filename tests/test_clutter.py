"""The Clutter generator: determinism, the scene statistics it promises, COCO-format round trip through
pycocotools and `register_coco_instances`, and the project's COCO AP equal to pycocotools' COCOeval."""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter

import numpy as np
import pytest

from clcl_det.data.catalog import DatasetCatalog, MetadataCatalog
from clcl_det.embedded.clutter import (CLUTTER_CLASSES, CLUTTER_COLOURS, CLUTTER_KINDS, ClutterSpec, class_blocks,
                                       clutter_root, ensure_clutter, mask_file, register_clutter, render_clutter)

SPEC = ClutterSpec(num_train=40, num_val=6, num_test=24, seed=5)


@pytest.fixture
def datasets_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLCL_DATASETS", str(tmp_path / "datasets"))
    return tmp_path / "datasets"


@pytest.fixture(scope="module")
def clutter_dir(tmp_path_factory):
    """SPEC generated once for the module, in its own datasets root."""
    root = tmp_path_factory.mktemp("clutter_datasets")
    old = os.environ.get("CLCL_DATASETS")
    os.environ["CLCL_DATASETS"] = str(root)
    path = ensure_clutter(SPEC)
    yield path
    if old is None:
        os.environ.pop("CLCL_DATASETS", None)
    else:
        os.environ["CLCL_DATASETS"] = old


def _tree_digest(root: str) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_classes_are_80_distinct_names_in_confusable_blocks():
    assert len(CLUTTER_CLASSES) == 80 == len(set(CLUTTER_CLASSES))
    words = [n.split(" ") for n in CLUTTER_CLASSES]
    assert all(w[0] in CLUTTER_COLOURS and w[-1] in CLUTTER_KINDS and len(w) in (2, 3) for w in words)
    for block in class_blocks():  # each block: same colour / other shape, plain / striped pairs
        names = [CLUTTER_CLASSES[k] for k in block]
        colours = Counter(n.split(" ")[0] for n in names[::2])
        assert max(colours.values()) == 2 and len({n.split(" ")[-1] for n in names}) == 5
        assert all(b == a.replace(" ", " striped ", 1) for a, b in zip(names[::2], names[1::2]))
    for first in (40, 50, 60, 70):  # every later class shares its colour and its shape with earlier ones
        old = [w for w in words[:first]]
        assert all(any(o[0] == w[0] for o in old) and any(o[-1] == w[-1] for o in old) for w in words[first:])


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, monkeypatch):
    spec = ClutterSpec(num_train=4, num_val=2, num_test=2, seed=1)
    digests = []
    for name in ("a", "b"):
        monkeypatch.setenv("CLCL_DATASETS", str(tmp_path / name))
        digests.append(_tree_digest(ensure_clutter(spec)))
    assert digests[0] == digests[1] and len(digests[0]) == 2 * 8 + 3 + 1  # jpg + png per image, 3 jsons, spec
    other = np.asarray(render_clutter(ClutterSpec(4, 2, 2, seed=2), "train", 0)[0])
    assert not np.array_equal(other, np.asarray(render_clutter(spec, "train", 0)[0]))
    assert not np.array_equal(np.asarray(render_clutter(spec, "val", 0)[0]), np.asarray(render_clutter(spec, "test", 0)[0]))


def test_scene_statistics_are_crowded_like_coco():
    spec = ClutterSpec(num_train=400)
    small, large = spec.area_thresholds()
    assert (small, large) == pytest.approx((6.4 ** 2, 19.2 ** 2))
    counts, areas, crowd, nested, empty = [], [], 0, 0, 0
    for i in range(0, 400, 2):
        _, class_map, objects = render_clutter(spec, "train", i)
        things = [o for o in objects if not o.iscrowd]
        crowd += len(objects) - len(things)
        if not objects:
            empty += 1
            assert not class_map.any()
            continue
        counts.append(len(things))
        areas += [o.area for o in things]
        boxes = np.array([o.box for o in things])
        inside = ((boxes[:, None, :2] >= boxes[None, :, :2]) & (boxes[:, None, 2:] <= boxes[None, :, 2:])).all(-1)
        nested += int((inside & ~np.eye(len(boxes), dtype=bool)).any(1).sum())
        for o in objects:  # the visible area lies in the box, and the class map marks it
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128 and 0 < o.area <= (x1 - x0) * (y1 - y0)
            assert (class_map[int(y0):math.ceil(y1), int(x0):math.ceil(x1)] == o.category_id + 1).any()
    assert 3 <= min(counts) and max(counts) <= 12 and 6.0 <= np.mean(counts) <= 7.3
    areas = np.array(areas)
    shares = [(areas < small).mean(), ((areas >= small) & (areas < large)).mean(), (areas >= large).mean()]
    assert all(0.15 <= s <= 0.6 for s in shares), shares
    assert 0.002 <= crowd / (crowd + len(areas)) <= 0.03 and nested >= 10 and 1 <= empty <= 10


def test_occlusion_reaches_but_never_exceeds_half_an_object():
    occluded = [o.occluded for i in range(60) for o in render_clutter(ClutterSpec(), "train", i)[2]]
    assert max(occluded) <= 0.5 and max(occluded) > 0.35 and np.mean(np.array(occluded) > 0.05) > 0.1


def test_json_loads_in_pycocotools_and_registers_like_user_data(clutter_dir):
    from pycocotools.coco import COCO

    for split, n in (("train", 40), ("val", 6), ("test", 24)):
        coco = COCO(os.path.join(clutter_dir, "annotations", f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n and len(coco.getCatIds()) == 80
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLUTTER_CLASSES)
        for a in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and 0 < a["area"] <= w * h and a["iscrowd"] in (0, 1)
    names = register_clutter(SPEC)
    assert names == {s: f"clutter_s5_n40-6-24_128_{s}" for s in ("train", "val", "test")}
    dicts = DatasetCatalog.get(names["train"])
    meta = MetadataCatalog.get(names["train"])
    assert meta.thing_classes == list(CLUTTER_CLASSES) and meta.evaluator_type == "coco"
    assert meta.json_file == os.path.join(clutter_dir, "annotations", "instances_train.json")
    for i in (0, 7, 39):  # dicts = what the generator drew (contiguous ids, XYXY boxes, json area)
        _, class_map, objects = render_clutter(SPEC, "train", i)
        d = dicts[i]
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == (128, 128)
        assert [(a["category_id"], tuple(a["bbox"]), a["area"], a["iscrowd"]) for a in d["annotations"]] == \
            [(o.category_id, o.box, o.area, int(o.iscrowd)) for o in objects]
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(mask_file(clutter_dir, d["file_name"]))), class_map)


def test_generated_on_first_load_into_an_empty_root(datasets_dir):
    spec = ClutterSpec(num_train=3, num_val=1, num_test=2, seed=9)
    names = register_clutter(spec)
    assert not os.path.exists(clutter_root(spec))
    assert len(DatasetCatalog.get(names["test"])) == 2 and os.path.isfile(os.path.join(clutter_root(spec), "spec.json"))
    assert register_clutter() == {s: f"clutter_{s}" for s in ("train", "val", "test")}


def test_a_registered_split_follows_the_datasets_root(tmp_path, monkeypatch):
    spec = ClutterSpec(num_train=2, num_val=1, num_test=1, seed=11)
    monkeypatch.setenv("CLCL_DATASETS", str(tmp_path / "a"))
    name = register_clutter(spec)["val"]
    monkeypatch.setenv("CLCL_DATASETS", str(tmp_path / "b"))  # changed after registration
    (d,) = DatasetCatalog.get(name)
    assert d["file_name"].startswith(str(tmp_path / "b")) and not (tmp_path / "a").exists()
    assert MetadataCatalog.get(name).json_file.startswith(str(tmp_path / "b"))


def test_non_cooccurrence_drops_a_real_share_of_later_tasks(clutter_dir):
    """IOR's filter drops the later task's images that hold an earlier class: a real share, not all."""
    from clcl_det.config import get_cfg
    from clcl_det.data.continual import build_continual_split

    dicts = DatasetCatalog.get(register_clutter(SPEC)["train"])
    for tasks in ("40+40", "70+10"):
        cfg = get_cfg()
        cfg.merge_from_list(["CONTINUAL.TASKS", tasks, "CONTINUAL.IMAGE_FILTER", "non_cooccurrence"])
        kept = len(build_continual_split(cfg, CLUTTER_CLASSES).task_train_dicts(dicts, 1))
        cfg.merge_from_list(["CONTINUAL.IMAGE_FILTER", "contains_current"])
        every = len(build_continual_split(cfg, CLUTTER_CLASSES).task_train_dicts(dicts, 1))
        assert 0.15 <= 1 - kept / every <= 0.9, (tasks, kept, every)


def test_project_coco_ap_equals_pycocotools_on_clutter(clutter_dir):
    """COCOEvaluator on the registered dicts (contiguous ids, crowd and json areas kept) gives
    pycocotools' COCOeval numbers on the json itself, to 1e-6, for noisy detections."""
    import contextlib
    import io

    import torch
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from clcl_det.evaluation import COCOEvaluator

    json_file = os.path.join(clutter_dir, "annotations", "instances_test.json")
    dicts = DatasetCatalog.get(register_clutter(SPEC)["test"])
    rng = np.random.default_rng(0)
    thresholds = MetadataCatalog.get(register_clutter(SPEC)["test"]).area_thresholds
    assert thresholds == SPEC.area_thresholds()
    results, ev = [], COCOEvaluator(dicts, list(CLUTTER_CLASSES), area_thresholds=thresholds)
    for d in dicts:
        boxes, labels = [], []
        for a in d["annotations"]:  # each object found with a jittered box, sometimes with the wrong class
            x0, y0, x1, y1 = a["bbox"]
            j = rng.normal(0, 0.08 * max(x1 - x0, y1 - y0), 4)
            boxes.append([x0 + j[0], y0 + j[1], x1 + j[2], y1 + j[3]])
            labels.append(a["category_id"] if rng.random() < 0.8 else int(rng.integers(80)))
        for _ in range(3):  # false positives
            x, y = rng.uniform(0, 100, 2)
            boxes.append([x, y, x + rng.uniform(4, 28), y + rng.uniform(4, 28)])
            labels.append(int(rng.integers(80)))
        boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        scores = rng.uniform(0.05, 1, len(boxes)).astype(np.float32)
        ev.process([{"image_id": d["image_id"]}], [{"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                                                    "labels": torch.tensor(labels)}])
        for b, s, l in zip(boxes.astype(np.float64).tolist(), scores.tolist(), labels):
            results.append({"image_id": d["image_id"], "category_id": l + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "score": s})
    ours = ev.evaluate()["bbox"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        reference = COCOeval(gt, gt.loadRes(results), "bbox")
        small, large = thresholds  # COCO's 32^2 / 96^2 at 640 px, scaled to 128 px
        reference.params.areaRng = [[0, 1e5 ** 2], [0, small], [small, large], [large, 1e5 ** 2]]
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    for i, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert ours[key] == pytest.approx(100 * reference.stats[i], abs=1e-6), key
    assert 5 < ours["AP"] < 95 and not any(math.isnan(ours[k]) for k in ("APs", "APm", "APl"))
    precision = reference.eval["precision"][:, :, :, 0, -1]  # per class, all areas, 100 detections
    for k, name in enumerate(CLUTTER_CLASSES):
        p = precision[:, :, k]
        expected = float(p[p > -1].mean() * 100) if (p > -1).any() else float("nan")
        got = ours["per_class"][name]["AP"]
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-6), name


def test_packaged_clutter_tiny_clip_is_the_released_checkpoint():
    """Base-Clutter's recipe loads the Clutter checkpoint shipped in the package (not Shapes'), checked
    by the sha256 the docs state; the Shapes recipe still loads its own."""
    from clcl_det.engine import setup_cfg
    from clcl_det.embedded import tiny_clip as P

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = setup_cfg(os.path.join(repo, "configs", "_base_", "Base-Clutter.yaml"))
    name, sha256, command = P.PACKAGED[P.recipe_digest(cfg)]
    path = P.tiny_clip_path(cfg)
    assert path == os.path.join(P.PACKAGED_DIR, name) == os.path.join(P.PACKAGED_DIR, "clutter-tiny.pt")
    assert P.built_tiny_clip_path(cfg) == path and P.file_sha256(path) == sha256
    assert "Base-Clutter.yaml" in command and "--verify" in command
    docs = open(os.path.join(repo, "docs", "tutorials", "embedded.md"), encoding="utf-8").read()
    assert sha256 in docs
    shapes = setup_cfg("")
    assert P.tiny_clip_path(shapes) == os.path.join(P.PACKAGED_DIR, P.PACKAGED_FILE) != path

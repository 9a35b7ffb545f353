"""Protocols as the literature defines them: multi-step metrics of a real 4-task run, per-task
budgets from the task's data, IOR's non-co-occurrence image filter, Shapes' validation split."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from conftest import run_tiny, tiny_cfg


def _mean(values):
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _close(a, b):
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or math.isnan(b)
    return b is not None and abs(a - b) < 1e-9


def test_four_task_shapes_run_metrics_by_hand(shapes_root, tmp_path):
    out = str(tmp_path / "run")
    # the tiny settings, with 1 iteration of 2 images at 64 px per task (4 tasks stay cheap)
    cfg = tiny_cfg(out, **{"CONTINUAL.TASKS": "5+5+5+5", "TEST.ZERO_SHOT": "False",
                           "SOLVER.MAX_ITER": "1", "SOLVER.IMS_PER_BATCH": "2", "INPUT.IMAGE_SIZE": "64",
                           "TEST.IMS_PER_BATCH": "12", "SOLVER.CHECKPOINT_PERIOD": "100"})
    summary = run_tiny(cfg)
    names = summary["class_names"]
    assert [s["task"] for s in summary["stages"]] == [0, 1, 2, 3]
    for t in range(4):
        with open(os.path.join(out, f"task_{t + 1}", "metrics.json")) as f:
            stage = json.load(f)
        # per-class APs as the evaluator wrote them for this stage (None = no GT)
        ap = [stage["per_class"][names[c]]["AP50"] if c < 5 * (t + 1) else None for c in range(20)]
        ap = [float("nan") if v is None else v for v in ap]
        base, incremental = ap[:5], ap[5:5 * (t + 1)]  # B = classes 1-5, N = 6..5(t+1)
        row = summary["stages"][t]
        assert _close(row["mAP@A"], _mean(ap[:5 * (t + 1)]))
        if t == 0:
            assert "mAP@B" not in row and "mAP@N" not in row
        else:
            assert _close(row["mAP@B"], _mean(base)) and _close(stage["summary"]["mAP@B"], _mean(base))
            assert _close(row["mAP@N"], _mean(incremental)) and _close(stage["summary"]["mAP@N"], _mean(incremental))
        # task x stage matrix: task k's classes 5k..5k+4 after stage t; None before learned
        for k in range(4):
            cell = summary["task_matrix"]["mAP"][k][t]
            if k > t:
                assert cell is None
            else:
                assert _close(cell, _mean(ap[5 * k:5 * k + 5]))
    assert summary["task_matrix"]["tasks"] == ["1-5", "6-10", "11-15", "16-20"]
    assert _close(summary["mean_mAP@A"], _mean([s["mAP@A"] for s in summary["stages"]]))
    text = open(os.path.join(out, "summary.txt")).read()
    assert "Task x stage matrix" in text and "Mean mAP@A over 4 stages" in text
    for f in ("summary.png", "summary_tasks.png"):
        assert open(os.path.join(out, f), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # the same run's stage files with per-class APs set by hand, AP(class c, stage t) = 10 (t + 1) + c,
    # summarised again by the engine: B = classes 0-4 -> 10 (t + 1) + 2; N = classes 5 .. 5t + 4 ->
    # 10 (t + 1) + (5t + 9) / 2; A = classes 0 .. 5t + 4 -> 10 (t + 1) + (5t + 4) / 2
    from clcl_det.data.continual import build_continual_split
    from clcl_det.engine.evaluate import write_summary

    for t in range(4):
        path = os.path.join(out, f"task_{t + 1}", "metrics.json")
        with open(path) as f:
            stage = json.load(f)
        for name in stage["per_class"]:
            stage["per_class"][name]["AP50"] = 10.0 * (t + 1) + names.index(name)
        with open(path, "w") as f:
            json.dump(stage, f)
    hand = write_summary(cfg, build_continual_split(cfg), out)
    assert [s["mAP@A"] for s in hand["stages"]] == [12.0, 24.5, 37.0, 49.5]
    assert [s.get("mAP@B") for s in hand["stages"]] == [None, 22.0, 32.0, 42.0]
    # N after task 4 is classes 6-20 (52), not the last task's 16-20 (57)
    assert [s.get("mAP@N") for s in hand["stages"]] == [None, 27.0, 39.5, 52.0]
    assert hand["mean_mAP@A"] == (12.0 + 24.5 + 37.0 + 49.5) / 4
    assert hand["task_matrix"]["mAP"] == [[12.0, 22.0, 32.0, 42.0], [None, 27.0, 37.0, 47.0],
                                          [None, None, 42.0, 52.0], [None, None, None, 57.0]]


# ----------------------------------------------------------------------------------------------
# per-task budget from the task's data


def _voc_like_dicts(n=600, seed=0):
    """VOC-like dataset dicts: 20 classes, 1-4 objects per image, class 20 rare (like tvmonitor)."""
    rng = np.random.default_rng(seed)
    freq = np.ones(20)
    freq[19] = 0.25
    freq /= freq.sum()
    dicts = []
    for i in range(n):
        cats = rng.choice(20, size=int(rng.integers(1, 5)), p=freq)
        dicts.append({"image_id": i, "file_name": f"{i}.jpg", "height": 100, "width": 100,
                      "annotations": [{"bbox": [0, 0, 10, 10], "category_id": int(c)} for c in cats]})
    return dicts


def test_task_budget_follows_the_task_images():
    from clcl_det.config import get_cfg
    from clcl_det.data.continual import build_continual_split
    from clcl_det.data.datasets import VOC_CLASSES
    from clcl_det.engine.trainer import task_schedule

    dicts = _voc_like_dicts()
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.EPOCHS", "12", "SOLVER.IMS_PER_BATCH", "16", "SOLVER.MAX_ITER", "1000",
                         "SOLVER.WARMUP_ITERS", "100", "SOLVER.STEPS", "(0.5, 800)"])
    budgets = {}
    for tasks in ("19+1", "15+5"):
        cfg.CONTINUAL.TASKS = tasks
        split = build_continual_split(cfg, VOC_CLASSES)
        for t in (0, 1):
            n = len(split.task_train_dicts(dicts, t))
            # brute force: images holding a class of the task
            lo, hi = (0, split.task_sizes[0]) if t == 0 else (split.task_sizes[0], 20)
            assert n == sum(any(lo <= a["category_id"] < hi for a in d["annotations"]) for d in dicts)
            sched = task_schedule(cfg, n)
            it = sched.SOLVER.MAX_ITER
            assert it == math.ceil(12 * n / 16)  # 12 epochs of the task's n images at batch 16
            assert sched.SOLVER.WARMUP_ITERS == round(100 * it / 1000)
            assert sched.SOLVER.STEPS == (0.5, round(800 * it / 1000))
            budgets[tasks, t] = (n, it)
    (n19, i19), (n15, i15) = budgets["19+1", 1], budgets["15+5", 1]
    assert n19 < n15 / 3  # a 1-class step has far fewer images than a 5-class step ...
    assert i15 / i19 == pytest.approx(n15 / n19, rel=0.05)  # ... and proportionally fewer iterations
    assert cfg.SOLVER.MAX_ITER == 1000  # the run's config is not changed
    cfg.SOLVER.EPOCHS = 0.0
    assert task_schedule(cfg, 37) is cfg  # EPOCHS 0: MAX_ITER for every task (Shapes)


# ----------------------------------------------------------------------------------------------
# IOR's non-co-occurrence image filter


def _hand_made_coco(tmp_path):
    """Categories a (id 1), b (id 2), c (id 5), d (id 7); per image the categories it holds."""
    images = {
        10: [1],             # a
        11: [1, 5],          # a + c
        12: [5],             # c
        13: [5, 7],          # c + d
        14: [(2, "crowd"), 7],  # a crowd of b + d
        15: [],              # nothing
        16: [7],             # d
        17: [2, 7],          # b + d
    }
    anns, k = [], 0
    for img, cats in images.items():
        for c in cats:
            crowd = isinstance(c, tuple)
            k += 1
            anns.append({"id": k, "image_id": img, "category_id": c[0] if crowd else c, "bbox": [1, 1, 5, 5],
                         "area": 25.0, "iscrowd": int(crowd)})
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 20, "width": 20} for i in images],
            "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"},
                           {"id": 7, "name": "d"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("tasks, image_filter, expected", [
    # IOR 2+2: task 1 = images with a or b (co-occurring c/d unlabelled, kept); task 2 = images with
    # c or d and no a/b object, crowd included (11, 14, 17 dropped)
    ("2+2", "non_cooccurrence", [[10, 11, 17], [12, 13, 16]]),
    # three tasks: task 3 (d) also drops 13 (holds c of task 2)
    ("2+1+1", "non_cooccurrence", [[10, 11, 17], [12, 13], [16]]),
    # the standard protocol keeps every image with a task object
    ("2+2", "contains_current", [[10, 11, 17], [11, 12, 13, 14, 16, 17]]),
    # exclusive also drops task 1's images holding a later class
    ("2+2", "exclusive", [[10], [12, 13, 14, 16]]),
])
def test_non_cooccurrence_filter_on_hand_made_json(tmp_path, tasks, image_filter, expected):
    from clcl_det.config import get_cfg
    from clcl_det.data.continual import build_continual_split
    from clcl_det.data.datasets import load_coco_json

    dicts = load_coco_json(_hand_made_coco(tmp_path), str(tmp_path))
    cfg = get_cfg()
    cfg.merge_from_list(["CONTINUAL.TASKS", tasks, "CONTINUAL.IMAGE_FILTER", image_filter])
    split = build_continual_split(cfg, ["a", "b", "c", "d"])
    got = [[d["image_id"] for d in split.task_train_dicts(dicts, t)] for t in range(split.num_tasks)]
    assert got == expected
    # only the task's own boxes are labelled
    for t, ds in enumerate(split.task_train_dicts(dicts, t) for t in range(split.num_tasks)):
        task = split.task(t)
        assert all(task.start <= a["category_id"] < task.stop for d in ds for a in d["annotations"])


# ----------------------------------------------------------------------------------------------
# COCO ground-truth area from the json


def test_coco_area_comes_from_the_json(tmp_path):
    import torch

    from clcl_det.data.datasets import load_coco_json
    from clcl_det.evaluation import COCOEvaluator

    # one 40x40 box (box area 1600: "medium" by the box) whose json area is 900 ("small", < 32^2)
    data = {"images": [{"id": 1, "file_name": "1.jpg", "height": 100, "width": 100}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 900.0,
                             "iscrowd": 0}],
            "categories": [{"id": 3, "name": "thing"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    dicts = load_coco_json(str(path), str(tmp_path))
    assert dicts[0]["annotations"][0]["area"] == 900.0
    ev = COCOEvaluator(dicts, ["thing"])
    ev.process([{"image_id": 1}], [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]),
                                    "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}])
    res = ev.evaluate()["bbox"]
    # the object is small by its json area: APs is 100, APm has no ground truth (NaN)
    assert res["APs"] == pytest.approx(100.0) and math.isnan(res["APm"]) and math.isnan(res["APl"])


# ----------------------------------------------------------------------------------------------
# VOC class names for the text encoder


def test_voc_text_encoder_reads_natural_language_names():
    import torch
    from torch import nn

    from clcl_det.data.catalog import MetadataCatalog
    from clcl_det.data.datasets import VOC_CLASSES
    from clcl_det.modeling.text import TextEncoder

    meta = MetadataCatalog.get("voc_2007_trainval")
    assert meta.thing_classes == list(VOC_CLASSES) and "diningtable" in meta.thing_classes  # dataset spelling
    names = meta.text_names
    assert (names["diningtable"], names["pottedplant"], names["tvmonitor"]) == ("dining table", "potted plant",
                                                                                 "tv monitor")
    assert names["aeroplane"] == "aeroplane" and names["motorbike"] == "motorbike"

    seen = []

    class FakeCLIP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def encode_text(self, tokens):
            return torch.randn(len(tokens), 8)

    def tokenizer(sentences):
        seen.extend(sentences)
        return torch.zeros(len(sentences), 4, dtype=torch.long)

    text = TextEncoder(FakeCLIP(), tokenizer, "simple", text_names=names)
    emb = text.encode_classes(["diningtable", "cat"])
    assert emb.shape == (2, 8)
    assert "art of the dining table." in seen and "art of the cat." in seen
    assert not any("diningtable" in s for s in seen)


# ----------------------------------------------------------------------------------------------
# shapes_val


def test_shapes_val_own_seed_disjoint_from_train_and_test(tmp_path, monkeypatch):
    from clcl_det.data.catalog import DatasetCatalog, MetadataCatalog
    from clcl_det.embedded import shapes

    monkeypatch.setenv("CLCL_DATASETS", str(tmp_path))
    spec = shapes.ShapesSpec(num_train=6, num_test=4, seed=0, image_size=64, num_val=5, val_seed=7)
    names = shapes.register_shapes(spec)
    try:
        assert names["val"] == "shapes_s7_n5_64_val"
        train, test, val = (DatasetCatalog.get(names[s]) for s in ("train", "test", "val"))
        assert len(val) == 5 and [d["image_id"] for d in val] == [f"val_{i:05d}" for i in range(5)]
        assert MetadataCatalog.get(names["val"]).thing_classes == list(shapes.SHAPES_CLASSES)

        def pixels(d):
            with open(d["file_name"], "rb") as f:
                return f.read()

        val_bytes = {pixels(d) for d in val}
        assert len(val_bytes) == 5 and not val_bytes & {pixels(d) for d in train + test}
        # the val images are the ones its own seed draws (split code of a test split, seed 7)
        image, _, objects = shapes.render_image(spec.val_spec(), "test", 2)
        assert [a["category_id"] for a in val[2]["annotations"]] == [o.category_id for o in objects]
        # the train/test folder (and so the tiny CLIP's cache key) does not depend on the val keys
        assert spec.to_dict() == shapes.ShapesSpec(num_train=6, num_test=4, seed=0, image_size=64).to_dict()
        with pytest.raises(ValueError, match="VAL_SEED"):
            shapes.ShapesSpec(seed=3, val_seed=3).val_spec()
    finally:
        for name in names.values():
            DatasetCatalog.remove(name)


# ----------------------------------------------------------------------------------------------
# EVA02-CLIP backbone


def test_eva02_dense_encoder_against_timm():
    # open_clip's EVA02 towers are a TimmModel around timm's Eva; the tiny EVA02 (same blocks:
    # rotary positions, SwiGLU, sub-LN attention) keeps this check cheap
    import torch
    from open_clip.timm_model import TimmModel

    from clcl_det.modeling.clip.dense import EvaDenseEncoder, build_dense_encoder

    torch.manual_seed(0)
    visual = TimmModel("eva02_tiny_patch14_224", embed_dim=64, pool="token", proj=None).eval()
    enc = build_dense_encoder(visual, [2, 5, 8, 11])
    assert isinstance(enc, EvaDenseEncoder) and (enc.patch_size, enc.width, enc.embed_dim) == (14, 192, 64)
    trunk = visual.trunk
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        taps, dense = enc(x)
        # the taps before the last block are timm's own intermediate outputs
        ref = trunk.forward_intermediates(x, indices=[2, 5, 8], intermediates_only=True)
        for a, b in zip(taps[:3], ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # the last block without token mixing = the block with each token attending only to itself
        h = trunk.patch_embed(x)
        h, rope = trunk._pos_embed(h)
        h = trunk.norm_pre(h)
        for blk in trunk.blocks[:-1]:
            h = blk(h, rope=rope)
        n = h.shape[1]
        self_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
        h = trunk.blocks[-1](h, rope=rope, attn_mask=self_only)
        torch.testing.assert_close(taps[3], h[:, 1:].transpose(1, 2).reshape(1, 192, 16, 16), rtol=1e-4, atol=1e-4)
        v = torch.nn.functional.normalize(trunk.head(trunk.norm(h[:, 1:])), dim=-1)
        torch.testing.assert_close(dense, v.transpose(1, 2).reshape(1, 64, 16, 16), rtol=1e-4, atol=1e-4)
        # any size divisible by the patch (positions resampled, rotary embedding at the new grid),
        # and the trunk's own rotary embedding is left at its 16 x 16 grid
        taps, dense = enc(torch.randn(1, 3, 56, 84))
        assert torch.equal(trunk.rope.get_embed(), rope)
    assert [t.shape for t in taps] == [(1, 192, 4, 6)] * 4 and dense.shape == (1, 64, 4, 6)


def test_eva02_clclip_voc_config_builds_and_detects():
    import torch

    from clcl_det.data.continual import Task
    from clcl_det.data.datasets import VOC_CLASSES
    from clcl_det.engine import setup_cfg
    from clcl_det.modeling import build_model

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = setup_cfg(os.path.join(repo, "configs", "clclip", "clclip_voc_10+10_eva02.yaml"), [
        "MODEL.CLIP.PRETRAINED", "", "INPUT.IMAGE_SIZE", "64", "MODEL.CLIP.TEMPLATES", "simple",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    assert cfg.MODEL.CLIP.ARCH == "EVA02-B-16" and cfg.CONTINUAL.TASKS == "10+10"
    torch.manual_seed(0)
    from clcl_det.continual import begin_task

    model = build_model(cfg).eval()
    assert model.text.text_names["diningtable"] == "dining table"
    # one class keeps the 12-layer text tower's prompt encoding cheap
    begin_task(model, Task(0, 0, 1, ("diningtable",), tuple(VOC_CLASSES)))
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}])
    assert set(out[0]) >= {"boxes", "scores", "labels"} and model.backbone.embed_dim == 512
    assert out[0]["boxes"].shape[0] == out[0]["scores"].shape[0] and model.backbone.encoder.width == 768
    assert len(out[0]["boxes"]) > 0 and bool((out[0]["labels"] == 0).all())  # at least one detection, of the one class

"""Using a trained run as a detector: Predictor, tools/demo.py, exported detections, TensorBoard
scalars, hooks, MODEL.WEIGHTS / CONTINUAL.START_TASK, one-line errors, GPU-ready training options
(checked on CPU for equivalence). The trained run is the session's `reference_run`."""
import contextlib
import glob
import importlib.util
import io
import itertools
import json
import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from clcl_det.config import ConfigError, get_cfg, resolve_config_path
from clcl_det.continual import Predictor
from clcl_det.continual.predictor import trained_tasks
from clcl_det.engine import HookBase, TaskTrainer, auto_scale_schedule
from clcl_det.engine.trainer import build_optimizer, unused_parameters
from clcl_det.utils.checkpoint import load_checkpoint_file
from clcl_det.utils.errors import run_cli

from conftest import final_state, run_tiny, same_state, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_dicts(out):
    from clcl_det.continual import ContinualRunner
    from clcl_det.engine import setup_cfg

    runner = ContinualRunner(setup_cfg(os.path.join(out, "config.yaml"), ["OUTPUT_DIR", out]))
    return runner.split, runner.test_dicts()


def _results(out, t):
    with open(os.path.join(out, f"task_{t}", "coco_instances_results.json")) as f:
        return json.load(f)


# -- 1. Predictor -----------------------------------------------------------------------------------
def test_predictor_matches_the_stage_evaluation(reference_run):
    out, _ = reference_run
    split, dicts = _test_dicts(out)
    cfg = None
    for task in (1, 2):
        if task == 1:
            p = Predictor.from_run(out, task=task, score_thresh=0.0)
            cfg = p.cfg
        else:  # config + weights form
            p = Predictor(cfg, os.path.join(out, "task_2", "model_final.pth"), score_thresh=0.0)
        assert p.class_names == list(split.task(task - 1).class_names)
        d = dicts[0]
        a = p(d["file_name"])
        # the same image through the evaluation loader: task_<t>/coco_instances_results.json
        ref = sorted((r for r in _results(out, task) if r["image_id"] == d["image_id"]), key=lambda r: -r["score"])
        assert len(ref) == len(a["scores"]) > 0
        np.testing.assert_allclose(a["scores"].numpy(), [r["score"] for r in ref], rtol=1e-5)
        xywh = torch.cat([a["boxes"][:, :2], a["boxes"][:, 2:] - a["boxes"][:, :2]], 1)
        np.testing.assert_allclose(xywh.numpy(), [r["bbox"] for r in ref], atol=1e-3)
        assert a["class_names"] == [split.class_names[r["category_id"]] for r in ref]
        assert max(a["labels"].tolist()) < len(p.class_names)
    # an RGB array and a 3xHxW tensor give the same detections as the path
    from PIL import Image

    arr = np.asarray(Image.open(d["file_name"]).convert("RGB"))
    b, c = p(arr), p(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(b["scores"], c["scores"])
    assert trained_tasks(out) == [1, 2]  # from_run's default task=-1 is the last of them


# -- 2. demo ------------------------------------------------------------------------------------------
def test_demo_takes_overrides_as_train_net_does():
    """Overrides are positional KEY VALUE pairs, as for tools/train_net.py, wherever --input's list ends;
    the deprecated --opts gives the same."""
    demo = _tool("demo")
    want = ["MODEL.WEIGHTS", "w.pth", "SOLVER.MAX_ITER=3"]
    for argv in (["--input", "a.png", "b.png", "--output", "d"] + want,
                 ["--output", "d", "--input", "a.png", "b.png"] + want,
                 ["--input", "a.png", "b.png", "--output", "d", "--opts"] + want):
        args = demo.parse_args(["--run", "o"] + argv)
        assert (args.input, args.opts, args.output) == (["a.png", "b.png"], want, "d"), argv


def test_demo_draws_and_lists_detections(reference_run, tmp_path):
    out, _ = reference_run
    _, dicts = _test_dicts(out)
    demo = _tool("demo")
    args = demo.get_parser().parse_args(["--run", out, "--task", "1", "--input", dicts[0]["file_name"],
                                         dicts[1]["file_name"], "--output", str(tmp_path), "--confidence-threshold",
                                         "0.0"])
    assert run_cli(lambda: demo.main(args)) == 0
    with open(tmp_path / "detections.json") as f:
        rec = json.load(f)
    assert rec["task"] == 1 and len(rec["class_names"]) == 10
    for d in dicts[:2]:
        name = os.path.splitext(os.path.basename(d["file_name"]))[0] + ".png"
        drawn = np.asarray(__import__("PIL.Image").Image.open(tmp_path / name).convert("RGB"))
        orig = np.asarray(__import__("PIL.Image").Image.open(d["file_name"]).convert("RGB"))
        dets = rec["images"][d["file_name"]]
        ref = [r for r in _results(out, 1) if r["image_id"] == d["image_id"]]
        assert len(dets) == len(ref) > 0
        assert drawn.shape == orig.shape and (drawn != orig).any(), "boxes are drawn on the image"


# -- 3. exported detections -----------------------------------------------------------------------------
def test_results_json_reevaluates_to_the_stage_ap(reference_run):
    from pycocotools.coco import COCO

    from clcl_det.evaluation import PascalVOCEvaluator

    out, _ = reference_run
    split, dicts = _test_dicts(out)
    for t in (1, 2):
        results = _results(out, t)
        # pycocotools reads it against the ground truth of the test images
        gt = COCO()
        gt.dataset = {"images": [{"id": d["image_id"], "height": d["height"], "width": d["width"]} for d in dicts],
                      "categories": [{"id": i, "name": n} for i, n in enumerate(split.class_names)],
                      "annotations": [{"id": k, "image_id": d["image_id"], "category_id": a["category_id"],
                                       "bbox": a["bbox"], "area": 1.0, "iscrowd": 0}
                                      for k, (d, a) in enumerate((d, a) for d in dicts for a in d["annotations"])]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            dt = gt.loadRes(results)
        assert len(dt.getAnnIds()) == len(results)
        # re-evaluated from the file alone, the VOC AP of each class is metrics.json's
        seen = list(range(split.task(t - 1).num_seen))
        ev = PascalVOCEvaluator(dicts, split.class_names, seen)
        by_image = {d["image_id"]: [] for d in dicts}
        for r in results:
            by_image[r["image_id"]].append(r)
        inputs = [{"image_id": i} for i in by_image]
        outputs = [{"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rs)]).reshape(-1, 4),
                    "scores": torch.tensor([r["score"] for r in rs]),
                    "labels": torch.tensor([r["category_id"] for r in rs], dtype=torch.long)}
                   for rs in by_image.values()]
        ev.process(inputs, outputs)
        res = ev.evaluate()["bbox"]["per_class"]
        with open(os.path.join(out, f"task_{t}", "metrics.json")) as f:
            metrics = json.load(f)
        for name, v in metrics["per_class"].items():  # NaN (no ground truth) is null in metrics.json
            assert res[name]["AP50"] == pytest.approx(float("nan") if v["AP50"] is None else v["AP50"], nan_ok=True)


def test_coco_evaluator_results_json_gives_the_same_ap(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from clcl_det.evaluation import COCOEvaluator

    rng = np.random.default_rng(0)
    dicts, inputs, outputs = [], [], []
    for i in range(6):
        xy = rng.uniform(0, 60, (3, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (3, 2))], 1)
        labels = rng.integers(0, 3, 3)
        dicts.append({"image_id": 100 + i, "height": 100, "width": 100,
                      "annotations": [{"bbox": b.tolist(), "category_id": int(c)} for b, c in zip(boxes, labels)]})
        noisy = boxes + rng.normal(0, 3, boxes.shape)
        inputs.append({"image_id": 100 + i})
        outputs.append({"boxes": torch.tensor(noisy), "scores": torch.tensor(rng.uniform(0.1, 1, 3)),
                        "labels": torch.tensor(labels)})
    ev = COCOEvaluator(dicts, ["a", "b", "c"], output_dir=str(tmp_path))
    ev.process(inputs, outputs)
    ap = ev.evaluate()["bbox"]["AP"]
    gt = COCO()
    gt.dataset = {"images": [{"id": d["image_id"], "height": 100, "width": 100} for d in dicts],
                  "categories": [{"id": i} for i in range(3)],
                  "annotations": [{"id": k + 1, "image_id": d["image_id"], "category_id": a["category_id"],
                                   "bbox": [a["bbox"][0], a["bbox"][1], a["bbox"][2] - a["bbox"][0],
                                            a["bbox"][3] - a["bbox"][1]],
                                   "area": (a["bbox"][2] - a["bbox"][0]) * (a["bbox"][3] - a["bbox"][1]), "iscrowd": 0}
                                  for k, (d, a) in enumerate((d, a) for d in dicts for a in d["annotations"])]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(str(tmp_path / "coco_instances_results.json"))
        e = COCOeval(gt, dt, "bbox")
        e.evaluate(), e.accumulate(), e.summarize()
    assert ap == pytest.approx(e.stats[0] * 100)


# -- 4. logging: TensorBoard, hooks, EVAL_PERIOD ------------------------------------------------------------
def test_event_files_hold_the_stage_scalars(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary = reference_run
    acc = EventAccumulator(out)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"lr", "total_loss", "loss/loss_cls", "stage/mAP@A", "stage/mAP@B", "stage/mAP@N"} <= set(tags)
    for key in ("mAP@A", "mAP@B", "mAP@N"):
        got = {e.step: e.value for e in acc.Scalars(f"stage/{key}")}
        for t in (1, 2):
            with open(os.path.join(out, f"task_{t}", "metrics.json")) as f:
                want = json.load(f)["summary"].get(key)  # task 1 has no old classes: no mAP@B
            assert (t in got) == isinstance(want, float)
            if isinstance(want, float):
                assert got[t] == pytest.approx(want, rel=1e-6)
    # losses on one step axis over the run: task 2's last iteration is step 2 * MAX_ITER
    assert max(e.step for e in acc.Scalars("lr")) == 8
    lines = [json.loads(x) for x in open(os.path.join(out, "task_2", "train_metrics.jsonl"))]
    assert lines[-1]["task"] == 2 and lines[-1]["iteration"] == 3 and "loss_cls" in lines[-1]
    log = open(os.path.join(out, "log.txt")).read()
    # the evaluation knows its length (12 test images / 4 per batch), so its progress has an ETA
    assert "Start inference on 3 batches" in log and "unknown number" not in log
    assert "run_eta: " in log  # task 1's log lines: the ETA of the whole run


class _Toy(nn.Module):
    """loss = mean over the batch of (w.x - y)^2: a batch of 2b is the mean of two batches of b."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.dead = nn.Linear(3, 1)  # never used: no gradient
        self.dtypes = []

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, batch):
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        pred = self.lin(x)
        self.dtypes.append(pred.dtype)
        return {"loss_mse": ((pred.float().squeeze(1) - y) ** 2).mean()}


def _toy_data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return [(x[i], x[i].sum() + 0.1 * torch.randn((), generator=g)) for i in range(n)]


def _train_toy(tmp_path, accum, per_batch, amp=False, dtype="float16", hooks=()):
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER", "6", "SOLVER.ACCUM_STEPS", str(accum), "SOLVER.AMP", str(amp),
                         "SOLVER.AMP_DTYPE", dtype, "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "1000",
                         "SOLVER.LOG_PERIOD", "3", "SOLVER.BASE_LR", "0.05", "SOLVER.CLIP_GRAD_NORM", "0"])
    data = _toy_data()
    torch.manual_seed(0)
    model = _Toy()

    def data_fn(start):
        i = start * accum
        while True:
            yield data[(i * per_batch) % len(data):(i * per_batch) % len(data) + per_batch]
            i += 1

    tr = TaskTrainer(cfg, model, data_fn, str(tmp_path / f"t{accum}_{per_batch}_{dtype}_{amp}"), hooks=list(hooks))
    tr.train()
    return model, tr


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    big, _ = _train_toy(tmp_path, accum=1, per_batch=8)
    acc, tr = _train_toy(tmp_path, accum=2, per_batch=4)
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(acc.dtypes) == 12  # 6 iterations x 2 micro-batches


def test_train_loader_micro_batches_are_the_big_batch(shapes_root):
    from clcl_det.data import build_train_loader, get_detection_dataset_dicts
    from clcl_det.engine import prepare_embedded_assets

    cfg = tiny_cfg()
    prepare_embedded_assets(cfg)
    dicts = get_detection_dataset_dicts(["shapes_train"])
    big = iter(build_train_loader(cfg, dicts, start_iter=1))
    cfg.merge_from_list(["SOLVER.ACCUM_STEPS", "2"])
    small = iter(build_train_loader(cfg, dicts, start_iter=1))
    for _ in range(2):
        b = next(big)
        s = next(small) + next(small)
        assert [(x["image_id"], x["seed"]) for x in b] == [(x["image_id"], x["seed"]) for x in s]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(b, s))


def test_bf16_autocast_on_cpu_is_close_to_fp32(tmp_path):
    ref, _ = _train_toy(tmp_path, accum=1, per_batch=8)
    bf, tr = _train_toy(tmp_path, accum=1, per_batch=8, amp=True, dtype="bfloat16")
    assert tr.use_amp and set(bf.dtypes) == {torch.bfloat16}
    for a, b in zip(ref.parameters(), bf.parameters()):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)
    fp16, tr = _train_toy(tmp_path, accum=1, per_batch=8, amp=True, dtype="float16")
    assert not tr.use_amp and set(fp16.dtypes) == {torch.float32}, "fp16 autocast is CUDA-only"


def test_hooks_are_called_around_every_step(tmp_path):
    calls = []

    class Rec(HookBase):
        def before_step(self):
            calls.append(("before", self.trainer.iter))

        def after_step(self):
            calls.append(("after", self.trainer.iter, round(self.trainer.latest["loss_mse"], 6)))

    _, tr = _train_toy(tmp_path, accum=1, per_batch=8, hooks=[Rec(), lambda it: calls.append(("fn", it))])
    assert [c[:2] for c in calls] == [x for it in range(6) for x in (("before", it), ("after", it), ("fn", it))]
    assert calls[-2][2] == round(tr.history["loss_mse"].latest(), 6)


def test_logged_times_are_medians_over_the_log_window(tmp_path):
    """time and data_time on a log line are medians over its LOG_PERIOD iterations, not the value
    of the iteration that happens to print: two slow batch loads out of three show."""
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER", "6", "SOLVER.LOG_PERIOD", "3", "SOLVER.WARMUP_ITERS", "2",
                         "SOLVER.CHECKPOINT_PERIOD", "1000"])
    data = _toy_data()

    def data_fn(start):
        for i in itertools.count(start):
            if i in (3, 4):  # the last window's batches 3 and 4 load slowly, batch 5 fast
                time.sleep(0.2)
            yield data[(8 * i) % len(data):(8 * i) % len(data) + 8]

    torch.manual_seed(0)
    tr = TaskTrainer(cfg, _Toy(), data_fn, str(tmp_path / "t"))
    tr.train()
    lines = [json.loads(x) for x in open(os.path.join(tr.output_dir, "train_metrics.jsonl"))]
    assert [x["iteration"] for x in lines] == [0, 2, 5]
    assert lines[1]["data_time"] < 0.1 and 0.2 <= lines[2]["data_time"] <= lines[2]["time"]


def test_find_unused_parameters_probe():
    model = _Toy()
    rng = torch.get_rng_state()
    assert unused_parameters(model, _toy_data(4)) == ["dead.weight", "dead.bias"]
    assert all(p.grad is None for p in model.parameters())
    # under autocast like a training step (bf16 here), the RNG state restored
    assert unused_parameters(model, _toy_data(4), torch.bfloat16) == ["dead.weight", "dead.bias"]
    assert model.dtypes == [torch.float32, torch.bfloat16] and torch.equal(torch.get_rng_state(), rng)


def test_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    """The fp16 loss scale and its growth tracker are saved with the periodic checkpoint and
    restored on resume (a resume that restarted the scale would skip steps to find it again);
    a checkpoint without scaling leaves a fresh scaler as it is."""
    model, tr = _train_toy(tmp_path, accum=1, per_batch=8)
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 7)  # fp16 scaling, as on a GPU
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tr.scaler.scale(model(_toy_data(4))["loss_mse"]).backward()
    tr.scaler.step(opt)
    tr.scaler.update()  # a finite step: the growth tracker counts it
    path = tr.checkpointer.save("model_0000004", iteration=4)
    fresh = TaskTrainer(tr.cfg, model, lambda s: iter(()), tr.output_dir)
    fresh.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    fresh.resume(path)
    assert fresh.start_iter == 5
    assert fresh.scaler.get_scale() == 2.0 ** 7 and fresh.scaler.state_dict()["_growth_tracker"] == 1
    _, off = _train_toy(tmp_path / "off", accum=1, per_batch=8)  # fp32: an empty scaler state
    off_path = off.checkpointer.save("model_0000004", iteration=4)
    assert load_checkpoint_file(off_path)["scaler"] == {}
    fresh.resume(off_path)
    assert fresh.scaler.get_scale() == 2.0 ** 7


def test_schedule_scales_with_the_batch():
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.REFERENCE_BATCH", "16", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.SCALE_SCHEDULE", "True",
                         "SOLVER.MAX_ITER", "1000", "SOLVER.WARMUP_ITERS", "50", "SOLVER.STEPS", "(0.5, 800)",
                         "SOLVER.CHECKPOINT_PERIOD", "500", "SOLVER.BASE_LR", "0.001"])
    auto_scale_schedule(cfg)
    s = cfg.SOLVER  # a quarter of the batch: four times the iterations, a quarter of the lr
    assert (s.MAX_ITER, s.WARMUP_ITERS, tuple(s.STEPS), s.CHECKPOINT_PERIOD) == (4000, 200, (0.5, 3200), 2000)
    assert build_optimizer(cfg, nn.Linear(2, 2)).param_groups[0]["lr"] == pytest.approx(0.00025)
    auto_scale_schedule(cfg)
    assert s.MAX_ITER == 4000, "applied once"


# -- 5. weights -------------------------------------------------------------------------------------------
def test_start_task_from_another_runs_weights(reference_run, tmp_path):
    out, _ = reference_run
    w1 = os.path.join(out, "task_1", "model_final.pth")
    new = str(tmp_path / "from_task1")
    run_tiny(tiny_cfg(new, DETERMINISTIC="True", **{"MODEL.WEIGHTS": w1, "CONTINUAL.START_TASK": "2"}))
    assert not os.path.exists(os.path.join(new, "task_1"))
    assert same_state(final_state(out), final_state(new)), "task 2 from task 1's weights = the uninterrupted run"
    with open(os.path.join(new, "task_2", "metrics.json")) as f, open(os.path.join(out, "task_2", "metrics.json")) as g:
        assert json.load(f)["per_class"] == json.load(g)["per_class"]


@pytest.mark.parametrize("opts,match", [
    ({"MODEL.WEIGHTS": "/nope/model_final.pth"}, "MODEL.WEIGHTS '/nope/model_final.pth' does not exist"),
    ({"MODEL.WEIGHTS": "task_1", "CONTINUAL.START_TASK": "3"}, "it starts task 2, not CONTINUAL.START_TASK 3"),
    ({"MODEL.WEIGHTS": "task_2"}, "no task is left to train"),
    ({"MODEL.WEIGHTS": "task_1", "CONTINUAL.TASKS": "15+5"}, "belongs to split 10\\+10"),
    ({"CONTINUAL.START_TASK": "2"}, "needs MODEL.WEIGHTS"),
])
def test_weights_are_used_or_refused_in_one_line(reference_run, tmp_path, opts, match):
    from clcl_det.continual import ContinualRunner

    out, _ = reference_run
    if opts.get("MODEL.WEIGHTS", "").startswith("task_"):
        opts = dict(opts, **{"MODEL.WEIGHTS": os.path.join(out, opts["MODEL.WEIGHTS"], "model_final.pth")})
    cfg = tiny_cfg(str(tmp_path / "x"), **opts)
    cfg.freeze()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_cli(lambda: ContinualRunner(cfg).run()) == 2
    assert len(err.getvalue().strip().splitlines()) == 1
    assert __import__("re").search(match, err.getvalue())


# -- 6. one-line errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,match", [
    (["DATASETS.TRAIN", "('shapes_trian',)"], "DATASETS.TRAIN: dataset 'shapes_trian' is not registered; did you "
                                              "mean 'shapes_train'"),
    (["MODEL.CLIP.PRETRAINED", "/nope/clip.pt"], "MODEL.CLIP.PRETRAINED: checkpoint file '/nope/clip.pt' does not exist"),
    (["MODEL.CLIP.ARCH", "ViT-B-61"], "MODEL.CLIP.ARCH 'ViT-B-61' is not an open_clip architecture; closest: ViT-B-16"),
    (["MODEL.DEVICE", "cuda"], "MODEL.DEVICE 'cuda': no CUDA GPU"),
    (["SOLVER.MAX_ITR=5"], "Unknown config key 'SOLVER.MAX_ITR' (command-line override); did you mean "
                           "'SOLVER.MAX_ITER'"),
])
def test_user_errors_print_one_line_and_exit_2(shapes_root, tmp_path, opts, match, monkeypatch):
    if opts[0] == "MODEL.DEVICE" and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train_net = _tool("train_net")
    args = train_net.default_argument_parser().parse_args([*_TINY, "OUTPUT_DIR", str(tmp_path / "o"), *opts])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_cli(lambda: train_net.main(args)) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and match in lines[0], lines


_TINY = ["MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES", "simple", "DATASETS.SHAPES.NUM_TRAIN", "24", "DATASETS.SHAPES.NUM_TEST", "12",
         "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2"]


def test_overrides_config_paths_and_coco_registration(tmp_path):
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER=7", "OUTPUT_DIR", "a=b", "SOLVER.BASE_LR", "0.5"])
    assert (cfg.SOLVER.MAX_ITER, cfg.OUTPUT_DIR, cfg.SOLVER.BASE_LR) == (7, "a=b", 0.5)
    with pytest.raises(ConfigError) as e:
        resolve_config_path("configs/clclp/clclip_shapes_10+10.yaml")
    assert "did you mean 'configs/clclip/clclip_shapes_10+10.yaml'" in str(e.value) and "ambiguous" not in str(e.value)
    assert resolve_config_path("configs/clclip/clclip_shapes_10+10.yaml").endswith("clclip_shapes_10+10.yaml")

    from clcl_det.data import DatasetCatalog, MetadataCatalog
    from clcl_det.data.datasets import register_coco_instances

    js = tmp_path / "a.json"
    js.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "height": 10, "width": 10}],
                              "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 3, 3],
                                               "iscrowd": 0}],
                              "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]}))
    register_coco_instances("i15_d2", {"source": "test"}, str(js), str(tmp_path))  # detectron2's signature
    register_coco_instances("i15_ours", str(js), str(tmp_path), class_names=["cat", "dog"])
    try:
        assert MetadataCatalog.get("i15_d2").thing_classes == ["cat", "dog"]
        assert MetadataCatalog.get("i15_d2").source == "test"
        assert MetadataCatalog.get("i15_d2").evaluator_type == "coco"
        assert DatasetCatalog.get("i15_d2")[0]["annotations"][0]["category_id"] == 0
        assert DatasetCatalog.get("i15_ours")[0]["annotations"][0]["category_id"] == 0
        assert MetadataCatalog.get("i15_ours").thing_classes == ["cat", "dog"]
    finally:
        for n in ("i15_d2", "i15_ours"):
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)


def test_eval_period_evaluates_inside_a_task(reference_run, tmp_path):
    from types import SimpleNamespace

    from clcl_det.continual import ContinualRunner
    from clcl_det.engine import setup_cfg
    from clcl_det.engine.hooks import PeriodicEvaluation, build_hooks

    out, _ = reference_run
    cfg = setup_cfg(os.path.join(out, "config.yaml"), ["OUTPUT_DIR", str(tmp_path), "TEST.EVAL_PERIOD", "2"])
    runner = ContinualRunner(cfg)
    seen = []

    class Rec(HookBase):
        def after_evaluation(self, task, stage, tag):
            seen.append((task.index, tag, stage["summary"]["mAP@A"]))

    runner.register_hooks([Rec()])
    hook = next(h for h in runner.hooks if isinstance(h, PeriodicEvaluation))
    assert [type(h).__name__ for h in build_hooks(cfg)] == ["TensorBoardWriter", "PeriodicEvaluation"]
    model = runner.load_task_model(0, os.path.join(out, "task_1", "model_final.pth"))
    hook.trainer = SimpleNamespace(iter=0, max_iter=4, task_index=0, model=model)
    hook.after_step()  # iteration 1: not a multiple of the period
    hook.trainer.iter = 1
    hook.after_step()  # iteration 2: evaluated
    hook.trainer.iter = 3
    hook.after_step()  # the task's last iteration: left to the stage evaluation
    with open(tmp_path / "task_1" / "eval_iter_2" / "metrics.json") as f:
        m = json.load(f)
    with open(os.path.join(out, "task_1", "metrics.json")) as f:
        ref = json.load(f)  # the same weights (task 1's final model): the same seen-class APs
    assert m["per_class"] == ref["per_class"] and not m["zero_shot"]
    assert seen == [(0, "iter_2", m["summary"]["mAP@A"])]
    assert os.path.isfile(tmp_path / "task_1" / "eval_iter_2" / "coco_instances_results.json")

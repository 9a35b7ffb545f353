"""Distributed training on CPU (gloo): 2 processes x b images agree with 1 process x 2b, and a
2-process run through tools/train_net.py imports plugins in every worker."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from clcl_det.engine import launch

from conftest import tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 2  # the 2nd iteration runs an EMA step of SE-VPR on prototypes the 1st set
TOL = dict(rtol=1e-4, atol=1e-6)  # float32 reductions in another order


# every classification-head config shipped (and CL-CLIP's multi-expert RoI head), task 1 of 10+10
HEADS = {
    "fvit": [],
    "clclip": ["MODEL.ROI_HEADS.NAME", "MultiExpertRoIHeads", "MODEL.CONTINUAL_LOSSES", "['FPNDrift', 'Orthogonality']",
               "MODEL.CLCLIP.MULTI_EXPERT.EXPERT_DIM", "4"],
    "sevpr": ["MODEL.CLS_HEAD.NAME", "SemanticPrototypeHead"],  # running prototypes updated in losses
    "replay": ["MODEL.CLS_HEAD.NAME", "GaussianReplay"],
    "secapp": ["MODEL.CLS_HEAD.NAME", "GaussianReplay", "MODEL.REPLAY.INNER_HEAD", "SemanticPrototypeHead"],
    "spa": ["MODEL.CLS_HEAD.NAME", "GaussianReplay", "MODEL.REPLAY.INNER_HEAD", "SPAHead", "MODEL.SPA.DESCRIPTIONS",
            "shapes", "MODEL.SPA.TOPK", "3", "MODEL.SPA.POOLER_RESOLUTION", "4", "MODEL.SPA.NUM_PATCHES", "4"],
}


def _train(name, opts, out_dir):
    from clcl_det.continual import ContinualRunner
    from clcl_det.data import build_train_loader
    from clcl_det.engine import TaskTrainer, default_setup
    from clcl_det.utils import comm

    cfg = tiny_cfg(out_dir)
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", str(ITERS), "SOLVER.LOG_PERIOD", "1",
                         "SOLVER.CHECKPOINT_PERIOD", "100", "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "1e-2",
                         # SGD: a parameter moves by lr x its gradient, so the check is on the all-reduced
                         # gradients. (Adam moves a weight whose gradient is ~0 by ~lr x sign(noise): 1 vs 2
                         # processes then differ by ~lr on such weights, with correct gradients.)
                         "SOLVER.OPTIMIZER", "SGD",
                         *opts])
    cfg.freeze()
    default_setup(cfg)
    runner = ContinualRunner(cfg)
    runner._begin_task(0)
    dicts = runner.split.task_train_dicts(runner.train_dicts(), 0)
    losses = []
    trainer = TaskTrainer(cfg, runner.model, lambda s: build_train_loader(cfg, dicts, task=0, start_iter=s),
                          os.path.join(out_dir, f"{name}_w{comm.get_world_size()}"),
                          hooks=[lambda it: losses.append({k: h.latest() for k, h in trainer.history.items()})])
    trainer.train()
    state = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    return {"losses": losses, "state": state, "ranks": comm.all_gather(state)}


def _worker(heads, out_file):
    from clcl_det.utils import comm

    res = {name: _train(name, HEADS[name], os.path.dirname(out_file)) for name in heads}
    if comm.is_main_process():
        torch.save(res, out_file)


def test_two_processes_agree_with_one_for_every_head(shapes_root, tmp_path):
    """Losses, parameters and buffers (SE-VPR's running prototypes are updated inside `losses`) of
    2 processes x 2 images equal those of 1 process x 4, for every head config; every rank holds
    the same buffers."""
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    launch(_worker, 1, args=(list(HEADS), one))
    launch(_worker, 2, args=(list(HEADS), two))
    res_a, res_b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for name in HEADS:
        a, b = res_a[name], res_b[name]
        assert len(a["losses"]) == len(b["losses"]) == ITERS, name
        for la, lb in zip(a["losses"], b["losses"]):
            assert la.keys() == lb.keys(), name
            for k in la:
                assert la[k] == pytest.approx(lb[k], rel=1e-4, abs=1e-6), (name, k, la[k], lb[k])
        assert a["state"].keys() == b["state"].keys(), name
        for k in a["state"]:
            torch.testing.assert_close(a["state"][k], b["state"][k], **TOL, msg=f"{name}: {k}")
        r0, r1 = b["ranks"]
        for k in r0:
            assert torch.equal(r0[k], r1[k]), f"{name}: {k} differs between ranks"
        # the model did move: agreement is not the trivial one of an untouched model
        assert any(la["loss_cls"] != a["losses"][0]["loss_cls"] for la in a["losses"][1:]), name
    for name in ("sevpr", "secapp"):  # the running means did run: prototypes of several batches
        counts = [v for k, v in res_a[name]["state"].items() if k.endswith("proto_counts")][0]
        assert counts.sum() > 0, (name, counts)


PLUGIN = textwrap.dedent('''
    import os
    from clcl_det.modeling import CLS_HEAD_REGISTRY
    from clcl_det.modeling.cls_heads.text_classifier import TextClassifier

    open(os.path.join(os.environ["PLUGIN_MARKS"], str(os.getpid())), "w").close()

    @CLS_HEAD_REGISTRY.register()
    class MarkedTextClassifier(TextClassifier):
        pass
''')


def test_cli_two_processes_with_plugin(shapes_root, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "marked.py").write_text(PLUGIN)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config", "fvit/finetune_shapes_10+10.yaml",
           "--num-gpus", "2", "--plugin", str(tmp_path / "marked.py"),
           "MODEL.CLS_HEAD.NAME", "MarkedTextClassifier", "MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES", "simple",
           "DATASETS.SHAPES.NUM_TRAIN", "24", "DATASETS.SHAPES.NUM_TEST", "12", "SOLVER.MAX_ITER", "2",
           "SOLVER.IMS_PER_BATCH", "4", "TEST.ZERO_SHOT", "False", "OUTPUT_DIR", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                       env={**os.environ, "PLUGIN_MARKS": str(marks)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(os.listdir(marks)) >= 2, "the plugin must be imported in every worker process"
    assert os.path.isfile(out / "task_2" / "metrics.json") and os.path.isfile(out / "log.txt.rank1")
    assert "summary of 2 stage(s)" in r.stdout


def _nan_worker(out_dir):
    """Rank 1's loss turns NaN at iteration 1; every rank records the error it stops with."""
    import json
    import time

    from clcl_det.utils import comm

    rank = comm.get_rank()
    cfg = tiny_cfg(out_dir)
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100"])
    from clcl_det.continual import ContinualRunner
    from clcl_det.data import build_train_loader
    from clcl_det.engine import TaskTrainer, default_setup

    cfg.freeze()
    default_setup(cfg)
    runner = ContinualRunner(cfg)
    runner._begin_task(0)
    dicts = runner.split.task_train_dicts(runner.train_dicts(), 0)
    calls = {"n": 0}

    def poison(module, inputs, losses):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:  # the probe's forward, iteration 0, then iteration 1
            losses = {k: v * float("nan") if k == "loss_cls" else v for k, v in losses.items()}
        return losses

    runner.model.register_forward_hook(poison)
    trainer = TaskTrainer(cfg, runner.model, lambda s: build_train_loader(cfg, dicts, task=0, start_iter=s),
                          os.path.join(out_dir, "nan"))
    start = time.perf_counter()
    try:
        trainer.train()
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 - recorded for the test
        result = {"error": type(e).__name__, "message": str(e), "iter": trainer.iter}
    result["seconds"] = time.perf_counter() - start
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_non_finite_loss_on_one_rank_stops_every_rank(shapes_root, tmp_path):
    """A NaN on rank 1 only: both ranks raise the same NonFiniteLossError naming rank 1, at the same
    iteration, before any backward pass could leave rank 0 waiting in DDP's all-reduce."""
    import json

    launch(_nan_worker, 2, args=(str(tmp_path),))
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r in res:
        assert r["error"] == "NonFiniteLossError", r
        assert r["iter"] == 1 and "loss_cls" in r["message"] and "on rank 1" in r["message"], r
        assert "on rank 0" not in r["message"] and r["seconds"] < 60, r
    assert "loss_cls=nan on rank 1" in res[1]["message"]  # the rank that saw it gives the value

"""CL-CLIP: cost volume, grouped experts vs a per-class loop, expert freezing across tasks,
drift and orthogonality losses, resume into a task with a grown vocabulary."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from clcl_det.continual import ContinualRunner, begin_task, end_task
from clcl_det.data.continual import Task
from clcl_det.engine import default_setup
from clcl_det.modeling import build_model
from clcl_det.modeling.cost_volume import category_prior, cost_volume
from clcl_det.modeling.losses.build import LossInputs, TeacherOutputs
from clcl_det.modeling.losses.drift import FPNDrift
from clcl_det.modeling.losses.orthogonality import orthogonality_loss
from clcl_det.modeling.roi_heads.multi_expert import ExpertBank
from clcl_det.utils.checkpoint import load_checkpoint_file

from conftest import tiny_cfg

NAMES = tuple(f"class {i}" for i in range(20))


def clclip_cfg(out="", **kw):
    cfg = tiny_cfg(out, **kw)
    cfg.merge_from_list(["MODEL.ROI_HEADS.NAME", "MultiExpertRoIHeads",
                         "MODEL.CONTINUAL_LOSSES", "['FPNDrift', 'Orthogonality']", "MODEL.CLCLIP.MULTI_EXPERT.EXPERT_DIM", "4"])
    return cfg


def test_cost_volume_brute_force():
    torch.manual_seed(0)
    V = F.normalize(torch.randn(2, 8, 3, 4), dim=1)
    T = F.normalize(torch.randn(5, 8), dim=1)
    C = cost_volume(V, T)
    for b in range(2):
        for y in range(3):
            for x in range(4):
                for k in range(5):
                    assert abs(float(C[b, k, y, x]) - float(torch.dot(V[b, :, y, x], T[k]))) < 1e-6
    bg = F.normalize(torch.randn(8), dim=0)
    P = category_prior(V, T, bg, temperature=0.5, norm="softmax")
    ref = torch.cat([C, cost_volume(V, bg[None])], 1).div(0.5).softmax(1)
    torch.testing.assert_close(P, ref)
    torch.testing.assert_close(P.sum(1), torch.ones(2, 3, 4))


@pytest.mark.parametrize("topk", [0, 2])
def test_grouped_experts_equal_per_class_loop(topk):
    torch.manual_seed(0)
    bank = ExpertBank(in_channels=6, expert_dim=3, embed_dim=5, temperature=10.0)
    bank.add(3)
    bank.add(2)  # a second task's chunk
    K, R = 5, 4
    x_all = torch.randn(R, K, 6, 7, 7)
    idx = None if topk == 0 else torch.stack([torch.randperm(K)[:topk] for _ in range(R)])
    x = x_all if idx is None else x_all.gather(1, idx[:, :, None, None, None].expand(-1, -1, 6, 7, 7))
    z, act, scale = bank(x, idx)
    # reference: a python loop over RoIs and their classes with each expert's own weights
    experts = [(c, i) for c in bank.chunks for i in range(c.n)]
    for r in range(R):
        classes = range(K) if idx is None else idx[r].tolist()
        for s, k in enumerate(classes):
            c, i = experts[k]
            E = bank.expert_dim
            h = F.relu(F.conv2d(x[r, s][None], c.w1[i * E:(i + 1) * E], c.b1[i * E:(i + 1) * E], padding=1))
            a = h.mean(1).flatten()
            h = F.relu(F.conv2d(h, c.w2[i * E:(i + 1) * E], c.b2[i * E:(i + 1) * E], padding=1)).mean((2, 3))[0]
            ref = h @ c.fc_w[i] + c.fc_b[i]
            torch.testing.assert_close(z[r, s], ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(act[r, s], a, rtol=1e-4, atol=1e-5)
            assert float(scale[r, s].detach()) == pytest.approx(float(c.logit_scale[i].exp()))
    if idx is None:  # an earlier vocabulary (the first task's 3 classes) uses the first 3 experts
        z3, act3, scale3 = bank(x_all[:, :3], None)
        torch.testing.assert_close(z3, z[:, :3]), torch.testing.assert_close(act3, act[:, :3])
        torch.testing.assert_close(scale3, scale[:, :3])


def test_orthogonality_disjoint_and_identical():
    disjoint = torch.zeros(3, 4, 49)
    for k in range(4):
        disjoint[:, k, k * 10:(k + 1) * 10] = 1.0
    assert float(orthogonality_loss(F.normalize(disjoint, dim=-1))) == 0.0
    same = F.normalize(torch.rand(3, 1, 49).expand(3, 4, 49), dim=-1)
    assert float(orthogonality_loss(same)) == pytest.approx(1.0, abs=1e-6)
    mixed = F.normalize(torch.rand(3, 4, 49), dim=-1)
    assert 0.0 < float(orthogonality_loss(mixed)) < 1.0


def _batch(n=2):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=g),
             "boxes": torch.tensor([[8.0, 10.0, 60.0, 50.0]]), "classes": torch.tensor([0]), "seed": i,
             "height": 128, "width": 128} for i in range(n)]


def test_drift_zero_for_identical_teacher_and_grows_with_perturbation():
    torch.manual_seed(0)
    model = build_model(clclip_cfg())
    begin_task(model, Task(0, 0, 10, NAMES[:10], NAMES))
    model.train()
    teacher = copy.deepcopy(model).eval()
    assert teacher.clip is model.clip, "teachers share the frozen CLIP"
    drift = {"feature": FPNDrift(mode="feature", weight=1.0), "param": FPNDrift(mode="param", weight=1.0)}
    values = {}
    for eps in (0.0, 1e-3, 1e-2):
        with torch.no_grad():
            for p_s, p_t in zip(model.backbone.parameters(), teacher.backbone.parameters()):
                p_s.copy_(p_t + eps * torch.randn_like(p_t))
        images = model.preprocess(_batch())
        outputs = LossInputs(backbone=model.backbone(images.tensors), ctx=None, rpn={}, roi={})
        values[eps] = {m: float(d(model, outputs, [], TeacherOutputs(teacher, outputs))["loss_drift"])
                       for m, d in drift.items()}
    for m in drift:
        assert values[0.0][m] == 0.0
        assert 0.0 < values[1e-3][m] < values[1e-2][m]


@pytest.fixture(scope="module")
def clclip_run(shapes_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clclip") / "run")
    cfg = clclip_cfg(out)
    cfg.freeze()
    default_setup(cfg)
    runner = ContinualRunner(cfg)
    runner.run()
    return out, runner


def test_old_experts_bit_identical_after_next_task(clclip_run):
    out, runner = clclip_run
    after_t1 = load_checkpoint_file(os.path.join(out, "task_1", "model_final.pth"))["model"]
    after_t2 = load_checkpoint_file(os.path.join(out, "task_2", "model_final.pth"))["model"]
    chunk0 = [k for k in after_t1 if k.startswith("roi_heads.experts.chunks.0.")]
    assert len(chunk0) == 7
    for k in chunk0:
        assert torch.equal(after_t1[k], after_t2[k]), f"{k} changed while training task 2"
    assert not any(k.startswith("roi_heads.experts.chunks.1.") for k in after_t1)
    # the shared branch did train in task 2, and the new chunk exists
    assert not torch.equal(after_t1["roi_heads.embed.weight"], after_t2["roi_heads.embed.weight"])
    assert after_t2["roi_heads.experts.chunks.1.fc_w"].shape[0] == 10
    head = runner.model.roi_heads
    assert all(not p.requires_grad for c in head.experts.chunks for p in c.parameters())


def test_task1_checkpoint_resumes_into_task2_with_grown_vocabulary(clclip_run, tmp_path):
    import shutil

    out, _ = clclip_run
    b = str(tmp_path / "b")
    shutil.copytree(out, b)
    shutil.rmtree(os.path.join(b, "task_2"))
    cfg = clclip_cfg(b)
    cfg.freeze()
    default_setup(cfg)
    runner = ContinualRunner(cfg, resume=True)
    runner.run()
    model = runner.model
    assert model.class_names == list(runner.split.class_names) and model.roi_heads.experts.num_experts == 20
    ref = load_checkpoint_file(os.path.join(out, "task_2", "model_final.pth"))["model"]
    new = load_checkpoint_file(os.path.join(b, "task_2", "model_final.pth"))["model"]
    assert ref.keys() == new.keys()
    for k in ref:
        assert torch.equal(ref[k], new[k]), k


@pytest.mark.parametrize("topk", [0, 3])
def test_chunked_expert_inference_equals_one_pass(topk, monkeypatch):
    import clcl_det.modeling.roi_heads.multi_expert as me

    torch.manual_seed(0)
    cfg = clclip_cfg(**{"MODEL.CLCLIP.MULTI_EXPERT.TOPK": topk, "INPUT.IMAGE_SIZE": 64})
    model = build_model(cfg).eval()
    begin_task(model, Task(0, 0, 6, NAMES[:6], NAMES[:6]))
    images = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}
              for _ in range(2)]
    with torch.no_grad():
        one = model(images)
        monkeypatch.setattr(me, "_MAX_PATHWAY_ELEMENTS", 1)  # one RoI per chunk
        chunked = model(images)
    for a, b in zip(one, chunked):
        assert len(a["boxes"]) > 0
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[k], b[k])


def test_unbiased_background_loss_matches_probability_sums():
    """Background RoIs: -log(p_bg + sum of old p_k); labelled RoIs: plain CE; 0 old = plain CE."""
    from clcl_det.modeling.cls_heads.build import unbiased_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(6, 8) * 3  # 7 classes + background
    logits[2, 1] = float("-inf")  # a class cut by per-RoI top-k
    labels = torch.tensor([7, 7, 5, 0, 7, 6])
    p = logits.softmax(dim=1)
    ref = []
    for r in range(6):
        if labels[r] == 7:
            ref.append(-torch.log(p[r, 7] + p[r, :3].sum()))
        else:
            ref.append(-torch.log(p[r, labels[r]]))
    torch.testing.assert_close(unbiased_cross_entropy(logits, labels, 3), torch.stack(ref).mean())
    torch.testing.assert_close(unbiased_cross_entropy(logits, labels, 0), F.cross_entropy(logits, labels))


def test_unbiased_background_reaches_the_loss_only_after_task_1():
    """MODEL.ROI_HEADS.UNBIASED_BACKGROUND: task 1 trains plain CE; task 2 absorbs its old classes."""
    cfg = clclip_cfg(**{"MODEL.ROI_HEADS.UNBIASED_BACKGROUND": "True", "INPUT.IMAGE_SIZE": "64"})
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = []
    head = model.roi_heads.cls_head
    orig = head.losses
    head.losses = lambda logits, labels, x, ctx: (seen.append(ctx.background_absorbs), orig(logits, labels, x, ctx))[1]
    g = torch.Generator().manual_seed(0)
    for t, task in enumerate([Task(0, 0, 10, NAMES[:10], NAMES), Task(1, 10, 20, NAMES, NAMES)]):
        begin_task(model, task)
        model.train()
        batch = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g),
                  "boxes": torch.tensor([[4.0, 5.0, 30.0, 25.0]]), "classes": torch.tensor([task.start]), "seed": t}]
        model(batch)
        end_task(model, task)
    assert seen == [0, 10]


def test_unbiased_distillation_matches_per_roi_loop():
    from clcl_det.modeling.losses.distillation import unbiased_logit_distillation
    g = torch.Generator().manual_seed(0)
    k_old, k_new, T = 3, 2, 2.0
    student = torch.randn(6, k_old + k_new + 1, generator=g) * 3
    teacher = torch.randn(6, k_old + 1, generator=g) * 3
    ref = []
    for s, t in zip(student.tolist(), teacher.tolist()):  # by hand: probabilities, not log-sum-exp
        ps = [math.exp(v / T) for v in s]
        ps = [v / sum(ps) for v in ps]
        merged = ps[:k_old] + [sum(ps[k_old:])]  # new classes + background = "background"
        qs = [math.exp(v / T) for v in t]
        qs = [v / sum(qs) for v in qs]
        ref.append(sum(q * math.log(q / p) for q, p in zip(qs, merged)))
    got = unbiased_logit_distillation(student, teacher, T)
    assert got.item() == pytest.approx(sum(ref) / len(ref) * T * T, rel=1e-5)
    # a new object the teacher calls background costs nothing when the student calls it new ...
    t_bg = torch.tensor([[-5.0, -5.0, -5.0, 5.0]])
    s_new = torch.tensor([[-5.0, -5.0, -5.0, 5.0, -30.0, -30.0]])  # mass on new class 3, not on bg (5)
    assert unbiased_logit_distillation(s_new, t_bg).item() < 1e-6
    # ... and calling an old object (teacher: class 0) new or background costs a lot
    t_old = torch.tensor([[5.0, -5.0, -5.0, -5.0]])
    assert unbiased_logit_distillation(s_new, t_old).item() > 5.0

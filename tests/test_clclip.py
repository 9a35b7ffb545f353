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


@pytest.mark.parametrize("topk,pool,norm", [(0, 1, False), (2, 1, False), (0, 3, True), (2, 7, True)])
def test_grouped_experts_equal_per_class_loop(topk, pool, norm):
    torch.manual_seed(0)
    bank = ExpertBank(in_channels=6, expert_dim=3, embed_dim=5, temperature=10.0, pool_size=pool, norm=norm)
    bank.add(3)
    bank.add(2)  # a second task's chunk
    if norm:  # non-trivial affine parameters
        with torch.no_grad():
            for p in bank.parameters():
                if p.ndim == 1 and p.numel() == p.shape[0] and p.shape[0] % 3 == 0:
                    p.add_(0.3 * torch.randn_like(p))
    K, R = 5, 4
    x_all = torch.randn(R, K, 6, 7, 7)
    idx = None if topk == 0 else torch.stack([torch.randperm(K)[:topk] for _ in range(R)])
    x = x_all if idx is None else x_all.gather(1, idx[:, :, None, None, None].expand(-1, -1, 6, 7, 7))
    z, act, scale = bank(x, idx)
    # reference: a python loop over RoIs and their classes with each expert's own weights
    experts = [(c, i) for c in bank.chunks for i in range(c.n)]
    E = bank.expert_dim

    def gn(h, c, i, layer):  # layer norm of one expert's E x 7 x 7 block, then its per-channel affine
        if not norm:
            return h
        h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-5)
        w, b = getattr(c, f"g{layer}_w")[i * E:(i + 1) * E], getattr(c, f"g{layer}_b")[i * E:(i + 1) * E]
        return h * w[None, :, None, None] + b[None, :, None, None]

    for r in range(R):
        classes = range(K) if idx is None else idx[r].tolist()
        for s, k in enumerate(classes):
            c, i = experts[k]
            h = F.relu(gn(F.conv2d(x[r, s][None], c.w1[i * E:(i + 1) * E], c.b1[i * E:(i + 1) * E], padding=1), c, i, 1))
            a = h.mean(1).flatten()
            h = F.relu(gn(F.conv2d(h, c.w2[i * E:(i + 1) * E], c.b2[i * E:(i + 1) * E], padding=1), c, i, 2))[0]
            cells = [h[:, (7 * gy) // pool:-(-7 * (gy + 1) // pool), (7 * gx) // pool:-(-7 * (gx + 1) // pool)].mean((1, 2))
                     for gy in range(pool) for gx in range(pool)]  # adaptive average pooling, cell by cell
            feat = torch.stack(cells, dim=1).flatten()  # E x G*G, channel-major like a flatten of E x G x G
            ref = feat @ c.fc_w[i] + c.fc_b[i]
            torch.testing.assert_close(z[r, s], ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(act[r, s], a, rtol=1e-4, atol=1e-5)
            assert float(scale[r, s].detach()) == pytest.approx(float(c.logit_scale[i].detach().exp()))
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
    assert teacher.backbone.encoder is model.backbone.encoder and teacher.backbone.encoder.visual is model.clip.visual
    ptrs = lambda m: {t.data_ptr() for t in (*m.parameters(), *m.buffers())}  # noqa: E731
    assert ptrs(teacher.backbone.encoder) <= ptrs(model.clip), "the teacher allocated its own CLIP image tower"
    assert not ptrs(teacher) & ptrs(model), "the teacher's trainable part is its own copy"
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


def test_mechanism_old_experts_bit_identical_after_next_task(clclip_run):
    out, runner = clclip_run
    after_t1 = load_checkpoint_file(os.path.join(out, "task_1", "model_final.pth"))["model"]
    after_t2 = load_checkpoint_file(os.path.join(out, "task_2", "model_final.pth"))["model"]
    chunk0 = [k for k in after_t1 if k.startswith("roi_heads.experts.chunks.0.")]
    bg0 = [k for k in after_t1 if k.startswith("roi_heads.bg_experts.chunks.0.")]  # task 1's background expert
    assert len(chunk0) == 11 and len(bg0) == 11  # w1, b1, w2, b2, fc_w, fc_b, logit_scale, group norms g1/g2 w/b
    # the experts' trunk, the shared branch's box-head convs, frozen after task 1
    trunk = [k for k in after_t1 if k.startswith("roi_heads.box_head.convs.")]
    assert len(trunk) == 3  # the test config's one conv: conv weight, GN weight, GN bias
    for k in chunk0 + bg0 + trunk:
        assert torch.equal(after_t1[k], after_t2[k]), f"{k} changed while training task 2"
    assert not any(k.startswith("roi_heads.experts.chunks.1.") for k in after_t1)
    # the shared branch did train in task 2, and the new chunk exists
    assert not torch.equal(after_t1["roi_heads.embed.weight"], after_t2["roi_heads.embed.weight"])
    assert not torch.equal(after_t1["roi_heads.box_head.fcs.0.weight"], after_t2["roi_heads.box_head.fcs.0.weight"])
    assert after_t2["roi_heads.experts.chunks.1.fc_w"].shape[0] == 10
    assert after_t2["roi_heads.bg_experts.chunks.1.fc_w"].shape[0] == 1
    head = runner.model.roi_heads
    assert all(not p.requires_grad for bank in (head.experts, head.bg_experts) for c in bank.chunks
               for p in c.parameters())


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


def test_topk_experts_have_no_loop_over_classes(monkeypatch):
    """Per-RoI top-k classes: the same number of conv / matmul calls for 5 or 12 experts, and no
    host read of a class list (tolist, item, unique, nonzero) on the way."""
    calls = {"conv2d": 0, "baddbmm": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    def run(K):
        torch.manual_seed(0)
        bank = ExpertBank(in_channels=6, expert_dim=3, embed_dim=5, temperature=10.0, pool_size=7)
        bank.add(K)
        idx = torch.stack([torch.randperm(K)[:3] for _ in range(4)])
        x = torch.randn(4, 3, 6, 7, 7)
        before = dict(calls)
        with monkeypatch.context() as mp:
            mp.setattr(F, "conv2d", counted("conv2d", F.conv2d))
            mp.setattr(torch, "baddbmm", counted("baddbmm", torch.baddbmm))
            for name in ("tolist", "item", "unique", "nonzero"):
                mp.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"Tensor.{_n} in the top-k path"))
            bank(x, idx)
        return {k: calls[k] - before[k] for k in calls}

    few, many = run(5), run(12)
    assert few == many and few["conv2d"] == 2 and few["baddbmm"] == 1


@pytest.mark.parametrize("topk", [0, 3])
def test_checkpointed_expert_chunks_in_training_equal_one_pass(topk, monkeypatch):
    """With top-k, training runs the expert convs in checkpointed RoI chunks when they exceed the
    device budget: the losses and every gradient equal those of one pass."""
    import clcl_det.modeling.roi_heads.multi_expert as me
    from conftest import two_box_batch

    cfg = clclip_cfg(**{"MODEL.CLCLIP.MULTI_EXPERT.TOPK": topk, "INPUT.IMAGE_SIZE": 64,
                        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 50})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    task = Task(0, 0, 6, NAMES[:6], NAMES[:6])
    begin_task(model, task)
    batch = two_box_batch(task, 2, 0)

    def step():
        model.zero_grad(set_to_none=True)
        losses = model(batch)
        sum(losses.values()).backward()
        return ({k: v.detach() for k, v in losses.items()},
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    one_loss, one_grad = step()
    monkeypatch.setattr(me, "_MAX_GATHERED_ELEMENTS", 1)  # one RoI per chunk
    chunks = model.roi_heads._roi_chunks(torch.zeros(5, 4, 7, 7), 3, topk > 0)
    assert len(chunks) == (5 if topk else 1) and all(c for _, c in chunks) == bool(topk)
    loss, grad = step()
    assert one_grad.keys() == grad.keys() and any("experts" in n for n in grad)
    for k in one_loss:
        torch.testing.assert_close(loss[k], one_loss[k], rtol=1e-5, atol=1e-6)
    for n in one_grad:
        torch.testing.assert_close(grad[n], one_grad[n], rtol=1e-4, atol=1e-6)


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
    """MODEL.ROI_HEADS.UNBIASED_BACKGROUND: task 1 trains plain CE; task 2 absorbs its old classes
    (in the experts' loss and in the shared branch's own class loss)."""
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
    assert seen == [0, 0, 10, 10]  # the experts' loss and the shared branch's own class loss, per task


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


# -- the mechanisms: what a frozen expert sees and scores does not move with later tasks -----------------
def test_mechanism_prior_independent_of_later_classes():
    """Per-class (sigmoid) prior = sigmoid((<V, t_k> - <V, t_bg>) / T), pixel by pixel; the
    softmax prior over a grown vocabulary changes when a similar class is added."""
    torch.manual_seed(0)
    V = F.normalize(torch.randn(2, 8, 3, 4), dim=1)
    red_circle, bg = F.normalize(torch.randn(8), dim=0), F.normalize(torch.randn(8), dim=0)
    red_cross = F.normalize(red_circle + 0.3 * torch.randn(8), dim=0)  # a similar class, added later
    others = F.normalize(torch.randn(3, 8), dim=1)
    before = torch.cat([red_circle[None], others])
    after = torch.cat([before, red_cross[None]])
    T = 0.05
    p2 = category_prior(V, after, bg, temperature=T, norm="sigmoid")
    for b in range(2):
        for y in range(3):
            for x in range(4):
                v = V[b, :, y, x]
                ref = 1 / (1 + math.exp(-(float(v @ red_circle) - float(v @ bg)) / T))
                assert float(p2[b, 0, y, x]) == pytest.approx(ref, rel=1e-5, abs=1e-7)
    s1 = category_prior(V, before, bg, temperature=T, norm="softmax")
    s2 = category_prior(V, after, bg, temperature=T, norm="softmax")
    assert not torch.allclose(s1[:, 0], s2[:, 0])


@pytest.mark.parametrize("norm", ["sigmoid", "softmax"])
def test_mechanism_head_prior_unchanged_by_later_tasks(norm):
    """The head's prior of task 1's classes ("red circle", ...) is bit-identical after task 2 adds
    "red cross": per class (sigmoid), or over its own task's classes (softmax)."""
    torch.manual_seed(0)
    model = build_model(clclip_cfg(**{"MODEL.CLCLIP.COST_VOLUME.NORM": norm, "INPUT.IMAGE_SIZE": 64})).eval()
    names = ("red circle", "green square", "blue triangle", "red cross", "red square")
    t1, t2 = Task(0, 0, 3, names[:3], names), Task(1, 3, 5, names, names)
    begin_task(model, t1)
    _, rois, dense = _head_inputs(model)
    ctx = model.make_context(dense, [(64, 64)])
    before = model.roi_heads.pooled_prior(rois, ctx, 3)
    end_task(model, t1)
    begin_task(model, t2)
    ctx = model.make_context(dense, [(64, 64)])
    after = model.roi_heads.pooled_prior(rois, ctx, 5)
    assert torch.equal(before, after[:, :3])
    if norm == "softmax":  # over task 1's vocabulary: each pixel's 3 classes + background sum to 1
        full, bg = model.roi_heads.expert_prior(ctx)
        assert bool((full[:, :3].sum(1) <= 1 + 1e-5).all()) and float(full[:, :3].sum(1).max()) > 0.5
        torch.testing.assert_close(full[:, :3].sum(1) + bg[:, 0], torch.ones_like(bg[:, 0]))  # with its background


def _head_inputs(model, n_rois=6, seed=0):
    """Fixed FPN features, RoIs and dense CLIP map for calling the RoI head directly."""
    g = torch.Generator().manual_seed(seed)
    C, D = model.backbone.out_channels, model.backbone.embed_dim
    feats = {k: torch.randn(1, C, 64 // s, 64 // s, generator=g)
             for k, s in zip(model.backbone.level_names, model.backbone.strides)}
    xy = torch.rand(n_rois, 2, generator=g) * 30
    rois = [torch.cat([xy, xy + 8 + torch.rand(n_rois, 2, generator=g) * 24], dim=1)]
    dense = F.normalize(torch.randn(1, D, 64 // model.backbone.clip_stride, 64 // model.backbone.clip_stride,
                                    generator=g), dim=1)
    return feats, rois, dense


def _old_scores(model, feats, rois, dense, k_old):
    """Old classes' logits and their final scores (the detector's probabilities in the ensemble
    with CLIP, as inference ranks detections)."""
    head = model.roi_heads
    assert head.ensemble and head.ensemble_alpha > 0
    ctx = model.make_context(dense, [(64, 64)])
    with torch.no_grad():
        out = head.predict(head.pool(feats, rois, ctx.image_sizes), rois, ctx)
        return out["logits"][:, :k_old].clone(), head.class_probabilities(out, rois, ctx)[:, :k_old].clone()


@pytest.mark.parametrize("shared,cost_volume,background,trunk,trunk_convs", [
    (False, True, "task", "own", 0), (False, True, "task", "own", 2), (False, True, "task", "box_head", 0),
    (False, False, "task", "box_head", 0), (False, True, "shared", "own", 0), (True, True, "shared", "box_head", 0)])
def test_mechanism_old_logits_invariant_to_later_tasks(shared, cost_volume, background, trunk, trunk_convs):
    """Experts alone: with the same FPN features, old classes' logits after a later task (new
    experts, a grown vocabulary, every trainable parameter changed) are those of before, bit for bit
    (also with the uniform prior of the no-cost-volume ablation); with per-task background experts
    so are their final scores (the CLIP ensemble's softmax runs per task too). With the shared
    background the trainable shared branch moves the probabilities, and with SHARED_CLASS_LOGITS the
    logits too. The experts' trunk (their own convs or the shared branch's box-head convs) is frozen
    with the first task's experts."""
    torch.manual_seed(0)
    cfg = clclip_cfg(**{"MODEL.CLCLIP.MULTI_EXPERT.SHARED_CLASS_LOGITS": shared, "INPUT.IMAGE_SIZE": 64,
                        "MODEL.CLCLIP.COST_VOLUME.ENABLED": cost_volume, "MODEL.CLCLIP.MULTI_EXPERT.NORM": "GN",
                        "MODEL.CLCLIP.MULTI_EXPERT.POOL_SIZE": 3, "MODEL.CLCLIP.MULTI_EXPERT.SHARED_CLASS_LOSS_WEIGHT": 1.0,
                        "MODEL.CLCLIP.MULTI_EXPERT.BACKGROUND": background,
                        "MODEL.CLCLIP.MULTI_EXPERT.TRUNK": trunk, "MODEL.CLCLIP.MULTI_EXPERT.TRUNK_CONVS": trunk_convs})
    model = build_model(cfg).eval()
    t1, t2 = Task(0, 0, 4, NAMES[:4], NAMES[:8]), Task(1, 4, 8, NAMES[:8], NAMES[:8])
    begin_task(model, t1)
    feats, rois, dense = _head_inputs(model)
    before, p_before = _old_scores(model, feats, rois, dense, 4)
    end_task(model, t1)
    begin_task(model, t2)
    with torch.no_grad():  # "training task 2": everything still trainable moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    after, p_after = _old_scores(model, feats, rois, dense, 4)
    assert torch.isfinite(before).all() and (p_before > 0).all()
    if shared:
        assert not torch.allclose(before, after)
    else:
        assert torch.equal(before, after)
    if background == "task":
        assert torch.equal(p_before, p_after)
    else:
        assert not torch.allclose(p_before, p_after)


def _two_task_training_outputs(cfg):
    """A model in task 2 (task 1's experts frozen) with the previous model as teacher; the
    outputs of one training forward."""
    torch.manual_seed(0)
    model = build_model(cfg)
    t1, t2 = Task(0, 0, 3, NAMES[:3], NAMES[:6]), Task(1, 3, 6, NAMES[:6], NAMES[:6])
    begin_task(model, t1)
    end_task(model, t1)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # the student's pyramid has moved away from the teacher's
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    begin_task(model, t2)
    model.set_teacher(teacher)
    model.train()
    captured = {}
    orig = model.continual_losses[0].forward

    def capture(m, outputs, batched, teacher):
        captured.update(vars(outputs))  # the typed LossInputs, field by field
        return orig(m, outputs, batched, teacher)

    model.continual_losses[0].forward = capture
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g),
              "boxes": torch.tensor([[4.0, 5.0, 40.0, 35.0], [30.0, 30.0, 60.0, 62.0]]),
              "classes": torch.tensor([3, 4]), "seed": i} for i in range(2)]
    losses = model(batch)
    return model, teacher, losses, captured


def test_mechanism_task_background_trains_only_the_current_task():
    """In task 2 the classification loss trains task 2's background expert and its class experts;
    task 1's background and class experts get no gradient (they are frozen and out of the graph's
    trainable set), so their scores cannot move."""
    cfg = clclip_cfg(**{"INPUT.IMAGE_SIZE": 64, "MODEL.CLCLIP.MULTI_EXPERT.POOL_SIZE": 3})
    model, _, losses, _ = _two_task_training_outputs(cfg)
    head = model.roi_heads
    losses["loss_cls"].backward()
    new_bg, old_bg = head.bg_experts.chunks[1], head.bg_experts.chunks[0]
    assert new_bg.fc_w.grad is not None and float(new_bg.fc_w.grad.abs().sum()) > 0
    assert float(head.experts.chunks[1].w1.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in list(old_bg.parameters())
               + list(head.experts.chunks[0].parameters()))


def test_mechanism_orthogonality_and_drift_gradients():
    """L_orth trains the current task's experts (and the features under them), never a frozen
    expert; L_drift trains the pyramid, not the experts, and never the teacher."""
    cfg = clclip_cfg(**{"INPUT.IMAGE_SIZE": 64, "MODEL.CLCLIP.MULTI_EXPERT.POOL_SIZE": 3})
    model, teacher, losses, _ = _two_task_training_outputs(cfg)
    old, new = model.roi_heads.experts.chunks
    assert all(not p.requires_grad for p in old.parameters())
    for name in ("loss_orth", "loss_drift"):
        model.zero_grad(set_to_none=True)
        loss = losses[name]
        loss.backward(retain_graph=True)
        assert all(p.grad is None for p in old.parameters()), name
        assert all(p.grad is None for p in teacher.parameters()), name
        fpn_grad = sum(float(p.grad.abs().sum()) for p in model.backbone.parameters() if p.grad is not None)
        new_grad = float(new.w1.grad.abs().sum()) if new.w1.grad is not None else 0.0
        if name == "loss_orth":
            assert new_grad > 0 and fpn_grad > 0
        else:
            assert new_grad == 0.0 and fpn_grad > 0
    assert float(losses["loss_drift"]) > 0


def test_mechanism_shared_class_loss_trains_the_shared_branch_only():
    """SHARED_CLASS_LOSS_WEIGHT: a classification loss on the shared branch's own logits; its
    gradient reaches the shared embedding and no expert. In task 2 a background RoI counts as
    "background or one of task 1's classes" (the shared branch is not taught that unlabelled old
    objects are background: it would then call every class without an expert background)."""
    cfg = clclip_cfg(**{"INPUT.IMAGE_SIZE": 64, "MODEL.CLCLIP.MULTI_EXPERT.SHARED_CLASS_LOSS_WEIGHT": 0.5})
    model, _, losses, out = _two_task_training_outputs(cfg)
    assert "loss_cls_shared" in losses
    roi = out["roi"]
    valid = roi["labels"] >= 0
    logits, labels = roi["shared_logits"][valid], roi["labels"][valid]
    probs = logits.softmax(dim=1)  # columns: classes 0-5, background 6; task 1 = classes 0-2
    bg = labels == 6
    assert bg.any() and (~bg).any()
    p_target = torch.where(bg, probs[:, [0, 1, 2, 6]].sum(dim=1), probs.gather(1, labels[:, None])[:, 0])
    torch.testing.assert_close(losses["loss_cls_shared"], 0.5 * -p_target.log().mean())
    assert float(losses["loss_cls_shared"]) < float(0.5 * F.cross_entropy(logits, labels)) - 1e-3
    model.zero_grad(set_to_none=True)
    losses["loss_cls_shared"].backward()
    assert float(model.roi_heads.embed.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for c in model.roi_heads.experts.chunks for p in c.parameters())


def test_unbiased_distillation_topk_same_classes_finite():
    """Per-RoI top-k: an old class the student left out (-inf) while the teacher gives it most of
    its mass (the case that gave a loss of 853) is dropped from both distributions; the KL is
    the one over the classes both kept, renormalised, computed here by hand."""
    from clcl_det.modeling.losses.distillation import unbiased_logit_distillation

    inf = float("inf")
    teacher = torch.tensor([[8.0, 1.0, -inf, 0.5], [2.0, 1.0, 0.0, 3.0]])  # 3 old classes + bg; RoI 0: class 2 cut
    student = torch.tensor([[-inf, 2.0, 1.0, 0.0, 1.5, -inf],  # class 0 cut by the student's top-k
                            [1.0, 2.0, 0.5, 1.0, -0.5, 0.2]])  # 3 old, 2 new, bg
    ref = []
    for s, t in zip(student.tolist(), teacher.tolist()):
        merged = s[:3] + [math.log(sum(math.exp(v) for v in s[3:] if v > -inf))]
        keep = [i for i in range(4) if merged[i] > -inf and t[i] > -inf]
        zs, zt = sum(math.exp(merged[i]) for i in keep), sum(math.exp(t[i]) for i in keep)
        ref.append(sum(math.exp(t[i]) / zt * math.log((math.exp(t[i]) / zt) / (math.exp(merged[i]) / zs))
                       for i in keep))
    got = unbiased_logit_distillation(student, teacher)
    assert math.isfinite(got.item()) and got.item() == pytest.approx(sum(ref) / 2, rel=1e-5)
    assert got.item() < 10.0
    grad_in = student.clone().requires_grad_(True)
    unbiased_logit_distillation(grad_in, teacher).backward()
    assert torch.isfinite(grad_in.grad).all()


@pytest.mark.parametrize("box_reg", ["task", "shared"])
def test_mechanism_old_boxes_frozen_with_their_task(box_reg):
    """BOX_REG task: with the same FPN features, an old class's boxes after a later task (every
    trainable parameter changed, the shared regressor included) are those of before, bit for bit,
    while the current task's classes take the shared regressor, which keeps training; at the task's
    end its regressor is the shared one as trained. With the shared regressor (the hollow case) the
    old boxes move."""
    torch.manual_seed(0)
    cfg = clclip_cfg(**{"INPUT.IMAGE_SIZE": 64, "MODEL.CLCLIP.MULTI_EXPERT.TRUNK": "box_head",
                        "MODEL.CLCLIP.MULTI_EXPERT.BOX_REG": box_reg})
    model = build_model(cfg).eval()
    head = model.roi_heads
    t1, t2 = Task(0, 0, 4, NAMES[:4], NAMES[:8]), Task(1, 4, 8, NAMES[:8], NAMES[:8])
    feats, rois, dense = _head_inputs(model)

    def boxes():
        ctx = model.make_context(dense, [(64, 64)])
        with torch.no_grad():
            out = head.predict(head.pool(feats, rois, ctx.image_sizes), rois, ctx)
            b = head.class_boxes(out, rois, ctx)
            shared = head.box_coder.decode_single(out["deltas"], torch.cat(rois))
        return (b if b.dim() == 3 else b[:, None].expand(-1, 8, -1)).clone(), shared

    begin_task(model, t1)
    end_task(model, t1)
    before, _ = boxes()
    begin_task(model, t2)
    with torch.no_grad():  # "training task 2": everything still trainable moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    after, shared = boxes()
    assert torch.isfinite(before).all()
    if box_reg == "shared":
        assert not torch.allclose(before[:, :4], after[:, :4])
        return
    assert torch.equal(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, :4], shared[:, None].expand(-1, 4, -1))
    assert torch.equal(after[:, 4:], shared[:, None].expand(-1, 4, -1))  # the current task: shared regressor
    end_task(model, t2)
    ended, _ = boxes()
    assert torch.equal(ended[:, :4], before[:, :4]) and torch.equal(ended[:, 4:], after[:, 4:])
    assert not any(p.requires_grad for p in head.task_box_regs.parameters())


def test_last_task_regressor_reuses_the_shared_deltas_bit_for_bit():
    """At the end of a task its frozen regressor is a copy of the shared one: its deltas are taken
    from the shared branch (its layers are not run), and they equal, bit for bit, those the copy
    computes itself. Once the shared regressor trains again, the copy runs its own layers."""
    torch.manual_seed(0)
    cfg = clclip_cfg(**{"INPUT.IMAGE_SIZE": 64, "MODEL.CLCLIP.MULTI_EXPERT.TRUNK": "box_head",
                        "MODEL.CLCLIP.MULTI_EXPERT.BOX_REG": "task"})
    model = build_model(cfg).eval()
    head = model.roi_heads
    t1, t2 = Task(0, 0, 4, NAMES[:4], NAMES[:8]), Task(1, 4, 8, NAMES[:8], NAMES[:8])
    feats, rois, dense = _head_inputs(model)
    calls = [0, 0]
    begin_task(model, t1)
    end_task(model, t1)
    begin_task(model, t2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    end_task(model, t2)
    for i, reg in enumerate(head.task_box_regs):
        reg.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))

    def predict():
        ctx = model.make_context(dense, [(64, 64)])
        with torch.no_grad():
            pooled = head.box_head.convs(head.pool(feats, rois, ctx.image_sizes))
            return head.predict(head.pool(feats, rois, ctx.image_sizes), rois, ctx), pooled.flatten(1)

    out, flat = predict()
    assert calls == [1, 0]  # task 1's copy runs, task 2's is the shared regressor
    with torch.no_grad():
        own = torch.stack([r(flat) for r in head.task_box_regs], dim=1)
    assert torch.equal(out["task_deltas"], own) and torch.equal(out["task_deltas"][:, 1], out["deltas"])
    with torch.no_grad():  # the shared regressor trains on (a third task)
        head.bbox_pred.weight.add_(0.1)
    calls[:] = [0, 0]
    out, flat = predict()
    assert calls == [1, 1]
    assert torch.equal(out["task_deltas"][:, 1], own[:, 1]) and not torch.equal(out["task_deltas"][:, 1], out["deltas"])


def test_box_reg_task_runs_and_evaluates(shapes_root, tmp_path):
    """BOX_REG task through the runner: two tasks, then --eval-only on the same output reproduces
    every stage's mAP (the checkpoints hold each task's regressor, in every loading path)."""
    out = str(tmp_path / "run")
    cfg = clclip_cfg(out, **{"MODEL.CLCLIP.MULTI_EXPERT.TRUNK": "box_head", "MODEL.CLCLIP.MULTI_EXPERT.BOX_REG": "task"})
    cfg.freeze()
    default_setup(cfg)
    summary = ContinualRunner(cfg).run()
    state = load_checkpoint_file(os.path.join(out, "task_2", "model_final.pth"))["model"]
    assert {k.split(".")[2] for k in state if k.startswith("roi_heads.task_box_regs.")} == {"0", "1"}
    evaluated = ContinualRunner(cfg).evaluate()
    assert [s["mAP@A"] for s in summary["stages"]] == [s["mAP@A"] for s in evaluated["stages"]]


@pytest.mark.parametrize("freeze", [True, False])
def test_mechanism_rpn_frozen_after_first_task(freeze):
    """MODEL.RPN.FREEZE_AFTER_FIRST_TASK: in the second task the RPN returns no loss, takes no
    gradient and keeps its bytes through an optimizer step, while the FPN still trains; without it
    (the hollow case) the RPN's loss reaches its parameters."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"INPUT.IMAGE_SIZE": 64, "MODEL.RPN.FREEZE_AFTER_FIRST_TASK": freeze}))
    t1, t2 = Task(0, 0, 3, NAMES[:3], NAMES[:6]), Task(1, 3, 6, NAMES[:6], NAMES[:6])
    begin_task(model, t1)
    end_task(model, t1)
    begin_task(model, t2)
    model.train()
    rpn = model.proposal_generator
    before = {k: v.clone() for k, v in rpn.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g),
              "boxes": torch.tensor([[4.0, 5.0, 40.0, 35.0]]), "classes": torch.tensor([4]), "seed": i} for i in range(2)]
    losses = model(batch)
    sum(losses.values()).backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.fpn.parameters())
    if freeze:
        assert "loss_rpn_cls" not in losses and "loss_rpn_loc" not in losses
        assert all(p.grad is None and not p.requires_grad for p in rpn.parameters())
        assert all(torch.equal(before[k], v) for k, v in rpn.state_dict().items())
    else:
        assert losses["loss_rpn_cls"] > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rpn.parameters())

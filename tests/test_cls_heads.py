"""The classification heads and SG-AKT: batched OT against POT's single-problem
solver, SPA scores against a per-pair computation, frozen task projectors, Gaussian statistics
(moments, sampling, save/load, the engine's checkpoint), SE-VPR refinement, SG-AKT snapshots and
aggregation, description files, and a head registered from outside the package."""
import copy
import json
import logging
import math
import os

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from clcl_det.continual import ContinualRunner, begin_task, continual_modules, end_task
from clcl_det.data import descriptions as desc
from clcl_det.data.catalog import MetadataCatalog
from clcl_det.data.continual import Task
from clcl_det.data.datasets.builtin import COCO_CLASSES
from clcl_det.embedded.shapes import SHAPES_CLASSES
from clcl_det.data.datasets.voc import VOC_CLASSES
from clcl_det.engine import default_setup, load_plugins
from clcl_det.engine.trainer import build_optimizer
from clcl_det.modeling import HeadContext, build_model
from clcl_det.modeling.cls_heads.gaussian_replay import GaussianReplay
from clcl_det.modeling.cls_heads.prototype import PrototypeRefinement, SemanticPrototypeHead
from clcl_det.modeling.cls_heads.spa import build_description_bank, ot_method_for, solve_ot_batch
from clcl_det.modeling.cls_heads.text_classifier import TextClassifier
from clcl_det.modeling.losses.sgakt import SGAKTDistill

from conftest import tiny_cfg, two_box_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK0 = Task(0, 0, 10, SHAPES_CLASSES[:10], SHAPES_CLASSES)
TASK1 = Task(1, 10, 20, SHAPES_CLASSES, SHAPES_CLASSES)


def _model(*opts):
    cfg = tiny_cfg()
    cfg.merge_from_list(["MODEL.SPA.DESCRIPTIONS", "shapes", "INPUT.IMAGE_SIZE", "64", *opts])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def _batch(task, n=2, seed=0):
    return two_box_batch(task, n, seed, first_class_step=0)


def _train(model, cfg, task, steps):
    model.train()
    opt = build_optimizer(cfg, model)
    for s in range(steps):
        losses = model(_batch(task, seed=s))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    return losses


def _ctx(text, task=None, dense=None, bg=None):
    D = text.shape[1]
    return HeadContext(text, bg if bg is not None else F.normalize(torch.ones(D), dim=0),
                       dense if dense is not None else torch.zeros(1, D, 4, 4), 8, [(32, 32)], task)


# -- SPA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sinkhorn", "log_sinkhorn"])
def test_batched_ot_equals_pot_single_problems_and_has_uniform_marginals(method):
    g = torch.Generator().manual_seed(0)
    B, n, L = 10, 16, 20
    cost = 1.0 - torch.rand(B, n, L, generator=g, dtype=torch.float64) * 0.8  # 1 - cos, cos in [0.2, 1]
    lens = torch.randint(3, L + 1, (B,), generator=g)
    lens[0] = L
    mask = torch.arange(L)[None] < lens[:, None]
    plan, value = solve_ot_batch(cost, mask, 0.1, method, max_iter=5000, tol=1e-10)
    for b in range(B):
        m = int(lens[b])
        ref = ot.sinkhorn(torch.full((n,), 1.0 / n, dtype=torch.float64), torch.full((m,), 1.0 / m, dtype=torch.float64),
                          cost[b, :, :m], 0.1, method="sinkhorn", stopThr=1e-12, numItermax=20000)
        assert (plan[b, :, :m] - ref).abs().max() < 1e-5
        assert abs(float(value[b]) - float((ref * cost[b, :, :m]).sum())) < 1e-5
        assert float(plan[b, :, m:].abs().sum()) == 0.0  # padded tokens carry no mass
    torch.testing.assert_close(plan.sum(2), torch.full((B, n), 1.0 / n, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), mask / lens[:, None].double(), atol=1e-5, rtol=0)
    # the head's settings (float32, tol 1e-5, <= 100 iterations) on costs of unit vectors
    p = F.normalize(torch.randn(64, 16, 32, generator=g), dim=-1)
    t = F.normalize(torch.randn(64, 30, 32, generator=g), dim=-1)
    m32 = torch.arange(30)[None] < torch.randint(3, 31, (64, 1), generator=g)
    plan32, _ = solve_ot_batch(1 - p @ t.transpose(1, 2), m32, 0.1, method, max_iter=100, tol=1e-5)
    torch.testing.assert_close(plan32.sum(2), torch.full((64, 16), 1 / 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan32.sum(1), m32 / m32.sum(1, keepdim=True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["sinkhorn", "log_sinkhorn"])
def test_no_grad_ot_has_the_value_and_gradient_of_autograd_through_sinkhorn(method):
    """The plan is solved without autograd; value and gradient equal POT's solver run with autograd
    through every iteration (plan detached at the end), and autograd saves no iteration's tensors."""
    g = torch.Generator().manual_seed(5)
    p = F.normalize(torch.randn(12, 16, 32, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(12, 30, 32, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.arange(30)[None] < torch.randint(3, 31, (12, 1), generator=g)
    w = torch.randn(12, generator=g, dtype=torch.float64)

    def saving(fn):  # runs fn, counting the tensors autograd saves for the backward pass meanwhile
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            out = fn()
        return out, len(saved)

    p_ref = p.clone().requires_grad_(True)
    cost = (1.0 - p_ref @ t.transpose(1, 2)).masked_fill(~mask[:, None, :], 0.0)
    b = mask.double() / mask.sum(1, keepdim=True)
    ref, n_ref = saving(lambda: ot.solve_batch(cost, reg=0.1, b=b, method=method, max_iter=100, tol=1e-5,
                                               grad="envelope").value_linear)
    (ref * w).sum().backward()
    p_new = p.clone().requires_grad_(True)
    (_, value), n_new = saving(lambda: solve_ot_batch(1.0 - p_new @ t.transpose(1, 2), mask, 0.1, method,
                                                      max_iter=100, tol=1e-5))
    (value * w).sum().backward()
    torch.testing.assert_close(value, ref.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(p_new.grad, p_ref.grad, atol=1e-12, rtol=0)
    assert n_ref > 50  # autograd through POT keeps tensors of every Sinkhorn iteration
    assert n_new <= 4  # the matmul and <T, C>


def test_ot_method_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ot_method_for("auto", 0.1, cpu) == "sinkhorn" and ot_method_for("auto", 0.01, cpu) == "log_sinkhorn"
    assert ot_method_for("auto", 0.1, gpu) == "log_sinkhorn" and ot_method_for("log_sinkhorn", 0.1, cpu) == "log_sinkhorn"
    with pytest.raises(ValueError, match="CPU only"):
        ot_method_for("sinkhorn", 0.1, gpu)


def test_spa_logits_match_a_per_pair_computation():
    cfg, model = _model("MODEL.CLS_HEAD.NAME", "SPAHead", "MODEL.SPA.TOPK", "3")
    begin_task(model, TASK0)
    head = model.roi_heads.cls_head
    g = torch.Generator().manual_seed(1)
    D = model.backbone.embed_dim
    with torch.no_grad():  # a trained-looking projector
        head.projectors[0].weight.copy_(0.1 * torch.randn(D, D, generator=g))
        head.projectors[0].bias.copy_(0.1 * torch.randn(D, generator=g))
    dense = F.normalize(torch.randn(2, D, 16, 16, generator=g), dim=1)
    ctx = model.make_context(dense, [(128, 128), (128, 128)])
    rois = [torch.tensor([[0.0, 0.0, 96.0, 80.0], [20.0, 30.0, 128.0, 128.0]]), torch.tensor([[10.0, 5.0, 90.0, 120.0]])]
    x = torch.randn(3, D, generator=g)
    with torch.no_grad():
        logits = head(x, ctx, rois)
    tau = float(head.scale().detach())
    W, b = head.projectors[0].weight.detach(), head.projectors[0].bias.detach()
    proj = lambda u: u + u @ W.t() + b  # noqa: E731
    text = torch.cat([ctx.class_embeddings, ctx.background_embedding[None]])
    det = F.normalize(x, dim=-1) @ text.t()
    glob = F.normalize(roi_align(dense, rois, 1, 1 / 8, 0, True).flatten(1), dim=-1)
    spa = F.normalize(proj(glob), dim=-1) @ text.t()
    patches = roi_align(dense, rois, output_size=7, spatial_scale=1 / 8, sampling_ratio=0, aligned=True)
    sentences, _ = desc.class_sentences(TASK0.class_names, desc.load_descriptions(desc.resolve_descriptions_file("shapes")))
    ref = spa.clone()
    for r in range(3):
        top = spa[r, :10].topk(3).indices.tolist()
        pr = F.normalize(proj(F.normalize(patches[r].flatten(1).t(), dim=-1)), dim=-1)  # 49 x D
        for c in top:
            tokens, sent = model.text.encode_tokens(sentences[c])
            chosen = pr[(pr @ sent.t()).max(dim=1).values.topk(16).indices]
            C = (1 - chosen @ torch.cat(tokens).t()).double()
            T = ot.sinkhorn(torch.full((16,), 1 / 16, dtype=torch.float64),
                            torch.full((C.shape[1],), 1 / C.shape[1], dtype=torch.float64), C, 0.1, stopThr=1e-10)
            ref[r, c] += 1.0 - float((T * C).sum())
    torch.testing.assert_close(logits, tau * (det + ref), atol=1e-5 * tau, rtol=0)
    # every class (TOPK 0) takes another path to the costs: the top-3 pairs' scores are the same
    with torch.no_grad():
        pooled = head.roi_patches(ctx, rois)
        assert pooled.is_contiguous()  # products with the description tokens fold into one matrix product
        patches_p = F.normalize(head.project(pooled), dim=-1)
        bank = head.bank(head.class_names(ctx))
        top3 = spa[:, :10].topk(3, dim=1).indices
        s_top = head.ot_scores(patches_p, bank, top3)
        s_all = head.ot_scores(patches_p, bank, torch.arange(10).expand(3, 10))
    torch.testing.assert_close(s_top.gather(1, top3), s_all.gather(1, top3), atol=1e-6, rtol=0)
    head.pairs_per_call = 2  # several POT calls, a RoI's pairs split across them
    with torch.no_grad():
        torch.testing.assert_close(head(x, ctx, rois), tau * (det + ref), atol=1e-5 * tau, rtol=0)
    head.combine = "ensemble"
    with torch.no_grad():
        torch.testing.assert_close(head(x, ctx, rois), 0.5 * (tau * det).log_softmax(1) + 0.5 * (tau * ref).log_softmax(1),
                                   atol=1e-4, rtol=0)
    # no RoIs: the detector's logits; replayed region features: the projected cosine
    torch.testing.assert_close(head(x, ctx, None), tau * det)
    torch.testing.assert_close(head.replay_logits(glob, ctx, None), tau * spa)


def test_old_projector_bit_identical_after_next_task():
    cfg, model = _model("MODEL.CLS_HEAD.NAME", "SPAHead", "MODEL.SPA.TOPK", "2")
    head = model.roi_heads.cls_head
    begin_task(model, TASK0)
    assert len(head.projectors) == 1 and head.projectors[0].weight.requires_grad
    assert float(head.projectors[0].weight.detach().abs().sum()) == 0.0  # zero: starts as the plain classifier
    assert copy.deepcopy(head)._text.obj is model.text  # copies (snapshots) share the frozen CLIP text tower
    _train(model, cfg, TASK0, 1)
    end_task(model, TASK0)
    p0 = {k: v.clone() for k, v in head.projectors[0].state_dict().items()}
    assert float(p0["weight"].abs().sum()) > 0, "task 1's projector did not train"
    x = torch.randn(5, model.backbone.embed_dim)
    z_before = head.project(x).detach()
    begin_task(model, TASK1)
    assert len(head.projectors) == 2
    assert not head.projectors[0].weight.requires_grad and head.projectors[1].weight.requires_grad
    assert torch.equal(head.project(x).detach(), z_before)  # a new task starts where the last one ended
    _train(model, cfg, TASK1, 1)
    for k, v in head.projectors[0].state_dict().items():
        assert torch.equal(v, p0[k])
    assert float(head.projectors[1].weight.detach().abs().sum()) > 0


# -- Gaussian replay --------------------------------------------------------------------------------
def _gaussian_data(seed=0, D=5, n=(300, 250, 400)):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c, nc in enumerate(n):
        A = rng.normal(size=(D, D)) * (0.3 + 0.2 * c)
        xs.append(rng.normal(size=(nc, D)) @ A.T + rng.normal(size=D) * 3)
        ys.append(np.full(nc, c))
    return xs, ys


def _batches(xs, ys, classes, seed=0):
    x, y = np.concatenate([xs[c] for c in classes]), np.concatenate([ys[c] for c in classes])
    y = np.concatenate([y, [-1, 7]])  # an ignored label and one outside the classes
    x = np.concatenate([x, np.full((2, x.shape[1]), 1e3)])
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order])
    return [(x[i:i + 97], y[i:i + 97]) for i in range(0, len(y), 97)]


def _replay(cov, D=5):
    head = GaussianReplay(inner=TextClassifier(embed_dim=D), embed_dim=D, cov=cov, shrinkage=1e-4)
    head.on_task_start(Task(0, 0, 2, ("a", "b"), ("a", "b", "c")), None)
    return head


@pytest.mark.parametrize("cov", ["full", "diagonal", "shared"])
def test_replay_statistics_and_sampling_reproduce_moments(cov):
    D = 5
    xs, ys = _gaussian_data(D=D)
    head = _replay(cov, D)
    head.set_statistics(torch.arange(0, 2), _batches(xs, ys, [0, 1]))  # task 1
    head.on_task_start(Task(1, 2, 3, ("a", "b", "c"), ("a", "b", "c")), None)
    head.set_statistics(torch.arange(2, 3), _batches(xs, ys, [2]))  # task 2
    eye = np.eye(D) * 1e-4
    pooled = sum((len(x) - 1) * np.cov(x.T) for x in xs) / sum(len(x) - 1 for x in xs)
    for c, x in enumerate(xs):
        np.testing.assert_allclose(head.means[c].numpy(), x.mean(0), rtol=1e-5, atol=1e-5)
        expected = {"full": np.cov(x.T), "diagonal": np.diag(np.var(x, 0, ddof=1)), "shared": pooled}[cov] + eye
        np.testing.assert_allclose(head.covariance(c).numpy(), expected, rtol=1e-5, atol=1e-5)
        assert int(head.counts[c]) == len(x)
    n = 100_000
    samples, labels = head.sample(torch.arange(3), n, torch.Generator().manual_seed(0))
    assert samples.shape == (3 * n, D) and torch.equal(labels, torch.arange(3).repeat_interleave(n))
    for c in range(3):
        s = samples[labels == c].double().numpy()
        sd = np.sqrt(np.diag(head.covariance(c).numpy()))
        assert np.all(np.abs(s.mean(0) - head.means[c].numpy()) < 5 * sd / math.sqrt(n))
        np.testing.assert_allclose(np.cov(s.T), head.covariance(c).numpy(), atol=0.02 * sd.max() ** 2, rtol=0)


def test_replay_statistics_survive_state_dict_round_trip():
    xs, ys = _gaussian_data()
    head = _replay("full")
    head.set_statistics(torch.arange(0, 2), _batches(xs, ys, [0, 1]))
    a, _ = head.sample(torch.arange(2), 4, torch.Generator().manual_seed(3))
    fresh = _replay("full")
    fresh.set_statistics(torch.arange(0, 2), _batches(*_gaussian_data(seed=1), [0, 1]))
    fresh.sample(torch.arange(2), 4)  # caches factors of other statistics, which loading must drop
    with pytest.raises(ValueError, match=r"no statistics stored for class\(es\) \[0, 1\]"):
        _replay("full").sample(torch.arange(2), 4)
    fresh.load_state_dict(head.state_dict(), strict=True)
    for k, v in head.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    b, _ = fresh.sample(torch.arange(2), 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_replay_statistics_through_the_engine_checkpoint(shapes_root, tmp_path):
    out = str(tmp_path / "replay")
    cfg = tiny_cfg(out)
    cfg.merge_from_list(["MODEL.CLS_HEAD.NAME", "GaussianReplay", "CONTINUAL.TRAIN_TASKS", "1", "SOLVER.MAX_ITER", "2",
                         "TEST.ZERO_SHOT", "False", "INPUT.IMAGE_SIZE", "64"])
    cfg.freeze()
    default_setup(cfg)
    first = ContinualRunner(cfg)
    first.run()
    head = first.model.roi_heads.cls_head
    dicts = first.split.task_train_dicts(first.train_dicts(), 0)
    boxes = torch.tensor([a["category_id"] for d in dicts for a in d["annotations"]])
    assert head.means.shape[0] == 10 and torch.equal(head.counts.long(), torch.bincount(boxes, minlength=10))
    assert float(head.covariances.abs().sum()) > 0
    second = ContinualRunner(cfg, resume=True)  # every task complete: rebuilds the structure and loads it
    second.run()
    other = second.model.roi_heads.cls_head
    for k, v in head.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    # task 2 replays the old classes; the draw is a function of (seed, task, iteration)
    model = second.model
    begin_task(model, second.split.task(1))
    model.train()
    batch = _batch(TASK1)
    first_loss = model(batch)["loss_replay"].detach()
    other.step.zero_()
    assert float(first_loss) > 0 and torch.equal(model(batch)["loss_replay"].detach(), first_loss)
    assert not torch.equal(model(batch)["loss_replay"].detach(), first_loss)  # iteration 1 draws other features


# -- SE-VPR -------------------------------------------------------------------------------------------
def _ln(a):
    a = np.asarray(a, dtype=np.float64)
    return (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5)


def test_sevpr_refinement_formula():
    D, K = 8, 5
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    protos = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    has = torch.ones(K, dtype=torch.bool)
    has[3] = False  # a class without a prototype is left out of the relations
    ref = PrototypeRefinement(D)
    with torch.no_grad():
        got = ref(text, protos, has).double().numpy()
    H = ref.proj.weight.detach().double().numpy()
    z = _ln(text.numpy()) @ H.T
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    logits = np.where(has.numpy()[None], -d2 / (2 * np.sqrt(D)), -np.inf)
    A = np.exp(logits - logits.max(1, keepdims=True))
    A /= A.sum(1, keepdims=True)
    out = _ln(A @ _ln(protos.numpy()))
    np.testing.assert_allclose(got, out / np.linalg.norm(out, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)


def test_sevpr_logits_running_and_exact_prototypes_and_losses():
    D, K = 8, 4
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    head = SemanticPrototypeHead(embed_dim=D)
    head.on_task_start(Task(0, 0, 2, tuple("ab"), tuple("abcd")), None)
    feats, lab = torch.randn(40, D, generator=g), torch.arange(40) % 2
    head.set_prototypes(torch.arange(2), [(feats, lab)])
    for c in range(2):
        torch.testing.assert_close(head.prototypes[c], F.normalize(F.normalize(feats[lab == c], dim=-1).mean(0), dim=0))
    head.store_refined(text[:2], torch.arange(2))
    stored = head.refined_stored.clone()
    task = Task(1, 2, K, tuple("abcd"), tuple("abcd"))
    head.on_task_start(task, None)
    ctx = _ctx(text, task)
    x = torch.randn(6, D, generator=g)
    logits = head(x, ctx)
    tau = float(head.scale().detach())
    cos_t = F.normalize(x, dim=-1) @ text.t()
    ref = head.refine(text, head.prototypes[:K], torch.tensor([True, True, False, False]))
    cos_p = F.normalize(x, dim=-1) @ ref.t()
    torch.testing.assert_close(logits[:, :2], tau * (0.5 * cos_t[:, :2] + 0.5 * cos_p[:, :2]))
    torch.testing.assert_close(logits[:, 2:4], tau * cos_t[:, 2:4])  # no prototype yet: text only
    torch.testing.assert_close(logits[:, 4], tau * F.normalize(x, dim=-1) @ ctx.background_embedding)
    # training: the current classes' running means of frozen region features; old ones untouched
    head.train()
    region = F.normalize(torch.randn(6, D, generator=g), dim=-1)
    head._region = region
    labels = torch.tensor([2, 3, 2, 4, -1, 0])
    old = head.prototypes[:2].clone()
    out = head.losses(logits, labels, x, ctx)
    torch.testing.assert_close(head.prototypes[2], F.normalize(region[[0, 2]].sum(0), dim=0))
    torch.testing.assert_close(head.prototypes[3], region[1])
    assert torch.equal(head.prototypes[:2], old) and float(head.proto_counts[0]) == 20  # exact: RoI 5 not added
    ref_now = head.refine(text, head.prototypes[:K], torch.ones(K, dtype=torch.bool))
    expected_reg = (1 - F.cosine_similarity(stored[:2], ref_now[:2], dim=-1)).mean()
    torch.testing.assert_close(out["loss_proto_reg"], expected_reg)
    proto_logits = tau * F.normalize(x[[0, 1, 2]], dim=-1) @ ref_now[2:].t()
    torch.testing.assert_close(out["loss_proto"], F.cross_entropy(proto_logits, torch.tensor([0, 1, 0])))


# -- SG-AKT --------------------------------------------------------------------------------------------
def test_sgakt_snapshot_frozen_replayed_and_distilled():
    cfg, model = _model("MODEL.CONTINUAL_LOSSES", "['SGAKTDistill']")
    loss = model.continual_losses[0]
    begin_task(model, TASK0)
    assert len(loss.snapshots) == 0
    _train(model, cfg, TASK0, 1)
    end_task(model, TASK0)
    begin_task(model, TASK1)
    begin_task(model, TASK1)  # idempotent
    assert len(loss.snapshots) == 1
    snap = loss.snapshots[0]
    state = {k: v.clone() for k, v in snap.state_dict().items()}
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state["backbone." + k])
    assert snap.backbone.encoder is model.backbone.encoder  # the frozen CLIP is shared, not copied
    assert not any(p.requires_grad for p in snap.parameters())
    in_life_cycle = {id(m) for m in continual_modules(model)}
    assert model.roi_heads.cls_head is not None and id(model.roi_heads) in in_life_cycle
    assert not any(id(m) in in_life_cycle for m in snap.modules()), "snapshots opt out of the life cycle"
    captured = {}
    forward = loss.forward

    def spy(m, outputs, batched_inputs, teacher):
        captured["agg"] = copy.deepcopy(loss.aggregator)  # as this step saw it (the optimizer moves it)
        captured["outputs"], captured["loss"] = outputs, forward(m, outputs, batched_inputs, teacher)
        return captured["loss"]

    loss.forward = spy
    _train(model, cfg, TASK1, 2)
    assert not snap.training
    for k, v in snap.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the loss of the last step, recomputed by hand from the snapshot's embeddings
    o = captured["outputs"]
    labels, rois, ctx = o["roi"]["labels"], o["roi"]["rois"], o["ctx"]
    pos = (labels >= 10) & (labels < 20)
    with torch.no_grad():
        feats = snap.backbone.pyramid_features(o["backbone"]["taps"])
        allv = snap.embed(snap.box_head(snap.pooler(feats, rois, ctx.image_sizes)))[pos]
        agg = captured["agg"]
        v = F.layer_norm(allv, (allv.shape[1],), agg.ln_k.weight, agg.ln_k.bias)
        teacher = F.layer_norm(v, (v.shape[1],), agg.ln_post.weight, agg.ln_post.bias)  # one snapshot: R = 1
        text = F.normalize(ctx.class_embeddings[10:20], dim=-1)
        p = (20 * F.normalize(teacher, dim=-1) @ text.t()).softmax(1)
        logq = (20 * F.normalize(o["roi"]["embeddings"][pos], dim=-1) @ text.t()).log_softmax(1)
    expected = 1 * (p * (p.log() - logq)).sum(1).mean()
    torch.testing.assert_close(captured["loss"]["loss_sgakt"], expected, rtol=1e-4, atol=1e-6)
    # a resumed run rebuilds the snapshot by replaying the tasks, then loads the weights
    _, fresh = _model("MODEL.CONTINUAL_LOSSES", "['SGAKTDistill']")
    begin_task(fresh, TASK0)
    end_task(fresh, TASK0)
    begin_task(fresh, TASK1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    for k, v in fresh.continual_losses[0].snapshots[0].state_dict().items():
        assert torch.equal(v, state[k])


# -- descriptions ---------------------------------------------------------------------------------------
def test_description_files_cover_their_datasets_and_fit_the_context():
    import open_clip

    tok = open_clip.get_tokenizer("shapes-tiny")
    for name, classes in (("voc", VOC_CLASSES), ("coco", COCO_CLASSES), ("shapes", SHAPES_CLASSES)):
        d = desc.load_descriptions(desc.resolve_descriptions_file(name))
        assert sorted(d) == sorted(classes), name
        for c, sents in d.items():
            assert 3 <= len(sents) <= 6 and len(set(sents)) == len(sents), (name, c)
            assert all(len(tok.encode(s)) + 2 <= 32 for s in sents), (name, c)  # SOT + EOT, tiny CLIP context


def test_description_names_paths_and_fallback(tmp_path, monkeypatch, caplog):
    d = desc.descriptions_dir()
    assert desc.resolve_descriptions_file("voc") == os.path.realpath(os.path.join(d, "voc.json"))
    for bad in ("..", "voc.", "~root", "a b", "voc\x00"):
        with pytest.raises(desc.DescriptionError, match="not a description name"):
            desc.resolve_descriptions_file(bad)
    with pytest.raises(desc.DescriptionError, match="no nope.json"):
        desc.resolve_descriptions_file("nope")
    with pytest.raises(desc.DescriptionError, match="does not exist"):
        desc.resolve_descriptions_file("../../etc/none.json")  # a path: used as given
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"_about": "x", "cat": ["a cat has whiskers."]}))
    assert desc.load_descriptions(desc.resolve_descriptions_file(str(own))) == {"cat": ["a cat has whiskers."]}
    # "" derives the name from the training dataset (metadata first)
    assert desc.resolve_descriptions_file("", ["voc_2007_trainval"]).endswith("voc.json")
    assert desc.resolve_descriptions_file("", ["shapes_train"]).endswith("shapes.json")
    assert desc.resolve_descriptions_file("", ["my_dataset_train"]) is None
    MetadataCatalog.get("my_dataset_train").set(descriptions="coco")
    try:
        assert desc.resolve_descriptions_file("", ["my_dataset_train"]).endswith("coco.json")
    finally:
        MetadataCatalog.remove("my_dataset_train")
    # a name never resolves outside the folder, even through a symlink in it
    folder = tmp_path / "descriptions"
    folder.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (folder / "evil.json").symlink_to(outside)
    monkeypatch.setattr(desc, "descriptions_dir", lambda: str(folder))
    with pytest.raises(desc.DescriptionError, match="outside"):
        desc.resolve_descriptions_file("evil")
    bad = tmp_path / "bad.json"
    bad.write_text('{"cat": "one sentence"}')
    with pytest.raises(desc.DescriptionError, match="class 'cat'"):
        desc.load_descriptions(str(bad))
    # classes without sentences fall back to the template, and are named in the log
    sents, missing = desc.class_sentences(["cat", "unicorn"], {"cat": ["a cat has whiskers."]})
    assert sents == [["a cat has whiskers."], ["a photo of a unicorn."]] and missing == ["unicorn"]
    _, model = _model()
    with caplog.at_level(logging.INFO, logger="clcl_det.modeling.cls_heads.spa"):
        bank = build_description_bank(model.text, ["cat", "unicorn"], {"cat": ["a cat has whiskers.", "it purrs."]})
    assert "unicorn" in caplog.text and "cat" not in caplog.text.split("template")[-1].split(":")[-1]
    assert bank.sentence_mask.tolist() == [[True, True], [True, False]]
    assert bank.token_mask.sum(1).tolist() == [sum(len(t) for t in model.text.encode_tokens(
        ["a cat has whiskers.", "it purrs."])[0]), len(model.text.encode_tokens(["a photo of a unicorn."])[0][0])]


# -- a head from outside the package --------------------------------------------------------------------
def test_example_custom_head_trains(shapes_root, tmp_path):
    example = load_plugins([os.path.join(REPO, "examples", "custom_head.py")])[0]
    head = example.MarginTextClassifier(embed_dim=4, margin=0.25)
    logits, labels = torch.randn(3, 3), torch.tensor([0, 2, 1])  # 2 classes + background
    ctx = _ctx(F.normalize(torch.randn(2, 4), dim=-1))
    shifted = logits.clone()
    shifted[0, 0] -= float(head.scale().detach()) * 0.25
    shifted[2, 1] -= float(head.scale().detach()) * 0.25
    torch.testing.assert_close(head.losses(logits, labels, None, ctx)["loss_cls"], F.cross_entropy(shifted, labels))
    out = str(tmp_path / "example")
    summary = example.run(out, ["SOLVER.MAX_ITER", "2", "INPUT.IMAGE_SIZE", "64"])
    assert [s["task"] for s in summary["stages"]] == [0]
    with open(os.path.join(out, "task_1", "train_metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert lines[-1]["iteration"] == 1 and math.isfinite(lines[-1]["loss_cls"])
    with open(os.path.join(out, "config.yaml")) as f:
        cfg_text = f.read()
    assert "MarginTextClassifier" in cfg_text and "custom_head.py" in cfg_text

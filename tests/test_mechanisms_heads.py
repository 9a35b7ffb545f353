"""Each continual mechanism of the classification heads and losses moves what it is meant to move
and nothing it is meant to keep: Gaussian replay, SPA's OT term and task projectors, SE-VPR's raw
and refined prototypes, SG-AKT's KL and relevance, and Faster ILOD's three terms."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from clcl_det.continual import begin_task, end_task, task_data
from clcl_det.data.continual import Task
from clcl_det.embedded.shapes import SHAPES_CLASSES
from clcl_det.engine.trainer import build_optimizer
from clcl_det.modeling import build_model
from clcl_det.modeling.losses.sgakt import SnapshotAggregator, sgakt_kl

from conftest import tiny_cfg, two_box_batch

TASK0 = Task(0, 0, 10, SHAPES_CLASSES[:10], SHAPES_CLASSES)
TASK1 = Task(1, 10, 20, SHAPES_CLASSES, SHAPES_CLASSES)


def _model(*opts):
    cfg = tiny_cfg()
    cfg.merge_from_list(["MODEL.SPA.DESCRIPTIONS", "shapes", "MODEL.SPA.TOPK", "2", "INPUT.IMAGE_SIZE", "64",
                         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", *opts])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def _batch(task, n=2, seed=0):
    return two_box_batch(task, n, seed, first_class_step=1)


def _train(model, cfg, task, steps, seed=0):
    model.train()
    opt = build_optimizer(cfg, model)
    for s in range(steps):
        losses = model(_batch(task, seed=seed + s))
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    return losses


def _first_task(*opts, steps=1):
    """A model trained on task 1, its task data seen (statistics, prototypes), entering task 2."""
    cfg, model = _model(*opts)
    begin_task(model, TASK0)
    _train(model, cfg, TASK0, steps)
    end_task(model, TASK0)
    task_data(model, TASK0, lambda: [_batch(TASK0, seed=5), _batch(TASK0, seed=6)])
    return cfg, model


def _grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


# -- Gaussian replay ------------------------------------------------------------------------------------
def test_mechanism_replay_around_text_classifier_trains_the_embedding_layer():
    _, model = _first_task("MODEL.CLS_HEAD.NAME", "GaussianReplay")
    head = model.roi_heads.cls_head
    assert head.means.shape[1] == model.roi_heads.embed.in_features  # box-head output space
    begin_task(model, TASK1)
    model.train()
    grads = _grads_of(model, model(_batch(TASK1))["loss_replay"])
    moved = [n for n, g in grads.items() if g is not None and float(g.abs().sum()) > 0]
    assert "roi_heads.embed.weight" in moved, moved
    assert any(n != "roi_heads.cls_head.inner.logit_scale" for n in moved)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(grads[n] is None for n in frozen)


def test_mechanism_replay_around_spa_trains_the_current_projector_only():
    _, model = _first_task("MODEL.CLS_HEAD.NAME", "GaussianReplay", "MODEL.REPLAY.INNER_HEAD", "SPAHead")
    head = model.roi_heads.cls_head
    assert head.means.shape[1] == model.backbone.embed_dim  # frozen CLIP space
    begin_task(model, TASK1)
    model.train()
    grads = _grads_of(model, model(_batch(TASK1))["loss_replay"])
    proj = head.inner.projectors
    assert float(grads["roi_heads.cls_head.inner.projectors.1.weight"].abs().sum()) > 0
    assert grads["roi_heads.cls_head.inner.projectors.0.weight"] is None and not proj[0].weight.requires_grad
    assert grads["roi_heads.embed.weight"] is None  # the replay lives in the frozen CLIP space


def test_mechanism_replay_scores_replayed_features_against_every_seen_class():
    """loss_replay is MODEL.REPLAY.WEIGHT times the cross-entropy of old-class pseudo-features over
    every seen class: with the new classes' texts copies of the old classes' (new class c+10 looks
    exactly like old class c), the loss of the same draws is that over the old classes alone plus
    weight * log 2; with the same draws, double the weight gives double the loss."""
    from dataclasses import replace

    _, model = _first_task("MODEL.CLS_HEAD.NAME", "GaussianReplay", "MODEL.REPLAY.WEIGHT", "0.5",
                           "MODEL.REPLAY.SAMPLES_PER_CLASS", "16")
    head = model.roi_heads.cls_head
    begin_task(model, TASK1)
    model.train()
    D = model.backbone.embed_dim
    ctx = model.make_context(F.normalize(torch.randn(1, D, 8, 8), dim=1), [(64, 64)])
    logits, labels, x = torch.zeros(3, 21), torch.tensor([10, 12, 20]), torch.randn(3, model.roi_heads.embed.out_features)

    def replay(c, weight=0.5):
        head.step.zero_()  # the same draws every call
        head.weight = weight
        return float(head.losses(logits, labels, x, c)["loss_replay"].detach())

    text = ctx.class_embeddings
    old_only = replace(ctx, class_embeddings=text[:10])  # the same draws scored over the old classes alone
    twins = replace(ctx, class_embeddings=torch.cat([text[:10], text[:10]]))  # new class c+10 = old class c
    base = replay(old_only)
    # over every seen class each draw's own class appears twice: -log(e^l_c / (2 sum_old e^l)) = CE_old + log 2
    assert replay(twins) - base == pytest.approx(0.5 * math.log(2), rel=1e-4)
    assert base > 0 and replay(old_only, 1.0) == pytest.approx(2 * base, rel=1e-5)
    assert replay(ctx) != base  # the new classes' own texts are in the softmax too


# -- SPA ----------------------------------------------------------------------------------------------
def test_mechanism_spa_ot_term_has_gradient_on_the_current_projector_only():
    cfg, model = _first_task("MODEL.CLS_HEAD.NAME", "SPAHead")
    begin_task(model, TASK1)
    head = model.roi_heads.cls_head
    g = torch.Generator().manual_seed(3)
    D = model.backbone.embed_dim
    dense = F.normalize(torch.randn(1, D, 8, 8, generator=g), dim=1)
    ctx = model.make_context(dense, [(64, 64)])
    rois = [torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 20.0, 64.0, 60.0]])]
    patches = F.normalize(head.project(head.roi_patches(ctx, rois)), dim=-1)
    bank = head.bank(head.class_names(ctx))
    s_ot = head.ot_scores(patches, bank, torch.arange(20).expand(2, 20))
    model.zero_grad(set_to_none=True)
    s_ot.sum().backward()
    assert float(head.projectors[1].weight.grad.abs().sum()) > 0
    assert head.projectors[0].weight.grad is None


def test_mechanism_spa_ot_term_trains_the_current_projector_through_the_logits():
    """Through the head's logits (not the OT scores alone, and with gradients on): the current
    projector's gradient of the class logits changes when the OT term is switched on (the OT
    score is not detached), and no gradient reaches the earlier task's projector."""
    cfg, model = _first_task("MODEL.CLS_HEAD.NAME", "SPAHead")
    begin_task(model, TASK1)
    model.train()
    head = model.roi_heads.cls_head
    g = torch.Generator().manual_seed(3)
    D = model.backbone.embed_dim
    ctx = model.make_context(F.normalize(torch.randn(1, D, 8, 8, generator=g), dim=1), [(64, 64)])
    rois = [torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 20.0, 64.0, 60.0]])]
    x = torch.randn(2, model.roi_heads.embed.out_features, generator=g)

    def grad(weight):
        head.ot_weight = weight
        model.zero_grad(set_to_none=True)
        head(x, ctx, rois)[:, :20].sum().backward()
        assert head.projectors[0].weight.grad is None
        return head.projectors[1].weight.grad.clone()

    with_ot, without = grad(1.0), grad(0.0)
    assert float((with_ot - without).abs().max()) > 1e-3 * float(without.abs().max()), "the OT score has no gradient"


def test_mechanism_spa_old_projectors_bit_identical_after_the_next_task():
    cfg, model = _first_task("MODEL.CLS_HEAD.NAME", "GaussianReplay", "MODEL.REPLAY.INNER_HEAD", "SPAHead")
    proj = model.roi_heads.cls_head.inner.projectors
    before = {k: v.clone() for k, v in proj[0].state_dict().items()}
    assert float(before["weight"].abs().sum()) > 0, "task 1's projector did not train"
    begin_task(model, TASK1)
    losses = _train(model, cfg, TASK1, 1)
    assert float(losses["loss_replay"].detach()) > 0
    end_task(model, TASK1)
    for k, v in proj[0].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert float(proj[1].weight.abs().sum()) > 0


# -- SE-VPR ---------------------------------------------------------------------------------------------
def test_mechanism_sevpr_raw_prototypes_are_frozen_clip_means_unchanged_by_training():
    cfg, model = _first_task("MODEL.CLS_HEAD.NAME", "SemanticPrototypeHead")
    head = model.roi_heads.cls_head
    raw = head.prototypes.clone()
    # independent: the mean of the normalised 1x1 RoIAlign of the frozen dense CLIP map per class
    feats, labels = [], []
    model.eval()
    with torch.no_grad():
        for seed in (5, 6):
            batch = _batch(TASK0, seed=seed)
            images = model.preprocess(batch)
            dense = model.backbone(images.tensors)["clip_dense"]
            pooled = roi_align(dense, [x["boxes"] for x in batch], 1, 1 / model.backbone.clip_stride, 0, True)
            feats.append(F.normalize(pooled.flatten(1), dim=-1))
            labels.append(torch.cat([x["classes"] for x in batch]))
    feats, labels = torch.cat(feats), torch.cat(labels)
    for c in labels.unique().tolist():
        torch.testing.assert_close(raw[c], F.normalize(feats[labels == c].mean(0), dim=0))
    # the next task's training leaves them bit-identical, also when its images show old classes
    # (labelled here, so their RoIs reach the running means); a retrained feature path gives the same
    counts = head.proto_counts.clone()
    begin_task(model, TASK1)
    model.train()
    opt = build_optimizer(cfg, model)
    for s in range(2):
        batch = _batch(TASK1, seed=s)
        for i, x in enumerate(batch):
            x["classes"] = torch.tensor([i, 12 + i])  # an old class and a new one
        losses = model(batch)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    assert torch.equal(head.prototypes[:10], raw[:10]) and torch.equal(head.proto_counts[:10], counts[:10])
    assert float(head.proto_counts[12]) > 0 and float(head.prototypes[12].norm()) > 0.5  # the new class's running mean
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    head.on_task_data(TASK0, model, [_batch(TASK0, seed=5), _batch(TASK0, seed=6)])
    torch.testing.assert_close(head.prototypes[:10], raw[:10], rtol=0, atol=1e-6)


def test_mechanism_sevpr_regulariser_pulls_refined_prototypes_to_their_stored_values():
    cfg, model = _first_task("MODEL.CLS_HEAD.NAME", "SemanticPrototypeHead")
    head = model.roi_heads.cls_head
    assert bool(head.refined_has[:4].all())
    begin_task(model, TASK1)
    model.train()
    batch = _batch(TASK1)
    # nothing moved yet, but the vocabulary grew: the regulariser measures only that
    with torch.no_grad():
        head.refine.proj.weight.mul_(3.0)
    losses = model(batch)
    assert float(losses["loss_proto_reg"].detach()) > 0 and float(losses["loss_proto"].detach()) > 0
    grads = _grads_of(model, losses["loss_proto_reg"])
    assert float(grads["roi_heads.cls_head.refine.proj.weight"].abs().sum()) > 0
    assert grads["roi_heads.embed.weight"] is None  # prototypes, not embeddings
    grads = _grads_of(model, model(batch)["loss_proto"])
    assert float(grads["roi_heads.embed.weight"].abs().sum()) > 0


# -- SG-AKT ---------------------------------------------------------------------------------------------
def test_mechanism_sgakt_kl_is_the_hand_computed_value_at_temperature_20_without_t2():
    z = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    o = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # cos = the vectors themselves (unit rows, identity text); by hand in numpy
    zs, os_ = 20 * z.double().numpy(), 20 * o.double().numpy()
    p = np.exp(os_) / np.exp(os_).sum(1, keepdims=True)
    q = np.exp(zs) / np.exp(zs).sum(1, keepdims=True)
    expected = (p * np.log(p / q)).sum(1).mean()
    got = sgakt_kl(z, o, text, 20.0)
    assert abs(float(got) - expected) < 1e-4 * expected
    assert expected > 1  # not the near-uniform softmax of 20 * (tau cos) / 20
    z.requires_grad_(True)
    o.requires_grad_(True)
    sgakt_kl(z, o, text, 20.0).backward()
    assert o.grad is None and float(z.grad.abs().sum()) > 0  # the teacher is detached


def test_mechanism_sgakt_relevance_changes_with_the_rois_features():
    torch.manual_seed(0)
    agg = SnapshotAggregator(8)
    query = torch.randn(1, 8).expand(2, 8)  # the same label for both RoIs
    values = torch.randn(2, 3, 8)
    o, rel = agg(query, values)
    assert torch.allclose(rel.sum(1), torch.ones(2))
    assert (rel[0] - rel[1]).abs().max() > 1e-3  # same query, different RoI features
    swapped = values[:, [2, 0, 1]]
    _, rel_s = agg(query, swapped)
    torch.testing.assert_close(rel_s, rel[:, [2, 0, 1]])
    (o * torch.randn(o.shape)).sum().backward()  # W_q and W_k learn from what the output is trained for
    assert float(agg.q_proj.weight.grad.abs().sum()) > 0 and float(agg.k_proj.weight.grad.abs().sum()) > 0


def test_mechanism_sgakt_trains_aggregator_and_student_from_snapshots_of_the_feature_path():
    cfg, model = _first_task("MODEL.CONTINUAL_LOSSES", "['SGAKTDistill']")
    loss = model.continual_losses[0]
    begin_task(model, TASK1)
    assert len(loss.snapshots) == 1
    snap = loss.snapshots[0]
    for name in ("box_head", "embed"):
        for k, v in getattr(snap, name).state_dict().items():
            assert torch.equal(v, getattr(model.roi_heads, name).state_dict()[k])
    model.train()
    losses = model(_batch(TASK1))
    assert float(losses["loss_sgakt"].detach()) > 0 and float(losses["loss_sgakt_agg"].detach()) > 0
    g_kl = _grads_of(model, losses["loss_sgakt"])
    assert float(g_kl["roi_heads.embed.weight"].abs().sum()) > 0  # the student is distilled
    assert all(g is None for n, g in g_kl.items() if n.startswith("continual_losses.0.aggregator"))
    g_agg = _grads_of(model, model(_batch(TASK1))["loss_sgakt_agg"])
    # one snapshot: relevance 1, so the CE trains the aggregator's norms (W_q, W_k: see the unit test)
    assert float(g_agg["continual_losses.0.aggregator.ln_post.weight"].abs().sum()) > 0
    assert all(g is None for n, g in g_agg.items() if n.startswith("continual_losses.0.snapshots"))
    state = {k: v.clone() for k, v in snap.state_dict().items()}
    _train(model, cfg, TASK1, 1)
    assert all(torch.equal(v, state[k]) for k, v in snap.state_dict().items())


def test_mechanism_sgakt_pool_evicts_the_least_relevant_snapshot():
    cfg, model = _model("MODEL.CONTINUAL_LOSSES", "['SGAKTDistill']", "MODEL.SGAKT.POOL_SIZE", "2")
    loss = model.continual_losses[0]
    tasks = [Task(i, 5 * i, 5 * i + 5, SHAPES_CLASSES[:5 * i + 5], SHAPES_CLASSES) for i in range(4)]
    begin_task(model, tasks[0])
    end_task(model, tasks[0])
    for t in tasks[1:3]:
        begin_task(model, t)
        end_task(model, t)
    assert len(loss.snapshots) == 2
    keep = loss.snapshots[0]
    loss.accumulated.copy_(torch.tensor([0.7, 0.3]))  # the newer snapshot was less relevant
    begin_task(model, tasks[3])
    assert len(loss.snapshots) == 2 and loss.snapshots[0] is keep
    torch.testing.assert_close(loss.accumulated, torch.full((2,), 0.5))


# -- Faster ILOD --------------------------------------------------------------------------------------
def _distill_losses(model, teacher):
    model.set_teacher(teacher)
    model.train()
    losses = model(_batch(TASK0, seed=3))
    return {k: float(losses[k].detach()) for k in ("loss_ilod_feat", "loss_ilod_rpn", "loss_ilod_roi")}


@pytest.mark.parametrize("part,moved", [(None, ()), ("backbone.fpn", ("feat", "rpn", "roi")),
                                        ("proposal_generator.head", ("rpn",)),
                                        ("roi_heads.box_head", ("roi",))])
def test_mechanism_faster_ilod_terms_zero_for_the_teacher_positive_when_perturbed(part, moved):
    _, model = _first_task("MODEL.CONTINUAL_LOSSES", "['FasterILODDistill']")
    teacher = copy.deepcopy(model)
    if part is not None:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.startswith(part):
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
    losses = _distill_losses(model, teacher)
    for term in ("feat", "rpn", "roi"):
        value = losses[f"loss_ilod_{term}"]
        assert (value > 0) if term in moved else (value == 0.0), (part, losses)


def test_mechanism_faster_ilod_feature_term_trains_the_students_pyramid():
    """loss_ilod_feat = sum over levels of mean(relu((t - mean t) - (s - mean s))) of the teacher's
    and the student's FPN maps (computed here by each model's own backbone, in float64 numpy); its
    gradient reaches the student's pyramid and nothing of the teacher or of the heads."""
    _, model = _first_task("MODEL.CONTINUAL_LOSSES", "['FasterILODDistill']")
    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("backbone.fpn"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    batch = _batch(TASK0, seed=3)
    model.set_teacher(teacher)
    model.train()
    with torch.no_grad():
        images = model.preprocess(batch).tensors
        s = {k: v.double().numpy() for k, v in model.backbone(images)["features"].items()}
        t = {k: v.double().numpy() for k, v in teacher.backbone(images)["features"].items()}
    ref = sum(np.maximum((t[k] - t[k].mean()) - (s[k] - s[k].mean()), 0).mean() for k in s)
    losses = model(batch)
    assert float(losses["loss_ilod_feat"].detach()) == pytest.approx(ref, rel=1e-4) and ref > 0
    grads = _grads_of(model, losses["loss_ilod_feat"])
    assert float(sum(grads[n].abs().sum() for n in grads if n.startswith("backbone.fpn") and grads[n] is not None)) > 0
    assert all(grads[n] is None for n in grads if n.startswith(("roi_heads", "proposal_generator")))
    assert all(p.grad is None for p in teacher.parameters())


def test_faster_ilod_rpn_and_roi_terms_are_the_hand_computed_values():
    """The RPN term (objectness where the teacher is higher, box deltas where it is higher by more
    than the threshold) and the RoI term (centred logits of [old, background], box deltas) by
    explicit loops over anchors, RoIs and classes."""
    from clcl_det.modeling.losses.distillation import filtered_rpn_distillation, roi_distillation

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 4, 5), (2, 3, 2, 3)]
    so, to = [torch.randn(s, generator=g) for s in shapes], [torch.randn(s, generator=g) for s in shapes]
    sd = [torch.randn(b, 4 * a, h, w, generator=g) for b, a, h, w in shapes]
    td = [torch.randn(b, 4 * a, h, w, generator=g) for b, a, h, w in shapes]
    terms = []
    for lo, lt, dso, dto, (B, A, H, W) in zip(so, to, sd, td, shapes):
        obj = box = 0.0
        for b in range(B):
            for a in range(A):
                for y in range(H):
                    for x in range(W):
                        diff = float(lt[b, a, y, x] - lo[b, a, y, x])
                        obj += max(diff, 0.0) ** 2
                        if diff > 0.1:
                            box += sum(float(dso[b, 4 * a + j, y, x] - dto[b, 4 * a + j, y, x]) ** 2 for j in range(4))
        n = B * A * H * W
        terms.append(obj / n + box / n)
    got = filtered_rpn_distillation(so, sd, to, td, 0.1)
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-5)

    k_old, K = 3, 5
    s_log, t_log = torch.randn(4, K + 1, generator=g), torch.randn(4, k_old + 1, generator=g)
    s_del, t_del = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    cls = box = 0.0
    for r in range(4):
        sm, tm = float(s_log[r].mean()), float(t_log[r].mean())
        s_kept = [float(s_log[r, c]) - sm for c in range(k_old)] + [float(s_log[r, K]) - sm]
        t_all = [float(t_log[r, c]) - tm for c in range(k_old + 1)]
        cls += sum((a - b) ** 2 for a, b in zip(s_kept, t_all))
        box += sum(float(s_del[r, j] - t_del[r, j]) ** 2 for j in range(4))
    ref = cls / (4 * (k_old + 1)) + box / 4
    assert float(roi_distillation(s_log, s_del, t_log, t_del)) == pytest.approx(ref, rel=1e-5)


# -- the configs without each continual part --------------------------------------------------------------
@pytest.mark.parametrize("without_name,name,key,off", [
    ("spa/spa_shapes_10+10_no_replay", "spa/spa_shapes_10+10", "MODEL.REPLAY.WEIGHT", 0.0),
    ("seca/sevpr_shapes_10+10_no_reg", "seca/sevpr_shapes_10+10", "MODEL.SEVPR.REG_WEIGHT", 0.0),
    ("seca/sevpr_shapes_10+10", "seca/seca_shapes_10+10", "MODEL.CONTINUAL_LOSSES", []),  # SECA without SG-AKT
    ("clclip_plus/clclip_plus_spa_shapes_10+10_no_replay", "clclip_plus/clclip_plus_spa_shapes_10+10",
     "MODEL.REPLAY.WEIGHT", 0.0),
    ("clclip_plus/clclip_plus_sevpr_shapes_10+10_no_reg", "clclip_plus/clclip_plus_sevpr_shapes_10+10",
     "MODEL.SEVPR.REG_WEIGHT", 0.0),
    ("clclip_plus/clclip_plus_sevpr_shapes_10+10", "clclip_plus/clclip_plus_seca_shapes_10+10",
     "MODEL.CONTINUAL_LOSSES", [])])
def test_mechanism_configs_without_the_continual_part_differ_from_theirs_only_there(without_name, name, key, off):
    import os

    from clcl_det.config import get_cfg

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    cfgs = []
    for n in (without_name, name):
        cfg = get_cfg()
        cfg.merge_from_file(os.path.join(folder, f"{n}.yaml"))
        cfgs.append(cfg)
    without, full = cfgs

    def get(cfg, k):
        for part in k.split("."):
            cfg = cfg[part]
        return cfg

    if key == "MODEL.CONTINUAL_LOSSES":
        assert "SGAKTDistill" in full.MODEL.CONTINUAL_LOSSES and "SGAKTDistill" not in without.MODEL.CONTINUAL_LOSSES
        assert [x for x in full.MODEL.CONTINUAL_LOSSES if x != "SGAKTDistill"] == list(without.MODEL.CONTINUAL_LOSSES)
        without.MODEL.SGAKT = full.MODEL.SGAKT.clone()  # SG-AKT's own keys: unused without the loss
    else:
        assert get(without, key) == off and get(full, key) != off
    without.merge_from_list([key, get(full, key), "OUTPUT_DIR", full.OUTPUT_DIR])
    assert without.dump() == full.dump()

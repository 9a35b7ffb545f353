"""CL-CLIP mechanisms checked by their effect: the prior reaches the experts through every gating
(and nothing else does), training-time top-k keeps a RoI's own class, the prior-guided background
ignore drops exactly the background RoIs the frozen prior calls an old class, and FPN drift is the
hand-computed value."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clcl_det.continual import begin_task, end_task
from clcl_det.data.continual import Task
from clcl_det.modeling import build_model
from clcl_det.modeling.losses.build import LossInputs, TeacherOutputs
from clcl_det.modeling.losses.drift import FPNDrift

from conftest import tiny_cfg

NAMES = tuple(f"class {i}" for i in range(8))


def _cfg(**kw):
    cfg = tiny_cfg(**{"INPUT.IMAGE_SIZE": 64, **kw})
    cfg.merge_from_list(["MODEL.ROI_HEADS.NAME", "MultiExpertRoIHeads", "MODEL.CLCLIP.MULTI_EXPERT.EXPERT_DIM", "4",
                         "MODEL.CONTINUAL_LOSSES", "['FPNDrift', 'Orthogonality']"])
    return cfg


def _model(**kw):
    torch.manual_seed(0)
    model = build_model(_cfg(**kw)).eval()
    begin_task(model, Task(0, 0, 6, NAMES[:6], NAMES))
    return model


def _inputs(model, seed=0, n_rois=6):
    """FPN features, RoIs and a dense CLIP map of one 64-px image, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    C, D, s = model.backbone.out_channels, model.backbone.embed_dim, model.backbone.clip_stride
    feats = {k: torch.randn(1, C, 64 // st, 64 // st, generator=g)
             for k, st in zip(model.backbone.level_names, model.backbone.strides)}
    xy = torch.rand(n_rois, 2, generator=g) * 30
    rois = [torch.cat([xy, xy + 8 + torch.rand(n_rois, 2, generator=g) * 24], dim=1)]
    return feats, rois, F.normalize(torch.randn(1, D, 64 // s, 64 // s, generator=g), dim=1)


def _predict(model, feats, rois, dense, labels=None):
    head = model.roi_heads
    ctx = model.make_context(dense, [(64, 64)])
    with torch.no_grad():
        return head.predict(head.pool(feats, rois, ctx.image_sizes), rois, ctx, labels)


# -- the prior reaches the experts through each gating ------------------------------------------------
@pytest.mark.parametrize("gating", ["residual", "multiply", "concat"])
def test_mechanism_expert_logits_follow_the_prior_through_every_gating(gating):
    """The class pathways are f * (1 + gamma m), f * m or [f, m] of the RoI feature f and the
    class's pooled prior m (checked against these formulas on random tensors); through the head,
    the experts' logits move when only the dense CLIP map (hence the prior) changes, and do not
    move by a bit when the prior is the uniform one of COST_VOLUME.ENABLED False."""
    model = _model(**{"MODEL.CLCLIP.MULTI_EXPERT.GATING": gating, "MODEL.CLCLIP.MULTI_EXPERT.GAMMA": 2.0})
    head = model.roi_heads
    g = torch.Generator().manual_seed(1)
    f, m = torch.randn(3, 5, 7, 7, generator=g), torch.rand(3, 4, 7, 7, generator=g)
    ref = {"residual": f[:, None] * (1 + 2.0 * m[:, :, None]), "multiply": f[:, None] * m[:, :, None],
           "concat": torch.cat([f[:, None].expand(-1, 4, -1, -1, -1), m[:, :, None]], dim=2)}[gating]
    torch.testing.assert_close(head.pathways(f, m), ref)

    feats, rois, dense = _inputs(model)
    _, _, other = _inputs(model, seed=1)
    a, b = _predict(model, feats, rois, dense)["logits"][:, :6], _predict(model, feats, rois, other)["logits"][:, :6]
    assert torch.isfinite(a).all()
    assert float((a - b).abs().max()) > 1e-2 * float(a.abs().max()), "the experts do not see the prior"

    uniform = _model(**{"MODEL.CLCLIP.MULTI_EXPERT.GATING": gating, "MODEL.CLCLIP.COST_VOLUME.ENABLED": False})
    a, b = _predict(uniform, feats, rois, dense)["logits"][:, :6], _predict(uniform, feats, rois, other)["logits"][:, :6]
    assert torch.equal(a, b), "with the uniform prior the dense CLIP map must not reach the experts"


# -- training-time top-k -----------------------------------------------------------------------------------
def test_mechanism_training_topk_keeps_each_rois_own_class():
    """MULTI_EXPERT.TOPK 2: each RoI is scored by the experts of its 2 classes of highest prior
    level (the other logits -inf); in training a foreground RoI's own class is among them even
    when its prior ranks it last, with the logit the full (top-k 0) head gives it; a background
    RoI keeps its plain top 2."""
    model = _model(**{"MODEL.CLCLIP.MULTI_EXPERT.TOPK": 2})
    feats, rois, dense = _inputs(model)
    ctx = model.make_context(dense, [(64, 64)])
    order = model.roi_heads.prior_level(rois, ctx, 6).argsort(dim=1, descending=True)
    last = order[:, -1]
    labels = last.clone()
    labels[-2:] = 6  # two background RoIs
    out = _predict(model, feats, rois, dense, labels)["logits"][:, :6]
    full = _predict(_model(), feats, rois, dense)["logits"][:, :6]
    finite = torch.isfinite(out)
    assert finite.sum(dim=1).tolist() == [2] * len(labels)
    for r in range(len(labels)):
        kept = set(finite[r].nonzero().squeeze(1).tolist())
        if labels[r] < 6:
            assert kept == {int(order[r, 0]), int(labels[r])}, (r, kept)
        else:
            assert kept == set(order[r, :2].tolist()), (r, kept)
        for k in kept:
            assert float(out[r, k]) == pytest.approx(float(full[r, k]), rel=1e-4, abs=1e-4)
    without = _predict(model, feats, rois, dense)["logits"][:, :6]  # inference: no label to keep
    assert (torch.isfinite(without).sum(dim=1) == 2).all() and not torch.isfinite(without[:-2].gather(1, last[:-2, None])).any()


# -- prior-guided background ignore ---------------------------------------------------------------------------
@pytest.mark.parametrize("background,thresh,active", [("shared", 0.5, True), ("shared", 2.0, False), ("task", 0.5, False)])
def test_mechanism_prior_guided_background_ignore(background, thresh, active):
    """From task 2 on (MULTI_EXPERT.BACKGROUND shared), a background RoI whose frozen prior gives
    an old class more than BG_IGNORE_THRESH is left out of the classification loss (label -1);
    a high prior of a new class, a labelled RoI, task 1, a threshold above 1 and the per-task
    background experts leave every label as it is."""
    model = _model(**{"MODEL.CLCLIP.MULTI_EXPERT.BACKGROUND": background, "MODEL.CLCLIP.BG_IGNORE_THRESH": thresh})
    head = model.roi_heads
    K = 8
    prior = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0],  # bg, old class 0: ignored
                          [0.1, 0.2, 0.1, 0.0, 0.0, 0.0, 0.9, 0.0],  # bg, new class 6: kept
                          [0.0, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # labelled old object: kept
                          [0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.0, 0.0],  # bg, old class 5: ignored
                          [0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.0, 0.0]])  # bg, below the threshold: kept
    labels = torch.tensor([K, K, 1, K, K])
    t1 = Task(0, 0, 6, NAMES[:6], NAMES)
    ctx1 = model.make_context(torch.zeros(1, 8, 4, 4), [(64, 64)])
    bg1 = torch.full((5,), 6)
    assert torch.equal(head.adjust_labels(bg1, {"prior_mean": prior[:, :6]}, ctx1), bg1), "task 1 has no old class"
    end_task(model, t1)
    begin_task(model, Task(1, 6, 8, NAMES, NAMES))
    ctx = model.make_context(torch.zeros(1, 8, 4, 4), [(64, 64)])
    got = head.adjust_labels(labels, {"prior_mean": prior}, ctx)
    expected = torch.tensor([-1, K, 1, -1, K]) if active else labels
    assert torch.equal(got, expected), got


# -- FPN drift ---------------------------------------------------------------------------------------------------
class _Teacher:
    """The Teacher interface on a copy of the model (the parts FPN drift reads)."""

    def __init__(self, model):
        self.m = model

    def teacher_features(self, taps):
        return self.m.backbone.pyramid_features(taps)

    def teacher_rpn(self, features):
        raise AssertionError("not read by FPN drift")

    def teacher_roi_logits(self, features, rois, ctx):
        raise AssertionError("not read by FPN drift")

    def teacher_roi_outputs(self, features, rois, ctx):
        raise AssertionError("not read by FPN drift")

    def teacher_proposals(self, images, features):
        raise AssertionError("not read by FPN drift")

    def teacher_parameters(self):
        return dict(self.m.backbone.named_parameters())


def test_mechanism_drift_is_the_hand_computed_value():
    """feature: weight * mean over levels of the mean squared difference between the student's and
    the teacher's pyramid (the teacher's computed by its own backbone); param: weight * sum of
    squared parameter differences; both in float64 numpy."""
    model = _model()
    model.train()
    teacher = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.backbone.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    images = model.preprocess([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)}])
    bb = model.backbone(images.tensors)
    outputs = LossInputs(backbone=bb, ctx=None, rpn={}, roi={})
    with torch.no_grad():
        t_feats = teacher.backbone(images.tensors)["features"]
    s = {k: v.detach().double().numpy() for k, v in bb["features"].items()}
    t = {k: v.double().numpy() for k, v in t_feats.items()}
    assert len(s) >= 3
    feature = 0.5 * np.mean([np.mean((s[k] - t[k]) ** 2) for k in s])
    got = FPNDrift(mode="feature", weight=0.5)(model, outputs, [], TeacherOutputs(_Teacher(teacher), outputs))
    assert float(got["loss_drift"].detach()) == pytest.approx(feature, rel=1e-4) and feature > 0
    tp = dict(teacher.backbone.named_parameters())
    param = 0.5 * sum(float(((p.detach().double() - tp[n].detach().double()) ** 2).sum())
                      for n, p in model.backbone.named_parameters())
    got = FPNDrift(mode="param", weight=0.5)(model, outputs, [], TeacherOutputs(_Teacher(teacher), outputs))
    assert float(got["loss_drift"].detach()) == pytest.approx(param, rel=1e-4) and param > 0

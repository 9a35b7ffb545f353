"""CL-CLIP's prior reaches the experts' scores: the level of class k's prior over a RoI moves class
k's logit, features where class k's prior is ~0 barely move it, a new task's gradient reaches the
RoI features mostly where its classes' prior lies, and the orthogonality loss pairs a foreground
RoI's labelled class with the others, never two frozen experts."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from clcl_det.continual import begin_task, end_task
from clcl_det.data.continual import Task
from clcl_det.modeling import build_model
from clcl_det.modeling.losses.orthogonality import orthogonality_loss

from conftest import tiny_cfg

NAMES = tuple(f"class {i}" for i in range(8))
J, K = 1, 4  # two classes of the first task


def _model(**kw):
    cfg = tiny_cfg(**{"INPUT.IMAGE_SIZE": 64, **kw})
    cfg.merge_from_list(["MODEL.ROI_HEADS.NAME", "MultiExpertRoIHeads", "MODEL.CLCLIP.MULTI_EXPERT.EXPERT_DIM", "4",
                         "MODEL.CONTINUAL_LOSSES", "['FPNDrift', 'Orthogonality']"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    begin_task(model, Task(0, 0, 6, NAMES[:6], NAMES))
    # well-separated text embeddings (the random tiny CLIP's are nearly parallel): the prior of a
    # cell that shows class j is then ~0 for every other class
    g = torch.Generator().manual_seed(3)
    D = model.backbone.embed_dim
    model.class_embeddings = F.normalize(torch.randn(len(NAMES), D, generator=g), dim=1)
    model.background_embedding = F.normalize(torch.randn(D, generator=g), dim=0)
    return model


def _features(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = model.backbone.out_channels
    return {k: torch.randn(1, C, 64 // st, 64 // st, generator=g)
            for k, st in zip(model.backbone.level_names, model.backbone.strides)}


def _cells(model):
    s = model.backbone.clip_stride
    return 64 // s, 64 // s


def _logits(model, pooled, rois, dense):
    head = model.roi_heads
    with torch.no_grad():
        return head.predict(pooled, rois, model.make_context(dense, [(64, 64)]))["logits"]


def _pooled(model, feats, rois):
    return model.roi_heads.pool(feats, rois, [(64, 64)])


def test_mechanism_prior_level_over_a_roi_moves_its_class_logit():
    """Lowering class k's prior evenly over the whole image (every cell of the dense CLIP map is
    a*t_k + t_bg, a from 0.5 down to 0) lowers class k's logit of every RoI by a clear margin, and
    far more than the other classes'; raising it (a = 3) raises it. The image features are
    unchanged, and k's map is flat inside each RoI: only its level changes."""
    model = _model()
    g = torch.Generator().manual_seed(1)
    h, w = _cells(model)
    t_k = model.class_embeddings[K][None, :, None, None].expand(-1, -1, h, w)
    t_bg = model.background_embedding[None, :, None, None]
    xy = torch.rand(6, 2, generator=g) * 30
    rois = [torch.cat([xy, xy + 12 + torch.rand(6, 2, generator=g) * 20], dim=1)]
    pooled = _pooled(model, _features(model), rois)
    base, low, high = (_logits(model, pooled, rois, F.normalize(a * t_k + t_bg, dim=1))[:, :6]
                       for a in (0.5, 0.0, 3.0))
    others = [c for c in range(6) if c != K]
    d_low, d_high = low - base, high - base
    assert (d_low[:, K] < -2.0).all(), d_low[:, K]
    assert (d_high[:, K] > 2.0).all(), d_high[:, K]
    assert (d_low[:, K] < d_low[:, others].amin(dim=1) - 2.0).all(), d_low
    assert (d_high[:, K] > d_high[:, others].amax(dim=1) + 2.0).all(), d_high


def test_mechanism_features_outside_a_class_prior_barely_move_its_logit():
    """One RoI over the whole image: class j fills its left half, class k its right half (the dense
    CLIP map is j's text on the left, k's on the right). Perturbing the RoI's features in its two
    leftmost columns (where k's prior is ~0) moves class k's logit far less than class j's.

    The experts read the RoI feature itself here (TRUNK own, no convs): a trunk of GroupNorm'd convs
    shared by every pathway (TRUNK box_head) normalises each RoI with statistics of all its cells,
    so a perturbation anywhere in the RoI reaches every cell before any pathway is gated."""
    model = _model(**{"MODEL.CLCLIP.MULTI_EXPERT.TRUNK": "own", "MODEL.CLCLIP.MULTI_EXPERT.TRUNK_CONVS": 0})
    h, w = _cells(model)
    dense = torch.empty(1, model.backbone.embed_dim, h, w)
    dense[..., : w // 2] = model.class_embeddings[J][:, None, None]
    dense[..., w // 2:] = model.class_embeddings[K][:, None, None]
    rois = [torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    pooled = _pooled(model, _features(model), rois)
    ctx = model.make_context(dense, [(64, 64)])
    m = model.roi_heads.pooled_prior(rois, ctx, 6)
    assert float(m[0, K, :, :2].max()) < 1e-3 < 0.5 < float(m[0, J, :, :2].min())  # the layout holds
    assert float(m[0, K, :, -1].min()) > 0.5
    base = _logits(model, pooled, rois, dense)
    moved = []
    for seed in range(3):
        g = torch.Generator().manual_seed(10 + seed)
        p = pooled.clone()
        p[..., :2] += 2.0 * torch.randn(p[..., :2].shape, generator=g)
        moved.append((_logits(model, p, rois, dense) - base)[0].abs())
    moved = torch.stack(moved)
    assert (moved[:, J] > 0.05).all(), moved[:, J]  # the features do reach class j's expert
    assert (moved[:, K] < 0.1 * moved[:, J]).all(), (moved[:, K], moved[:, J])


def test_mechanism_new_task_gradient_reaches_features_where_its_prior_lies():
    """In the second task, the new class's expert sends the FPN its gradient where the new class's
    prior lies: the left half of the image shows an old class, the right half the new class; the
    gradient of the new class's logit w.r.t. the FPN features of a RoI over the whole image is
    mostly in the right half (outside the middle quarter, which the trunk convs blur across; the
    trunk's GroupNorm, shared by all pathways, still passes some to the left half)."""
    model = _model()
    end_task(model, Task(0, 0, 6, NAMES[:6], NAMES))
    embeddings, bg = model.class_embeddings.clone(), model.background_embedding.clone()
    begin_task(model, Task(1, 6, 8, NAMES[6:], NAMES))
    model.class_embeddings, model.background_embedding = embeddings, bg
    new = 7
    h, w = _cells(model)
    dense = torch.empty(1, model.backbone.embed_dim, h, w)
    dense[..., : w // 2] = model.class_embeddings[J][:, None, None]
    dense[..., w // 2:] = model.class_embeddings[new][:, None, None]
    rois = [torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    head = model.roi_heads.train()
    feats = {k: v.requires_grad_(True) for k, v in _features(model).items()}
    out = head.predict(_pooled(model, feats, rois), rois, model.make_context(dense, [(64, 64)]))
    out["logits"][0, new].backward()
    left = right = 0.0
    for f in feats.values():
        if f.grad is None:  # a pyramid level the RoI is not pooled from
            continue
        grad, q = f.grad[0].abs().sum(dim=0), f.shape[-1] // 8  # H x W
        left += float(grad[:, : 3 * q].sum())
        right += float(grad[:, f.shape[-1] - 3 * q:].sum())
    assert right > 0 and left < 0.25 * right, (left, right)


def _frozen_pair_setup():
    torch.manual_seed(0)
    R, S, P = 5, 4, 9
    maps = F.normalize(torch.rand(R, S, P), dim=-1).requires_grad_(True)
    trainable = torch.tensor([False, False, True, True])  # classes 0, 1 frozen (an earlier task)
    return maps, trainable


def test_orthogonality_pairs_the_labelled_class_with_the_others():
    """With labels: the sum over the foreground RoIs and k != y of (a_y . a_k)^2 over R (S - 1)
    (checked against a loop); background (label S) and ignored (-1) RoIs add nothing."""
    maps, _ = _frozen_pair_setup()
    labels = torch.tensor([2, 0, 4, -1, 3])
    terms = [float(maps[r, labels[r]] @ maps[r, k]) ** 2 for r in range(5) if 0 <= labels[r] < 4
             for k in range(4) if k != labels[r]]
    assert float(orthogonality_loss(maps, labels)) == pytest.approx(sum(terms) / (5 * 3), rel=1e-5)
    # a RoI's own map against itself is never a pair: identical maps of other classes give 1
    same = F.normalize(torch.rand(3, 1, 9), dim=-1).expand(3, 4, 9)
    assert float(orthogonality_loss(same, torch.tensor([0, 1, 3]))) == pytest.approx(1.0, abs=1e-6)
    assert float(orthogonality_loss(same, torch.tensor([4, 4, -1]))) == 0.0  # background only


def test_orthogonality_no_gradient_from_two_frozen_experts():
    """A RoI labelled with a frozen class: its pairs with the other frozen class are left out (no
    gradient at all to the frozen maps); its pairs with trainable classes train those only. The
    loss sums the pairs that hold a trainable expert (over R (S - 1))."""
    maps, trainable = _frozen_pair_setup()
    labels = torch.tensor([0, 1, 0, 2, 1])
    loss = orthogonality_loss(maps, labels, trainable=trainable)
    loss.backward()
    assert torch.equal(maps.grad[:, :2], torch.zeros_like(maps.grad[:, :2])), "frozen maps got gradient"
    assert float(maps.grad[:, 2:].abs().sum()) > 0
    terms = [float(maps[r, labels[r]] @ maps[r, k]) ** 2 for r in range(5) for k in range(4)
             if k != labels[r] and (trainable[k] or trainable[labels[r]])]
    assert float(loss) == pytest.approx(sum(terms) / (5 * 3), rel=1e-5)
    # only frozen classes and frozen labels: no pair, a zero loss without gradient
    maps.grad = None
    only_frozen = orthogonality_loss(maps[:, :2], labels.clamp(max=1), trainable=trainable[:2])
    assert float(only_frozen) == 0.0


def test_prior_level_is_the_clip_softmax_of_the_rois_inner_cosines():
    """The level of a RoI is the softmax over [task's seen classes, background] of the mean cosines
    of the RoI moved in by LEVEL_INSET cells, at T = 1 / the CLIP's logit scale (TEMPERATURE 0) or
    at the TEMPERATURE given; the logits' prior term is beta * log(level_k / level_bg)."""
    for temperature in (0.0, 0.05):
        model = _model(**{"MODEL.CLCLIP.COST_VOLUME.TEMPERATURE": temperature,
                          "MODEL.CLCLIP.MULTI_EXPERT.PRIOR_LOGIT_WEIGHT": 0.7})
        assert model.clip_logit_scale == pytest.approx(float(model.clip.logit_scale.exp()))
        T = temperature or 1.0 / model.clip_logit_scale
        g = torch.Generator().manual_seed(5)
        h, w = _cells(model)
        dense = F.normalize(torch.randn(1, model.backbone.embed_dim, h, w, generator=g), dim=1)
        rois = [torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0]])]
        ctx = model.make_context(dense, [(64, 64)])
        level = model.roi_heads.prior_level(rois, ctx, 6)
        s = model.backbone.clip_stride
        inset = 0.25 * s
        inner = rois[0] + torch.tensor([inset, inset, -inset, -inset])
        text = torch.cat([model.class_embeddings[:6], model.background_embedding[None]])
        cos = torch.einsum("bdhw,kd->bkhw", dense, text)
        mean = roi_align(cos, [inner], 7, spatial_scale=1.0 / s, sampling_ratio=2, aligned=True).mean(dim=(2, 3))
        ref = (mean / T).softmax(dim=1)
        torch.testing.assert_close(level, ref[:, :6])
        torch.testing.assert_close(model.roi_heads.prior_logits(rois, ctx, 6), 0.7 * (ref[:, :6] / ref[:, 6:]).log())


@pytest.mark.parametrize("vocabulary", ["seen", "task"])
def test_one_class_task_prior_tells_its_class_from_earlier_objects(vocabulary):
    """A one-class task (class 6 after classes 0-5): on cells that show an earlier class j (whose
    text is also somewhat like class 6's), class 6's map is ~0 when normalised over the classes
    seen so far (VOCABULARY seen), and high over its own task's class and the background only."""
    model = _model(**{"MODEL.CLCLIP.COST_VOLUME.VOCABULARY": vocabulary})
    end_task(model, Task(0, 0, 6, NAMES[:6], NAMES))
    embeddings, bg = model.class_embeddings.clone(), model.background_embedding.clone()
    begin_task(model, Task(1, 6, 7, NAMES[:7], NAMES))
    model.class_embeddings, model.background_embedding = embeddings, bg
    h, w = _cells(model)
    cell = F.normalize(model.class_embeddings[J] + 0.5 * model.class_embeddings[6], dim=0)
    dense = cell[None, :, None, None].expand(1, -1, h, w).contiguous()
    ctx = model.make_context(dense, [(64, 64)])
    m = model.roi_heads.pooled_prior([torch.tensor([[8.0, 8.0, 56.0, 56.0]])], ctx, 7)
    if vocabulary == "seen":
        assert float(m[0, 6].max()) < 0.05 and float(m[0, J].min()) > 0.5
    else:
        assert float(m[0, 6].min()) > 0.5


def test_box_prior_quality_on_a_hand_made_cost_volume():
    """`box_prior` (what tools/measure_clip_dense.py reports): a box painted, with a cell of margin,
    with class k's cosine 1 (others 0, background 0.5) has level softmax([..1 at k..], 0.5) / T);
    hit rate, prior of the box's class, entropy and calibration error follow from the levels."""
    from clcl_det.embedded.quality import PriorQuality, box_prior

    cost = torch.zeros(4, 8, 8)  # 3 classes + background, 8-px cells
    cost[3] = 0.5
    boxes, labels = torch.tensor([[8.0, 8.0, 32.0, 32.0], [48.0, 48.0, 64.0, 64.0]]), torch.tensor([2, 0])
    for (x0, y0, x1, y1), k in zip(boxes.long().tolist(), labels.tolist()):
        cost[k, max(0, y0 // 8 - 1):y1 // 8 + 1, max(0, x0 // 8 - 1):x1 // 8 + 1] = 1.0
    level, cell = box_prior(cost, boxes, 8, 0.1, "softmax", level_inset=0.25)
    ref = torch.stack([(torch.eye(4)[k].index_put_((torch.tensor([3]),), torch.tensor(0.5)) / 0.1).softmax(0)
                       for k in labels.tolist()])
    torch.testing.assert_close(level, ref)
    assert cell[:, :3].argmax(dim=1).tolist() == labels.tolist()
    q = PriorQuality(level, cell, labels)
    assert q.hit_rate("level").overall == 1.0 and q.hit_rate("map").overall == 1.0
    assert q.true_class_prior() == pytest.approx(float(ref[0, 2]))
    p = ref / ref.sum(1, keepdim=True)
    assert q.entropy() == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-5)
    assert q.calibration_error() == pytest.approx(1.0 - float(ref[0, 2]), rel=1e-5)  # always right, confidence < 1


def test_normalized_gating_and_the_uniform_ablation():
    """GATING normalized forms f * m / max_RoI(m) (checked on random tensors; a flat map gives f
    itself). With the uniform prior (COST_VOLUME.ENABLED False) neither route carries CLIP evidence:
    the level change of the first test moves no logit at all."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    f, m = torch.randn(3, 5, 7, 7, generator=g), torch.rand(3, 4, 7, 7, generator=g)
    peak = torch.stack([torch.stack([m[r, s].max() for s in range(4)]) for r in range(3)])
    torch.testing.assert_close(model.roi_heads.pathways(f, m), f[:, None] * (m / peak[:, :, None, None])[:, :, None])
    torch.testing.assert_close(model.roi_heads.pathways(f, torch.full_like(m, 0.2)), f[:, None].expand(-1, 4, -1, -1, -1))

    uniform = _model(**{"MODEL.CLCLIP.COST_VOLUME.ENABLED": False})
    h, w = _cells(uniform)
    t_k = uniform.class_embeddings[K][None, :, None, None].expand(-1, -1, h, w)
    t_bg = uniform.background_embedding[None, :, None, None]
    rois = [torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0]])]
    pooled = _pooled(uniform, _features(uniform), rois)
    low, high = (_logits(uniform, pooled, rois, F.normalize(a * t_k + t_bg, dim=1)) for a in (0.0, 3.0))
    assert torch.equal(low, high)


def test_prior_weighted_drift_holds_the_pyramid_where_old_objects_lie():
    """DRIFT.PRIOR_WEIGHTED: each cell's squared pyramid difference weighted by the earlier
    classes' highest prior there (hand-computed at the levels' own size); a change of the pyramid
    where no old class's prior lies costs nothing, one where it lies does."""
    from types import SimpleNamespace

    from clcl_det.modeling.context import HeadContext
    from clcl_det.modeling.losses.build import LossInputs
    from clcl_det.modeling.losses.drift import FPNDrift

    g = torch.Generator().manual_seed(4)
    teacher = {"p3": torch.randn(2, 5, 8, 8, generator=g), "p4": torch.randn(2, 5, 8, 8, generator=g)}
    student = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in teacher.items()}
    prior = torch.zeros(2, 5, 8, 8)  # classes 0-2 of task 1, 3-4 of task 2
    prior[:, 1, :, 4:] = 0.8  # an old class on the right half
    prior[:, 3, :, :4] = 0.9  # the new class on the left: not an old class's
    ctx = HeadContext(torch.zeros(5, 4), torch.zeros(4), torch.zeros(2, 4, 8, 8), 8, [(64, 64)] * 2,
                      task=Task(1, 3, 5, NAMES[:5], NAMES[:5]), extras={"prior": prior})
    drift = FPNDrift(mode="feature", weight=0.5, prior_weighted=True)

    def loss(s):
        inputs = LossInputs(backbone={"features": s}, ctx=ctx, rpn={}, roi={})
        return float(drift(None, inputs, [], SimpleNamespace(features=lambda: teacher))["loss_drift"])

    w = prior[:, 1:2]
    ref = 0.5 * sum(float((w * (student[k] - teacher[k]).pow(2)).sum() / (w.sum() * 5)) for k in teacher) / 2
    assert loss(student) == pytest.approx(ref, rel=1e-5)
    left = {k: v.clone() for k, v in student.items()}
    left["p3"][..., :4] += 1.0
    right = {k: v.clone() for k, v in student.items()}
    right["p3"][..., 4:] += 1.0
    assert loss(left) == pytest.approx(loss(student), rel=1e-6)
    assert loss(right) > 2 * loss(student)

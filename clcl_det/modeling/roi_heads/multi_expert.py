"""CL-CLIP's Multi-Expert RoI head: the cost-volume prior decouples each RoI feature into one
pathway per class; each class has its own convolutional expert, created when the class first
appears and frozen after its task. Boxes come from the shared F-ViT branch (or, as an option, from
each task's copy of its regressor, frozen with the task); the background logit from a per-task
background expert frozen with its task (or, as an option, from the shared branch).

The per-RoI prior and the gatings live in `class_prior`, the experts in `expert_bank`; this module
wires them into the F-ViT head: the experts' trunk, the expert logits, and how the background
closes the softmax."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...config import configurable
from ...utils.device import chunk_elements
from ..backbone.clip_vit import get_norm
from ..context import HeadContext
from ..cost_volume import PRIOR_NORMS
from .build import ROI_HEADS_REGISTRY
from .class_prior import GATINGS, CostVolumePrior, UniformPrior
from .expert_bank import ExpertBank, ExpertChunk
from .fvit_roi_heads import FViTRoIHeads, pooled_clip_embeddings

__all__ = ["ExpertChunk", "ExpertBank", "MultiExpertRoIHeads", "GATINGS"]

BOX_REGS = ("shared", "task")
_MAX_PATHWAY_ELEMENTS = 2**21  # expert-conv chunk bound on a CPU: 8 MB of float32 pathway inputs (cache-sized); a GPU's: chunk_elements
_LEVEL_FLOOR = 1e-6  # the prior level's floor in its log (a sigmoid's background column can be 0)
_MAX_GATHERED_ELEMENTS = 2**28  # training with per-RoI classes on a CPU: pathway + gathered weight elements per chunk (a memory bound)


@ROI_HEADS_REGISTRY.register()
class MultiExpertRoIHeads(FViTRoIHeads):
    """F-ViT RoI head + cost-volume category decoupling + per-class experts (docs/methods.md, CL-CLIP).

    Class logits s_{r,k} = tau_k cos(z_{r,k}, t_k) + beta log(l_{r,k} / l_{r,bg}) come from expert k on
    the pathway f_r * m_{r,k} / max m_{r,k} (GATING normalized; or f_r * m_{r,k}, f_r * (1 + gamma
    m_{r,k}), [f_r, m_{r,k}]) and from the prior's level l over the RoI: the map m says where class k
    lies inside the RoI, the level how much the RoI looks like it (`class_prior`). With `background` "task" each
    task also has a background expert b_t (pathway gated by its task's background prior, logit
    tau cos(z, t_bg)), frozen with the task's class experts, and a class's probability is the softmax
    over its own task's logits and b_t: an old class's score depends on frozen experts, the FPN and
    the frozen prior only. With "shared" the shared branch's background logit closes one softmax over
    all classes. Box regression (with `box_reg` "shared") and vocabulary classes without an expert
    (zero-shot evaluation) come from the shared branch; with "task" a finished task's classes take
    their boxes from its copy of the shared regressor, frozen at the task's end."""

    loss_names = FViTRoIHeads.loss_names + ("loss_cls_shared",)  # the shared branch's own class loss

    @configurable
    def __init__(self, *, expert_dim: int = 16, gating: str = "normalized", gamma: float = 1.0, topk: int = 0,
                 freeze: bool = True, use_cost_volume: bool = True, prior_temperature: float = 0.0,
                 prior_norm: str = "softmax", prior_vocabulary: str = "seen", prior_level_inset: float = 0.25,
                 prior_logit_weight: float = 1.0, bg_ignore_thresh: float = 0.5, shared_class_logits: bool = False,
                 expert_temperature: float = 50.0, pool_size: int = 7, expert_norm: str = "GN",
                 shared_class_loss_weight: float = 1.0, background: str = "task", trunk: str = "box_head",
                 trunk_convs: int = 4, box_reg: str = "shared", **kwargs: Any):
        super().__init__(**kwargs)
        if gating not in GATINGS:
            raise ValueError(f"MODEL.CLCLIP.MULTI_EXPERT.GATING '{gating}' is not one of {tuple(GATINGS)}")
        if prior_norm not in PRIOR_NORMS:
            raise ValueError(f"MODEL.CLCLIP.COST_VOLUME.NORM '{prior_norm}' is not one of {PRIOR_NORMS}")
        if prior_logit_weight and prior_norm == "none":
            raise ValueError("MODEL.CLCLIP.MULTI_EXPERT.PRIOR_LOGIT_WEIGHT needs a prior in [0, 1] "
                             "(COST_VOLUME.NORM softmax or sigmoid), not the raw cosines of NORM 'none'")
        if expert_norm not in ("none", "GN"):
            raise ValueError(f"MODEL.CLCLIP.MULTI_EXPERT.NORM '{expert_norm}' is not one of none | GN")
        if background not in self._BACKGROUNDS:
            raise ValueError(f"MODEL.CLCLIP.MULTI_EXPERT.BACKGROUND '{background}' is not one of "
                             f"{tuple(self._BACKGROUNDS)}")
        if trunk not in self._TRUNKS:
            raise ValueError(f"MODEL.CLCLIP.MULTI_EXPERT.TRUNK '{trunk}' is not one of {tuple(self._TRUNKS)}")
        if box_reg not in BOX_REGS:
            raise ValueError(f"MODEL.CLCLIP.MULTI_EXPERT.BOX_REG '{box_reg}' is not one of {BOX_REGS}")
        if box_reg == "task" and trunk != "box_head":
            raise ValueError("MODEL.CLCLIP.MULTI_EXPERT.BOX_REG 'task' needs TRUNK 'box_head' (a task's regressor "
                             f"reads the frozen box-head convs), not '{trunk}'")
        c = kwargs["in_channels"]
        # the experts' trunk, trained in the first task with them and frozen at its end: the shared
        # branch's own box-head convs ("box_head", no extra compute), or a conv stack of their own
        self.trunk_source = trunk
        if trunk == "box_head":
            c = self.box_head.conv_out_channels
        self.trunk = nn.Sequential(*[m for _ in range(trunk_convs) for m in (
            nn.Conv2d(c, c, 3, padding=1, bias=False), get_norm("GN", c), nn.ReLU(inplace=True))]) \
            if trunk == "own" and trunk_convs else None
        bank = (c + GATINGS[gating].extra_channels, expert_dim, self.embed.out_features,
                expert_temperature, pool_size, expert_norm == "GN")
        self.experts = ExpertBank(*bank)
        self.bg_experts = ExpertBank(*bank) if background == "task" else None  # one per task
        self.background = background
        self.gating, self.gamma, self.topk, self.freeze = gating, gamma, topk, freeze
        self.use_cost_volume, self.prior_temperature, self.prior_norm = use_cost_volume, prior_temperature, prior_norm
        self.prior_logit_weight = prior_logit_weight
        self.bg_ignore_thresh, self.shared_class_logits = bg_ignore_thresh, shared_class_logits
        self.shared_class_loss_weight = shared_class_loss_weight
        # BOX_REG task: per task, a copy of the shared regressor (box-head fcs + bbox_pred), created at
        # the task's start and filled and frozen at its end; the first `_box_regs_done` are filled
        self.box_reg = box_reg
        self.task_box_regs = nn.ModuleList()
        self._box_regs_done = 0
        self.resolution = self.pooler.output_size[0] if isinstance(self.pooler.output_size, (tuple, list)) \
            else self.pooler.output_size
        self.prior = CostVolumePrior(prior_temperature, prior_norm, prior_vocabulary, prior_level_inset,
                                     self.resolution) if use_cost_volume else UniformPrior(self.resolution)

    @classmethod
    def from_config(cls, cfg: Any, in_channels: int, level_names, embed_dim: int) -> Dict[str, Any]:
        kw = FViTRoIHeads.from_config(cfg, in_channels, level_names, embed_dim)
        me, cv = cfg.MODEL.CLCLIP.MULTI_EXPERT, cfg.MODEL.CLCLIP.COST_VOLUME
        kw.update(expert_dim=me.EXPERT_DIM, gating=me.GATING, gamma=me.GAMMA, topk=me.TOPK, freeze=me.FREEZE,
                  use_cost_volume=cv.ENABLED, prior_temperature=cv.TEMPERATURE, prior_norm=cv.NORM,
                  prior_vocabulary=cv.VOCABULARY, prior_level_inset=cv.LEVEL_INSET,
                  prior_logit_weight=me.PRIOR_LOGIT_WEIGHT,
                  bg_ignore_thresh=cfg.MODEL.CLCLIP.BG_IGNORE_THRESH,
                  shared_class_logits=me.SHARED_CLASS_LOGITS, expert_temperature=cfg.MODEL.CLS_HEAD.TEMPERATURE,
                  pool_size=me.POOL_SIZE, expert_norm=me.NORM, shared_class_loss_weight=me.SHARED_CLASS_LOSS_WEIGHT,
                  background=me.BACKGROUND, trunk=me.TRUNK, trunk_convs=me.TRUNK_CONVS, box_reg=me.BOX_REG)
        return kw

    # -- continual life cycle --------------------------------------------------------------------
    def on_task_start(self, task: Any, model: nn.Module) -> None:
        """Create the experts of the task's new classes (and the task's background expert, and the
        slot of its box regressor)."""
        new = task.num_seen - self.experts.num_experts
        if new > 0:
            self.experts.add(new)
            if self.bg_experts is not None:
                self.bg_experts.add(1)
            if self.box_reg == "task" and self.freeze:  # filled at the task's end: every stage's checkpoint holds it
                self.task_box_regs.append(self._shared_regressor_copy())

    def _shared_regressor_copy(self) -> nn.Module:
        reg = nn.Sequential(copy.deepcopy(self.box_head.fcs), copy.deepcopy(self.bbox_pred))
        return reg.requires_grad_(False)

    def _holds_shared_regressor(self, reg: nn.Module) -> bool:
        """Whether a finished task's regressor holds exactly the shared regressor's weights, so its
        deltas are the shared branch's, bit for bit (the same layers on the same input), and need not
        be computed twice: true for the last task's copy until the shared regressor trains again,
        i.e. whenever a model is evaluated at the end of a task."""
        shared, own = [*self.box_head.fcs.parameters(), *self.bbox_pred.parameters()], list(reg.parameters())
        return len(shared) == len(own) and all(torch.equal(a, b) for a, b in zip(shared, own))

    def on_task_end(self, task: Any, model: nn.Module) -> None:
        """Freeze every expert learned so far (out of the next task's optimizer)."""
        if self.freeze:
            self.experts.chunks.requires_grad_(False)
            if self.trunk is not None:
                self.trunk.requires_grad_(False)
            if self.trunk_source == "box_head":  # the shared branch keeps training its fcs and box regression
                self.box_head.convs.requires_grad_(False)
            if self.bg_experts is not None:
                self.bg_experts.chunks.requires_grad_(False)
            if self.box_reg == "task" and len(self.task_box_regs):  # the task's boxes as they are now
                fcs, pred = self.task_box_regs[-1]
                fcs.load_state_dict(self.box_head.fcs.state_dict())
                pred.load_state_dict(self.bbox_pred.state_dict())
                self._box_regs_done = len(self.task_box_regs)

    # -- forward ----------------------------------------------------------------------------------
    def pooled_prior(self, rois: List[Tensor], ctx: HeadContext, num: int, background: bool = False) -> Tensor:
        """The prior of the first `num` classes RoIAligned like the features: R x num x P x P
        (`background`: the first `num` tasks' background columns instead)."""
        return self.prior.pooled(rois, ctx, [c.n for c in self.experts.chunks], num, background)

    def prior_level(self, rois: List[Tensor], ctx: HeadContext, num: int, background: bool = False) -> Tensor:
        """How much each RoI as a whole looks like each of the first `num` classes: R x num
        (`background`: the first `num` tasks' background columns instead)."""
        return self.prior.level(rois, ctx, [c.n for c in self.experts.chunks], num, background)

    def prior_logits(self, rois: List[Tensor], ctx: HeadContext, num: int) -> Tensor:
        """The prior's term of the first `num` classes' logits (PRIOR_LOGIT_WEIGHT beta): R x num,
        beta log(level_k / level_bg) with level_bg the background level of class k's task, i.e. the
        log-odds of class k against the background. Within a task's softmax it multiplies class k's
        odds against the task's background by (level_k / level_bg) ** beta."""
        sizes = torch.tensor([b - a for a, b in self.task_ranges(num)], device=ctx.clip_dense.device)
        level, bg = self.prior.levels(rois, ctx, [c.n for c in self.experts.chunks])
        level, bg = level[:, :num].clamp(min=_LEVEL_FLOOR).log(), bg[:, :len(sizes)].clamp(min=_LEVEL_FLOOR).log()
        return self.prior_logit_weight * (level - bg.repeat_interleave(sizes, dim=1))

    def expert_prior(self, ctx: HeadContext) -> Tuple[Tensor, Tensor]:
        """The cost-volume prior of every class that has an expert, B x K x h x w, and each task's
        background column, B x T x h x w (`CostVolumePrior.maps`)."""
        return self.prior.maps(ctx, [c.n for c in self.experts.chunks])

    def task_ranges(self, num: int) -> List[Tuple[int, int]]:
        """[start, stop) of each expert chunk's classes among the first `num`."""
        return [(a, b) for _, a, b in self.experts.chunk_ranges(num)]

    def background_logits(self, pooled: Tensor, rois: List[Tensor], ctx: HeadContext, num_tasks: int) -> Tensor:
        """Each task's background expert on the pathway gated by its task's background prior: R x T."""
        m = self.pooled_prior(rois, ctx, num_tasks, background=True)
        h, _ = self.bg_experts.gated_features(pooled, m, self.pathways)
        z, scale = self.bg_experts.embed(h)
        return scale * (F.normalize(z, dim=-1) * ctx.background_embedding).sum(-1)

    def _select(self, rois: List[Tensor], ctx: HeadContext, K: int, labels: Optional[Tensor]) -> Optional[Tensor]:
        """Per-RoI top-k of the first K classes by prior level (None = all); in training a RoI's
        own class is kept."""
        if self.topk <= 0 or self.topk >= K:
            return None
        idx = self.prior_level(rois, ctx, K).topk(self.topk, dim=1).indices
        if labels is not None:
            fg = (labels >= 0) & (labels < K)
            missing = fg & ~(idx == labels[:, None]).any(dim=1)
            idx[missing, -1] = labels[missing]
        return idx

    def _roi_chunks(self, pooled: Tensor, S: int, gathered: bool) -> List[Tuple[slice, bool]]:
        """RoI slices for the expert convs and whether each is checkpointed: chunks of at most
        `chunk_elements` pathway (and, for per-RoI classes, gathered weight) elements; in training
        one pass, except per-RoI classes over several chunks, which are checkpointed."""
        R = len(pooled)
        C, E = self.experts.in_channels, self.experts.expert_dim
        per_roi = S * (pooled[0].numel() + (E * (C + E) * 9 if gathered else 0))
        budget = _MAX_GATHERED_ELEMENTS if self.training else _MAX_PATHWAY_ELEMENTS
        step = max(1, chunk_elements(pooled.device, budget) // per_roi)
        if step >= R or (self.training and not gathered):
            return [(slice(0, R), False)]
        return [(slice(i, i + step), self.training and torch.is_grad_enabled()) for i in range(0, R, step)]

    def predict(self, pooled: Tensor, rois: List[Tensor], ctx: HeadContext,
                labels: Optional[Tensor] = None) -> Dict[str, Tensor]:
        pooled, out = self._TRUNKS[self.trunk_source](self, pooled, rois, ctx, labels)
        K = min(self.experts.num_experts, ctx.num_classes)
        if K == 0:
            return out
        m = self.pooled_prior(rois, ctx, K)
        prior_mean = m.mean(dim=(2, 3))
        idx = self._select(rois, ctx, K, labels)
        s, act = self.expert_logits(pooled, m, ctx.class_embeddings[:K], idx)
        if self.prior_logit_weight:  # the level of the prior; the map reached the experts through the gating
            s = s + self.prior_logits(rois, ctx, K)
        shared = out["logits"]  # R x (K_vocab + 1)
        if self.shared_class_logits:
            s = s + shared[:, :K]
        out["shared_logits"] = shared
        out["logits"] = self._BACKGROUNDS[self.background](self, s, out, pooled, rois, ctx)
        out["expert_maps"] = F.normalize(act, dim=-1)
        out["expert_trainable"] = torch.cat([c.w1.new_full((c.n,), c.w1.requires_grad, dtype=torch.bool)
                                             for c in self.experts.chunks])[:K]
        if idx is not None:  # the maps are those of each RoI's classes idx
            out["expert_classes"] = idx
        out["prior_mean"] = prior_mean
        return out

    # -- the experts' trunk (MULTI_EXPERT.TRUNK): what the experts read, and the shared branch's outputs
    def _box_head_trunk(self, pooled: Tensor, rois: List[Tensor], ctx: HeadContext,
                        labels: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """One conv stack, the box head's, feeds the shared branch and the experts; at inference the
        finished tasks' frozen regressors add their deltas, R x T x 4."""
        pooled = self.box_head.convs(pooled)
        out = self.shared_outputs(pooled, rois, ctx)
        if self._box_regs_done and not self.training:
            flat = pooled.flatten(1)
            done = self.task_box_regs[:self._box_regs_done]
            last = out["deltas"] if self._holds_shared_regressor(done[-1]) else done[-1](flat)
            out["task_deltas"] = torch.stack([r(flat) for r in done[:-1]] + [last], dim=1)
        return pooled, out

    def _own_trunk(self, pooled: Tensor, rois: List[Tensor], ctx: HeadContext,
                   labels: Optional[Tensor]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The shared branch on the RoI feature; the experts read it through convs of their own (if any)."""
        out = super().predict(pooled, rois, ctx, labels)
        return (self.trunk(pooled) if self.trunk is not None else pooled), out

    _TRUNKS = {"box_head": _box_head_trunk, "own": _own_trunk}

    # -- the experts' logits ------------------------------------------------------------------------
    def expert_logits(self, pooled: Tensor, m: Tensor, text: Tensor,
                      idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Logits s_{r,k} = tau_k cos(z_{r,k}, t_k) of expert k on class k's pathway under the
        pooled prior m (R x K x P x P), R x K (-inf outside a RoI's classes `idx`, R x S, if
        given), and the experts' activation maps R x S x P*P."""
        h, act = self._expert_features(pooled, m, idx)
        z, scale = self.experts.embed(h, idx)
        t = text[idx] if idx is not None else text[None]
        s = scale * (F.normalize(z, dim=-1) * t).sum(-1)
        if idx is not None:
            s = torch.full((len(s), len(text)), float("-inf"), device=s.device, dtype=s.dtype).scatter(1, idx, s)
        return s, act

    def _expert_features(self, pooled: Tensor, m: Tensor, idx: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """The expert convs on every class pathway (`idx` None) or on each RoI's classes `idx`.
        RoIs go through them in chunks that bound the pathway tensor's size (and, with `idx`, the
        expert weights gathered per pair), sized by device; in training one pass, or with `idx`
        checkpointed chunks (each chunk's gathered weights are freed and recomputed in the backward
        pass)."""
        if idx is not None:
            m = m.gather(1, idx[:, :, None, None].expand(-1, -1, *m.shape[2:]))
        parts = []
        for sl, checkpointed in self._roi_chunks(pooled, m.shape[1], idx is not None):
            run, args = (self._all_class_features, (pooled[sl], m[sl])) if idx is None else \
                (self._subset_features, (pooled[sl], m[sl], idx[sl]))
            parts.append(checkpoint(run, *args, use_reentrant=False) if checkpointed else run(*args))
        return torch.cat([h for h, _ in parts]), torch.cat([a for _, a in parts])

    def _all_class_features(self, pooled: Tensor, m: Tensor) -> Tuple[Tensor, Tensor]:
        """Every class's pathway, built chunk of experts by chunk of experts."""
        return self.experts.gated_features(pooled, m, self.pathways)

    def _subset_features(self, pooled: Tensor, m: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor]:
        return self.experts.features(self.pathways(pooled, m), idx)

    # -- the background (MULTI_EXPERT.BACKGROUND): what closes the training softmax -----------------------
    def _task_background(self, s: Tensor, out: Dict[str, Tensor], pooled: Tensor, rois: List[Tensor],
                         ctx: HeadContext) -> Tensor:
        """[expert logits, shared logits of the classes without an expert, the latest task's
        background expert]; every task's background logit is kept in out["task_bg_logits"]."""
        K, shared = s.shape[1], out["shared_logits"]
        out["task_bg_logits"] = self.background_logits(pooled, rois, ctx, len(self.task_ranges(K)))
        return torch.cat([s, shared[:, K:-1], out["task_bg_logits"][:, -1:]], dim=1)

    def _shared_background(self, s: Tensor, out: Dict[str, Tensor], pooled: Tensor, rois: List[Tensor],
                           ctx: HeadContext) -> Tensor:
        """[expert logits, the shared branch's logits of the other classes and its background]."""
        return torch.cat([s, out["shared_logits"][:, s.shape[1]:]], dim=1)

    _BACKGROUNDS = {"task": _task_background, "shared": _shared_background}

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], ctx: HeadContext,
                targets: Optional[List[Dict[str, Tensor]]] = None,
                seeds: Optional[Sequence[Optional[int]]] = None) -> Tuple[Any, Dict[str, Any]]:
        """The F-ViT head's forward; in training, plus the shared branch's own classification
        loss (`loss_cls_shared`): its embedding scores the classes that have no expert yet. In that
        loss an unlabelled object of an earlier task's class may be background or its class: the
        shared branch never scores those classes, and a plain cross-entropy would teach it that every
        object but the current task's is background, which then outscores every class without an
        expert (their detections fall below the score threshold)."""
        result, out = super().forward(features, proposals, ctx, targets, seeds)
        if self.training and self.shared_class_loss_weight > 0 and "shared_logits" in out:
            if ctx.task is not None:  # earlier tasks' objects: background or their class (unbiased background)
                ctx = dataclasses.replace(ctx, background_absorbs=max(ctx.background_absorbs, ctx.task.start))
            loss = self.cls_head.losses(out["shared_logits"], out["labels"], out["embeddings"], ctx)["loss_cls"]
            result["loss_cls_shared"] = self.shared_class_loss_weight * loss
        return result, out

    def foreground_probabilities(self, out: Dict[str, Tensor], ctx: HeadContext) -> Tensor:
        """R x K: with per-task backgrounds, a class's probability is the softmax over its own
        task's logits and that task's background. Classes without an expert take the shared
        branch's own softmax (zero-shot) with either background: a softmax that also holds the
        experts' logits (summed with the shared ones under SHARED_CLASS_LOGITS) would compare
        them with logits of another scale."""
        K = ctx.num_classes
        if "task_bg_logits" not in out:
            probs = super().foreground_probabilities(out, ctx)
            E = min(self.experts.num_experts, K)
            if E == K or "shared_logits" not in out:
                return probs
            return torch.cat([probs[:, :E], out["shared_logits"].softmax(dim=-1)[:, E:K]], dim=1)
        probs = out["shared_logits"].softmax(dim=-1)[:, :K].clone()
        bg = out["task_bg_logits"]
        for t, (a, b) in enumerate(self.task_ranges(K)):
            probs[:, a:b] = torch.cat([out["logits"][:, a:b], bg[:, t:t + 1]], dim=1).softmax(dim=-1)[:, :-1]
        return probs

    def class_boxes(self, out: Dict[str, Tensor], rois: List[Tensor], ctx: HeadContext) -> Tensor:
        """With BOX_REG task, R x K x 4: a finished task's classes take their task's frozen
        regressor, the others (the current task, classes without an expert) the shared one."""
        if "task_deltas" not in out or not rois:
            return super().class_boxes(out, rois, ctx)
        K = ctx.num_classes
        deltas = out["deltas"][:, None].expand(-1, K, -1).clone()
        for t, (a, b) in enumerate(self.task_ranges(K)[: out["task_deltas"].shape[1]]):
            deltas[:, a:b] = out["task_deltas"][:, t:t + 1]
        props = torch.cat(rois)[:, None].expand(-1, K, -1)
        return self.box_coder.decode_single(deltas.reshape(-1, 4), props.reshape(-1, 4)).view(-1, K, 4)

    def class_probabilities(self, out: Dict[str, Tensor], rois: List[Tensor], ctx: HeadContext) -> Tensor:
        """With per-task backgrounds the ensemble runs group by group: each task's classes (and the
        classes without an expert, as one group) get a CLIP softmax of their own, and each group's
        scores are computed on tensors of their own, so a later task cannot change an old class's
        final score, not by a bit."""
        if self.bg_experts is None or not (self.ensemble and self.ensemble_alpha > 0):
            return super().class_probabilities(out, rois, ctx)
        K = ctx.num_classes
        p_det = self.foreground_probabilities(out, ctx)
        clip_emb = pooled_clip_embeddings(ctx.clip_dense, rois, ctx.clip_stride)
        groups = self.task_ranges(K)
        end = groups[-1][1] if groups else 0
        if end < K:  # the classes without an expert
            groups.append((end, K))
        return torch.cat([self.ensemble_scores(p_det[:, a:b].contiguous(), self.clip_probabilities(clip_emb, ctx, a, b))
                          for a, b in groups], dim=1)

    def pathways(self, f: Tensor, m: Tensor) -> Tensor:
        """Class pathways of RoI features f (R x C x P x P) under the prior m (R x S x P x P):
        R x S x C' x P x P (MULTI_EXPERT.GATING)."""
        return GATINGS[self.gating].pathways(f[:, None], m, self.gamma)

    def adjust_labels(self, labels: Tensor, out: Dict[str, Tensor], ctx: HeadContext) -> Tensor:
        """Prior-guided background: a background RoI that the frozen prior calls an old class
        is left out of the classification loss (it is likely an unlabelled old object)."""
        task = ctx.task
        if task is None or task.start == 0 or self.bg_ignore_thresh > 1 or "prior_mean" not in out \
                or not self.use_cost_volume or self.bg_experts is not None:
            return labels
        old = out["prior_mean"][:, : task.start].amax(dim=1)
        ignore = (labels == ctx.num_classes) & (old > self.bg_ignore_thresh)
        return torch.where(ignore, torch.full_like(labels, -1), labels)

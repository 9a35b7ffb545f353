"""CL-CLIP's Multi-Expert RoI head: the cost-volume prior decouples each RoI feature into one
pathway per class; each class has its own convolutional expert, created when the class first
appears and frozen after its task. Boxes come from the shared F-ViT branch (or, as an option, from
each task's copy of its regressor, frozen with the task); the background logit from a per-task
background expert frozen with its task (or, as an option, from the shared branch)."""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import roi_align

from ...config import configurable
from ...utils.device import chunk_elements
from ..backbone.clip_vit import get_norm
from ..context import HeadContext
from ..cost_volume import PRIOR_NORMS, category_prior
from .build import ROI_HEADS_REGISTRY
from .fvit_roi_heads import FViTRoIHeads, pooled_clip_embeddings

__all__ = ["ExpertChunk", "ExpertBank", "MultiExpertRoIHeads", "GATINGS"]

GATINGS = ("residual", "multiply", "concat")
BACKGROUNDS = ("task", "shared")
TRUNKS = ("box_head", "own")
BOX_REGS = ("shared", "task")
_MAX_PATHWAY_ELEMENTS = 2**21  # expert-conv chunk bound on a CPU: 8 MB of float32 pathway inputs (cache-sized); a GPU's: chunk_elements
_MAX_GATHERED_ELEMENTS = 2**28  # training with per-RoI classes on a CPU: pathway + gathered weight elements per chunk (a memory bound)


class ExpertChunk(nn.Module):
    """The experts of one task's n classes, stored stacked: expert i is
    conv3x3(C->E) -> [GN] -> ReLU -> conv3x3(E->E) -> [GN] -> ReLU -> average pool to G x G ->
    flatten -> fc(E*G*G -> D), plus the chunk's logit scale (G = 1: global mean; GN: a group norm
    over each expert's own E channels, with `norm`). Freezing the chunk freezes exactly these classes."""

    def __init__(self, n: int, in_channels: int, expert_dim: int, embed_dim: int, temperature: float,
                 pool_size: int = 1, norm: bool = False):
        super().__init__()
        self.n = n
        if norm:
            self.g1_w, self.g2_w = (nn.Parameter(torch.ones(n * expert_dim)) for _ in range(2))
            self.g1_b, self.g2_b = (nn.Parameter(torch.zeros(n * expert_dim)) for _ in range(2))
        conv1 = nn.Conv2d(in_channels, n * expert_dim, 3, padding=1)
        conv2 = nn.Conv2d(expert_dim, n * expert_dim, 3, padding=1)
        self.w1, self.b1 = nn.Parameter(conv1.weight.detach()), nn.Parameter(conv1.bias.detach())
        self.w2, self.b2 = nn.Parameter(conv2.weight.detach()), nn.Parameter(conv2.bias.detach())
        fan_in = expert_dim * pool_size * pool_size
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's init for this fan-in
        self.fc_w = nn.Parameter(torch.empty(n, fan_in, embed_dim).uniform_(-bound, bound))
        self.fc_b = nn.Parameter(torch.empty(n, embed_dim).uniform_(-bound, bound))
        self.logit_scale = nn.Parameter(torch.full((n,), math.log(temperature)))


class ExpertBank(nn.Module):
    """All experts so far, one chunk per task, evaluated as grouped convolutions (no loop over
    classes): every class at once, or a per-RoI subset of classes."""

    def __init__(self, in_channels: int, expert_dim: int, embed_dim: int, temperature: float, pool_size: int = 1,
                 norm: bool = False):
        super().__init__()
        self.in_channels, self.expert_dim, self.embed_dim = in_channels, expert_dim, embed_dim
        self.temperature, self.pool_size, self.norm = temperature, pool_size, norm
        self.chunks = nn.ModuleList()

    @property
    def num_experts(self) -> int:
        return sum(c.n for c in self.chunks)

    def add(self, n: int) -> ExpertChunk:
        chunk = ExpertChunk(n, self.in_channels, self.expert_dim, self.embed_dim, self.temperature, self.pool_size,
                            self.norm)
        device = next(self.parameters()).device if len(self.chunks) else None
        self.chunks.append(chunk.to(device) if device is not None else chunk)
        return chunk

    def chunk_ranges(self, num: int) -> List[Tuple[ExpertChunk, int, int]]:
        """Each chunk holding some of the first `num` classes, with their [start, stop)."""
        out, start = [], 0
        for chunk in self.chunks:
            if start >= num:
                break
            out.append((chunk, start, min(start + chunk.n, num)))
            start += chunk.n
        return out

    def _cat(self, name: str) -> Tensor:
        return torch.cat([getattr(c, name) for c in self.chunks], dim=0)

    def _pool(self, h: Tensor, R: int, S: int) -> Tensor:
        """R*S*E maps of P x P (as R x S*E x P x P) -> R x S x E*G*G."""
        E, G = self.expert_dim, self.pool_size
        if G == 1:
            return h.view(R, S, E, -1).mean(dim=3)
        if G != h.shape[-1]:
            h = F.adaptive_avg_pool2d(h, G)
        return h.reshape(R, S, E * G * G)

    def _norm(self, h: Tensor, groups: int, w: Optional[Tensor], b: Optional[Tensor]) -> Tensor:
        """Group norm of each expert's E channels (one group per pathway), if enabled."""
        return F.group_norm(h, groups, w, b) if self.norm else h

    def forward(self, x: Tensor, idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """x: R x S x C x P x P, the pathway inputs for classes `idx` (R x S; None = the first S
        classes in order, e.g. all K, or an earlier vocabulary). Returns embeddings R x S x D, activation
        maps R x S x P*P (channel mean of the first conv, after ReLU) and logit scales R x S."""
        h, act = self.features(x, idx)
        z, scale = self.embed(h, idx)
        return z, act, scale

    def chunk_features(self, c: ExpertChunk, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The first s experts of chunk `c` on their pathway inputs x (R x s x C x P x P), as one
        grouped convolution per layer: pooled features R x s x E*G*G and activation maps R x s x P*P."""
        R, s, C, P, _ = x.shape
        n = s * self.expert_dim
        g = [(getattr(c, f"g{i}_w")[:n], getattr(c, f"g{i}_b")[:n]) if self.norm else (None, None) for i in (1, 2)]
        h = F.conv2d(x.reshape(R, s * C, P, P), c.w1[:n], c.b1[:n], padding=1, groups=s)
        h = F.relu(self._norm(h, s, *g[0]))
        act = h.view(R, s, self.expert_dim, P * P).mean(dim=2)
        h = F.relu(self._norm(F.conv2d(h, c.w2[:n], c.b2[:n], padding=1, groups=s), s, *g[1]))
        return self._pool(h, R, s), act

    def gated_features(self, f: Tensor, m: Tensor, gate: Callable[[Tensor, Tensor], Tensor]) -> Tuple[Tensor, Tensor]:
        """`features` of the pathways gate(f, m[:, a:b]) of the first S = m.shape[1] classes, built
        chunk by chunk (the R x S x C x P x P pathway tensor is never held whole)."""
        if m.shape[1] > self.num_experts:
            raise ValueError(f"{m.shape[1]} class pathways for {self.num_experts} experts")
        parts = [self.chunk_features(c, gate(f, m[:, a:b])) for c, a, b in self.chunk_ranges(m.shape[1])]
        return torch.cat([h for h, _ in parts], dim=1), torch.cat([a for _, a in parts], dim=1)

    def features(self, x: Tensor, idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The convolutional part: pooled features R x S x E*G*G and activation maps R x S x P*P.
        With `idx` None, one grouped conv per chunk: a task's features are computed the same way
        (same kernels, same shapes) whatever chunks come after it, so they do not move by a bit."""
        R, S, C, P, _ = x.shape
        E, K = self.expert_dim, self.num_experts
        if idx is None:
            if S > K:
                raise ValueError(f"{S} class pathways for {K} experts")
            parts = [self.chunk_features(c, x[:, a:b]) for c, a, b in self.chunk_ranges(S)]
            return torch.cat([h for h, _ in parts], dim=1), torch.cat([a for _, a in parts], dim=1)
        # per-RoI class subsets: gather each pair's weights; groups = R*S in a batch of one
        w1, b1, w2, b2 = self._cat("w1"), self._cat("b1"), self._cat("w2"), self._cat("b2")
        flat = idx.reshape(-1)
        w1s = w1.view(K, E, C, 3, 3)[flat].reshape(R * S * E, C, 3, 3)
        w2s = w2.view(K, E, E, 3, 3)[flat].reshape(R * S * E, E, 3, 3)
        g = [(self._cat(f"g{i}_w").view(K, E)[flat].reshape(-1), self._cat(f"g{i}_b").view(K, E)[flat].reshape(-1))
             if self.norm else (None, None) for i in (1, 2)]
        h = F.conv2d(x.reshape(1, R * S * C, P, P), w1s, b1.view(K, E)[flat].reshape(-1), padding=1, groups=R * S)
        h = F.relu(self._norm(h, R * S, *g[0]))
        act = h.view(R, S, E, P * P).mean(dim=2)
        h = F.conv2d(h, w2s, b2.view(K, E)[flat].reshape(-1), padding=1, groups=R * S)
        h = F.relu(self._norm(h, R * S, *g[1]))
        return self._pool(h.view(R, S * E, P, P), R, S), act

    def embed(self, h: Tensor, idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The fc of each pathway's expert: embeddings R x S x D and logit scales R x S. Run once over
        all RoIs (every expert's fc weights are read once)."""
        R, S, _ = h.shape
        if idx is None:  # chunk by chunk, like `features`
            zs = [torch.einsum("rsf,sfd->rsd", h[:, a:b], c.fc_w[:b - a]) + c.fc_b[:b - a]
                  for c, a, b in self.chunk_ranges(S)]
            scale = self._cat("logit_scale")[:S].exp().clamp(max=100.0)
            return torch.cat(zs, dim=1), scale.expand(R, S)
        fc_w, fc_b, scale = self._cat("fc_w"), self._cat("fc_b"), self._cat("logit_scale").exp().clamp(max=100.0)
        # a RoI's S classes are distinct: lay the pairs out by class (K x R slots, unused slots zero),
        # one batched matmul per class's fc, read back per pair; no loop over classes, no host sync,
        # no fc weight gathered per pair
        K, rows = fc_w.shape[0], torch.arange(R, device=h.device)[:, None].expand(R, S)
        by_class = h.new_zeros(K, R, h.shape[2]).index_put((idx, rows), h)
        z = torch.baddbmm(fc_b[:, None, :].to(h.dtype), by_class, fc_w.to(h.dtype))  # K x R x D
        return z[idx, rows], scale[idx]


@ROI_HEADS_REGISTRY.register()
class MultiExpertRoIHeads(FViTRoIHeads):
    """F-ViT RoI head + cost-volume category decoupling + per-class experts (docs/methods.md, CL-CLIP).

    Class logits s_{r,k} = tau_k cos(z_{r,k}, t_k) come from expert k on the pathway
    f_r * (1 + gamma m_{r,k}) (or f_r * m_{r,k}, or [f_r, m_{r,k}]). With `background` "task" each
    task also has a background expert b_t (pathway gated by its task's background prior, logit
    tau cos(z, t_bg)), frozen with the task's class experts, and a class's probability is the softmax
    over its own task's logits and b_t: an old class's score depends on frozen experts, the FPN and
    the frozen prior only. With "shared" the shared branch's background logit closes one softmax over
    all classes. Box regression (with `box_reg` "shared") and vocabulary classes without an expert
    (zero-shot evaluation) come from the shared branch; with "task" a finished task's classes take
    their boxes from its copy of the shared regressor, frozen at the task's end."""

    loss_names = FViTRoIHeads.loss_names + ("loss_cls_shared",)  # the shared branch's own class loss

    @configurable
    def __init__(self, *, expert_dim: int = 16, gating: str = "residual", gamma: float = 1.0, topk: int = 0,
                 freeze: bool = True, use_cost_volume: bool = True, prior_temperature: float = 0.01,
                 prior_norm: str = "softmax", bg_ignore_thresh: float = 0.5, shared_class_logits: bool = False,
                 expert_temperature: float = 50.0, pool_size: int = 1, expert_norm: str = "none",
                 shared_class_loss_weight: float = 0.0, background: str = "task", trunk: str = "own",
                 trunk_convs: int = 0, box_reg: str = "shared", **kwargs: Any):
        super().__init__(**kwargs)
        if gating not in GATINGS:
            raise ValueError(f"MODEL.CLCLIP.MULTI_EXPERT.GATING '{gating}' is not one of {GATINGS}")
        if prior_norm not in PRIOR_NORMS:
            raise ValueError(f"MODEL.CLCLIP.COST_VOLUME.NORM '{prior_norm}' is not one of {PRIOR_NORMS}")
        if expert_norm not in ("none", "GN"):
            raise ValueError(f"MODEL.CLCLIP.MULTI_EXPERT.NORM '{expert_norm}' is not one of none | GN")
        if background not in BACKGROUNDS:
            raise ValueError(f"MODEL.CLCLIP.MULTI_EXPERT.BACKGROUND '{background}' is not one of {BACKGROUNDS}")
        if trunk not in TRUNKS:
            raise ValueError(f"MODEL.CLCLIP.MULTI_EXPERT.TRUNK '{trunk}' is not one of {TRUNKS}")
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
        bank = (c + (1 if gating == "concat" else 0), expert_dim, self.embed.out_features,
                expert_temperature, pool_size, expert_norm == "GN")
        self.experts = ExpertBank(*bank)
        self.bg_experts = ExpertBank(*bank) if background == "task" else None  # one per task
        self.gating, self.gamma, self.topk, self.freeze = gating, gamma, topk, freeze
        self.use_cost_volume, self.prior_temperature, self.prior_norm = use_cost_volume, prior_temperature, prior_norm
        self.bg_ignore_thresh, self.shared_class_logits = bg_ignore_thresh, shared_class_logits
        self.shared_class_loss_weight = shared_class_loss_weight
        # BOX_REG task: per task, a copy of the shared regressor (box-head fcs + bbox_pred), created at
        # the task's start and filled and frozen at its end; the first `_box_regs_done` are filled
        self.box_reg = box_reg
        self.task_box_regs = nn.ModuleList()
        self._box_regs_done = 0
        self.resolution = self.pooler.output_size[0] if isinstance(self.pooler.output_size, (tuple, list)) \
            else self.pooler.output_size

    @classmethod
    def from_config(cls, cfg: Any, in_channels: int, level_names, embed_dim: int) -> Dict[str, Any]:
        kw = FViTRoIHeads.from_config(cfg, in_channels, level_names, embed_dim)
        me, cv = cfg.MODEL.CLCLIP.MULTI_EXPERT, cfg.MODEL.CLCLIP.COST_VOLUME
        kw.update(expert_dim=me.EXPERT_DIM, gating=me.GATING, gamma=me.GAMMA, topk=me.TOPK, freeze=me.FREEZE,
                  use_cost_volume=cv.ENABLED, prior_temperature=cv.TEMPERATURE, prior_norm=cv.NORM,
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
        R, P = sum(len(r) for r in rois), self.resolution
        if not self.use_cost_volume:  # uniform over each task's classes and background
            level = torch.cat([ctx.clip_dense.new_full((1 if background else c.n,), 1.0 / (c.n + 1))
                               for c in self.experts.chunks])[:num]
            return level[None, :, None, None].expand(R, num, P, P)
        if "prior" not in ctx.extras:  # once per batch: B x K_experts x h x w and B x T x h x w
            ctx.extras["prior"], ctx.extras["bg_prior"] = self.expert_prior(ctx)
        prior = ctx.extras["bg_prior" if background else "prior"][:, :num]
        return roi_align(prior, list(rois), P, spatial_scale=1.0 / ctx.clip_stride, sampling_ratio=2, aligned=True)

    def expert_prior(self, ctx: HeadContext) -> Tuple[Tensor, Tensor]:
        """The prior of every class that has an expert, B x K x h x w, and each task's background
        column, B x T x h x w, computed task by task (one expert chunk at a time): a class's map
        depends on its own task's vocabulary and the background only (per class for NORM sigmoid,
        over its task's classes for softmax), so classes added later cannot change it, not even in
        the last bit."""
        parts, bg = [], []
        for start, stop in self.task_ranges(ctx.num_classes):
            p = category_prior(ctx.clip_dense, ctx.class_embeddings[start:stop], ctx.background_embedding,
                               self.prior_temperature, self.prior_norm)
            parts.append(p[:, :-1])
            bg.append(p[:, -1:])
        return torch.cat(parts, dim=1), torch.cat(bg, dim=1)

    def task_ranges(self, num: int) -> List[Tuple[int, int]]:
        """[start, stop) of each expert chunk's classes among the first `num`."""
        return [(a, b) for _, a, b in self.experts.chunk_ranges(num)]

    def background_logits(self, pooled: Tensor, rois: List[Tensor], ctx: HeadContext, num_tasks: int) -> Tensor:
        """Each task's background expert on the pathway gated by its task's background prior: R x T."""
        m = self.pooled_prior(rois, ctx, num_tasks, background=True)
        h, _ = self.bg_experts.gated_features(pooled, m, self.pathways)
        z, scale = self.bg_experts.embed(h)
        return scale * (F.normalize(z, dim=-1) * ctx.background_embedding).sum(-1)

    def _select(self, prior_mean: Tensor, labels: Optional[Tensor]) -> Optional[Tensor]:
        """Per-RoI top-k classes by mean prior (None = all); in training a RoI's own class is kept."""
        K = prior_mean.shape[1]
        if self.topk <= 0 or self.topk >= K:
            return None
        idx = prior_mean.topk(self.topk, dim=1).indices
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
        if self.trunk_source == "box_head":  # one conv stack feeds the shared branch and the experts
            pooled = self.box_head.convs(pooled)
            out = self.shared_outputs(pooled, rois, ctx)
            if self._box_regs_done and not self.training:  # finished tasks' frozen regressors: R x T x 4
                flat = pooled.flatten(1)
                done = self.task_box_regs[:self._box_regs_done]
                last = out["deltas"] if self._holds_shared_regressor(done[-1]) else done[-1](flat)
                out["task_deltas"] = torch.stack([r(flat) for r in done[:-1]] + [last], dim=1)
        else:
            out = super().predict(pooled, rois, ctx, labels)
            if self.trunk is not None:
                pooled = self.trunk(pooled)
        shared = out["logits"]  # R x (K_vocab + 1)
        K = min(self.experts.num_experts, ctx.num_classes)
        if K == 0:
            return out
        m = self.pooled_prior(rois, ctx, K)
        prior_mean = m.mean(dim=(2, 3))
        idx = self._select(prior_mean, labels)
        if idx is not None:
            m = m.gather(1, idx[:, :, None, None].expand(-1, -1, *m.shape[2:]))
        text = ctx.class_embeddings[:K]
        # RoIs go through the expert convs in chunks that bound the pathway tensor's size (and, with
        # top-k, the expert weights gathered per pair), sized by device; the experts' fc then runs
        # once over all RoIs. In training one pass, or with top-k checkpointed chunks (each chunk's
        # gathered weights are freed and recomputed in the backward pass)
        h_parts, act_parts = [], []
        for sl, checkpointed in self._roi_chunks(pooled, m.shape[1], idx is not None):
            if idx is None:  # every class: the pathways are built chunk by chunk of experts
                run = lambda p, mm: self.experts.gated_features(p, mm, self.pathways)  # noqa: E731
                args = (pooled[sl], m[sl])
            else:
                run = lambda p, mm, ii: self.experts.features(self.pathways(p, mm), ii)  # noqa: E731
                args = (pooled[sl], m[sl], idx[sl])
            h, act = checkpoint(run, *args, use_reentrant=False) if checkpointed else run(*args)
            h_parts.append(h)
            act_parts.append(act)
        h, act = torch.cat(h_parts), torch.cat(act_parts)
        z, scale = self.experts.embed(h, idx)
        t = text[idx] if idx is not None else text[None]
        s = scale * (F.normalize(z, dim=-1) * t).sum(-1)
        if idx is not None:
            s = torch.full((len(s), K), float("-inf"), device=s.device, dtype=s.dtype).scatter(1, idx, s)
        if self.shared_class_logits:
            s = s + shared[:, :K]
        out["shared_logits"] = shared
        if self.bg_experts is not None:  # the latest task's background closes the training softmax
            out["task_bg_logits"] = self.background_logits(pooled, rois, ctx, len(self.task_ranges(K)))
            out["logits"] = torch.cat([s, shared[:, K:-1], out["task_bg_logits"][:, -1:]], dim=1)
        else:
            out["logits"] = torch.cat([s, shared[:, K:]], dim=1)
        out["expert_maps"] = F.normalize(act, dim=-1)
        out["prior_mean"] = prior_mean
        return out

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
        R x S x C' x P x P."""
        f = f[:, None]
        if self.gating == "residual":
            return f * (1 + self.gamma * m[:, :, None])
        if self.gating == "multiply":
            return f * m[:, :, None]
        return torch.cat([f.expand(-1, m.shape[1], -1, -1, -1), m[:, :, None]], dim=2)

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

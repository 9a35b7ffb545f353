"""SPA (semantic-guided patch alignment): the text classifier plus an optimal-transport score between
a RoI's description-selected frozen CLIP patches, adapted by task-specific projectors, and the
class descriptions' semantic tokens."""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ot
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ...config import configurable
from ...utils.device import chunk_elements
from ...data.descriptions import DEFAULT_TEMPLATE, class_sentences, load_class_descriptions
from ..context import HeadContext
from ..roi_statistics import clip_region_features
from .build import CLS_HEAD_REGISTRY
from .text_classifier import TextClassifier

__all__ = ["SPAHead", "DescriptionBank", "build_description_bank", "select_patches", "solve_ot_batch",
           "ot_method_for"]

logger = logging.getLogger(__name__)

OT_METHODS = ("auto", "sinkhorn", "log_sinkhorn")
_PAIR_BUDGET = 1 << 25  # on a CPU, elements of the OT temporaries held at once (a GPU's: chunk_elements)
_SENTENCE_BATCH = 256  # sentences per text-tower call when building a bank


class _Shared:
    """Holds an object that copies of the head share (deepcopy returns the same holder): the
    frozen text encoder must not be duplicated into snapshots."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Shared":
        return self


@dataclass
class DescriptionBank:
    """Encoded descriptions of a vocabulary: sentence embeddings d_{c,j} and semantic tokens S_c,
    padded per class (masks mark the real entries). Derived from the frozen CLIP; not saved."""

    names: Tuple[str, ...]
    sentences: Tensor  # K x J x D, L2-normalised
    sentence_mask: Tensor  # K x J bool
    tokens: Tensor  # K x L x D, L2-normalised
    token_mask: Tensor  # K x L bool

    def to(self, device: torch.device) -> "DescriptionBank":
        if self.tokens.device == device:
            return self
        return DescriptionBank(self.names, self.sentences.to(device), self.sentence_mask.to(device),
                               self.tokens.to(device), self.token_mask.to(device))


def build_description_bank(text: Any, names: Sequence[str], descriptions: Mapping[str, Sequence[str]],
                           template: str = DEFAULT_TEMPLATE) -> DescriptionBank:
    """Encode every class's sentences with the frozen text tower (`text.encode_tokens`)."""
    per_class, missing = class_sentences(names, descriptions, template)
    if missing:
        logger.info(f"SPA: {len(missing)} of {len(names)} classes have no description and use "
                    f"'{template}': {', '.join(missing)}")
    flat = [s for sents in per_class for s in sents]
    toks: List[Tensor] = []
    sents: List[Tensor] = []
    for i in range(0, len(flat), _SENTENCE_BATCH):
        t, s = text.encode_tokens(flat[i:i + _SENTENCE_BATCH])
        toks += list(t)
        sents.append(s)
    sent = torch.cat(sents)
    K, D = len(names), sent.shape[1]
    J = max(len(s) for s in per_class)
    class_tokens, pos = [], 0
    for sents_c in per_class:
        class_tokens.append(torch.cat(toks[pos:pos + len(sents_c)]))
        pos += len(sents_c)
    L = max(int(t.shape[0]) for t in class_tokens)
    if L == 0:
        raise ValueError(f"SPA: the descriptions of {list(names)} encode to no tokens")
    sentences, sentence_mask = sent.new_zeros(K, J, D), torch.zeros(K, J, dtype=torch.bool, device=sent.device)
    tokens, token_mask = sent.new_zeros(K, L, D), torch.zeros(K, L, dtype=torch.bool, device=sent.device)
    pos = 0
    for c, (sents_c, tok_c) in enumerate(zip(per_class, class_tokens)):
        sentences[c, : len(sents_c)] = sent[pos:pos + len(sents_c)]
        sentence_mask[c, : len(sents_c)] = True
        tokens[c, : len(tok_c)] = tok_c
        token_mask[c, : len(tok_c)] = True
        pos += len(sents_c)
    empty = [n for n, m in zip(names, token_mask.any(1).tolist()) if not m]
    if empty:
        raise ValueError(f"SPA: the descriptions of {empty} encode to no tokens")
    return DescriptionBank(tuple(names), sentences, sentence_mask, tokens, token_mask)


def select_patches(patches: Tensor, sentences: Tensor, sentence_mask: Tensor, num: int) -> Tensor:
    """Indices (R x K x num) of each RoI's `num` patches with the highest max_j cos(patch, d_{c,j})
    for each class. patches: R x P x D, sentences: K x J x D (L2-normalised), mask K x J."""
    sim = torch.einsum("rpd,kjd->rkpj", patches, sentences)
    sim = sim.masked_fill(~sentence_mask[None, :, None, :], float("-inf")).amax(dim=-1)  # R x K x P
    return sim.topk(min(num, patches.shape[1]), dim=-1).indices


def ot_method_for(method: str, epsilon: float, device: torch.device) -> str:
    """The POT method to run. `auto`: plain Sinkhorn on CPU when EPSILON >= 0.05 (faster; with costs
    in [0, 2] the kernel exp(-C/eps) stays above 1e-18), else the log-domain solver. POT 0.9.7's
    batched plain Sinkhorn starts its scalings on the CPU, so it cannot run on a GPU."""
    if method == "auto":
        return "sinkhorn" if device.type == "cpu" and epsilon >= 0.05 else "log_sinkhorn"
    if method == "sinkhorn" and device.type != "cpu":
        raise ValueError(f"MODEL.SPA.OT_METHOD 'sinkhorn' runs on the CPU only (POT's batched Sinkhorn), not on "
                         f"{device.type}; use 'log_sinkhorn' or 'auto'")
    return method


def solve_ot_batch(cost: Tensor, token_mask: Tensor, epsilon: float, method: str = "auto",
                   max_iter: int = 100, tol: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """Entropic OT of a batch of problems with POT (`ot.solve_batch`, torch backend): uniform mass
    on the n patches (rows) and on each problem's real tokens (columns where `token_mask`; padded
    columns get no mass). cost: B x n x L. Returns the plans T* (B x n x L, constant) and <T*, C>
    (B), whose gradient w.r.t. the cost is T* (envelope theorem): the plan is solved without
    autograd, so the Sinkhorn iterations are not recorded."""
    method = ot_method_for(method, epsilon, cost.device)
    with torch.autocast(cost.device.type, enabled=False):  # Sinkhorn in float32 whatever the AMP dtype
        cost = cost.to(torch.promote_types(cost.dtype, torch.float32))  # at least float32
        cost = cost.masked_fill(~token_mask[:, None, :], 0.0)  # finite; carries no mass
        with torch.no_grad():
            mass = token_mask.to(cost.dtype)
            b = mass / mass.sum(dim=-1, keepdim=True)
            plan = ot.solve_batch(cost.detach(), reg=epsilon, b=b, method=method, max_iter=max_iter, tol=tol,
                                  grad="detach").plan
        return plan, (cost * plan).sum(dim=(1, 2))


COMBINE_MODES = ("sum", "ensemble")


@CLS_HEAD_REGISTRY.register()
class SPAHead(TextClassifier):
    """The detector's text classifier on the RoI embedding z_r, combined with SPA's class score on
    the RoI's frozen CLIP features.

    SPA works in the frozen CLIP space: the RoI's RoIAligned 7x7 patch tokens p and its global
    region feature g go through the task projectors, u -> u + sum_t P_t(u) (one zero-initialised
    Linear(D, D) per task, frozen after its task). Per class c, the top `num_patches` projected
    patches by max_j cos(patch, d_{c,j}) are aligned with the class's description tokens by
    entropic OT (cost 1 - cos, the plan held constant, so the cost's gradient reaches the current
    projector); s^OT_c = 1 - <T*, C>. SPA logits: tau * [cos(P(g), t_c) + lambda * s^OT_c,
    cos(P(g), t_bg)]. `combine`: "sum" adds them to the detector's logits tau * cos(z_r, [t, t_bg]);
    "ensemble" mixes the log-softmaxes, (1 - w) * detector + w * SPA. Without RoIs (no CLIP
    features) the detector's logits alone. Replay (`GaussianReplay`) lives in g's space and goes
    through the same projectors (`replay_space` "clip")."""

    replay_space = "clip"

    @configurable
    def __init__(self, *, embed_dim: int, descriptions: Optional[Mapping[str, Sequence[str]]],
                 fallback_template: str = DEFAULT_TEMPLATE, num_patches: int = 16, patch_resolution: int = 7,
                 epsilon: float = 0.1, ot_weight: float = 1.0, ot_method: str = "auto", ot_max_iter: int = 100,
                 ot_tol: float = 1e-5, topk: int = 0, pairs_per_call: int = 0, task_projectors: bool = True,
                 combine: str = "sum", ensemble_weight: float = 0.5, temperature: float = 50.0,
                 learn_temperature: bool = True, learn_background: bool = False):
        super().__init__(embed_dim=embed_dim, temperature=temperature, learn_temperature=learn_temperature,
                         learn_background=learn_background)
        if ot_method not in OT_METHODS:
            raise ValueError(f"MODEL.SPA.OT_METHOD '{ot_method}' is not one of {' | '.join(OT_METHODS)}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"MODEL.SPA.COMBINE '{combine}' is not one of {' | '.join(COMBINE_MODES)}")
        if not 0.0 <= ensemble_weight <= 1.0:
            raise ValueError(f"MODEL.SPA.ENSEMBLE_WEIGHT ({ensemble_weight}) must be in [0, 1]")
        if "{}" not in fallback_template:
            raise ValueError(f"MODEL.SPA.FALLBACK_TEMPLATE '{fallback_template}' needs a '{{}}' for the class name")
        if epsilon <= 0 or num_patches <= 0 or patch_resolution <= 0 or topk < 0 or pairs_per_call < 0:
            raise ValueError(f"MODEL.SPA: EPSILON ({epsilon}), NUM_PATCHES ({num_patches}) and POOLER_RESOLUTION "
                             f"({patch_resolution}) must be > 0, TOPK ({topk}) and PAIRS_PER_CALL "
                             f"({pairs_per_call}) >= 0")
        if num_patches > patch_resolution ** 2:
            raise ValueError(f"MODEL.SPA.NUM_PATCHES ({num_patches}) exceeds the {patch_resolution}x{patch_resolution} "
                             f"patches of a RoI")
        self.embed_dim = embed_dim
        self.descriptions = {k: list(v) for k, v in (descriptions or {}).items()}
        self.fallback_template = fallback_template
        self.num_patches, self.patch_resolution = num_patches, patch_resolution
        self.epsilon, self.ot_weight, self.ot_method = epsilon, ot_weight, ot_method
        self.ot_max_iter, self.ot_tol, self.topk = ot_max_iter, ot_tol, topk
        self.pairs_per_call = pairs_per_call
        self.task_projectors = task_projectors
        self.combine, self.ensemble_weight = combine, ensemble_weight
        self.projectors = nn.ModuleList()
        self._text: Optional[_Shared] = None
        self._banks: "OrderedDict[Tuple[str, ...], DescriptionBank]" = OrderedDict()

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> Dict[str, Any]:
        s = cfg.MODEL.SPA
        descriptions = load_class_descriptions(s.DESCRIPTIONS, cfg.DATASETS.TRAIN)
        return {**super().from_config(cfg, embed_dim), "descriptions": descriptions,
                "fallback_template": s.FALLBACK_TEMPLATE, "num_patches": s.NUM_PATCHES,
                "patch_resolution": s.POOLER_RESOLUTION, "epsilon": s.EPSILON, "ot_weight": s.OT_WEIGHT,
                "ot_method": s.OT_METHOD, "ot_max_iter": s.OT_MAX_ITER, "ot_tol": s.OT_TOL, "topk": s.TOPK,
                "pairs_per_call": s.PAIRS_PER_CALL, "task_projectors": s.TASK_PROJECTORS,
                "combine": s.COMBINE, "ensemble_weight": s.ENSEMBLE_WEIGHT}

    # -- continual life cycle ------------------------------------------------------------------
    def on_task_start(self, task: Any, model: nn.Module) -> None:
        """Add this task's projector (zero weights: the head starts the task computing exactly what
        it computed at the end of the previous one); freeze the earlier ones; encode the vocabulary."""
        if getattr(model, "text", None) is not None:
            self.set_text_encoder(model.text)
        if self.task_projectors:
            while len(self.projectors) <= task.index:  # skip_init: no draw from the global RNG
                proj = nn.utils.skip_init(nn.Linear, self.embed_dim, self.embed_dim)
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
                self.projectors.append(proj)
            for i, proj in enumerate(self.projectors):
                proj.requires_grad_(i == task.index)
        if self._text is not None:
            self.bank(tuple(task.class_names))

    def on_task_end(self, task: Any, model: nn.Module) -> None:
        """The task's projector (and every earlier one) is frozen from now on."""
        for proj in list(self.projectors)[: task.index + 1]:
            proj.requires_grad_(False)

    def set_text_encoder(self, text: Any) -> None:
        """The frozen text encoder (`clcl_det.modeling.text.TextEncoder`) used for descriptions."""
        self._text = _Shared(text)

    # -- descriptions ---------------------------------------------------------------------------
    def bank(self, names: Tuple[str, ...], device: Optional[torch.device] = None) -> DescriptionBank:
        """The encoded descriptions of `names` (built once per vocabulary, a few kept), on `device`."""
        if names not in self._banks:
            if self._text is None:
                raise RuntimeError("SPAHead has no text encoder: it gets the model's in on_task_start "
                                   "(clcl_det.continual.begin_task) or from set_text_encoder()")
            self._banks[names] = build_description_bank(self._text.obj, names, self.descriptions,
                                                        self.fallback_template)
            while len(self._banks) > 4:
                self._banks.popitem(last=False)
        self._banks.move_to_end(names)
        if device is not None:
            self._banks[names] = self._banks[names].to(device)
        return self._banks[names]

    def class_names(self, ctx: HeadContext) -> Tuple[str, ...]:
        """Names of the K classes of ctx: `ctx.class_names` / extras["class_names"] if the model sets
        them, else the first K classes of the task's class order (the engine's vocabularies),
        checked against ctx.class_embeddings."""
        K = ctx.num_classes
        names = getattr(ctx, "class_names", None) or ctx.get("class_names")
        if names is None and ctx.task is not None and len(ctx.task.all_class_names) >= K:
            names = ctx.task.all_class_names[:K]
            if self._text is not None:
                expected = self._text.obj.encode_classes(list(names)).to(ctx.class_embeddings)
                if not torch.allclose(expected, ctx.class_embeddings, atol=1e-5):
                    names = None
        if names is None or len(names) != K:
            raise RuntimeError(f"SPAHead cannot tell which {K} classes are scored: put their names in "
                               f"ctx.extras['class_names']")
        return tuple(names)

    # -- forward --------------------------------------------------------------------------------
    def project(self, u: Tensor) -> Tensor:
        """u + sum_t P_t(u) over the last dimension (frozen CLIP features into the task-adapted space)."""
        if not len(self.projectors):
            return u
        weight = torch.stack([p.weight for p in self.projectors]).sum(0)
        bias = torch.stack([p.bias for p in self.projectors]).sum(0)
        return u + F.linear(u, weight, bias)

    def roi_patches(self, ctx: HeadContext, rois: Sequence[Tensor]) -> Tensor:
        """RoIAlign-pooled frozen dense CLIP patch tokens, L2-normalised: R x (res*res) x D,
        contiguous (a transposed view would make every product with the description tokens a
        batched one over a copy of the token matrix per RoI)."""
        pooled = roi_align(ctx.clip_dense, list(rois), output_size=self.patch_resolution,
                           spatial_scale=1.0 / ctx.clip_stride, sampling_ratio=0, aligned=True)
        return F.normalize(pooled.flatten(2).transpose(1, 2).contiguous(), dim=-1)

    def candidates(self, text_cos: Tensor) -> Tensor:
        """R x k class indices of the (RoI, class) pairs that get the OT term: each RoI's top-k text
        classes (k = TOPK), or all K classes in order (TOPK 0 or >= K)."""
        R, K = text_cos.shape
        if self.topk <= 0 or self.topk >= K:
            return torch.arange(K, device=text_cos.device).expand(R, K)
        return text_cos.detach().topk(self.topk, dim=1).indices

    def ot_scores(self, patches: Tensor, bank: DescriptionBank, classes: Tensor) -> Tensor:
        """s^OT (R x K, 0 outside the pairs of `classes`, R x k class indices): 1 - <T*, 1 - cos(selected
        patches, S_c)>. The RoIs' pairs are solved together, in RoI chunks of `pairs_per_call` pairs
        (0: as many as keep the temporaries within the device's budget, `chunk_elements`); the
        patch-token cosines of all pairs come from one batched product against every class's tokens,
        so there is no loop over classes and no host sync. Differentiable in `patches` (envelope
        gradient)."""
        R, P, D = patches.shape
        K, L = bank.token_mask.shape
        J, k = bank.sentences.shape[1], classes.shape[1]
        n = min(self.num_patches, P)
        per_roi = P * K * (J + L) + 4 * k * n * L  # similarities (at most), then the cost, plan and solver temporaries
        rois = max(1, self.pairs_per_call // k if self.pairs_per_call
                   else chunk_elements(patches.device, _PAIR_BUDGET) // per_roi)
        sentences, tokens = bank.sentences.reshape(K * J, D), bank.tokens.reshape(K * L, D)
        values = []
        for s in range(0, R, rois):
            p, cls = patches[s:s + rois], classes[s:s + rois]
            B = p.shape[0]
            with torch.no_grad():  # each pair's n patches by max_j cos(patch, d_{c,j})
                sim = (p @ sentences.t()).view(B, P, K, J)
                sim = sim.masked_fill(~bank.sentence_mask, float("-inf")).amax(dim=-1)  # B x P x K
                idx = sim.gather(2, cls[:, None, :].expand(B, P, k)).topk(n, dim=1).indices  # B x n x k
            if k == K:  # every class, in order: the chosen patches against their class's tokens
                chosen = p.gather(1, idx.transpose(1, 2).reshape(B, k * n, 1).expand(-1, -1, D)).view(B, k, n, D)
                cos = torch.einsum("bknd,kld->bknl", chosen, bank.tokens).float()  # OT in float32 under autocast
            else:  # per-RoI classes: every patch against every class's tokens, then the pairs' entries
                where = (idx * K + cls[:, None, :]).transpose(1, 2).reshape(B, k * n, 1).expand(-1, -1, L)
                cos = (p @ tokens.t()).float().view(B, P * K, L).gather(1, where)
            cost = 1.0 - cos.reshape(B * k, n, L)
            _, value = solve_ot_batch(cost, bank.token_mask[cls.reshape(-1)], self.epsilon, self.ot_method,
                                      self.ot_max_iter, self.ot_tol)
            values.append(1.0 - value.view(B, k))
        return patches.new_zeros(R, K).scatter(1, classes, torch.cat(values).to(patches.dtype))

    def spa_logits(self, ctx: HeadContext, rois: Sequence[Tensor]) -> Tensor:
        """tau * [cos(P(g), t_c) + lambda * s^OT_c, cos(P(g), t_bg)]: R x (K+1)."""
        g = clip_region_features(ctx.clip_dense, rois, ctx.clip_stride)
        cos = self.cosine(self.project(g), ctx)  # R x (K+1)
        K = ctx.num_classes
        if self.ot_weight == 0 or K == 0 or cos.shape[0] == 0:
            return self.scale() * cos
        patches = F.normalize(self.project(self.roi_patches(ctx, rois)), dim=-1)
        bank = self.bank(self.class_names(ctx), cos.device)
        s_ot = self.ot_scores(patches, bank, self.candidates(cos[:, :K]))
        return self.scale() * (cos + F.pad(self.ot_weight * s_ot, (0, 1)))

    def combine_logits(self, det: Tensor, spa: Tensor) -> Tensor:
        if self.combine == "sum":
            return det + spa
        w = self.ensemble_weight
        return (1 - w) * det.log_softmax(dim=1) + w * spa.log_softmax(dim=1)

    def forward(self, x: Tensor, ctx: HeadContext, rois: Optional[list] = None) -> Tensor:
        det = self.scale() * self.cosine(x, ctx)  # the detector's own logits on z_r
        if rois is None:
            return det
        return self.combine_logits(det, self.spa_logits(ctx, rois))

    def replay_logits(self, feats: Tensor, ctx: HeadContext, embed: Optional[nn.Module]) -> Tensor:
        """Replayed frozen-CLIP region features through the projectors: tau * cos(P(g), [t, t_bg])."""
        return self.scale() * self.cosine(self.project(feats), ctx)

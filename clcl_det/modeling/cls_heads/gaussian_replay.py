"""Gaussian pseudo-feature replay (SPA / SECA++): per-class Gaussian statistics of features in a
space whose later layers train, stored after each task, sampled while later tasks train."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ConfigError, configurable
from ...utils.registry import lookup
from ...utils.seed import derive_seed
from ..context import HeadContext
from ..roi_statistics import all_reduce_sum, ground_truth_features
from .build import CLS_HEAD_REGISTRY, ClsHead

__all__ = ["GaussianReplay", "COV_MODES"]

COV_MODES = ("full", "diagonal", "shared")


def _mix_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (same on every process)."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 0x9E3779B9) % (2**63 - 1)
    return s


@CLS_HEAD_REGISTRY.register()
class GaussianReplay(ClsHead):
    """Wraps an inner classification head. After each task (`on_task_data`) stores, per class of
    that task, the mean and covariance of its ground-truth boxes' features (`cov`: full, diagonal
    or one covariance shared by all classes; `shrinkage`·I added) in buffers that grow per task
    and are saved with the model. The features live where the inner head says
    (`inner.replay_space`): around `TextClassifier` / `SemanticPrototypeHead` the box-head output
    that enters the RoI head's trainable `embed` layer (replayed through that layer, so the loss
    reaches it); around `SPAHead` the frozen CLIP region features (replayed through the current
    task projectors). While later tasks train, `samples_per_class` pseudo-features per old class
    are drawn each iteration and classified (`inner.replay_logits`) by cross-entropy over all seen
    classes (`loss_replay`). Draws come from a generator seeded by (seed, task, iteration), so a run is
    reproducible, resumes bit-identically and does not depend on the number of processes (every
    process draws the same features)."""

    loss_names = ("loss_replay",)

    @configurable
    def __init__(self, *, inner: ClsHead, embed_dim: int, cov: str = "full", shrinkage: float = 1e-4,
                 samples_per_class: int = 8, weight: float = 1.0, seed: int = 0):
        super().__init__()
        if cov not in COV_MODES:
            raise ValueError(f"MODEL.REPLAY.COV '{cov}' is not one of {' | '.join(COV_MODES)}")
        if shrinkage < 0 or samples_per_class < 0:
            raise ValueError(f"MODEL.REPLAY: SHRINKAGE ({shrinkage}) and SAMPLES_PER_CLASS ({samples_per_class}) "
                             f"must be >= 0")
        self.inner = inner
        self.embed_dim, self.cov_mode, self.shrinkage = embed_dim, cov, shrinkage  # embed_dim: feature width
        self.samples_per_class, self.weight = samples_per_class, weight
        self.seed = seed if seed >= 0 else int(torch.randint(2**31 - 1, ()))
        D = embed_dim
        self.register_buffer("means", torch.zeros(0, D))  # K x D
        self.register_buffer("counts", torch.zeros(0))  # K, embeddings behind each class's statistics
        if cov == "full":
            self.register_buffer("covariances", torch.zeros(0, D, D))  # K x D x D
        elif cov == "diagonal":
            self.register_buffer("variances", torch.zeros(0, D))  # K x D
        else:
            self.register_buffer("shared_covariance", torch.zeros(D, D))  # pooled within-class covariance
            self.register_buffer("shared_dof", torch.zeros(()))  # its degrees of freedom, sum_c (n_c - 1)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training iterations of this task
        self._factors: Optional[Tuple[Tensor, Tensor]] = None  # (classes, cached Cholesky/std factors)
        self._host: Optional[Dict[str, Any]] = None  # host copies of `step` and of which classes are stored
        self._embed: Optional[nn.Module] = None  # the RoI head's embed layer (a reference, not a child)

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> Dict[str, Any]:
        r = cfg.MODEL.REPLAY
        if r.INNER_HEAD == "GaussianReplay":
            raise ConfigError("MODEL.REPLAY.INNER_HEAD cannot be GaussianReplay itself (e.g. TextClassifier, SPAHead)")
        inner = lookup(CLS_HEAD_REGISTRY, r.INNER_HEAD, "MODEL.REPLAY.INNER_HEAD")(cfg, embed_dim)
        return {"inner": inner, "embed_dim": embed_dim, "cov": r.COV, "shrinkage": r.SHRINKAGE,
                "samples_per_class": r.SAMPLES_PER_CLASS, "weight": r.WEIGHT, "seed": derive_seed(cfg.SEED)}

    # -- statistics -----------------------------------------------------------------------------
    @property
    def num_stored(self) -> int:
        return int(self.means.shape[0])

    def _grow(self, num_classes: int) -> None:
        extra = num_classes - self.num_stored
        if extra <= 0:
            return
        D = self.embed_dim
        self.means = torch.cat([self.means, self.means.new_zeros(extra, D)])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
        if self.cov_mode == "full":
            self.covariances = torch.cat([self.covariances, self.covariances.new_zeros(extra, D, D)])
        elif self.cov_mode == "diagonal":
            self.variances = torch.cat([self.variances, self.variances.new_zeros(extra, D)])
        self._factors = self._host = None

    def _set_width(self, width: int) -> None:
        """Feature width of the statistics (only while none are stored)."""
        if width == self.embed_dim:
            return
        if self.num_stored:
            raise ValueError(f"GaussianReplay: statistics of width {self.embed_dim} stored, features now {width} wide")
        self.embed_dim = width
        ref = self.means
        self.means = ref.new_zeros(0, width)
        if self.cov_mode == "full":
            self.covariances = ref.new_zeros(0, width, width)
        elif self.cov_mode == "diagonal":
            self.variances = ref.new_zeros(0, width)
        else:
            self.shared_covariance = ref.new_zeros(width, width)
        self._factors = self._host = None

    def on_task_start(self, task: Any, model: nn.Module) -> None:
        """Find the replay space's width and the `embed` layer replayed features go through;
        buffers sized for the task's seen classes (zeros for the new ones); iteration count 0."""
        heads = getattr(model, "roi_heads", None)
        if self.inner.replay_space == "box" and heads is not None:
            object.__setattr__(self, "_embed", heads.embed)  # not registered: the RoI head owns it
            self._set_width(heads.embed.in_features)
        elif self.inner.replay_space == "clip" and model is not None:
            self._set_width(model.backbone.embed_dim)
        self._grow(task.stop)
        self.step.zero_()
        self._host = None

    def on_task_data(self, task: Any, model: nn.Module, loader: Iterable) -> None:
        """Statistics of the task's classes from the ground-truth boxes of its training images."""
        classes = torch.arange(task.start, task.stop)
        self.set_statistics(classes, ground_truth_features(model, loader, self.inner.replay_space))

    @torch.no_grad()
    def set_statistics(self, classes: Tensor, batches: Iterable[Tuple[Tensor, Tensor]]) -> None:
        """Store mean / covariance of `classes` from (embeddings N x D, labels N) batches (summed
        over processes); other labels are ignored, a class without embeddings keeps count 0."""
        classes = classes.to(self.means.device)
        self._grow(int(classes.max()) + 1)
        C, D = len(classes), self.embed_dim
        pos = torch.full((self.num_stored,), -1, dtype=torch.long, device=self.means.device)
        pos[classes] = torch.arange(C, device=pos.device)
        n = torch.zeros(C, dtype=torch.float64, device=pos.device)
        s1 = torch.zeros(C, D, dtype=torch.float64, device=pos.device)
        s2 = torch.zeros(C, D, D, dtype=torch.float64, device=pos.device) if self.cov_mode != "diagonal" \
            else torch.zeros(C, D, dtype=torch.float64, device=pos.device)
        for emb, lab in batches:
            emb, lab = emb.to(s1), lab.to(pos.device)
            inside = (lab >= 0) & (lab < self.num_stored)
            emb, p = emb[inside], pos[lab[inside]]
            emb, p = emb[p >= 0], p[p >= 0]
            n.index_add_(0, p, torch.ones_like(p, dtype=n.dtype))
            s1.index_add_(0, p, emb)
            if self.cov_mode == "diagonal":
                s2.index_add_(0, p, emb * emb)
            else:
                for c in p.unique().tolist():
                    e = emb[p == c]
                    s2[c] += e.t() @ e
        all_reduce_sum(n, s1, s2)
        mean = s1 / n.clamp_min(1)[:, None]
        denom = (n - 1).clamp_min(1)
        if self.cov_mode == "diagonal":
            var = ((s2 - n[:, None] * mean * mean) / denom[:, None]).clamp_min(0) * (n > 1)[:, None]
            self.variances[classes] = (var + self.shrinkage).to(self.variances)
        else:
            scatter = s2 - n[:, None, None] * mean[:, :, None] * mean[:, None, :]
            scatter = scatter * (n > 1)[:, None, None]
            eye = torch.eye(D, dtype=torch.float64, device=pos.device)
            if self.cov_mode == "full":
                cov = scatter / denom[:, None, None] + self.shrinkage * eye
                self.covariances[classes] = cov.to(self.covariances)
            else:
                dof_old = self.shared_dof.double()
                old = (self.shared_covariance.double() - self.shrinkage * eye) * dof_old
                dof = dof_old + (n - 1).clamp_min(0).sum()
                pooled = (old + scatter.sum(0)) / dof.clamp_min(1)
                self.shared_covariance.copy_((pooled + self.shrinkage * eye).to(self.shared_covariance))
                self.shared_dof.fill_(float(dof))
        self.means[classes] = mean.to(self.means)
        self.counts[classes] = n.to(self.counts)
        self._factors = self._host = None

    def covariance(self, c: int) -> Tensor:
        """The stored covariance of class c (D x D) whatever the mode."""
        if self.cov_mode == "full":
            return self.covariances[c]
        if self.cov_mode == "diagonal":
            return torch.diag(self.variances[c])
        return self.shared_covariance

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._factors = self._host = None

    def _host_state(self) -> Dict[str, Any]:
        """`step` and which classes have statistics, read from the buffers once after they change
        (a training step then needs no device sync to choose and seed its draws)."""
        if self._host is None or self._host["key"] != self._host_key():
            self._host = {"key": self._host_key(), "step": int(self.step), "stored": (self.counts > 0).cpu()}
        return self._host

    def _host_key(self) -> Tuple[int, ...]:
        """Changes whenever `step` or `counts` is written (in-place writes bump a tensor's version)."""
        return self.step._version, self.step.data_ptr(), self.counts._version, self.counts.data_ptr()

    def _scale_factors(self, classes: Tensor) -> Tensor:
        """Per class the Cholesky factor (full / shared: C x D x D) or the std (diagonal: C x D),
        computed in float64 on the buffers' device and kept there (float64 on a CPU, the buffers'
        dtype on a GPU), cached until the statistics change."""
        dev = self.means.device
        if self._factors is not None and torch.equal(self._factors[0], classes) and self._factors[1].device == dev:
            return self._factors[1]
        idx = classes.to(dev)
        if self.cov_mode == "full":
            f = torch.linalg.cholesky(self.covariances[idx].double())
        elif self.cov_mode == "diagonal":
            f = self.variances[idx].double().clamp_min(0).sqrt()
        else:
            f = torch.linalg.cholesky(self.shared_covariance.double())[None].expand(len(classes), -1, -1)
        f = f.to(torch.float64 if dev.type == "cpu" else self.means.dtype)
        self._factors = (classes.clone(), f)
        return f

    def sample(self, classes: Tensor, n: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """n pseudo-features per class (C*n x D, on the buffers' device) and their labels, drawn on
        the generator's device (the buffers' without one)."""
        classes = classes.cpu().long()
        empty = classes[~self._host_state()["stored"][classes]]
        if empty.numel():
            raise ValueError(f"GaussianReplay: no statistics stored for class(es) {empty.tolist()}")
        f = self._scale_factors(classes)
        dev = self.means.device
        z = torch.randn(len(classes), n, self.embed_dim, generator=generator, dtype=f.dtype,
                        device=generator.device if generator is not None else dev).to(dev)
        noise = z * f[:, None, :] if self.cov_mode == "diagonal" else z @ f.transpose(1, 2)
        idx = classes.to(dev)
        x = self.means[idx].to(f.dtype)[:, None, :] + noise
        return x.reshape(-1, self.embed_dim).to(self.means), idx.repeat_interleave(n)

    # -- classification ---------------------------------------------------------------------------
    def forward(self, x: Tensor, ctx: HeadContext, rois: Optional[list] = None) -> Tensor:
        return self.inner(x, ctx, rois)

    def replay_classes(self, ctx: HeadContext) -> Tensor:
        """Old classes with statistics (below the task's first class and inside the vocabulary), on
        the host."""
        limit = min(self.num_stored, ctx.num_classes)
        if ctx.task is not None:
            limit = min(limit, ctx.task.start)
        return torch.nonzero(self._host_state()["stored"][:limit]).squeeze(1)

    def losses(self, logits: Tensor, labels: Tensor, x: Tensor, ctx: HeadContext) -> Dict[str, Tensor]:
        out = dict(self.inner.losses(logits, labels, x, ctx))
        if not self.training:
            return out
        host = self._host_state()
        step = host["step"]
        self.step += 1
        host.update(step=step + 1, key=self._host_key())
        classes = self.replay_classes(ctx)
        if self.weight == 0 or self.samples_per_class == 0 or classes.numel() == 0:
            out["loss_replay"] = logits.sum() * 0.0
            return out
        task = ctx.task.index if ctx.task is not None else 0
        g = torch.Generator(device=self.means.device).manual_seed(_mix_seed(self.seed, task, step))
        feats, labs = self.sample(classes, self.samples_per_class, g)
        replayed = self.inner.replay_logits(feats, ctx, self._embed)[:, : ctx.num_classes]  # seen classes
        out["loss_replay"] = self.weight * F.cross_entropy(replayed, labs)
        return out

"""CL-CLIP's expert bank: one small convolutional expert per class, stored one chunk per task
and evaluated as grouped convolutions (no Python loop over classes)."""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvLayer", "ExpertChunk", "ExpertBank"]


class ConvLayer(NamedTuple):
    """One conv3x3 -> [group norm] -> ReLU layer of every expert of a chunk, stacked expert-major:
    weight n*E x C_in x 3 x 3, bias n*E, group-norm affine n*E each (None without the norm)."""
    weight: Tensor
    bias: Tensor
    norm_weight: Optional[Tensor]
    norm_bias: Optional[Tensor]

    def first(self, n: int) -> "ConvLayer":
        """The first n output channels (the first n / E experts)."""
        return ConvLayer(*(t[:n] if t is not None else None for t in self))

    def gather(self, experts: Tensor, num_experts: int) -> "ConvLayer":
        """The layers of `experts` (a flat index into the stacked experts), in that order."""
        return ConvLayer(*(t.view(num_experts, -1, *t.shape[1:])[experts].reshape(-1, *t.shape[1:])
                           if t is not None else None for t in self))


class ExpertChunk(nn.Module):
    """The experts of one task's n classes, stored stacked: expert i is
    conv3x3(C->E) -> [GN] -> ReLU -> conv3x3(E->E) -> [GN] -> ReLU -> average pool to G x G ->
    flatten -> fc(E*G*G -> D), plus the chunk's logit scale (G = 1: global mean; GN: a group norm
    over each expert's own E channels, with `norm`). Freezing the chunk freezes exactly these classes."""

    def __init__(self, n: int, in_channels: int, expert_dim: int, embed_dim: int, temperature: float,
                 pool_size: int, norm: bool):
        super().__init__()
        self.n = n
        affine = (lambda value: nn.Parameter(torch.full((n * expert_dim,), value))) if norm else (lambda value: None)
        # registered before the convs: the parameter order of checkpoints and optimizers stays as it was
        self.g1_w, self.g2_w = affine(1.0), affine(1.0)
        self.g1_b, self.g2_b = affine(0.0), affine(0.0)
        conv1 = nn.Conv2d(in_channels, n * expert_dim, 3, padding=1)
        conv2 = nn.Conv2d(expert_dim, n * expert_dim, 3, padding=1)
        self.w1, self.b1 = nn.Parameter(conv1.weight.detach()), nn.Parameter(conv1.bias.detach())
        self.w2, self.b2 = nn.Parameter(conv2.weight.detach()), nn.Parameter(conv2.bias.detach())
        fan_in = expert_dim * pool_size * pool_size
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's init for this fan-in
        self.fc_w = nn.Parameter(torch.empty(n, fan_in, embed_dim).uniform_(-bound, bound))
        self.fc_b = nn.Parameter(torch.empty(n, embed_dim).uniform_(-bound, bound))
        self.logit_scale = nn.Parameter(torch.full((n,), math.log(temperature)))

    def layers(self) -> Tuple[ConvLayer, ConvLayer]:
        """The two conv layers of the chunk's experts."""
        return ConvLayer(self.w1, self.b1, self.g1_w, self.g1_b), ConvLayer(self.w2, self.b2, self.g2_w, self.g2_b)


def _cat_layers(layers: List[ConvLayer]) -> ConvLayer:
    """One layer of several chunks, stacked in chunk order."""
    return ConvLayer(*(torch.cat(ts, dim=0) if ts[0] is not None else None for ts in zip(*layers)))


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

    def _layer(self, h: Tensor, layer: ConvLayer, groups: int) -> Tensor:
        """conv3x3 -> [group norm of each expert's E channels, one group per pathway] -> ReLU."""
        h = F.conv2d(h, layer.weight, layer.bias, padding=1, groups=groups)
        if self.norm:
            h = F.group_norm(h, groups, layer.norm_weight, layer.norm_bias)
        return F.relu(h)

    def _convs(self, x: Tensor, layers: Tuple[ConvLayer, ConvLayer], R: int, S: int, groups: int
               ) -> Tuple[Tensor, Tensor]:
        """Both layers on x (the R x S pathways as `groups` groups of channels): pooled features
        R x S x E*G*G and activation maps R x S x P*P (channel mean of the first layer, after ReLU)."""
        P = x.shape[-1]
        h = self._layer(x, layers[0], groups)
        act = h.view(R, S, self.expert_dim, P * P).mean(dim=2)
        h = self._layer(h, layers[1], groups)
        return self._pool(h.view(R, S * self.expert_dim, P, P), R, S), act

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
        return self._convs(x.reshape(R, s * C, P, P), tuple(layer.first(n) for layer in c.layers()), R, s, s)

    def gated_features(self, f: Tensor, m: Tensor, gate: Callable[[Tensor, Tensor], Tensor]
                       ) -> Tuple[Tensor, Tensor]:
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
        if idx is None:
            if S > self.num_experts:
                raise ValueError(f"{S} class pathways for {self.num_experts} experts")
            parts = [self.chunk_features(c, x[:, a:b]) for c, a, b in self.chunk_ranges(S)]
            return torch.cat([h for h, _ in parts], dim=1), torch.cat([a for _, a in parts], dim=1)
        # per-RoI class subsets: gather each pair's weights; groups = R*S in a batch of one
        K, flat = self.num_experts, idx.reshape(-1)
        layers = tuple(_cat_layers(list(ls)).gather(flat, K) for ls in zip(*(c.layers() for c in self.chunks)))
        return self._convs(x.reshape(1, R * S * C, P, P), layers, R, S, R * S)

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

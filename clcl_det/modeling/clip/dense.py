"""Dense features from an open_clip ViT at any input size: tapped token maps and the dense map V."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLIPDenseEncoder", "EvaDenseEncoder", "SigLIPDenseEncoder", "build_dense_encoder", "default_tap_indices"]


def default_tap_indices(num_blocks: int, num_taps: int = 4) -> List[int]:
    """Evenly spaced blocks, the last one being the final block (ViT-B/16: 3, 5, 7, 11)."""
    if num_blocks < num_taps:
        raise ValueError(f"a ViT with {num_blocks} blocks cannot give {num_taps} taps")
    if num_blocks == 12 and num_taps == 4:
        return [3, 5, 7, 11]
    step = num_blocks / num_taps
    return sorted({min(num_blocks - 1, int(round(step * (i + 1))) - 1) for i in range(num_taps)})


def _v_path(block: nn.Module, x: Tensor) -> Tensor:
    """The block without token mixing: x + out_proj(v_proj(ln_1(x))), then the MLP."""
    attn = block.attn
    if not hasattr(attn, "in_proj_weight") or attn.in_proj_weight is None:
        raise NotImplementedError(
            f"dense CLIP features need an attention with a packed in_proj (got {type(attn).__name__})"
        )
    width = x.shape[-1]
    w_v = attn.in_proj_weight[2 * width:]
    b_v = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    y = F.linear(block.ln_1(x), w_v, b_v)
    if hasattr(attn, "ln_inner") and not isinstance(attn.ln_inner, nn.Identity):
        y = attn.ln_inner(y)
    y = attn.out_proj(y)
    x = x + block.ls_1(y)
    return x + block.ls_2(block.mlp(block.ln_2(x)))



def _patch_grid(images: Tensor, patch_size: int) -> Tuple[int, int, int]:
    """Batch size and the (h, w) patch grid of `images`; their sides must be multiples of the patch."""
    B, _, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"input {H}x{W} is not divisible by the CLIP patch size {patch_size}")
    return B, H // patch_size, W // patch_size

class CLIPDenseEncoder(nn.Module):
    """Runs an open_clip `VisionTransformer` on images of any size divisible by the patch size.

    Returns the token maps after the tapped blocks (B x width x h x w, CLS dropped) and the dense
    CLIP map V (B x D x h x w, L2-normalised). The final block runs without token mixing (F-ViT /
    MaskCLIP); its output is the last tap and the source of V. Positional embeddings are resized
    bicubically to the input's grid.
    """

    def __init__(self, visual: nn.Module, tap_indices: Sequence[int] = ()):
        super().__init__()
        for attr in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post"):
            if not hasattr(visual, attr):
                raise TypeError(
                    f"MODEL.CLIP.ARCH must be an open_clip ViT (VisionTransformer); its visual tower "
                    f"{type(visual).__name__} has no '{attr}'"
                )
        if getattr(visual, "attn_pool", None) is not None:
            raise NotImplementedError("open_clip ViTs with attentional pooling are not supported")
        self.visual = visual
        blocks = visual.transformer.resblocks
        taps = list(tap_indices) or default_tap_indices(len(blocks))
        if taps[-1] != len(blocks) - 1 or any(not 0 <= t < len(blocks) for t in taps) or taps != sorted(set(taps)):
            raise ValueError(
                f"MODEL.CLIP.TAP_INDICES {taps} must be increasing block indices ending with the final "
                f"block {len(blocks) - 1}"
            )
        self.tap_indices = taps
        patch = visual.conv1.kernel_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple) else patch)
        self.width = int(visual.conv1.out_channels)
        self.embed_dim = int(visual.proj.shape[1]) if visual.proj is not None else self.width
        self._pos_cache: Dict[Tuple[int, int, torch.dtype, torch.device], Tensor] = {}

    def _pos_embed(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (h, w, dtype, device)
        if key not in self._pos_cache or self.training:
            pos = self.visual.positional_embedding
            cls_pos, grid_pos = pos[:1], pos[1:]
            g = int(math.isqrt(grid_pos.shape[0]))
            if (g, g) != (h, w):
                grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
                grid_pos = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
                grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(h * w, -1)
            out = torch.cat([cls_pos, grid_pos.to(pos.dtype)], dim=0).to(device=device, dtype=dtype)
            if self.training:
                return out
            self._pos_cache[key] = out
        return self._pos_cache[key]

    def forward(self, images: Tensor) -> Tuple[List[Tensor], Tensor]:
        B, h, w = _patch_grid(images, self.patch_size)
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # B, hw, width
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(h, w, x.dtype, x.device)
        x = v.ln_pre(x)
        batch_first = getattr(v.transformer, "batch_first", True)
        blocks = v.transformer.resblocks
        taps: List[Tensor] = []
        to_map = lambda t: t[:, 1:].transpose(1, 2).reshape(B, -1, h, w)  # noqa: E731
        if not batch_first:
            x = x.transpose(0, 1)
        for i, blk in enumerate(blocks[:-1]):
            x = blk(x)
            if i in self.tap_indices:
                taps.append(to_map(x if batch_first else x.transpose(0, 1)))
        x = _v_path(blocks[-1], x if batch_first else x.transpose(0, 1))
        taps.append(to_map(x))
        tokens = v.ln_post(x[:, 1:])
        if v.proj is not None:
            tokens = tokens @ v.proj
        dense = F.normalize(tokens, dim=-1).transpose(1, 2).reshape(B, -1, h, w)
        return taps, dense


def _check_taps(tap_indices: Sequence[int], num_blocks: int) -> List[int]:
    taps = list(tap_indices) or default_tap_indices(num_blocks)
    if taps[-1] != num_blocks - 1 or any(not 0 <= t < num_blocks for t in taps) or taps != sorted(set(taps)):
        raise ValueError(
            f"MODEL.CLIP.TAP_INDICES {taps} must be increasing block indices ending with the final "
            f"block {num_blocks - 1}"
        )
    return taps


def _set_timm_tower(encoder: nn.Module, visual: nn.Module, trunk: nn.Module, tap_indices: Sequence[int]) -> None:
    """The attributes every dense encoder of an open_clip tower around a timm trunk has: the tower, its
    trunk, the tapped blocks, the patch size, the token width and the embedding width (the last
    Linear of the trunk's and the tower's heads, or the token width)."""
    encoder.visual = visual
    encoder.trunk = trunk
    encoder.tap_indices = _check_taps(tap_indices, len(trunk.blocks))
    patch = trunk.patch_embed.patch_size
    encoder.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    encoder.width = int(trunk.embed_dim)
    projections = [m for part in (trunk.head, visual.head) for m in part.modules() if isinstance(m, nn.Linear)]
    encoder.embed_dim = int(projections[-1].out_features) if projections else encoder.width


class EvaDenseEncoder(nn.Module):
    """`CLIPDenseEncoder` for open_clip's EVA02 towers (`TimmModel` around a timm `Eva` trunk,
    e.g. EVA02-B-16): same outputs, any input size divisible by the patch size.

    Absolute positions are resampled with timm's `resample_abs_pos_embed`, rotary ones taken from
    the trunk's `rope.get_embed` at the input's grid. The final block runs without token mixing:
    its attention keeps the value path (v projection, EVA's sub-LN `attn.norm`, output projection),
    then the block's MLP; the trunk's final norm and CLIP head project the tokens into V.
    """

    def __init__(self, visual: nn.Module, tap_indices: Sequence[int] = ()):
        super().__init__()
        trunk = getattr(visual, "trunk", None)
        for attr in ("patch_embed", "pos_embed", "cls_token", "rope", "blocks", "norm", "head"):
            if trunk is None or not hasattr(trunk, attr):
                raise TypeError(f"MODEL.CLIP.ARCH: EVA dense features need a timm Eva trunk; "
                                f"{type(trunk or visual).__name__} has no '{attr}'")
        if getattr(trunk, "global_pool", "token") != "token" or getattr(trunk, "reg_token", None) is not None:
            raise NotImplementedError("EVA towers with average pooling or register tokens are not supported")
        _set_timm_tower(self, visual, trunk, tap_indices)

    def _rope(self, h: int, w: int) -> Tensor:
        """The trunk's rotary embedding at an h x w grid (cached). A rope with a fixed feature shape
        is moved to the grid with its public `update_feat_shape`, read, and moved back."""
        key = (h, w)
        cache = self.__dict__.setdefault("_rope_cache", {})
        if key not in cache:
            rope = self.trunk.rope
            fixed = getattr(rope, "feat_shape", None)
            if fixed is None:
                cache[key] = rope.get_embed(shape=[h, w])
            elif list(fixed) == [h, w]:
                cache[key] = rope.get_embed().clone()
            else:
                rope.update_feat_shape([h, w])
                try:
                    cache[key] = rope.get_embed().clone()
                finally:
                    rope.update_feat_shape(list(fixed))
        return cache[key]

    def _v_path(self, block: nn.Module, x: Tensor) -> Tensor:
        attn = block.attn
        h = block.norm1(x)
        if getattr(attn, "qkv", None) is not None:
            w_v = attn.qkv.weight[2 * self.width:]
            b_v = attn.v_bias if getattr(attn, "v_bias", None) is not None else (
                attn.qkv.bias[2 * self.width:] if attn.qkv.bias is not None else None)
            y = F.linear(h, w_v, b_v)
        else:
            y = attn.v_proj(h)
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("EVA attention with a gate is not supported for dense features")
        y = attn.proj(attn.norm(y))
        if block.gamma_1 is not None:
            y = block.gamma_1 * y
        x = x + y
        m = block.mlp(block.norm2(x))
        return x + (block.gamma_2 * m if block.gamma_2 is not None else m)

    def forward(self, images: Tensor) -> Tuple[List[Tensor], Tensor]:
        from timm.layers import resample_abs_pos_embed

        B, h, w = _patch_grid(images, self.patch_size)
        t = self.trunk
        pe = t.patch_embed
        x = pe.norm(pe.proj(images.to(pe.proj.weight.dtype)).flatten(2).transpose(1, 2))  # B, hw, width
        pos = resample_abs_pos_embed(t.pos_embed, new_size=(h, w), old_size=pe.grid_size, num_prefix_tokens=1)
        x = torch.cat([t.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1) + pos.to(x.dtype)
        x = t.norm_pre(x)
        rope = self._rope(h, w).to(device=x.device)
        taps: List[Tensor] = []
        to_map = lambda z: z[:, 1:].transpose(1, 2).reshape(B, -1, h, w)  # noqa: E731
        for i, blk in enumerate(t.blocks[:-1]):
            x = blk(x, rope=rope)
            if i in self.tap_indices:
                taps.append(to_map(x))
        x = self._v_path(t.blocks[-1], x)
        taps.append(to_map(x))
        tokens = self.visual.head(t.head(t.fc_norm(t.norm(x[:, 1:]))))
        dense = F.normalize(tokens, dim=-1).transpose(1, 2).reshape(B, -1, h, w)
        return taps, dense


class SigLIPDenseEncoder(nn.Module):
    """`CLIPDenseEncoder` for open_clip's SigLIP / SigLIP2 towers (`TimmModel` around a timm
    `VisionTransformer` without class token, pooled by an attention-pool head, e.g.
    ViT-B-16-SigLIP2): same outputs, any input size divisible by the patch size.

    Absolute positions are resampled with timm's `resample_abs_pos_embed`. Every block runs as
    trained (the last tap is the final block's output). The dense map takes the attention pool
    without token mixing: each token's own value (the pool's kv projection, value half), the pool's
    output projection and its MLP, i.e. what the pool returns for a sequence of that one token;
    then the trunk's and the CLIP tower's heads.
    """

    def __init__(self, visual: nn.Module, tap_indices: Sequence[int] = ()):
        super().__init__()
        trunk = getattr(visual, "trunk", None)
        for attr in ("patch_embed", "pos_embed", "blocks", "norm", "attn_pool", "fc_norm", "head"):
            if trunk is None or not hasattr(trunk, attr):
                raise TypeError(f"MODEL.CLIP.ARCH: SigLIP dense features need a timm VisionTransformer trunk; "
                                f"{type(trunk or visual).__name__} has no '{attr}'")
        pool = trunk.attn_pool
        if pool is None or getattr(trunk, "num_prefix_tokens", 0) or getattr(pool, "pos_embed", None) is not None:
            raise NotImplementedError("SigLIP dense features need an attention-pool head without its own positions "
                                      "and a trunk without class or register tokens")
        _set_timm_tower(self, visual, trunk, tap_indices)

    def _pool_v_path(self, x: Tensor) -> Tensor:
        """The attention pool applied to each token alone (attention weight 1 on itself): B x N x width."""
        pool = self.trunk.attn_pool
        B, N, C = x.shape
        v = pool.kv(x).reshape(B, N, 2, C)[:, :, 1]  # heads in order, as the pool's output reshape
        y = pool.proj_drop(pool.proj(v))
        return y + pool.mlp(pool.norm(y)) if pool.mlp is not None else y

    def forward(self, images: Tensor) -> Tuple[List[Tensor], Tensor]:
        from timm.layers import resample_abs_pos_embed

        B, h, w = _patch_grid(images, self.patch_size)
        t = self.trunk
        pe = t.patch_embed
        x = pe.norm(pe.proj(images.to(pe.proj.weight.dtype)).flatten(2).transpose(1, 2))  # B, hw, width
        pos = resample_abs_pos_embed(t.pos_embed, new_size=(h, w), old_size=pe.grid_size, num_prefix_tokens=0)
        x = t.norm_pre(t.patch_drop(t.pos_drop(x + pos.to(x.dtype))))
        taps: List[Tensor] = []
        to_map = lambda z: z.transpose(1, 2).reshape(B, -1, h, w)  # noqa: E731
        for i, blk in enumerate(t.blocks):
            x = blk(x)
            if i in self.tap_indices:
                taps.append(to_map(x))
        tokens = self.visual.head(t.head(t.head_drop(t.fc_norm(self._pool_v_path(t.norm(x))))))
        dense = F.normalize(tokens, dim=-1).transpose(1, 2).reshape(B, -1, h, w)
        return taps, dense


def build_dense_encoder(visual: nn.Module, tap_indices: Sequence[int] = ()) -> nn.Module:
    """The dense encoder of an open_clip visual tower: EVA (timm Eva trunk), SigLIP (timm ViT
    with an attention-pool head) or a standard ViT."""
    trunk = getattr(visual, "trunk", None)
    if hasattr(trunk, "rope"):
        return EvaDenseEncoder(visual, tap_indices)
    if getattr(trunk, "attn_pool", None) is not None:
        return SigLIPDenseEncoder(visual, tap_indices)
    return CLIPDenseEncoder(visual, tap_indices)

"""Dense features from an open_clip ViT at any input size: tapped token maps and the dense map V."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLIPDenseEncoder", "default_tap_indices"]


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
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not divisible by the CLIP patch size {p}")
        h, w = H // p, W // p
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

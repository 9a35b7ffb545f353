"""Optimizer parameter groups and learning-rate factors shared by the detector's trainer and the
tiny-CLIP recipe."""
import math
from typing import Any, Dict, List, Sequence

from torch import nn

__all__ = ["decay_param_groups", "cosine_factor", "warmup_factor"]


def decay_param_groups(model: nn.Module, weight_decay: float, no_decay_names: Sequence[str] = ()
                       ) -> List[Dict[str, Any]]:
    """Two groups of the trainable parameters: with `weight_decay`, and without it for biases,
    norms, scalars (ndim <= 1) and parameters whose name contains one of `no_decay_names`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(s in name for s in no_decay_names) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_factor(it: int, total: int) -> float:
    """Cosine decay from 1 at iteration 0 to 0 at `total`."""
    return 0.5 * (1.0 + math.cos(math.pi * it / max(total, 1)))


def warmup_factor(it: int, warmup_iters: int, start: float) -> float:
    """Linear warm-up from `start` at iteration 0 to 1 at `warmup_iters` (1 afterwards)."""
    if it >= warmup_iters:
        return 1.0
    alpha = it / warmup_iters
    return start * (1 - alpha) + alpha

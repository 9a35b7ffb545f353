"""Balanced positive/negative sampling with a per-image seed, so the sample an image gets does not
depend on which process or batch it lands in (DDP agreement, bit-identical resume)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["subsample_labels", "image_generator"]


def image_generator(seed: Optional[int], salt: int) -> Optional[torch.Generator]:
    """A CPU generator seeded by an image's sample seed and a salt (one per sampling site)."""
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + salt) % (2**63 - 1))
    return g


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float,
                     generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """Indices of sampled positives (label 1) and negatives (label 0); -1 is ignored."""
    positive = torch.nonzero(labels == 1).squeeze(1)
    negative = torch.nonzero(labels == 0).squeeze(1)
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    perm_pos = torch.randperm(positive.numel(), generator=generator)[:num_pos].to(labels.device)
    perm_neg = torch.randperm(negative.numel(), generator=generator)[:num_neg].to(labels.device)
    return positive[perm_pos], negative[perm_neg]


def subsample_batch(labels: Sequence[Tensor], num_samples: int, positive_fraction: float,
                    seeds: Sequence[Optional[int]], salt: int) -> Tuple[List[Tensor], List[Tensor]]:
    """`subsample_labels` per image with that image's generator."""
    pos, neg = [], []
    for lab, seed in zip(labels, seeds):
        p, n = subsample_labels(lab, num_samples, positive_fraction, image_generator(seed, salt))
        pos.append(p)
        neg.append(n)
    return pos, neg

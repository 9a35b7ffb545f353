"""The one rule for seeds: every random stream of a run derives from `cfg.SEED` through
`derive_seed`. A negative SEED means "random": one seed is drawn per run (per process group: rank
0 draws, the others receive it), logged, and used for everything (data order, augmentation, new
parameters, random CLIP weights, replay draws)."""
from __future__ import annotations

import logging
import os
from typing import Optional

from . import comm

__all__ = ["derive_seed", "resolve_seed"]

logger = logging.getLogger(__name__)

_drawn: Optional[int] = None  # the seed drawn for SEED < 0 (once per process)


def resolve_seed(seed: int) -> int:
    """`seed` itself if >= 0; else the run's drawn seed (drawn and logged on first use)."""
    global _drawn
    if seed >= 0:
        return int(seed)
    if _drawn is None:
        drawn = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        _drawn = int(comm.broadcast_object(drawn))
        logger.info(f"SEED {seed} (random): this run uses seed {_drawn}; pass SEED {_drawn} to repeat it")
    return _drawn


def derive_seed(seed: int, *stream: int) -> int:
    """The seed of one random stream: the (resolved) run seed for no stream, else
    (seed * 1000 + s) % 2^31 folded over the stream's integers (e.g. `derive_seed(cfg.SEED, t + 1)`
    for what task t creates)."""
    s = resolve_seed(seed)
    for part in stream:
        s = (s * 1000 + int(part)) % 2**31
    return s

"""PROPOSAL_GENERATOR_REGISTRY and its builder."""
from typing import Any, Sequence

from torch import nn

from ...utils.registry import Registry, lookup

PROPOSAL_GENERATOR_REGISTRY = Registry("PROPOSAL_GENERATOR")
PROPOSAL_GENERATOR_REGISTRY.__doc__ = """Proposal generators: (cfg, in_channels, strides) -> module."""


def build_proposal_generator(cfg: Any, in_channels: int, strides: Sequence[int]) -> nn.Module:
    """The proposal generator named by MODEL.PROPOSAL_GENERATOR.NAME."""
    name = cfg.MODEL.PROPOSAL_GENERATOR.NAME
    return lookup(PROPOSAL_GENERATOR_REGISTRY, name, "MODEL.PROPOSAL_GENERATOR.NAME")(cfg, in_channels, strides)

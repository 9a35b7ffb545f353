"""Backbones."""
from . import clip_vit  # noqa: F401  (registration)

"""Continual losses."""
from . import distillation, drift, orthogonality  # noqa: F401  (registration)

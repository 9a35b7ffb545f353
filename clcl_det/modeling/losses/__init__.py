"""Continual losses."""
from . import distillation, drift, orthogonality  # noqa: F401  (registration)
from . import sgakt  # noqa: F401  (registration)

"""Continual losses."""
from . import config  # noqa: F401  (the methods' config keys)
from . import distillation, drift, orthogonality  # noqa: F401  (registration)
from . import sgakt  # noqa: F401  (registration)

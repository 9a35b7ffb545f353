"""Meta-architectures."""
from . import fvit  # noqa: F401  (registration)

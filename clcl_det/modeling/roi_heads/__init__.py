"""RoI heads."""
from . import fvit_roi_heads  # noqa: F401  (registration)

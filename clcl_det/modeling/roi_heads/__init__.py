"""RoI heads."""
from . import fvit_roi_heads, multi_expert  # noqa: F401  (registration)

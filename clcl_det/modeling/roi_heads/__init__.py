"""RoI heads."""
from . import config  # noqa: F401  (the methods' config keys)
from . import fvit_roi_heads, multi_expert  # noqa: F401  (registration)

"""clcl_det: continual (class-incremental) object detection with CLIP, detectron2-style."""
__version__ = "0.1.0"

from . import embedded  # noqa: E402,F401  (declares the embedded default's config keys in get_cfg())

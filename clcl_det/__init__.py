"""clcl_det: continual (class-incremental) object detection with CLIP, detectron2-style."""
__version__ = "0.1.0"

"""The embedded default: the synthetic Shapes dataset (`shapes`), the crowded COCO-format Clutter
dataset (`clutter`), the recipe that pretrains the project's tiny CLIP on either (`tiny_clip`), its
quality measurement (`quality`) and their config keys (`config`). The entry point prepares these
assets (`prepare_embedded_assets`) before a model is built; the model only loads the cached weights."""
from . import config  # noqa: F401  (declares MODEL.CLIP.TINY and DATASETS.CLUTTER in get_cfg())

"""The embedded default: the synthetic Shapes dataset (`shapes`), the recipe that pretrains the
project's tiny CLIP on it (`tiny_clip`), its quality measurement (`quality`) and its config keys
(`config`). The entry point prepares these assets (`prepare_embedded_assets`) before a model is
built; the model only loads the cached weights."""
from . import config  # noqa: F401  (declares MODEL.CLIP.TINY in get_cfg())

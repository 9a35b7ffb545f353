"""Build the frozen open_clip model named by MODEL.CLIP (any architecture, tag or local file)."""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import open_clip
import torch
from torch import nn

from ...utils.seed import derive_seed

__all__ = ["build_clip", "clip_cache_dir", "create_open_clip", "PROJECT_PRETRAINED", "register_pretrained"]

logger = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

PROJECT_PRETRAINED = "shapes-tiny"  # weights built by the project's own recipe and cached

# MODEL.CLIP.PRETRAINED names whose checkpoint file a package above `modeling` knows: name -> fn(cfg) -> path
_PRETRAINED_FILES: Dict[str, Callable[[Any], str]] = {}


def register_pretrained(name: str, path_fn: Callable[[Any], str]) -> None:
    """Make MODEL.CLIP.PRETRAINED `name` load the file `path_fn(cfg)` (prepared before the model is
    built; `path_fn` raises FileNotFoundError with a one-line hint if it is missing)."""
    _PRETRAINED_FILES[name] = path_fn


@contextlib.contextmanager
def _open_clip_warnings_quiet() -> Iterator[None]:
    """open_clip warns on the root logger when a model gets random weights; we say so ourselves."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def create_open_clip(arch: str, pretrained: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """`open_clip.create_model`, without open_clip's warning when `pretrained` is None (random
    weights on purpose)."""
    if pretrained:
        return open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    with _open_clip_warnings_quiet():
        return open_clip.create_model(arch, pretrained=None, **kwargs)


def clip_cache_dir(cfg: Any = None) -> str:
    """MODEL.CLIP.CACHE_DIR, else $CLCL_CACHE, else ~/.cache/clcl_det."""
    d = (cfg.MODEL.CLIP.CACHE_DIR if cfg is not None else "") or os.environ.get("CLCL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "clcl_det"
    )
    os.makedirs(d, exist_ok=True)
    return d


def build_clip(cfg: Any) -> Tuple[nn.Module, Any]:
    """The open_clip model (frozen, eval mode) and its tokenizer.

    MODEL.CLIP.PRETRAINED: "" = random weights; "shapes-tiny" = the project's tiny CLIP (built and
    cached by the entry point before the model is built, see `register_pretrained`); a file path =
    a local checkpoint; anything else = an open_clip pretrained tag (downloaded by open_clip into
    CACHE_DIR).
    """
    arch, pretrained = cfg.MODEL.CLIP.ARCH, cfg.MODEL.CLIP.PRETRAINED
    if arch not in open_clip.list_models():
        from ...config import ConfigError

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3, cutoff=0.5)
        raise ConfigError(f"MODEL.CLIP.ARCH '{arch}' is not an open_clip architecture"
                          + (f"; closest: {', '.join(close)}" if close else "") + " (see open_clip.list_models())")
    if pretrained in _PRETRAINED_FILES:
        pretrained = _PRETRAINED_FILES[pretrained](cfg)
    elif pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not os.path.isfile(pretrained):
            from ...config import ConfigError

            raise ConfigError(f"MODEL.CLIP.PRETRAINED: checkpoint file '{pretrained}' does not exist")
    if pretrained:
        logger.info(f"CLIP: {arch} with weights '{pretrained}'")
    else:
        logger.info(f"CLIP: {arch} with random weights (MODEL.CLIP.PRETRAINED is empty)")
    # random weights are a function of SEED, so a resumed or eval-only run sees the same CLIP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.SEED))
        model = create_open_clip(arch, pretrained or None, cache_dir=clip_cache_dir(cfg), weights_only=True)
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)
    return model, tokenizer

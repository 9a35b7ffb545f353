"""The recipe that pretrains the project's tiny CLIP (`shapes-tiny`) on an embedded dataset, and its cache.

The dataset is `MODEL.CLIP.TINY.DATASET`: Shapes (20 classes; the default) or Clutter (80 classes,
crowded scenes; `clutter.py`). Every step trains both towers on its *train* images (the val and
test splits are never trained on); below, "the 20 class names" are the dataset's class names:

- **Dense alignment**: full images (random flip and zoom) go through `CLIPDenseEncoder`, exactly
  the dense map V the detector computes (final block without token mixing, `ln_post`, `proj`,
  L2-norm). Each patch cell is classified by a softmax over the text embeddings of the 20 class
  names and of the background prompt, with a soft target: the fraction of the cell's pixels that
  each class (or the background) covers in the Shapes class map. Object cells weigh more.
- **Crop-caption contrast**: object crops (class-balanced, random context and jitter) go through
  `encode_image` and are contrasted against the captions of all 20 classes.

- **Region term** (`TINY.REGION_WEIGHT`): a box's mean cell response - what the dense hit
  rate measures - must pick the box's class (cross-entropy over the classes).

Text embeddings are drawn afresh at every step: per class, a few random prompt templates of
`TINY.TEMPLATES` (plus the bare name), averaged - so the prompt ensemble the detector computes
lands where training put the classes; a text-only contrastive term (two templates of a name
match each other) runs alone for `TINY.TEXT_WARMUP_ITERS` steps first, so the class captions are
apart before the images join. The ViT starts from a mimetic initialisation of its attention
(`TINY.MIMETIC_INIT`, Trockman & Kolter 2023) and uses fixed 2-D sin-cos positions: without
them a ViT trained from scratch stays at chance on *shape* (it learns colour at once) for longer
than the whole recipe. Warm-up then cosine decay; AdamW.

The recipe runs in a child process under pinned numerics (`pinned_env`, `pin_numerics`): ATen's
kernels at AVX2 even on AVX-512 CPUs, MKL in conditional-numerical-reproducibility mode at AVX2,
oneDNN off, two threads whatever the machine. Without them the checkpoint's bytes followed the
CPU's instruction set (the kernels' reduction order does); with them every x86-64 CPU with AVX2
builds the same file (`tools/tiny_clip_repro.py` checks the variations one machine can produce).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..data.datasets.voc import load_voc_instances
from ..modeling.clip.dense import CLIPDenseEncoder
from ..modeling.clip.factory import PROJECT_PRETRAINED, clip_cache_dir, create_open_clip, register_pretrained
from ..modeling.text import TEMPLATE_SETS
from ..utils.checkpoint import atomic_torch_save
from ..utils.device import resolve_device
from ..utils.errors import UserError
from ..utils.optim import cosine_factor, decay_param_groups, warmup_factor
from .quality import box_cell_mask
from .clutter import CLUTTER_CLASSES, ClutterSpec, ensure_clutter, mask_file, register_clutter
from .shapes import SHAPES_CLASSES, ShapesSpec, ensure_shapes, file_lock, register_shapes

__all__ = ["ensure_shapes_tiny", "pretrain_tiny_clip", "tiny_clip_path", "recipe_key", "recipe_digest",
           "packaged_tiny_clip_path", "verify_packaged", "TinyCLIPChecksumError", "ShapesTrainData",
           "RecipeData", "recipe_data", "RECIPE_DATASETS"]

logger = logging.getLogger("clcl_det.embedded.tiny_clip")  # by name: the build process runs this module as __main__

_SECONDS_PER_STEP_HINT = 1.3  # a recipe step on a 2-core CPU under pinned numerics (for the "how long" log line only)


# ----------------------------------------------------------------------------------------------
# the dataset a recipe trains on


@dataclass
class RecipeData:
    """An embedded dataset as the recipe sees it: its spec (part of the cache key), class names,
    train-split dicts with each image's class map (`sem_seg_file_name`; crowd boxes left out), and
    the registered split its quality is monitored on."""

    spec: Dict[str, Any]
    class_names: Sequence[str]
    train_dicts: Callable[[], List[Dict[str, Any]]]
    monitor_split: Callable[[], str]


def _shapes_data(cfg: Any) -> RecipeData:
    spec = ShapesSpec.from_cfg(cfg)

    def train_dicts() -> List[Dict[str, Any]]:
        root = ensure_shapes(spec)
        return [{**d, "sem_seg_file_name": os.path.join(root, "SegmentationClass", f"{d['image_id']}.png")}
                for d in load_voc_instances(root, "train", SHAPES_CLASSES)]

    return RecipeData(spec.to_dict(), SHAPES_CLASSES, train_dicts, lambda: register_shapes(spec)["test"])


def _clutter_data(cfg: Any) -> RecipeData:
    from ..data.catalog import DatasetCatalog

    spec = ClutterSpec.from_cfg(cfg)

    def train_dicts() -> List[Dict[str, Any]]:
        root = ensure_clutter(spec)
        return [{**d, "sem_seg_file_name": mask_file(root, d["file_name"]),
                 "annotations": [a for a in d["annotations"] if not a.get("iscrowd", 0)]}
                for d in DatasetCatalog.get(register_clutter(spec)["train"])]

    return RecipeData(spec.to_dict(), CLUTTER_CLASSES, train_dicts, lambda: register_clutter(spec)["val"])


RECIPE_DATASETS: Dict[str, Callable[[Any], RecipeData]] = {"shapes": _shapes_data, "clutter": _clutter_data}


def recipe_data(cfg: Any) -> RecipeData:
    """The dataset `MODEL.CLIP.TINY.DATASET` names, for the spec of `cfg`."""
    name = cfg.MODEL.CLIP.TINY.DATASET
    if name not in RECIPE_DATASETS:
        raise ValueError(f"MODEL.CLIP.TINY.DATASET '{name}' is not one of {sorted(RECIPE_DATASETS)}")
    return RECIPE_DATASETS[name](cfg)


# ----------------------------------------------------------------------------------------------
# cache


def recipe_key(cfg: Any) -> Dict[str, Any]:
    """Everything the pretrained weights depend on: the recipe keys, the model config, the spec of
    the dataset it trains on (under the dataset's name), the background prompt and the pixel
    normalisation."""
    arch = cfg.MODEL.CLIP.ARCH
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"MODEL.CLIP.ARCH '{arch}' has no open_clip model config")
    return {
        "arch": arch,
        "model_config": model_cfg,
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.MODEL.CLIP.TINY.items())
                   if k != "DATASET"},  # the dataset is the key of its spec below
        cfg.MODEL.CLIP.TINY.DATASET: recipe_data(cfg).spec,
        "background_prompt": cfg.MODEL.CLIP.BACKGROUND_PROMPT,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
    }


# The checkpoint shipped in the package: the default recipe's build, which every x86-64 CPU with
# AVX2 reproduces byte for byte (`python tools/pretrain_tiny_clip.py --verify` rebuilds and compares).
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
PACKAGED_FILE = "shapes-tiny.pt"
PACKAGED_RECIPE = "144c38ff4d70"  # `recipe_digest` of the default config
PACKAGED_SHA256 = "1ffaee7a224ca690d1f23defb57d72a439e6ce6cfccb824b477f001122378d28"
REBUILD_COMMAND = "python tools/pretrain_tiny_clip.py --verify"
# Clutter's recipe (configs/_base_/Base-Clutter.yaml: MODEL.CLIP.TINY.DATASET clutter, 600 steps), also packaged
CLUTTER_FILE = "clutter-tiny.pt"
CLUTTER_RECIPE = "896b228c3008"
CLUTTER_SHA256 = "db973eebdc65ad8e0460f9eb728b73c8bb9fc772cd8b6f3d6a2b9a50cf036ad3"
CLUTTER_REBUILD_COMMAND = "python tools/pretrain_tiny_clip.py --verify --config-file configs/_base_/Base-Clutter.yaml"
# every shipped checkpoint: recipe digest -> (file in PACKAGED_DIR, sha256, the command that rebuilds it)
PACKAGED: Dict[str, Tuple[str, str, str]] = {
    PACKAGED_RECIPE: (PACKAGED_FILE, PACKAGED_SHA256, REBUILD_COMMAND),
    CLUTTER_RECIPE: (CLUTTER_FILE, CLUTTER_SHA256, CLUTTER_REBUILD_COMMAND),
}


class TinyCLIPChecksumError(UserError, RuntimeError):
    """The packaged tiny CLIP's bytes are not the released ones."""


def recipe_digest(cfg: Any) -> str:
    """12 hex digits of the sha256 of `recipe_key(cfg)`."""
    return hashlib.sha256(json.dumps(recipe_key(cfg), sort_keys=True).encode()).hexdigest()[:12]


def packaged_tiny_clip_path(cfg: Any) -> Optional[str]:
    """The checkpoint shipped in the package if `cfg` asks for a recipe one was built with, else None."""
    if cfg.MODEL.CLIP.ARCH != "shapes-tiny" or recipe_digest(cfg) not in PACKAGED:
        return None
    return os.path.join(PACKAGED_DIR, PACKAGED[recipe_digest(cfg)][0])


def _packaged_entry(path: str) -> Tuple[str, str, str]:
    name = os.path.basename(path)
    entry = next((e for e in PACKAGED.values() if e[0] == name), None)
    if entry is None:
        raise ValueError(f"'{path}' is not a packaged tiny CLIP "
                         f"(packaged: {', '.join(e[0] for e in PACKAGED.values())})")
    return entry


_verified: Dict[Tuple[str, float, int], bool] = {}


def verify_packaged(path: str) -> str:
    """`path` if its sha256 is the one `PACKAGED` releases for its file (checked once per file version
    and process), else a one-line TinyCLIPChecksumError that names the rebuild command."""
    _, released, command = _packaged_entry(path)
    if not os.path.isfile(path):
        raise TinyCLIPChecksumError(f"the packaged tiny CLIP '{path}' is missing; reinstall the package or rebuild "
                                    f"it with: {command} --output {path}")
    st = os.stat(path)
    key = (path, st.st_mtime, st.st_size)
    if key not in _verified:
        digest = file_sha256(path)
        if digest != released:
            raise TinyCLIPChecksumError(
                f"the packaged tiny CLIP '{path}' has sha256 {digest[:12]}…, not the released {released[:12]}… "
                f"(a corrupted or altered file); rebuild it with: {command} --output {path}")
        _verified[key] = True
    return path


def tiny_clip_path(cfg: Any) -> str:
    """The packaged checkpoint for the default recipe, else `<cache dir>/shapes-tiny-<hash>.pt`;
    the hash covers `recipe_key(cfg)`."""
    packaged = packaged_tiny_clip_path(cfg)
    if packaged is not None:
        return packaged
    digest = recipe_digest(cfg)
    arch = cfg.MODEL.CLIP.ARCH
    name = f"shapes-tiny-{digest}.pt" if arch == "shapes-tiny" else f"{arch}-shapes-{digest}.pt"
    return os.path.join(clip_cache_dir(cfg), name)


def built_tiny_clip_path(cfg: Any) -> str:
    """`tiny_clip_path(cfg)` if it is built (what MODEL.CLIP.PRETRAINED "shapes-tiny" loads; the
    packaged checkpoint is checked by its sha256), else a FileNotFoundError saying how to build it."""
    path = tiny_clip_path(cfg)
    if path == packaged_tiny_clip_path(cfg):
        return verify_packaged(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.CLIP.PRETRAINED '{PROJECT_PRETRAINED}': the tiny CLIP '{path}' is not built; "
                                f"tools/train_net.py builds it first (or run tools/pretrain_tiny_clip.py)")
    return path


register_pretrained(PROJECT_PRETRAINED, built_tiny_clip_path)


def ensure_shapes_tiny(cfg: Any, force: bool = False, eval_images: int = 0) -> str:
    """The path of the pretrained tiny CLIP for `cfg`: the packaged checkpoint (checked by its
    sha256) for the default recipe, else the cached build, built first if missing (or if `force`)
    by `build_pinned`. Building runs under a file lock (concurrent processes build it once); the
    sha256 of the file is logged either way."""
    path = tiny_clip_path(cfg)
    if path == packaged_tiny_clip_path(cfg) and not force:
        verify_packaged(path)
        logger.info(f"tiny CLIP '{path}' (packaged) sha256 {_packaged_entry(path)[1]}")
        return path
    if force and path == packaged_tiny_clip_path(cfg):
        raise ValueError("this recipe's tiny CLIP is packaged; rebuild it into another file with "
                         f"{_packaged_entry(path)[2]} (or --output PATH)")
    if not (os.path.isfile(path) and not force):
        with file_lock(path + ".lock"):
            if force or not os.path.isfile(path):  # else built by another process while we waited
                t = cfg.MODEL.CLIP.TINY
                est = t.ITERS * _SECONDS_PER_STEP_HINT / 60
                logger.info(f"Pretraining the tiny CLIP '{cfg.MODEL.CLIP.ARCH}' on {t.DATASET} ({t.ITERS} steps; about "
                            f"{est:.0f} min on a 2-core CPU, done once and cached as '{path}')")
                start = time.perf_counter()
                build_pinned(cfg, path, eval_images=eval_images)
                logger.info(f"Tiny CLIP pretrained in {(time.perf_counter() - start) / 60:.1f} min")
    logger.info(f"tiny CLIP '{path}' sha256 {file_sha256(path)}")
    return path


def file_sha256(path: str) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# pinned numerics: the same bytes on every x86-64 CPU with AVX2

PINNED_THREADS = 2  # intra-op threads of the build, whatever the machine (reductions split by thread count)


def pinned_env(threads: int = PINNED_THREADS) -> Dict[str, str]:
    """Environment of the build process: ATen's kernels at AVX2 (not AVX-512), MKL in conditional
    numerical reproducibility mode at AVX2 (`MKL_CBWR`), oneDNN capped at AVX2, a fixed thread count."""
    env = dict(os.environ)
    env.update({
        "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MKL_DYNAMIC": "FALSE",
        "OMP_DYNAMIC": "FALSE", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
        "OMP_WAIT_POLICY": "PASSIVE",  # idle threads sleep instead of spinning (a shared machine); no numeric effect
    })
    return env


def pin_numerics(threads: int = PINNED_THREADS) -> None:
    """In the build process (after `pinned_env`): fixed threads, no oneDNN (its kernel choice depends
    on cache sizes), deterministic algorithms; warns if ATen did not run at AVX2."""
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = False
    torch.use_deterministic_algorithms(True)
    cap = torch.backends.cpu.get_cpu_capability()
    if cap != "AVX2" or os.environ.get("MKL_CBWR") != "AVX2,STRICT":
        logger.warning(f"tiny CLIP build: CPU kernels at {cap} and MKL_CBWR={os.environ.get('MKL_CBWR')} (pinned: "
                       f"AVX2 and AVX2,STRICT): the checkpoint will not be bit-identical to the one every "
                       f"x86-64 CPU with AVX2 builds")


def build_pinned(cfg: Any, out_path: str, eval_images: int = 0, threads: int = PINNED_THREADS,
                 env: Optional[Dict[str, str]] = None, prefix: Sequence[str] = ()) -> None:
    """Run the recipe of `cfg` in a child process under `pinned_env` and write the checkpoint to
    `out_path` (the child logs to this process's stderr). `env` replaces `pinned_env()` and
    `prefix` (e.g. `taskset -c 0`) goes before the command: both for `tools/tiny_clip_repro.py`."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tiny_clip_") as tmp:
        cfg_file = os.path.join(tmp, "config.yaml")
        with open(cfg_file, "w") as f:
            f.write(cfg.dump())
        cmd = list(prefix) + [sys.executable, "-m", "clcl_det.embedded.tiny_clip", cfg_file, out_path,
               "--threads", str(threads), "--eval-images", str(eval_images)]
        child_env = pinned_env(threads) if env is None else env
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        child_env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [child_env.get("PYTHONPATH", "")] if p])
        rc = subprocess.call(cmd, env=child_env)
    if rc != 0 or not os.path.isfile(out_path):
        raise RuntimeError(f"the tiny CLIP build failed (exit code {rc}; command: {' '.join(cmd)}): see the log above")


def _child_main(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m clcl_det.embedded.tiny_clip CONFIG.yaml OUT.pt`: the build process."""
    import argparse

    p = argparse.ArgumentParser(description="Build the tiny CLIP under pinned numerics (run by build_pinned).")
    p.add_argument("config")
    p.add_argument("output")
    p.add_argument("--threads", type=int, default=PINNED_THREADS)
    p.add_argument("--eval-images", type=int, default=0)
    args = p.parse_args(argv)
    from ..config import CfgNode
    from ..utils.logger import setup_logger

    setup_logger(name="clcl_det")
    pin_numerics(args.threads)
    with open(args.config) as f:
        import yaml

        cfg = CfgNode(yaml.safe_load(f))
    eval_fn = None
    if args.eval_images or cfg.MODEL.CLIP.TINY.EVAL_PERIOD > 0:
        from .quality import monitoring_fn

        eval_fn = monitoring_fn(cfg, args.eval_images)
    pretrain_tiny_clip(cfg, args.output, eval_fn=eval_fn)


# ----------------------------------------------------------------------------------------------
# data


class ShapesTrainData:
    """An embedded train split in memory: uint8 images (N, 3, S, S), class maps (N, S, S) with
    0 = background and k + 1 = class k, and one row per object (image index, x0, y0, x1, y1, class)."""

    def __init__(self, images: Tensor, masks: Tensor, objects: Tensor):
        self.images, self.masks, self.objects = images, masks, objects

    @classmethod
    def load(cls, root: str, class_names: Sequence[str] = SHAPES_CLASSES) -> "ShapesTrainData":
        """The train split of a Shapes folder."""
        dicts = load_voc_instances(root, "train", class_names)
        return cls.from_dicts([{**d, "sem_seg_file_name": os.path.join(root, "SegmentationClass", f"{d['image_id']}.png")}
                               for d in dicts], f"in '{root}'")

    @classmethod
    def from_dicts(cls, dicts: Sequence[Dict[str, Any]], where: str = "") -> "ShapesTrainData":
        """Dataset dicts (XYXY_ABS boxes) whose `sem_seg_file_name` is the image's class map."""
        if not dicts:
            raise ValueError(f"the train split {where} is empty: the tiny CLIP needs training images")
        images, masks, objects = [], [], []
        for i, d in enumerate(dicts):
            with Image.open(d["file_name"]) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            with Image.open(d["sem_seg_file_name"]) as m:
                masks.append(np.asarray(m, dtype=np.uint8))
            for a in d["annotations"]:
                objects.append([i, *a["bbox"], a["category_id"]])
        if not objects:
            raise ValueError(f"the train split {where} has no objects")
        return cls(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                   torch.from_numpy(np.stack(masks)), torch.tensor(objects, dtype=torch.float32))


def _affine_sample(images: Tensor, theta: Tensor, size: int, mode: str) -> Tensor:
    grid = F.affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _zoom_theta(n: int, max_zoom: float, gen: torch.Generator) -> Tensor:
    """Affine maps (n, 2, 3) of random zoom-in crops (scale 1..max_zoom) with a random flip."""
    zoom = 1 + torch.rand(n, generator=gen) * (max_zoom - 1)
    half = 1 / zoom  # half side of the crop in [-1, 1] units
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - half)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - half)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = half * flip, half
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    return theta


def _crop_theta(boxes: Tensor, image_size: int, context: Tuple[float, float], gen: torch.Generator) -> Tensor:
    """Affine maps of square crops around XYXY `boxes` with random context, jitter and flip."""
    n = len(boxes)
    wh = (boxes[:, 2:] - boxes[:, :2]).amax(1)
    ctx = context[0] + torch.rand(n, generator=gen) * (context[1] - context[0])
    side = (wh * (1 + 2 * ctx)).clamp(max=image_size)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + (torch.rand(n, 2, generator=gen) - 0.5) * 0.2 * side[:, None]
    half = side / image_size
    c = centre / image_size * 2 - 1
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = half * flip, half
    theta[:, 0, 2], theta[:, 1, 2] = c[:, 0], c[:, 1]
    return theta


@dataclass
class _DenseBatch:
    images: Tensor  # (n, 3, s, s) normalised
    target: Tensor  # (n, K + 1, h, w) cell coverage; channel 0 = background, k + 1 = class k
    boxes: Tensor  # (m, 4) XYXY object boxes in the batch's pixel coordinates
    box_image: Tensor  # (m,) index of each box's image in the batch
    box_class: Tensor  # (m,) class of each box
    offset: Tuple[int, int]  # top-left cell of the window in the full patch grid


def _cell_coverage(labels: Tensor, num_labels: int, stride: int) -> Tensor:
    """(n, num_labels, H / stride, W / stride): the fraction of each patch cell's pixels carrying
    each label of the (n, H, W) label map."""
    n, H, W = labels.shape
    h, w = H // stride, W // stride
    cells = labels[:, :h * stride, :w * stride].reshape(n, h, stride, w, stride).permute(0, 1, 3, 2, 4)
    cells = cells.reshape(n, h * w, stride * stride)
    cov = torch.zeros(n, h * w, num_labels).scatter_add_(2, cells, torch.ones(cells.shape)) / (stride * stride)
    return cov.view(n, h, w, num_labels).permute(0, 3, 1, 2).contiguous()


def _transform_boxes(boxes: Tensor, theta: Tensor, size: int) -> Tensor:
    """XYXY pixel boxes of the input images mapped to the output of `_affine_sample(theta)`
    (scale, flip and shift only)."""
    a = theta[:, [0, 1], [0, 1]].repeat(1, 2)  # x, y scale (signed) per box
    c = theta[:, :, 2].repeat(1, 2)
    u = (boxes / size * 2 - 1 - c) / a
    out = (u + 1) * size / 2
    return torch.stack([torch.minimum(out[:, 0], out[:, 2]), torch.minimum(out[:, 1], out[:, 3]),
                        torch.maximum(out[:, 0], out[:, 2]), torch.maximum(out[:, 1], out[:, 3])], 1)


class _Batches:
    """Random training batches drawn with one torch.Generator (deterministic given the seed)."""

    def __init__(self, data: ShapesTrainData, num_classes: int, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], stride: int, max_zoom: float, crop_context: Tuple[float, float],
                 seed: int):
        self.data, self.K, self.stride = data, num_classes, stride
        self.max_zoom, self.crop_context = max_zoom, crop_context
        self.mean = torch.tensor(pixel_mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pixel_std).view(1, 3, 1, 1) * 255
        self.gen = torch.Generator().manual_seed(seed)
        self._perm: List[int] = []
        labels = data.objects[:, 5].long()
        self.rows_of_image = [torch.nonzero(data.objects[:, 0] == i).flatten() for i in range(len(data.images))]
        self.by_class = [torch.nonzero(labels == k).flatten() for k in range(num_classes)]
        self.present = [k for k in range(num_classes) if len(self.by_class[k])]

    def _normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def dense(self, n: int, window: int = 0) -> _DenseBatch:
        """n zoomed/flipped images with their cell targets and object boxes. With `window` > 0,
        every image is cut to the same random window x window square aligned to the patch grid."""
        idx = []
        while len(idx) < n:
            if not self._perm:
                self._perm = torch.randperm(len(self.data.images), generator=self.gen).tolist()
            idx.append(self._perm.pop())
        images = self.data.images[idx].float()
        size = images.shape[-1]
        theta = _zoom_theta(n, self.max_zoom, self.gen)
        images = _affine_sample(images, theta, size, "bilinear")
        masks = _affine_sample(self.data.masks[idx, None].float(), theta, size, "nearest")[:, 0].round().long()
        rows = [self.rows_of_image[i] for i in idx]
        box_image = torch.cat([torch.full((len(r),), b) for b, r in enumerate(rows)])
        obj = self.data.objects[torch.cat(rows)]
        boxes = _transform_boxes(obj[:, 1:5], theta[box_image], size)
        top = left = 0
        side = size
        if 0 < window < size:
            cells = (size - window) // self.stride + 1
            top, left = (int(v) for v in torch.randint(cells, (2,), generator=self.gen))
            y, x = top * self.stride, left * self.stride
            images = images[..., y:y + window, x:x + window]
            masks = masks[..., y:y + window, x:x + window]
            boxes = boxes - torch.tensor([x, y, x, y], dtype=boxes.dtype)
            side = window
        # keep boxes mostly inside the view, clipped to it
        clipped = boxes.clamp(0, side)
        area = (boxes[:, 2:] - boxes[:, :2]).prod(1)
        keep = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(1) >= 0.5 * area
        return _DenseBatch(self._normalise(images), _cell_coverage(masks, self.K + 1, self.stride), clipped[keep],
                           box_image[keep], obj[keep, 5].long(), (top, left))

    def crops(self, n: int, size: int) -> Tuple[Tensor, Tensor]:
        """n object crops (classes drawn uniformly among those present) resized to `size`, and labels."""
        cls = torch.tensor(self.present)[torch.randint(len(self.present), (n,), generator=self.gen)]
        rows = torch.stack([self.by_class[int(k)][torch.randint(len(self.by_class[int(k)]), (1,), generator=self.gen)]
                            for k in cls]).flatten()
        obj = self.data.objects[rows]
        images = self.data.images[obj[:, 0].long()].float()
        theta = _crop_theta(obj[:, 1:5], images.shape[-1], self.crop_context, self.gen)
        # pad with the mean colour so out-of-image areas look neutral after normalisation
        crops = _affine_sample(images - self.mean, theta, size, "bilinear") + self.mean
        return self._normalise(crops), obj[:, 5].long()


@contextlib.contextmanager
def _positional_window(visual: nn.Module, top: int, left: int, h: int, w: int) -> Iterator[None]:
    """Make `visual.positional_embedding` the (h, w) window at cell (top, left) of its grid (plus
    the class position), differentiably: a crop of the image at native scale is then encoded with
    the positions it has in the whole image."""
    full = visual.positional_embedding
    g = math.isqrt(full.shape[0] - 1)
    if (h, w) == (g, g):
        yield
        return
    grid = full[1:].view(g, g, -1)[top:top + h, left:left + w].reshape(h * w, -1)
    del visual.positional_embedding  # the Parameter; restored below
    visual.positional_embedding = torch.cat([full[:1], grid])
    try:
        yield
    finally:
        del visual.positional_embedding
        visual.positional_embedding = full


# ----------------------------------------------------------------------------------------------
# text


class _PromptSampler:
    """Per step, each name's embedding = the mean of a few randomly templated prompts (with grad)."""

    def __init__(self, tokenizer: Any, names: Sequence[str], templates: str, per_name: int, gen: torch.Generator):
        if templates not in TEMPLATE_SETS:
            raise ValueError(f"MODEL.CLIP.TINY.TEMPLATES '{templates}' is not one of {sorted(TEMPLATE_SETS)}")
        fns = list(TEMPLATE_SETS[templates]) + [lambda c: c]  # the bare name too
        # (num_templates, num_names, context)
        self.tokens = torch.stack([tokenizer([f(n) for n in names]) for f in fns])
        self.per_name, self.gen = per_name, gen

    def sample(self, clip: nn.Module, per_name: int) -> Tensor:
        """(per_name, N, D): each name under `per_name` random templates, L2-normalised."""
        T, N, L = self.tokens.shape
        pick = torch.randint(T, (per_name, N), generator=self.gen)
        tokens = self.tokens[pick, torch.arange(N)[None].expand_as(pick)].reshape(-1, L)
        return F.normalize(clip.encode_text(tokens.to(clip.logit_scale.device)), dim=-1).view(per_name, N, -1)

    def __call__(self, clip: nn.Module) -> Tuple[Tensor, Tensor]:
        """The names' embeddings (N, D) and a text-only contrastive loss: two templated prompts
        of a name must match each other rather than the other names' prompts."""
        emb = self.sample(clip, max(2, self.per_name))
        a, b = emb[0], emb[1]
        logits = a @ b.T / 0.1
        target = torch.arange(len(a), device=a.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return F.normalize(emb[: self.per_name].mean(0), dim=-1), loss


# ----------------------------------------------------------------------------------------------
# the recipe


_NO_DECAY = ("embedding",)  # positional / token embeddings: no weight decay (nor on norms, biases, scales)


@torch.no_grad()
def mimetic_init(visual: nn.Module, gen: torch.Generator, qk: Tuple[float, float] = (0.7, 0.7),
                 vo: Tuple[float, float] = (0.4, 0.4)) -> None:
    """Initialise the attention of a ViT so that, per head, W_q^T W_k ~ a Z + b I and, per layer,
    W_v^T W_o^T ~ a' Z' - b' I (Z Gaussian, scale 1/sqrt(d)): attention starts out favouring
    similar tokens at nearby positions, which ViTs trained from scratch otherwise learn slowly
    (mimetic initialisation, Trockman & Kolter 2023)."""

    def factor(a: float, b: float, d: int) -> Tuple[Tensor, Tensor, Tensor]:
        m = a * torch.randn(d, d, generator=gen) / math.sqrt(d) + b * torch.eye(d)
        u, sv, vh = torch.linalg.svd(m)
        return u, sv.sqrt(), vh

    for block in visual.transformer.resblocks:
        attn = block.attn
        w = attn.in_proj_weight
        d, heads = attn.embed_dim, attn.num_heads
        k = d // heads
        for h in range(heads):
            u, sq, vh = factor(qk[0], qk[1], d)
            w[h * k:(h + 1) * k] = (u[:, :k] * sq[:k]).T.to(w.dtype)  # W_q of head h (k x d)
            w[d + h * k:d + (h + 1) * k] = (sq[:k, None] * vh[:k]).to(w.dtype)  # W_k of head h
        u, sq, vh = factor(vo[0], -vo[1], d)
        w[2 * d:] = (u * sq).T.to(w.dtype)  # W_v
        attn.out_proj.weight.copy_((sq[:, None] * vh).T)  # W_o


def pretrain_tiny_clip(cfg: Any, out_path: str, eval_fn: Optional[Callable[[nn.Module, int], None]] = None
                       ) -> Dict[str, float]:
    """Run the recipe `cfg.MODEL.CLIP.TINY` and save the state_dict atomically at `out_path`.

    `eval_fn(model, step)` (optional) is called every `TINY.EVAL_PERIOD` steps and at the end, for
    monitoring; it must not train. Returns the final losses and the wall time.
    """
    t = cfg.MODEL.CLIP.TINY
    arch = cfg.MODEL.CLIP.ARCH
    device = resolve_device(cfg.MODEL.DEVICE)
    source = recipe_data(cfg)
    data = ShapesTrainData.from_dicts(source.train_dicts(), f"of {t.DATASET}")
    names = list(source.class_names) + [cfg.MODEL.CLIP.BACKGROUND_PROMPT]
    K = len(source.class_names)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.SEED)
        model = create_open_clip(arch, None, device=device)
        if t.MIMETIC_INIT:
            mimetic_init(model.visual, torch.Generator().manual_seed(t.SEED))
    model.train()
    # only a few dozen of the 49k token embeddings are ever used: keep the table at its random
    # init (its dense gradient and Adam state would cost more than the rest of the text tower)
    if isinstance(getattr(model, "token_embedding", None), nn.Embedding):
        model.token_embedding.requires_grad_(False)
    encoder = CLIPDenseEncoder(model.visual).train()
    tokenizer = open_clip.get_tokenizer(arch)
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list))
               else model.visual.image_size)
    gen = torch.Generator().manual_seed(t.SEED + 1)
    batches = _Batches(data, K, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, encoder.patch_size, t.MAX_ZOOM,
                       tuple(t.CROP_CONTEXT), t.SEED + 2)
    prompts = _PromptSampler(tokenizer, names, t.TEMPLATES, t.PROMPTS_PER_CLASS, gen)
    opt = torch.optim.AdamW(decay_param_groups(model, t.WEIGHT_DECAY, _NO_DECAY), lr=t.LR, betas=(0.9, 0.98), eps=1e-6,
                            foreach=True)
    warmup = int(round(t.WARMUP_ITERS))
    log_period = max(1, t.ITERS // 20)
    stats: Dict[str, float] = {}
    start = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(range(t.ITERS), desc="tiny CLIP", unit="step", leave=False, disable=None)
    text_opt = torch.optim.AdamW(decay_param_groups(model, t.WEIGHT_DECAY, _NO_DECAY), lr=t.LR, betas=(0.9, 0.98), eps=1e-6,
                            foreach=True)
    for it in range(t.TEXT_WARMUP_ITERS):  # separate the class captions before the images join
        for g in text_opt.param_groups:
            g["lr"] = t.LR * warmup_factor(it, t.TEXT_WARMUP_ITERS // 4, 1 / max(1, t.TEXT_WARMUP_ITERS // 4))
        _, text_loss = prompts(model)
        text_opt.zero_grad(set_to_none=True)
        text_loss.backward()
        text_opt.step()
    if t.TEXT_WARMUP_ITERS:
        logger.info(f"text warm-up: {t.TEXT_WARMUP_ITERS} steps, loss {float(text_loss.detach()):.3f}")
    del text_opt
    for it in bar:
        for g in opt.param_groups:
            g["lr"] = t.LR * cosine_factor(it, t.ITERS) * warmup_factor(it, warmup, 1 / max(1, warmup))
        text, text_loss = prompts(model)  # (K + 1, D)
        scale = model.logit_scale.exp().clamp(max=100.0)
        loss = t.TEXT_WEIGHT * text_loss
        stats["text"] = float(text_loss.detach())
        if t.BATCH_SIZE > 0 and t.DENSE_WEIGHT > 0:
            batch = batches.dense(t.BATCH_SIZE, t.DENSE_WINDOW)
            gh, gw = batch.target.shape[-2:]
            with _positional_window(model.visual, *batch.offset, gh, gw):
                _, dense = encoder(batch.images.to(device))
            target = batch.target.to(device)
            # classes (incl. background) in target order: background first
            order = torch.cat([text[K:], text[:K]])
            logits = scale * torch.einsum("bdhw,kd->bkhw", dense, order)
            ce = -(target * F.log_softmax(logits, dim=1)).sum(1)  # b, h, w
            weight = 1 + (t.OBJECT_WEIGHT - 1) * (1 - target[:, 0])
            dense_loss = (weight * ce).sum() / weight.sum()
            loss = loss + t.DENSE_WEIGHT * dense_loss
            stats["dense"] = float(dense_loss.detach())
            if t.REGION_WEIGHT > 0 and len(batch.boxes):  # the metric's view: a box's mean response
                cells = box_cell_mask(batch.boxes.to(device), gh, gw, encoder.patch_size).float()
                pooled = torch.einsum("nhw,nkhw->nk", cells, logits[batch.box_image.to(device), 1:])
                pooled = pooled / cells.sum((1, 2))[:, None]
                region_loss = F.cross_entropy(pooled, batch.box_class.to(device))
                loss = loss + t.REGION_WEIGHT * region_loss
                stats["region"] = float(region_loss.detach())
            with torch.no_grad():  # cells mostly covered by an object: is their class the argmax?
                obj = target[:, 0] < 0.5
                stats["cell_acc"] = float((logits.argmax(1) == target.argmax(1))[obj].float().mean())
        if t.CROP_BATCH_SIZE > 0:
            crop_size = t.CROP_SIZE or size
            crops, labels = batches.crops(t.CROP_BATCH_SIZE, crop_size)
            cells = crop_size // encoder.patch_size  # smaller crops take the centre of the position grid
            offset = (size // encoder.patch_size - cells) // 2
            with _positional_window(model.visual, offset, offset, cells, cells):
                feats = F.normalize(model.encode_image(crops.to(device)), dim=-1)
            crop_loss = F.cross_entropy(scale * feats @ text[:K].T, labels.to(device))
            loss = loss + crop_loss
            stats["crop"] = float(crop_loss.detach())
            stats["crop_acc"] = float((feats @ text[:K].T).argmax(1).eq(labels.to(device)).float().mean())
        with torch.no_grad():
            sim = text[:K] @ text[:K].T
            stats["text_cos"] = float((sim.sum() - sim.diagonal().sum()) / (K * (K - 1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (it + 1) % log_period == 0 or it + 1 == t.ITERS:
            elapsed = time.perf_counter() - start
            msg = " ".join(f"{k} {v:.3f}" for k, v in stats.items())
            logger.info(f"tiny CLIP step {it + 1}/{t.ITERS}: {msg} scale {float(scale.detach()):.1f} "
                        f"lr {opt.param_groups[0]['lr']:.2e} ({elapsed:.0f}s, eta {elapsed / (it + 1) * (t.ITERS - it - 1):.0f}s)")
        if eval_fn is not None and t.EVAL_PERIOD > 0 and (it + 1) % t.EVAL_PERIOD == 0 and it + 1 < t.ITERS:
            eval_fn(model, it + 1)
    bar.close()
    stats["seconds"] = time.perf_counter() - start
    model.eval()
    if eval_fn is not None:
        eval_fn(model, t.ITERS)
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out_path)
    return stats


if __name__ == "__main__":
    _child_main()

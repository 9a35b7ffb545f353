"""Dataset dict -> model input: read the image, resize (with scale jitter), flip, crop."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import configurable
from ..utils.errors import UserError

__all__ = ["DatasetMapper", "ImageReadError", "read_image"]


class ImageReadError(UserError, OSError):
    """An image file is missing, truncated or not an image."""


def read_image(file_name: str) -> np.ndarray:
    """An RGB uint8 array (H x W x 3); a one-line `ImageReadError` naming the file otherwise."""
    try:
        with Image.open(file_name) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {file_name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"unreadable image {file_name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure (DecompressionBombError, struct.error, ...)
        raise ImageReadError(f"unreadable image {file_name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


class DatasetMapper:
    """Maps a dataset dict to ``{image: uint8 3xHxW, boxes: Nx4, classes: N, image_id, height,
    width, file_name, seed}``. Training draws its randomness from the per-sample `rng` only, so a
    sample is the same whatever process or worker maps it."""

    @configurable
    def __init__(self, *, is_train: bool, image_size: int, scale_jitter: Sequence[float] = (1.0, 1.0),
                 random_flip: str = "horizontal", min_box_size: float = 1.0):
        if random_flip not in ("horizontal", "none"):
            raise ValueError(f"INPUT.RANDOM_FLIP '{random_flip}' is not one of ('horizontal', 'none')")
        self.is_train = is_train
        self.image_size = image_size
        self.scale_jitter = tuple(scale_jitter)
        self.random_flip = random_flip
        self.min_box_size = min_box_size

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool = True) -> Dict[str, Any]:
        return {
            "is_train": is_train,
            "image_size": cfg.INPUT.IMAGE_SIZE,
            "scale_jitter": cfg.INPUT.SCALE_JITTER,
            "random_flip": cfg.INPUT.RANDOM_FLIP,
            "min_box_size": cfg.INPUT.MIN_BOX_SIZE,
        }

    def __call__(self, d: Dict[str, Any], rng: Optional[np.random.Generator] = None) -> Dict[str, Any]:
        image = d["image"] if "image" in d else read_image(d["file_name"])  # an RGB uint8 HxWx3 array given in memory
        h, w = image.shape[:2]
        annos = d.get("annotations", [])
        boxes = np.array([a["bbox"] for a in annos], dtype=np.float32).reshape(-1, 4)
        classes = np.array([a["category_id"] for a in annos], dtype=np.int64)
        train = self.is_train and rng is not None
        scale = self.image_size / max(h, w)
        if train and self.scale_jitter != (1.0, 1.0):
            scale *= float(rng.uniform(*self.scale_jitter))
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        if (nh, nw) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
            boxes = boxes * np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
        if train and self.random_flip == "horizontal" and rng.random() < 0.5:
            image = image[:, ::-1]
            boxes = np.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], axis=1)
        if train and max(nh, nw) > self.image_size:  # large-scale jitter: random crop back to the canvas
            y0 = int(rng.integers(0, max(nh - self.image_size, 0) + 1))
            x0 = int(rng.integers(0, max(nw - self.image_size, 0) + 1))
            image = image[y0:y0 + self.image_size, x0:x0 + self.image_size]
            boxes = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
            nh, nw = image.shape[:2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, nw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, nh)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_box_size)
        out = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "boxes": torch.from_numpy(boxes[keep]),
            "classes": torch.from_numpy(classes[keep]),
            "image_id": d["image_id"],
            "height": d.get("height", h),
            "width": d.get("width", w),
            "file_name": d.get("file_name", ""),
        }
        if rng is not None:
            out["seed"] = int(rng.integers(2**31 - 1))
        return out

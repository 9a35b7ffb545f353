"""Shapes: the synthetic detection dataset of the embedded default, written to disk in VOC layout.

Coloured geometric shapes (20 classes = 5 colours x 4 shapes, e.g. "red circle") on cluttered
backgrounds (gradients, low-frequency texture, pixel noise, grey/brown blobs, lines and
shapes of non-class colours), 1-5 labelled objects per image, 14-60 px at 128 px. The dataset is
a pure function of `ShapesSpec`: image `i` of split `s` is drawn from
`numpy.random.default_rng([seed, split_code, i])`, so the same spec gives byte-identical files.

Layout under `shapes_root(spec)`::

    JPEGImages/<id>.jpg          RGB, JPEG quality 90, 4:4:4
    Annotations/<id>.xml         VOC XML (1-based pixel boxes, difficult=0)
    SegmentationClass/<id>.png   8-bit class map: 0 = background, k + 1 = SHAPES_CLASSES[k]
    ImageSets/Main/{train,test}.txt
    spec.json                    written last: marks the folder complete

`shapes_val` (validation, for choosing tuned values) is generated from its own seed `val_seed`
(which must differ from `seed`) as the test split of `spec.val_spec()`, in that spec's folder:
its images are disjoint from train and test; its image ids read "val_<i>".

Every object is labelled with its class; the continual splitter hides old/future classes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..data.catalog import DatasetCatalog, MetadataCatalog
from ..data.datasets.root import datasets_root
from ..data.datasets.voc import load_voc_instances

__all__ = [
    "SHAPES_CLASSES", "SHAPE_COLOURS", "SHAPE_KINDS", "ShapesSpec", "ShapeObject", "shapes_root",
    "ensure_shapes", "register_shapes", "variant_name", "render_image",
    "image_ids", "caption_for", "file_lock", "generate_once", "polygon_points", "draw_background",
    "draw_distractors", "finish_image",
]

logger = logging.getLogger(__name__)

# Saturated class colours, far apart in hue (they survive JPEG and the background's tints).
SHAPE_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 45),
    "blue": (35, 70, 225),
    "yellow": (240, 210, 25),
    "purple": (150, 45, 200),
}
SHAPE_KINDS: Tuple[str, ...] = ("circle", "square", "triangle", "cross")


def _class_order() -> Tuple[str, ...]:
    """Class k has colour k % 5 and shape (k % 5 + k // 5) % 4: each block of five classes uses
    every colour once, and each colour meets a new shape in every block. So the first 10 classes
    hold two shapes of each colour and 2-3 colours of each shape, the first 15 three shapes of
    each colour and 3-4 colours of each shape: every later task shares colours and shapes with
    earlier ones (10+10, 15+5, 19+1)."""
    colours = list(SHAPE_COLOURS)
    return tuple(
        f"{colours[k % 5]} {SHAPE_KINDS[(k % 5 + k // 5) % 4]}" for k in range(len(colours) * len(SHAPE_KINDS))
    )


SHAPES_CLASSES: Tuple[str, ...] = _class_order()

# Distractor colours: greys, browns, beige, off-white, near-black (none is a class colour).
_DISTRACTOR_COLOURS: Tuple[Tuple[int, int, int], ...] = (
    (90, 90, 90), (140, 140, 140), (185, 185, 185), (40, 40, 40), (235, 232, 225),
    (120, 80, 45), (150, 105, 60), (95, 65, 40), (200, 185, 160), (165, 150, 125),
)
_SPLIT_CODES = {"train": 0, "test": 1}
SHAPES_SPLITS = ("train", "test", "val")  # registered splits; val = the test split of `ShapesSpec.val_spec()`
_JPEG_QUALITY = 90
_SUPERSAMPLE = 2  # shapes are drawn at 2x and downsampled (anti-aliased edges)
# Shapes are drawn upright and unstretched: a tiny CLIP trained from scratch in minutes learns
# upright shapes, but not rotated or stretched ones (the commit that set these holds the numbers).
_MAX_ROTATION = 0.0  # radians a square, triangle or cross may be rotated by
_MAX_LOG_ASPECT = 0.0  # log of the largest width/height stretch of a shape
_FORMAT_VERSION = 2  # bump when the drawing changes: regenerates cached folders


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate; the dataset is a pure function of it."""

    num_train: int = 2000
    num_test: int = 500
    seed: int = 0
    image_size: int = 128
    num_val: int = 500  # shapes_val: not part of the train/test folder's identity (`to_dict`)
    val_seed: int = 1000

    def __post_init__(self) -> None:
        if self.num_train < 0 or self.num_test < 0 or self.num_val < 0:
            raise ValueError(f"DATASETS.SHAPES: image counts must be >= 0 (got {self.num_train}, {self.num_test}, "
                             f"{self.num_val})")

        if self.image_size < 32:
            raise ValueError(f"DATASETS.SHAPES.IMAGE_SIZE must be >= 32 (got {self.image_size})")

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ShapesSpec":
        s = cfg.DATASETS.SHAPES
        return cls(num_train=int(s.NUM_TRAIN), num_test=int(s.NUM_TEST), seed=int(s.SEED), image_size=int(s.IMAGE_SIZE),
                   num_val=int(s.NUM_VAL), val_seed=int(s.VAL_SEED))

    def val_spec(self) -> "ShapesSpec":
        """The spec whose test split is shapes_val: `num_val` images from `val_seed`."""
        if self.val_seed == self.seed:
            raise ValueError(f"DATASETS.SHAPES.VAL_SEED ({self.val_seed}) must differ from DATASETS.SHAPES.SEED: "
                             f"shapes_val would repeat shapes_test")
        return ShapesSpec(num_train=0, num_test=self.num_val, seed=self.val_seed, image_size=self.image_size,
                          val_seed=self.seed)

    def num_images(self, split: str) -> int:
        if split not in _SPLIT_CODES:
            raise ValueError(f"Shapes split must be one of {sorted(_SPLIT_CODES)}, got '{split}'")
        return self.num_train if split == "train" else self.num_test

    def to_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("num_val", "val_seed")}
        return {**d, "format_version": _FORMAT_VERSION, "classes": list(SHAPES_CLASSES)}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: class id and its box in continuous pixel coordinates (XYXY, exclusive)."""

    category_id: int
    box: Tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return SHAPES_CLASSES[self.category_id]


# ----------------------------------------------------------------------------------------------
# drawing


def polygon_points(kind: str, cx: float, cy: float, w: float, h: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of a shape of half-extents (w, h) around (cx, cy), rotated by `angle` radians."""
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "triangle":
        pts = [(0, -1), (1, 0.85), (-1, 0.85)]
    elif kind == "cross":
        t = 0.34
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
               (-t, -t)]
    elif kind == "circle":
        n = 48
        pts = [(math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)) for i in range(n)]
    elif kind == "star":  # five points
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.sin(math.pi / 5 * i), -(1.0 if i % 2 == 0 else 0.45)
                * math.cos(math.pi / 5 * i)) for i in range(10)]
    elif kind == "hexagon":
        pts = [(math.cos(math.pi / 3 * i), math.sin(math.pi / 3 * i)) for i in range(6)]
    else:
        raise ValueError(kind)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * x * w - s * y * h, cy + s * x * w + c * y * h) for x, y in pts]


def draw_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted gradient + low-frequency texture + optional stripes + pixel noise (float32 HxWx3)."""
    grey = rng.uniform(70, 190)
    c0 = grey + rng.uniform(-30, 30, 3)
    c1 = grey + rng.uniform(-60, 60) + rng.uniform(-30, 30, 3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (np.cos(theta) * xx + np.sin(theta) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    g = int(rng.integers(3, 9))  # low-frequency texture: a coarse noise grid upsampled (mostly luminance)
    coarse = rng.normal(0, rng.uniform(6, 22), (g, g, 1)) + rng.normal(0, rng.uniform(3, 10), (g, g, 3))
    coarse = coarse.astype(np.float32)
    tex = np.stack([np.asarray(Image.fromarray(coarse[..., k]).resize((size, size), Image.BICUBIC)) for k in range(3)], -1)
    img = img + tex
    if rng.random() < 0.3:  # faint stripes
        period = rng.uniform(6, 20)
        phi = rng.uniform(0, 2 * np.pi)
        img = img + rng.uniform(5, 15) * np.sin(2 * np.pi * (xx if rng.random() < 0.5 else yy) * size / period + phi)[..., None]
    return img.astype(np.float32)


def draw_distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Clutter that is not one of the 20 classes: blobs, lines and outlines/shapes in grey/brown tones."""
    S = _SUPERSAMPLE
    for _ in range(int(rng.integers(2, 8))):
        colour = _DISTRACTOR_COLOURS[int(rng.integers(len(_DISTRACTOR_COLOURS)))]
        colour = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in colour)
        kind = rng.choice(["blob", "line", "outline", "shape"], p=[0.35, 0.3, 0.15, 0.2])
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.04, 0.2) * size
        if kind == "blob":  # irregular polygon
            n = int(rng.integers(5, 10))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = r * rng.uniform(0.5, 1.0, n)
            pts = [(S * (cx + a * math.cos(b)), S * (cy + a * math.sin(b))) for a, b in zip(rad, ang)]
            draw.polygon(pts, fill=colour)
        elif kind == "line":
            x1, y1 = rng.uniform(0, size, 2)
            draw.line([(S * cx, S * cy), (S * x1, S * y1)], fill=colour, width=int(S * rng.integers(1, 4)))
        elif kind == "outline":  # a ring or an open polygon outline
            if rng.random() < 0.5:
                draw.ellipse([S * (cx - r), S * (cy - r), S * (cx + r), S * (cy + r)], outline=colour,
                             width=int(S * rng.integers(1, 3)))
            else:
                pts = polygon_points("hexagon", S * cx, S * cy, S * r, S * r, rng.uniform(0, np.pi))
                draw.line(pts + pts[:1], fill=colour, width=int(S * rng.integers(1, 3)))
        else:  # a filled shape of a non-class colour (a grey circle is not a class)
            kind2 = str(rng.choice(list(SHAPE_KINDS) + ["hexagon"]))
            pts = polygon_points(kind2, S * cx, S * cy, S * r, S * r, rng.uniform(-0.4, 0.4))
            draw.polygon(pts, fill=colour)


def _place(rng: np.random.Generator, size: int, boxes: List[Tuple[float, ...]],
           w: float, h: float) -> Optional[Tuple[float, float]]:
    """A centre for a w x h box inside the image with little overlap with `boxes` (None if crowded)."""
    for _ in range(30):
        cx, cy = rng.uniform(w / 2 + 1, size - w / 2 - 1), rng.uniform(h / 2 + 1, size - h / 2 - 1)
        b = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        ok = True
        for o in boxes:
            iw = min(b[2], o[2]) - max(b[0], o[0])
            ih = min(b[3], o[3]) - max(b[1], o[1])
            if iw > 0 and ih > 0:
                inter = iw * ih
                if inter / min(w * h, (o[2] - o[0]) * (o[3] - o[1])) > 0.15:
                    ok = False
                    break
        if ok:
            return cx, cy
    return None


def render_image(spec: ShapesSpec, split: str, index: int) -> Tuple[Image.Image, np.ndarray, List[ShapeObject]]:
    """Image `index` of `split`: the RGB image, its class map (0 = background, k + 1 = class k)
    and the labelled objects in drawing order. A pure function of its arguments."""
    if not 0 <= index < spec.num_images(split):
        raise IndexError(f"Shapes {split} has {spec.num_images(split)} images, asked for #{index}")
    rng = np.random.default_rng([spec.seed, _SPLIT_CODES[split], index])
    size, S = spec.image_size, _SUPERSAMPLE
    base = np.clip(draw_background(rng, size), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(base).resize((size * S, size * S), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    draw_distractors(rng, draw, size)
    label = Image.new("L", (size * S, size * S), 0)
    ldraw = ImageDraw.Draw(label)
    objects: List[ShapeObject] = []
    placed: List[Tuple[float, ...]] = []
    scale = size / 128.0
    for _ in range(int(rng.integers(1, 6))):
        k = int(rng.integers(len(SHAPES_CLASSES)))
        colour_name, kind = SHAPES_CLASSES[k].split(" ")
        side = math.exp(rng.uniform(math.log(14), math.log(60))) * scale
        aspect = math.exp(rng.uniform(-_MAX_LOG_ASPECT, _MAX_LOG_ASPECT))
        w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
        round_ = kind == "circle"
        angle = 0.0 if round_ else rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
        # the rotated shape's extent, for placement
        ext = 1.0 if round_ else abs(math.cos(angle)) + abs(math.sin(angle))
        centre = _place(rng, size, placed, w * ext, h * ext)
        if centre is None:
            continue
        cx, cy = centre
        pts = polygon_points(kind, S * cx, S * cy, S * w / 2, S * h / 2, angle)
        colour = np.array(SHAPE_COLOURS[colour_name]) + rng.integers(-18, 19, 3)
        fill = tuple(int(v) for v in np.clip(colour, 0, 255))
        draw.polygon(pts, fill=fill)
        ldraw.polygon(pts, fill=k + 1)
        xs, ys = [p[0] / S for p in pts], [p[1] / S for p in pts]
        box = (max(0, math.floor(min(xs))), max(0, math.floor(min(ys))),
               min(size, math.ceil(max(xs))), min(size, math.ceil(max(ys))))
        placed.append((cx - w * ext / 2, cy - h * ext / 2, cx + w * ext / 2, cy + h * ext / 2))
        objects.append(ShapeObject(k, box))
    image = finish_image(rng, canvas, size)
    mask = np.asarray(label.resize((size, size), Image.NEAREST), dtype=np.uint8)
    return image, mask, objects


def finish_image(rng: np.random.Generator, canvas: Image.Image, size: int) -> Image.Image:
    """The supersampled `canvas` box-filtered down to `size`, with pixel noise and, a quarter of
    the time, a slight blur."""
    image = canvas.resize((size, size), Image.BOX)
    noise = rng.normal(0, rng.uniform(2, 8), (size, size, 3))
    image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.7))))
    return image


def caption_for(names: Sequence[str]) -> str:
    """An image-level caption, e.g. "a photo of a red circle and a blue square."."""
    items = [f"a {n}" for n in dict.fromkeys(names)] or ["a background"]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"a photo of {listed}."


# ----------------------------------------------------------------------------------------------
# writing and caching


def image_ids(spec: ShapesSpec, split: str) -> List[str]:
    return [f"{split}_{i:05d}" for i in range(spec.num_images(split))]


def _annotation_xml(img_id: str, size: int, objects: Sequence[ShapeObject]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "Shapes"
    ET.SubElement(root, "filename").text = f"{img_id}.jpg"
    sz = ET.SubElement(root, "size")
    for k, v in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, k).text = str(v)
    ET.SubElement(root, "segmented").text = "1"
    for o in objects:
        ob = ET.SubElement(root, "object")
        ET.SubElement(ob, "name").text = o.name
        ET.SubElement(ob, "pose").text = "Unspecified"
        ET.SubElement(ob, "truncated").text = "0"
        ET.SubElement(ob, "difficult").text = "0"
        bb = ET.SubElement(ob, "bndbox")
        x0, y0, x1, y1 = o.box  # pixels x0..x1-1 -> 1-based inclusive VOC indices
        for k, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bb, k).text = str(int(v))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _write_split(spec: ShapesSpec, split: str, root: str, progress: Any) -> None:
    ids = image_ids(spec, split)
    for i, img_id in enumerate(ids):
        image, mask, objects = render_image(spec, split, i)
        image.save(os.path.join(root, "JPEGImages", f"{img_id}.jpg"), quality=_JPEG_QUALITY, subsampling=0)
        Image.fromarray(mask).save(os.path.join(root, "SegmentationClass", f"{img_id}.png"))
        with open(os.path.join(root, "Annotations", f"{img_id}.xml"), "wb") as f:
            f.write(_annotation_xml(img_id, spec.image_size, objects))
        progress.update(1)
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in ids))


def shapes_root(spec: ShapesSpec) -> str:
    """<datasets root>/shapes for the default spec, else <root>/shapes_s{seed}_n{train}-{test}_{size}
    (the root is `datasets_root()`: $CLCL_DATASETS, default ./datasets)."""
    base = datasets_root()
    if spec.to_dict() == ShapesSpec().to_dict():
        return os.path.join(base, "shapes")
    return os.path.join(base, f"shapes_s{spec.seed}_n{spec.num_train}-{spec.num_test}_{spec.image_size}")


def _is_complete(root: str, identity: Dict[str, Any]) -> bool:
    try:
        with open(os.path.join(root, "spec.json")) as f:
            return json.load(f) == identity
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive `fcntl.flock` on `path` (created if needed): one holder across processes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def generate_once(root: str, identity: Dict[str, Any], write: Callable[[str], None], what: str) -> str:
    """`root` holding a generated dataset whose `spec.json` equals `identity`; if it does not yet,
    `write(tmp)` fills a temporary folder next to `root`, `spec.json` is written last and the folder
    is renamed to `root`, under a file lock so concurrent processes generate it once. `what` names
    the dataset in the log."""
    if _is_complete(root, identity):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    with file_lock(os.path.abspath(root) + ".lock"):
        if _is_complete(root, identity):  # another process generated it while we waited
            return root
        logger.info(f"Generating {what} in '{root}'")
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.", suffix=".tmp", dir=parent)  # the one temp naming
        try:
            write(tmp)
            with open(os.path.join(tmp, "spec.json"), "w") as f:
                json.dump(identity, f, indent=1)
            if os.path.lexists(root):  # an incomplete or outdated folder
                shutil.rmtree(root)
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(f"{what.split(' (')[0]} ready in '{root}'")
    return root


def ensure_shapes(spec: ShapesSpec = ShapesSpec()) -> str:
    """The root of the generated dataset; generates it first if missing or incomplete
    (`generate_once`: a temporary folder renamed when complete, under a file lock)."""

    def write(tmp: str) -> None:
        from tqdm import tqdm

        for sub in ("JPEGImages", "Annotations", "SegmentationClass", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(tmp, sub))
        with tqdm(total=spec.num_train + spec.num_test, desc="Shapes", unit="img", leave=False, disable=None) as bar:
            for split in ("train", "test"):
                _write_split(spec, split, tmp, bar)

    return generate_once(shapes_root(spec), spec.to_dict(), write,
                         f"the Shapes dataset ({spec.num_train} train + {spec.num_test} test images, "
                         f"{spec.image_size} px, seed {spec.seed}; a few seconds per 1000 images)")


# ----------------------------------------------------------------------------------------------
# registration


def variant_name(spec: ShapesSpec, split: str) -> str:
    """The registered dataset name of a split of `spec`: `shapes_<split>` for the default spec,
    `shapes_s<seed>_n<train>-<test>_<size>_<split>` for any other."""
    if split not in SHAPES_SPLITS:
        raise ValueError(f"Shapes split must be one of {list(SHAPES_SPLITS)}, got '{split}'")
    if split == "val":  # its own seed and count
        default = ShapesSpec()
        if (spec.val_seed, spec.num_val, spec.image_size) == (default.val_seed, default.num_val, default.image_size):
            return "shapes_val"
        return f"shapes_s{spec.val_seed}_n{spec.num_val}_{spec.image_size}_val"
    if spec.to_dict() == ShapesSpec().to_dict():
        return f"shapes_{split}"
    return f"shapes_s{spec.seed}_n{spec.num_train}-{spec.num_test}_{spec.image_size}_{split}"


def _set_metadata(name: str, spec: ShapesSpec, split: str) -> None:
    if split == "val":  # the test split of val_spec(), in its own folder
        if spec.val_seed == spec.seed:  # loading says why it cannot be
            return
        spec, split = spec.val_spec(), "test"
    MetadataCatalog.get(name).set(thing_classes=list(SHAPES_CLASSES), evaluator_type="pascal_voc",
                                  dirname=shapes_root(spec), split=split)


def _load(name: str, spec: ShapesSpec, split: str) -> List[Dict[str, Any]]:
    if split == "val":
        dicts = load_voc_instances(ensure_shapes(spec.val_spec()), "test", SHAPES_CLASSES)
        _set_metadata(name, spec, split)
        return [{**d, "image_id": "val" + str(d["image_id"])[len("test"):]} for d in dicts]
    root = ensure_shapes(spec)
    _set_metadata(name, spec, split)  # $CLCL_DATASETS may have changed since registration
    return load_voc_instances(root, split, SHAPES_CLASSES)


def register_shapes(spec: ShapesSpec = ShapesSpec(), alias: bool = False) -> Dict[str, str]:
    """Register every split of `spec` (train, test and val) under `variant_name` (idempotent) and
    return {split: name}. With `alias`, the names the configs use (`shapes_<split>`) are pointed at
    `spec` too."""
    if not isinstance(spec, ShapesSpec):
        raise TypeError(f"register_shapes needs a ShapesSpec, got {type(spec).__name__}")
    names = {}
    for split in SHAPES_SPLITS:
        names[split] = variant_name(spec, split)
        for name in dict.fromkeys([names[split]] + ([f"shapes_{split}"] if alias else [])):
            if name in DatasetCatalog:
                DatasetCatalog.remove(name)
            DatasetCatalog.register(name, lambda name=name, split=split: _load(name, spec, split))
            _set_metadata(name, spec, split)
    return names


register_shapes()

"""Clutter: a crowded synthetic detection dataset in COCO format, the embedded stand-in for MS-COCO.

80 classes = 8 colours x 5 shapes x 2 fills ("red circle", "red striped circle", ...): Shapes'
colours and shapes plus orange, cyan, pink and the star, each plain or striped. Scenes are crowded
like COCO's: 3-12 objects per image (mean 6.6), up to half of an object hidden by later ones,
some objects nested inside larger ones, sizes across COCO's small / medium / large (its area
thresholds 32^2 and 96^2 scaled by image_size / 640), about 1 % `iscrowd` regions (a cluster of
tiny objects of one class, one box), about 1 % images without objects, on Shapes' cluttered
backgrounds (`shapes.draw_background`, `shapes.draw_distractors`).

Class order and co-occurrence: the classes come in 8 blocks of 10 ids (5 colour-shape pairs, each
plain and striped; a block holds one colour twice and five shapes, and neighbouring blocks share
the shapes). An image draws a primary block (long-tailed), then each object from it (80 %), from
a neighbouring block (15 %) or from all classes (5 %), each class with a long-tailed weight. So
confusable classes (same colour / other shape, same shape / other colour, plain / striped) meet
in one image, class frequency is long-tailed, and a later task's images often hold earlier
classes: IOR's non-co-occurrence rule (CONTINUAL.IMAGE_FILTER non_cooccurrence) drops a real
share of them (docs/tutorials/protocols.md gives the shares).

The dataset is a pure function of `ClutterSpec`: image `i` of split `s` is drawn from
`numpy.random.default_rng([seed, 7, split_code, i])`. Layout under `clutter_root(spec)`::

    images/<split>/<split>_<i>.jpg            RGB, JPEG quality 90, 4:4:4
    annotations/instances_<split>.json        COCO instances (bbox, area = visible pixels, iscrowd)
    masks/<split>/<split>_<i>.png             8-bit class map: 0 = background, k + 1 = class k
    spec.json                                 written last: marks the folder complete

Splits train, val (for choosing tuned values) and test are disjoint draws; each is registered
as `clutter_<split>` with `register_coco_instances`, the function a user calls for own data.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..data.catalog import DatasetCatalog, MetadataCatalog
from ..data.datasets.coco import register_coco_instances
from ..data.datasets.root import datasets_root
from .shapes import (SHAPE_COLOURS, SHAPE_KINDS, draw_background, draw_distractors, finish_image, generate_once,
                     polygon_points)

__all__ = [
    "CLUTTER_CLASSES", "CLUTTER_COLOURS", "CLUTTER_KINDS", "CLUTTER_SPLITS", "ClutterSpec", "ClutterObject",
    "clutter_root", "ensure_clutter", "register_clutter", "clutter_name", "render_clutter", "class_blocks",
    "mask_file",
]

CLUTTER_COLOURS: Dict[str, Tuple[int, int, int]] = {
    **SHAPE_COLOURS, "orange": (245, 130, 20), "cyan": (20, 185, 205), "pink": (240, 95, 175)}
CLUTTER_KINDS: Tuple[str, ...] = SHAPE_KINDS + ("star",)
_BLOCKS = 8  # blocks of 10 class ids
_BLOCK = 10


def _class_order() -> Tuple[str, ...]:
    """Block b holds the colour-shape pairs (colour (b - 2 s) % 8, shape s) for the five shapes s,
    each plain then striped: every pair once over the 8 blocks."""
    colours = list(CLUTTER_COLOURS)
    names = []
    for b in range(_BLOCKS):
        for s, kind in enumerate(CLUTTER_KINDS):
            colour = colours[(b - 2 * s) % len(colours)]
            names += [f"{colour} {kind}", f"{colour} striped {kind}"]
    return tuple(names)


CLUTTER_CLASSES: Tuple[str, ...] = _class_order()
CLUTTER_SPLITS = ("train", "val", "test")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_ID_OFFSET = 10_000_000  # image ids of split s start at s * _ID_OFFSET + 1 (disjoint across splits, like COCO's)
_DATASET_CODE = 7  # in every image's seed: Clutter's draws differ from Shapes' for the same seed
_STRUCTURE_SEED = 20261207  # the class frequencies and block priors: fixed, not part of a spec
_JPEG_QUALITY = 90
_SUPERSAMPLE = 2
_FORMAT_VERSION = 1  # bump when the drawing changes: regenerates cached folders

# scene statistics
_P_EMPTY = 0.01  # an image without objects
_P_CROWD = 0.065  # an image with one iscrowd region (about 1 % of the annotations)
_P_NESTED = 0.15  # an object placed inside a larger one
_P_PRIMARY, _P_NEIGHBOUR = 0.80, 0.15  # object drawn from the image's block / a neighbouring block (else any class)
_MAX_OCCLUDED = 0.5  # largest fraction of an object later objects may hide
_SIDE_RANGE = (4.5, 64.0)  # object side at 128 px (log-uniform), scaled with image_size


def _structure() -> Tuple[np.ndarray, np.ndarray]:
    """Long-tailed class weights (80,) and block priors (8,), fixed for the dataset."""
    rng = np.random.default_rng(_STRUCTURE_SEED)
    class_w = 1.0 / (rng.permutation(len(CLUTTER_CLASSES)) + 4.0)
    block_w = 1.0 / (rng.permutation(_BLOCKS) + 3.0) ** 0.6
    return class_w, block_w / block_w.sum()


_CLASS_W, _BLOCK_P = _structure()


def class_blocks() -> List[range]:
    """The class-id ranges of the 8 blocks."""
    return [range(b * _BLOCK, (b + 1) * _BLOCK) for b in range(_BLOCKS)]


@dataclass(frozen=True)
class ClutterSpec:
    """What to generate; the dataset is a pure function of it."""

    num_train: int = 2000
    num_val: int = 500
    num_test: int = 500
    seed: int = 0
    image_size: int = 128

    def __post_init__(self) -> None:
        if min(self.num_train, self.num_val, self.num_test) < 0:
            raise ValueError(f"DATASETS.CLUTTER: image counts must be >= 0 (got {self.num_train}, {self.num_val}, "
                             f"{self.num_test})")
        if self.image_size < 64:
            raise ValueError(f"DATASETS.CLUTTER.IMAGE_SIZE must be >= 64 (got {self.image_size})")
        if max(self.num_train, self.num_val, self.num_test) >= _ID_OFFSET:
            raise ValueError(f"DATASETS.CLUTTER: at most {_ID_OFFSET - 1} images per split")

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ClutterSpec":
        c = cfg.DATASETS.CLUTTER
        return cls(num_train=int(c.NUM_TRAIN), num_val=int(c.NUM_VAL), num_test=int(c.NUM_TEST), seed=int(c.SEED),
                   image_size=int(c.IMAGE_SIZE))

    def num_images(self, split: str) -> int:
        if split not in _SPLIT_CODES:
            raise ValueError(f"Clutter split must be one of {list(CLUTTER_SPLITS)}, got '{split}'")
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def area_thresholds(self) -> Tuple[float, float]:
        """COCO's small / medium / large area limits (32^2, 96^2 at 640 px) scaled to `image_size`."""
        s = self.image_size / 640.0
        return (32 * s) ** 2, (96 * s) ** 2

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "format_version": _FORMAT_VERSION, "classes": list(CLUTTER_CLASSES)}


@dataclass(frozen=True)
class ClutterObject:
    """One annotated object: class id, visible box (XYXY, pixels), visible area (pixels), crowd flag,
    and the fraction of its drawn pixels that later objects hide (not in the json)."""

    category_id: int
    box: Tuple[float, float, float, float]
    area: float
    iscrowd: bool = False
    occluded: float = 0.0


# ----------------------------------------------------------------------------------------------
# drawing


def _pick_class(rng: np.random.Generator, block: int) -> int:
    u = rng.random()
    if u < _P_PRIMARY:
        b = block
    elif u < _P_PRIMARY + _P_NEIGHBOUR:
        b = int(np.clip(block + (1 if rng.random() < 0.5 else -1), 0, _BLOCKS - 1))
    else:
        return int(rng.choice(len(CLUTTER_CLASSES), p=_CLASS_W / _CLASS_W.sum()))
    w = _CLASS_W[b * _BLOCK:(b + 1) * _BLOCK]
    return b * _BLOCK + int(rng.choice(_BLOCK, p=w / w.sum()))


def _shape_mask(kind: str, cx: float, cy: float, half: float, big: int) -> np.ndarray:
    """(big, big) bool mask of a shape of half-side `half` around (cx, cy), supersampled pixels."""
    m = Image.new("L", (big, big), 0)
    ImageDraw.Draw(m).polygon(polygon_points(kind, cx, cy, half, half, 0.0), fill=1)
    return np.asarray(m, dtype=bool)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, striped: bool, period: float,
           angle: float) -> None:
    """Fill `mask` of the (big, big, 3) canvas with `colour`; striped: every other band of
    `period` supersampled pixels at `angle` in a dark shade of the colour."""
    if not striped:
        canvas[mask] = colour
        return
    ys, xs = np.nonzero(mask)
    t = (xs * math.cos(angle) + ys * math.sin(angle)) / period
    dark = (t % 1.0) < 0.5
    canvas[ys, xs] = np.where(dark[:, None], colour * 0.35, colour)


def render_clutter(spec: ClutterSpec, split: str, index: int) -> Tuple[Image.Image, np.ndarray, List[ClutterObject]]:
    """Image `index` of `split`: the RGB image, its class map (0 = background, k + 1 = class k) and
    the annotated objects (visible boxes and areas). A pure function of its arguments."""
    if not 0 <= index < spec.num_images(split):
        raise IndexError(f"Clutter {split} has {spec.num_images(split)} images, asked for #{index}")
    rng = np.random.default_rng([spec.seed, _DATASET_CODE, _SPLIT_CODES[split], index])
    size, S = spec.image_size, _SUPERSAMPLE
    big, scale = size * S, size / 128.0
    base = np.clip(draw_background(rng, size), 0, 255).astype(np.uint8)
    canvas_im = Image.fromarray(base).resize((big, big), Image.NEAREST)
    draw_distractors(rng, ImageDraw.Draw(canvas_im), size)
    canvas = np.asarray(canvas_im, dtype=np.float32).copy()
    inst = np.zeros((big, big), dtype=np.int32)  # 0 = none, j + 1 = object j
    classes: List[int] = []
    full: List[int] = []  # drawn pixels of each object
    crowd: List[bool] = []
    centres: List[Tuple[float, float, float]] = []  # (cx, cy, half side) in 1x pixels, non-crowd objects

    def commit(mask: np.ndarray, k: int, is_crowd: bool) -> bool:
        """Draw-order check: no earlier object may lose more than _MAX_OCCLUDED of its pixels."""
        if len(full):
            covered = np.bincount(inst[mask], minlength=len(full) + 1)[1:]
            visible = np.bincount(inst.ravel(), minlength=len(full) + 1)[1:]
            if np.any(visible - covered < (1 - _MAX_OCCLUDED) * np.asarray(full)):
                return False
        inst[mask] = len(full) + 1
        classes.append(k)
        full.append(int(mask.sum()))
        crowd.append(is_crowd)
        return True

    n = 0 if rng.random() < _P_EMPTY else 3 + int(rng.binomial(9, 0.4))
    block = int(rng.choice(_BLOCKS, p=_BLOCK_P))
    if n and rng.random() < _P_CROWD:  # a crowd region first: a cluster of tiny objects of one class
        k = _pick_class(rng, block)
        colour_name, kind = CLUTTER_CLASSES[k].split(" ")[0], CLUTTER_CLASSES[k].split(" ")[-1]
        r = rng.uniform(10, 20) * scale
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        mask = np.zeros((big, big), dtype=bool)
        colour = np.array(CLUTTER_COLOURS[colour_name], np.float32)
        for _ in range(int(rng.integers(8, 16))):
            a, d = rng.uniform(0, 2 * math.pi), r * math.sqrt(rng.random())
            half = rng.uniform(1.5, 3.0) * scale
            m = _shape_mask(kind, S * (cx + d * math.cos(a)), S * (cy + d * math.sin(a)), S * half, big)
            _paint(canvas, m, colour + rng.integers(-18, 19, 3), "striped" in CLUTTER_CLASSES[k], 3.0 * S, math.pi / 4)
            mask |= m
        commit(mask, k, True)
    lo, hi = (math.log(v * scale) for v in _SIDE_RANGE)
    for _ in range(n):
        k = _pick_class(rng, block)
        words = CLUTTER_CLASSES[k].split(" ")
        colour = np.array(CLUTTER_COLOURS[words[0]], np.float32) + rng.integers(-18, 19, 3)
        striped = words[1] == "striped"
        parents = [c for c in centres if c[2] >= 9 * scale]
        nested = bool(parents) and rng.random() < _P_NESTED
        parent = parents[int(rng.integers(len(parents)))] if nested else None
        side = math.exp(rng.uniform(lo, hi))
        period = S * float(np.clip(side / 3.5, 2.5, 7.0))
        angle = rng.uniform(math.pi / 6, math.pi / 3) * (1 if rng.random() < 0.5 else -1)
        for attempt in range(30):  # smaller after failed attempts: a crowded image still gets its objects
            s = side * 0.93 ** attempt
            if parent is not None:
                s = min(s, parent[2] * 2 * rng.uniform(0.3, 0.5))
                cx = parent[0] + rng.uniform(-0.25, 0.25) * parent[2]
                cy = parent[1] + rng.uniform(-0.25, 0.25) * parent[2]
            else:
                cx, cy = rng.uniform(s / 2, size - s / 2, 2)
            mask = _shape_mask(words[-1], S * cx, S * cy, S * s / 2, big)
            if mask.sum() >= S * S and commit(mask, k, False):
                _paint(canvas, mask, colour, striped, period, angle)
                centres.append((cx, cy, s / 2))
                break
    image = finish_image(rng, Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)), size)
    labels = np.concatenate([[0], np.asarray(classes, dtype=np.int64) + 1]).astype(np.uint8)
    class_map = np.asarray(Image.fromarray(labels[inst]).resize((size, size), Image.NEAREST), dtype=np.uint8)
    objects = []
    for j, k in enumerate(classes):
        ys, xs = np.nonzero(inst == j + 1)
        if len(ys) == 0:
            continue
        box = (xs.min() / S, ys.min() / S, (xs.max() + 1) / S, (ys.max() + 1) / S)
        objects.append(ClutterObject(k, box, len(ys) / (S * S), crowd[j], 1.0 - len(ys) / full[j]))
    return image, class_map, objects


# ----------------------------------------------------------------------------------------------
# writing and caching


def _file(split: str, i: int) -> str:
    return f"{split}_{i:05d}"


def mask_file(root: str, image_file: str) -> str:
    """The class map of an image of a Clutter folder (`image_file` as in its dataset dict)."""
    split = os.path.basename(os.path.dirname(image_file))
    return os.path.join(root, "masks", split, os.path.splitext(os.path.basename(image_file))[0] + ".png")


def coco_instances(spec: ClutterSpec, split: str, objects: Sequence[Sequence[ClutterObject]]) -> Dict[str, Any]:
    """The COCO instances json of a split, from each image's objects."""
    offset = _SPLIT_CODES[split] * _ID_OFFSET
    images, annotations = [], []
    for i, objs in enumerate(objects):
        images.append({"id": offset + i + 1, "file_name": f"{_file(split, i)}.jpg", "height": spec.image_size,
                       "width": spec.image_size})
        for o in objs:
            x0, y0, x1, y1 = o.box
            annotations.append({"id": offset + len(annotations) + 1, "image_id": offset + i + 1,
                                "category_id": o.category_id + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": o.area, "iscrowd": int(o.iscrowd)})
    categories = [{"id": k + 1, "name": n, "supercategory": n.split(" ")[-1]} for k, n in enumerate(CLUTTER_CLASSES)]
    info = {"description": "Clutter (clcl_det.embedded.clutter)", "version": str(_FORMAT_VERSION)}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _write_split(spec: ClutterSpec, split: str, root: str, progress: Any) -> None:
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(root, sub, split))
    objects = []
    for i in range(spec.num_images(split)):
        image, class_map, objs = render_clutter(spec, split, i)
        image.save(os.path.join(root, "images", split, f"{_file(split, i)}.jpg"), quality=_JPEG_QUALITY, subsampling=0)
        Image.fromarray(class_map).save(os.path.join(root, "masks", split, f"{_file(split, i)}.png"))
        objects.append(objs)
        progress.update(1)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(coco_instances(spec, split, objects), f)


def clutter_root(spec: ClutterSpec) -> str:
    """<datasets root>/clutter for the default spec, else <root>/clutter_s{seed}_n{train}-{val}-{test}_{size}."""
    base = datasets_root()
    if spec.to_dict() == ClutterSpec().to_dict():
        return os.path.join(base, "clutter")
    counts = f"{spec.num_train}-{spec.num_val}-{spec.num_test}"
    return os.path.join(base, f"clutter_s{spec.seed}_n{counts}_{spec.image_size}")


def ensure_clutter(spec: ClutterSpec = ClutterSpec()) -> str:
    """The root of the generated dataset; generates it first if missing or incomplete
    (`shapes.generate_once`: a temporary folder renamed when complete, under a file lock)."""

    def write(tmp: str) -> None:
        from tqdm import tqdm

        os.makedirs(os.path.join(tmp, "annotations"))
        total = spec.num_train + spec.num_val + spec.num_test
        with tqdm(total=total, desc="Clutter", unit="img", leave=False, disable=None) as bar:
            for split in CLUTTER_SPLITS:
                _write_split(spec, split, tmp, bar)

    return generate_once(clutter_root(spec), spec.to_dict(), write,
                         f"the Clutter dataset ({spec.num_train} train + {spec.num_val} val + {spec.num_test} test "
                         f"images, {spec.image_size} px, seed {spec.seed}; about 10 s per 1000 images)")


# ----------------------------------------------------------------------------------------------
# registration


def clutter_name(spec: ClutterSpec, split: str) -> str:
    """The registered name of a split: `clutter_<split>` for the default spec, else
    `clutter_s<seed>_n<train>-<val>-<test>_<size>_<split>`."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"Clutter split must be one of {list(CLUTTER_SPLITS)}, got '{split}'")
    return f"{os.path.basename(clutter_root(spec))}_{split}"


def _register_split(name: str, spec: ClutterSpec, split: str) -> None:
    """`register_coco_instances` for one split under `name`, its loader generating the folder first;
    a loader called after $CLCL_DATASETS changed registers the split again at the new root."""
    root = clutter_root(spec)
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    register_coco_instances(name, {"thing_classes": list(CLUTTER_CLASSES), "evaluator_type": "coco", "dirname": root,
                                   "split": split, "area_thresholds": spec.area_thresholds()},
                            os.path.join(root, "annotations", f"instances_{split}.json"),
                            os.path.join(root, "images", split))
    load = DatasetCatalog.pop(name)

    def generate_and_load() -> List[Dict[str, Any]]:
        if clutter_root(spec) != root:
            _register_split(name, spec, split)
            return DatasetCatalog.get(name)
        ensure_clutter(spec)
        return load()

    DatasetCatalog.register(name, generate_and_load)


def register_clutter(spec: ClutterSpec = ClutterSpec(), alias: bool = False) -> Dict[str, str]:
    """Register every split of `spec` with `register_coco_instances` (idempotent; the folder is
    generated when a split is first loaded; `area_thresholds` metadata: COCO's small / medium /
    large limits scaled to the image size) and return {split: name}. With `alias`, the names the
    configs use (`clutter_<split>`) are pointed at `spec` too."""
    if not isinstance(spec, ClutterSpec):
        raise TypeError(f"register_clutter needs a ClutterSpec, got {type(spec).__name__}")
    names = {}
    for split in CLUTTER_SPLITS:
        names[split] = clutter_name(spec, split)
        for name in dict.fromkeys([names[split]] + ([f"clutter_{split}"] if alias else [])):
            _register_split(name, spec, split)
    return names


register_clutter()

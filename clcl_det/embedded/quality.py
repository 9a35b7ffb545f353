"""How good a CLIP is at what the detector asks of it, measured on labelled boxes.

- **Dense hit rate**: per ground-truth box, the class whose cost-volume response
  `C = einsum('bdhw,kd->bkhw', V, T)` has the highest mean over the box's patch cells (cells whose
  centre lies inside the box; at least the cell holding the box centre) must be the box's class.
- **Crop accuracy**: each box, cropped square with a little context and resized to the CLIP input
  size, is classified zero-shot by `encode_image` against the class text embeddings.
- **Prior quality** (`measure_prior`): CL-CLIP's cost-volume prior read per box as its head reads it
  per RoI (the cost volume RoIAligned on a P x P grid): the *level* (`normalize_prior` of the mean
  cosines of the box moved in by a fraction of a cell, against the classes and the background, at
  temperature T) and, for contrast, the
  *map* (`normalize_prior` of every cell, then averaged over the box). Hit rate (the class of the
  highest prior is the box's), the mean prior of the box's class, the mean entropy over
  [classes, background], and the expected calibration error of the top class.
- **Mixed boxes** (`mixed_box_share`): the share of labelled boxes that another class's object covers
  by at least a given fraction of the box's area, i.e. of RoIs in which a class-specific spatial
  prior can tell two classes apart.

V comes from `CLIPDenseEncoder` and T from `TextEncoder` (prompt ensemble), as in the detector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..modeling.clip.dense import CLIPDenseEncoder
from ..modeling.cost_volume import inset_boxes, normalize_prior

__all__ = [
    "ClassAccuracy", "box_cell_mask", "box_responses", "dense_hit_rate", "square_crops", "crop_accuracy",
    "load_images", "measure_clip", "measure_on_dataset", "measure_on_shapes", "format_report", "PriorQuality",
    "measure_prior", "format_prior_report", "mixed_box_share",
]


@dataclass
class ClassAccuracy:
    """Per-class counts of correct decisions (K,) and of boxes (K,)."""

    correct: Tensor
    total: Tensor

    @classmethod
    def zeros(cls, num_classes: int) -> "ClassAccuracy":
        return cls(torch.zeros(num_classes, dtype=torch.long), torch.zeros(num_classes, dtype=torch.long))

    @classmethod
    def from_predictions(cls, pred: Tensor, labels: Tensor, num_classes: int) -> "ClassAccuracy":
        labels = labels.long().cpu()
        hit = (pred.long().cpu() == labels).long()
        return cls(torch.bincount(labels, hit, minlength=num_classes).long(),
                   torch.bincount(labels, minlength=num_classes).long())

    def __add__(self, other: "ClassAccuracy") -> "ClassAccuracy":
        return ClassAccuracy(self.correct + other.correct, self.total + other.total)

    @property
    def overall(self) -> float:
        """Fraction of all boxes that are correct (NaN without boxes)."""
        n = int(self.total.sum())
        return float(self.correct.sum()) / n if n else float("nan")

    def per_class(self, names: Sequence[str]) -> Dict[str, float]:
        return {n: (float(c) / float(t) if t else float("nan"))
                for n, c, t in zip(names, self.correct.tolist(), self.total.tolist())}


def box_cell_mask(boxes: Tensor, h: int, w: int, stride: float) -> Tensor:
    """(n, h, w) bool: the patch cells whose centre lies inside each XYXY box, and always the cell
    holding the box centre (so small boxes get one cell)."""
    boxes = boxes.float()
    cy = (torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5) * stride
    cx = (torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5) * stride
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    inside_x = (cx[None] >= x0) & (cx[None] <= x1)  # n, w
    inside_y = (cy[None] >= y0) & (cy[None] <= y1)  # n, h
    mask = inside_y[:, :, None] & inside_x[:, None, :]
    ci = ((boxes[:, 1] + boxes[:, 3]) / 2 / stride).long().clamp(0, h - 1)
    cj = ((boxes[:, 0] + boxes[:, 2]) / 2 / stride).long().clamp(0, w - 1)
    mask[torch.arange(len(boxes), device=boxes.device), ci, cj] = True
    return mask


def box_responses(cost: Tensor, boxes: Tensor, stride: float) -> Tensor:
    """(n, K): the mean of a (K, h, w) cost volume over each box's cells."""
    K, h, w = cost.shape
    mask = box_cell_mask(boxes.to(cost.device), h, w, stride).float()  # n, h, w
    return torch.einsum("nhw,khw->nk", mask, cost.float()) / mask.sum((1, 2))[:, None]


def dense_hit_rate(dense: Tensor, text: Tensor, boxes: Sequence[Tensor], labels: Sequence[Tensor],
                   stride: float) -> ClassAccuracy:
    """Hit counts of a batch: `dense` (B, D, h, w) dense maps, `text` (K, D) class embeddings,
    per image the XYXY boxes (n_i, 4) in input pixels and their class ids (n_i,)."""
    cost = torch.einsum("bdhw,kd->bkhw", dense.float(), text.float().to(dense.device))
    acc = ClassAccuracy.zeros(text.shape[0])
    for c, b, l in zip(cost, boxes, labels):
        if len(b):
            acc = acc + ClassAccuracy.from_predictions(box_responses(c, b, stride).argmax(1), l, text.shape[0])
    return acc


def square_crops(image: Tensor, boxes: Tensor, size: int, context: float = 0.1) -> Tensor:
    """(n, C, size, size) crops of a (C, H, W) image: per box, a square of side
    max(w, h) * (1 + 2 * context) around its centre, shifted to lie inside the image where
    possible (zero padding otherwise), resized bilinearly."""
    C, H, W = image.shape
    out = []
    for x0, y0, x1, y1 in boxes.float().tolist():
        side = max(x1 - x0, y1 - y0) * (1 + 2 * context)
        side = max(2.0, min(side, float(max(H, W))))
        cx = min(max((x0 + x1) / 2, side / 2), W - side / 2) if side <= W else W / 2
        cy = min(max((y0 + y1) / 2, side / 2), H - side / 2) if side <= H else H / 2
        l, t = int(round(cx - side / 2)), int(round(cy - side / 2))
        s = int(round(side))
        crop = F.pad(image, (max(0, -l), max(0, l + s - W), max(0, -t), max(0, t + s - H)))
        crop = crop[:, max(0, t):max(0, t) + s, max(0, l):max(0, l) + s]
        out.append(F.interpolate(crop[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(out) if out else image.new_zeros((0, C, size, size), dtype=torch.float32)


@torch.no_grad()
def crop_accuracy(clip_model: nn.Module, images: Sequence[Tensor], boxes: Sequence[Tensor],
                  labels: Sequence[Tensor], text: Tensor, context: float = 0.1,
                  batch_size: int = 64) -> ClassAccuracy:
    """Zero-shot classification of box crops of normalised (C, H, W) images with `encode_image`."""
    size = _input_size(clip_model)
    crops = [square_crops(im, b, size, context) for im, b in zip(images, boxes) if len(b)]
    if not crops:
        return ClassAccuracy.zeros(text.shape[0])
    crops_t = torch.cat(crops)
    lab = torch.cat([l for l, b in zip(labels, boxes) if len(b)])
    device = next(clip_model.parameters()).device
    preds = []
    for i in range(0, len(crops_t), batch_size):
        f = F.normalize(clip_model.encode_image(crops_t[i:i + batch_size].to(device)).float(), dim=-1)
        preds.append((f @ text.float().to(device).T).argmax(1).cpu())
    return ClassAccuracy.from_predictions(torch.cat(preds), lab, text.shape[0])


def _input_size(clip_model: nn.Module) -> int:
    size = getattr(clip_model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def load_images(dataset_dicts: Sequence[Dict[str, Any]], pixel_mean: Sequence[float],
                pixel_std: Sequence[float]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Normalised (3, H, W) images (RGB, mean/std in 0..1 units), XYXY boxes and class ids of
    detectron2-style dataset dicts (XYXY_ABS boxes); crowd regions are not objects and are left out."""
    mean = torch.tensor(pixel_mean).view(3, 1, 1)
    std = torch.tensor(pixel_std).view(3, 1, 1)
    images, boxes, labels = [], [], []
    for d in dataset_dicts:
        with Image.open(d["file_name"]) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        images.append((torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0 - mean) / std)
        annos = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes.append(torch.tensor([a["bbox"] for a in annos], dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor([a["category_id"] for a in annos], dtype=torch.long))
    return images, boxes, labels


@torch.no_grad()
def measure_clip(clip_model: nn.Module, class_text: Tensor, dataset_dicts: Sequence[Dict[str, Any]],
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], batch_size: int = 50,
                 crop_context: float = 0.1, progress: Optional[Callable[[int], None]] = None
                 ) -> Dict[str, ClassAccuracy]:
    """Dense hit rate and crop accuracy of `clip_model` on dataset dicts (all images the same size),
    with `class_text` (K, D) the class embeddings in the dataset's class order."""
    was_training = clip_model.training
    clip_model.eval()
    encoder = CLIPDenseEncoder(clip_model.visual).eval()
    device = next(clip_model.parameters()).device
    K = class_text.shape[0]
    hits, crops = ClassAccuracy.zeros(K), ClassAccuracy.zeros(K)
    for i in range(0, len(dataset_dicts), batch_size):
        images, boxes, labels = load_images(dataset_dicts[i:i + batch_size], pixel_mean, pixel_std)
        _, dense = encoder(torch.stack(images).to(device))
        hits = hits + dense_hit_rate(dense, class_text, boxes, labels, stride=encoder.patch_size)
        crops = crops + crop_accuracy(clip_model, images, boxes, labels, class_text, context=crop_context)
        if progress is not None:
            progress(len(images))
    clip_model.train(was_training)
    return {"dense_hit_rate": hits, "crop_accuracy": crops}


def measure_on_dataset(cfg: Any, clip_model: nn.Module, tokenizer: Callable, dataset: str,
                       num_images: Optional[int] = None, templates: Optional[str] = None) -> Dict[str, ClassAccuracy]:
    """`measure_clip` on the first `num_images` (None = all) images of a registered dataset (crowd
    boxes left out), with the prompt-ensembled embeddings of its `thing_classes` from `TextEncoder`
    (`templates`, default `cfg.MODEL.CLIP.TEMPLATES`)."""
    from ..data.catalog import DatasetCatalog, MetadataCatalog
    from ..modeling.text import TextEncoder

    dicts = DatasetCatalog.get(dataset)
    dicts = dicts[:num_images] if num_images else dicts
    was_training = clip_model.training
    clip_model.eval()
    text = TextEncoder(clip_model, tokenizer, templates or cfg.MODEL.CLIP.TEMPLATES).encode_classes(
        MetadataCatalog.get(dataset).thing_classes)
    res = measure_clip(clip_model, text, dicts, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
    clip_model.train(was_training)
    return res


def measure_on_shapes(cfg: Any, clip_model: nn.Module, tokenizer: Callable, num_images: Optional[int] = None,
                      templates: Optional[str] = None, split: str = "test") -> Dict[str, ClassAccuracy]:
    """`measure_on_dataset` on a Shapes split (train, test or val, as registered for the spec of
    `cfg.DATASETS.SHAPES`)."""
    from .shapes import ShapesSpec, register_shapes

    return measure_on_dataset(cfg, clip_model, tokenizer, register_shapes(ShapesSpec.from_cfg(cfg))[split],
                              num_images=num_images, templates=templates)


def format_report(results: Dict[str, ClassAccuracy], class_names: Optional[Sequence[str]] = None) -> str:
    """A per-class table of the dense hit rate and the crop accuracy, with the overall numbers."""
    from tabulate import tabulate

    if class_names is None:
        from .shapes import SHAPES_CLASSES as class_names  # type: ignore[no-redef]
    hits, crops = results["dense_hit_rate"], results["crop_accuracy"]
    ph, pc = hits.per_class(class_names), crops.per_class(class_names)
    rows = [[n, int(t), f"{ph[n]:.1%}", f"{pc[n]:.1%}"] for n, t in zip(class_names, hits.total.tolist())]
    rows.append(["all", int(hits.total.sum()), f"{hits.overall:.1%}", f"{crops.overall:.1%}"])
    table = tabulate(rows, headers=["class", "boxes", "dense hit rate", "crop accuracy"], tablefmt="pipe")
    return f"dense hit rate {hits.overall:.1%} (chance {1 / len(class_names):.0%}), crop accuracy " \
           f"{crops.overall:.1%}\n{table}"


def monitoring_fn(cfg: Any, num_images: int = 0) -> Callable[[nn.Module, int], None]:
    """A callback for `pretrain_tiny_clip` that logs the quality on the first `num_images` (0 = all)
    images of the recipe dataset's monitored split (Shapes test, Clutter val; measurement only: it
    does not train)."""
    import logging

    import open_clip

    from .tiny_clip import recipe_data

    log = logging.getLogger(__name__)
    tokenizer = open_clip.get_tokenizer(cfg.MODEL.CLIP.ARCH)
    source = recipe_data(cfg)

    def fn(model: nn.Module, step: int) -> None:
        res = measure_on_dataset(cfg, model, tokenizer, source.monitor_split(), num_images=num_images or None)
        final = step == cfg.MODEL.CLIP.TINY.ITERS
        log.info(f"step {step}: " + (format_report(res, source.class_names) if final else
                 f"dense hit rate {res['dense_hit_rate'].overall:.1%}, "
                 f"crop accuracy {res['crop_accuracy'].overall:.1%}"))

    return fn


@dataclass
class PriorQuality:
    """Per-box prior of the boxes measured so far (n x (K+1), background last) and their classes."""

    level: Tensor
    map: Tensor
    labels: Tensor

    def hit_rate(self, which: str = "level") -> ClassAccuracy:
        prior = getattr(self, which)
        K = prior.shape[1] - 1
        return ClassAccuracy.from_predictions(prior[:, :K].argmax(dim=1), self.labels, K)

    def true_class_prior(self) -> float:
        return float(self.level.gather(1, self.labels[:, None]).mean())

    def entropy(self) -> float:
        """Mean entropy (nats) of the level over [classes, background], renormalised."""
        p = self.level / self.level.sum(dim=1, keepdim=True)
        return float(-(p * p.clamp(min=1e-12).log()).sum(dim=1).mean())

    def calibration_error(self, bins: int = 10) -> float:
        """Expected calibration error of the level's top class (confidence = its prior)."""
        K = self.level.shape[1] - 1
        conf, pred = self.level[:, :K].max(dim=1)
        hit = (pred == self.labels).float()
        which = (conf * bins).long().clamp(max=bins - 1)
        err = torch.zeros(())
        for b in range(bins):
            sel = which == b
            if sel.any():
                err += sel.float().mean() * (conf[sel].mean() - hit[sel].mean()).abs()
        return float(err)


def box_prior(cost: Tensor, boxes: Tensor, stride: float, temperature: float, norm: str, level_inset: float,
              resolution: int = 7) -> Tuple[Tensor, Tensor]:
    """The level and the pooled map (each n x (K+1)) of the XYXY boxes of one image's cosines
    `cost` ((K+1) x h x w, background last), RoIAligned like CL-CLIP's head reads a RoI."""
    from torchvision.ops import roi_align

    def pooled(maps: Tensor, b: Tensor) -> Tensor:
        return roi_align(maps[None].float(), [b.float().to(maps.device)], resolution, spatial_scale=1.0 / stride,
                         sampling_ratio=2, aligned=True).mean(dim=(2, 3))

    level = normalize_prior(pooled(cost, inset_boxes(boxes, level_inset, stride)), temperature, norm)
    cell = pooled(normalize_prior(cost[None], temperature, norm)[0], boxes)
    return level, cell


@torch.no_grad()
def measure_prior(clip_model: nn.Module, class_text: Tensor, background_text: Tensor,
                  dataset_dicts: Sequence[Dict[str, Any]], pixel_mean: Sequence[float], pixel_std: Sequence[float],
                  temperature: float, norm: str = "softmax", level_inset: float = 0.25,
                  batch_size: int = 50) -> PriorQuality:
    """CL-CLIP's prior of every labelled box (see `box_prior`), over the classes of `class_text`
    (K x D, the dataset's class order) and the background, at `temperature` (0 = 1 / the CLIP's
    logit scale)."""
    if temperature <= 0:
        temperature = 1.0 / float(clip_model.logit_scale.exp().clamp(max=100.0))
    was_training = clip_model.training
    clip_model.eval()
    encoder = CLIPDenseEncoder(clip_model.visual).eval()
    device = next(clip_model.parameters()).device
    text = torch.cat([class_text, background_text[None]]).float().to(device)
    levels, maps, labs = [], [], []
    for i in range(0, len(dataset_dicts), batch_size):
        images, boxes, labels = load_images(dataset_dicts[i:i + batch_size], pixel_mean, pixel_std)
        _, dense = encoder(torch.stack(images).to(device))
        cost = torch.einsum("bdhw,kd->bkhw", dense.float(), text)
        for c, b, l in zip(cost, boxes, labels):
            if len(b):
                level, cell = box_prior(c, b, encoder.patch_size, temperature, norm, level_inset)
                levels.append(level.cpu())
                maps.append(cell.cpu())
                labs.append(l)
    clip_model.train(was_training)
    K = class_text.shape[0]
    empty = torch.zeros(0, K + 1)
    return PriorQuality(torch.cat(levels) if levels else empty, torch.cat(maps) if maps else empty,
                        torch.cat(labs) if labs else torch.zeros(0, dtype=torch.long))


def format_prior_report(q: PriorQuality, temperature: float, norm: str) -> str:
    """One line per reading of the prior: hit rate, and for the level its calibration."""
    return (f"prior at T {temperature:.4g} ({norm}), {len(q.labels)} boxes: level (normalised RoI-mean cosines) "
            f"hit rate {q.hit_rate('level').overall:.1%}, box-class prior {q.true_class_prior():.3f}, "
            f"entropy {q.entropy():.2f} nats, ECE {q.calibration_error():.3f}; map (normalised per cell, then "
            f"averaged) hit rate {q.hit_rate('map').overall:.1%}")


def mixed_box_share(dataset_dicts: Sequence[Dict[str, Any]], min_cover: Sequence[float] = (0.1, 0.25)
                    ) -> Tuple[int, Dict[float, float]]:
    """The number of labelled boxes (crowd regions left out; XYXY_ABS) and, per fraction in
    `min_cover`, the share of them that a box of another class covers by at least that fraction
    of their area."""
    best: List[Tensor] = []
    for d in dataset_dicts:
        annos = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        if not annos:
            continue
        boxes = torch.tensor([a["bbox"] for a in annos], dtype=torch.float64).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in annos])
        wh = (torch.min(boxes[:, None, 2:], boxes[None, :, 2:]) - torch.max(boxes[:, None, :2], boxes[None, :, :2]))
        inter = wh.clamp(min=0).prod(dim=2)
        area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
        cover = inter / area.clamp(min=1e-9)[:, None]
        cover[labels[:, None] == labels[None, :]] = 0.0
        best.append(cover.max(dim=1).values)
    cover = torch.cat(best) if best else torch.zeros(0, dtype=torch.float64)
    n = len(cover)
    return n, {f: float((cover >= f).double().mean()) if n else 0.0 for f in min_cover}

"""The tiny CLIP: cache key, a tiny recipe end to end, locking, and the quality measures."""
from __future__ import annotations

import multiprocessing as mp
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clcl_det.config import get_cfg
from clcl_det.embedded import tiny_clip as P
from clcl_det.embedded.quality import (
    ClassAccuracy, box_cell_mask, box_responses, crop_accuracy, dense_hit_rate, square_crops,
)


def _tiny_recipe_cfg(tmp_path, **extra):
    cfg = get_cfg()
    cfg.merge_from_list([
        "DATASETS.SHAPES.NUM_TRAIN", "12", "DATASETS.SHAPES.NUM_TEST", "6",
        "MODEL.CLIP.CACHE_DIR", str(tmp_path / "cache"), "MODEL.DEVICE", "cpu",
        "MODEL.CLIP.TINY.ITERS", "3", "MODEL.CLIP.TINY.BATCH_SIZE", "2", "MODEL.CLIP.TINY.CROP_BATCH_SIZE", "2",
        "MODEL.CLIP.TINY.TEXT_WARMUP_ITERS", "2", "MODEL.CLIP.TINY.WARMUP_ITERS", "1",
        *[str(x) for kv in extra.items() for x in kv],
    ])
    return cfg


@pytest.fixture
def datasets_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLCL_DATASETS", str(tmp_path / "datasets"))
    return tmp_path / "datasets"


# ---------------------------------------------------------------------------------------------- cache


def test_cache_key_covers_recipe_spec_and_prompt(tmp_path):
    cfg = _tiny_recipe_cfg(tmp_path)
    path = P.tiny_clip_path(cfg)
    assert os.path.dirname(path) == str(tmp_path / "cache")
    assert os.path.basename(path).startswith("shapes-tiny-") and path.endswith(".pt")
    for key, value in (("MODEL.CLIP.TINY.ITERS", "4"), ("MODEL.CLIP.TINY.LR", "0.002"),
                       ("MODEL.CLIP.TINY.SEED", "1"), ("DATASETS.SHAPES.SEED", "1"),
                       ("MODEL.CLIP.BACKGROUND_PROMPT", "nothing")):
        other = cfg.clone()
        other.merge_from_list([key, value])
        assert P.tiny_clip_path(other) != path, key
    unrelated = cfg.clone()
    unrelated.merge_from_list(["SOLVER.MAX_ITER", "7", "MODEL.CLIP.TEMPLATES", "simple"])
    assert P.tiny_clip_path(unrelated) == path


def test_cache_key_covers_model_config(tmp_path, monkeypatch):
    cfg = _tiny_recipe_cfg(tmp_path)
    path = P.tiny_clip_path(cfg)
    model_cfg = open_clip.get_model_config("shapes-tiny")
    model_cfg["vision_cfg"] = {**model_cfg["vision_cfg"], "layers": model_cfg["vision_cfg"]["layers"] + 1}
    monkeypatch.setattr(P.open_clip, "get_model_config", lambda name: model_cfg)
    assert P.tiny_clip_path(cfg) != path


def test_packaged_tiny_clip_is_the_released_checkpoint():
    """The default recipe loads the checkpoint shipped in the package, whose sha256 is the one the
    README states."""
    from clcl_det.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.CLIP.ARCH", "shapes-tiny"])
    path = P.tiny_clip_path(cfg)
    assert path == P.packaged_tiny_clip_path(cfg) == os.path.join(P.PACKAGED_DIR, P.PACKAGED_FILE)
    assert P.recipe_digest(cfg) == P.PACKAGED_RECIPE
    assert P.file_sha256(path) == P.PACKAGED_SHA256
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    assert P.PACKAGED_SHA256 in readme
    assert P.built_tiny_clip_path(cfg) == path
    state = torch.load(path, weights_only=True)
    assert torch.equal(open_clip.create_model("shapes-tiny", pretrained=path, weights_only=True)
                       .state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])


def test_corrupted_packaged_tiny_clip_is_refused_in_one_line(tmp_path, monkeypatch):
    from clcl_det.config import get_cfg
    from clcl_det.utils.errors import run_cli

    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.CLIP.ARCH", "shapes-tiny"])
    data = bytearray(open(P.packaged_tiny_clip_path(cfg), "rb").read())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (tmp_path / P.PACKAGED_FILE).write_bytes(bytes(data))
    monkeypatch.setattr(P, "PACKAGED_DIR", str(tmp_path))
    for load in (P.built_tiny_clip_path, P.ensure_shapes_tiny):
        with pytest.raises(P.TinyCLIPChecksumError) as err:
            load(cfg)
        msg = str(err.value)
        assert "\n" not in msg and P.REBUILD_COMMAND in msg and P.PACKAGED_SHA256[:12] in msg
    assert run_cli(lambda: P.ensure_shapes_tiny(cfg)) == 2  # the entry points print it as one error line


# ---------------------------------------------------------------------------------------------- recipe


def test_tiny_recipe_builds_a_loadable_deterministic_checkpoint(tmp_path, datasets_dir):
    from clcl_det.modeling.clip.factory import build_clip

    cfg = _tiny_recipe_cfg(tmp_path)
    with pytest.raises(FileNotFoundError, match="not built"):  # building the model only loads weights
        build_clip(cfg)
    path = P.ensure_shapes_tiny(cfg)
    assert path == P.tiny_clip_path(cfg) and os.path.isfile(path)
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]
    state = torch.load(path, weights_only=True)
    model = open_clip.create_model("shapes-tiny", pretrained=path, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    fresh = open_clip.create_model("shapes-tiny").state_dict()
    assert not torch.equal(fresh["visual.conv1.weight"], state["visual.conv1.weight"])

    mtime = os.path.getmtime(path)
    assert P.ensure_shapes_tiny(cfg) == path and os.path.getmtime(path) == mtime  # cached

    # the same recipe again gives the same bytes, also when the calling process runs other kernels
    again = str(tmp_path / "again.pt")
    with torch.backends.mkldnn.flags(enabled=True):
        P.build_pinned(cfg, again, env={**P.pinned_env(), "MKL_ENABLE_INSTRUCTIONS": "AVX2"})
    assert P.file_sha256(again) == P.file_sha256(path)

    # the detector's route: MODEL.CLIP.PRETRAINED = shapes-tiny
    clip, _ = build_clip(cfg)
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())
    assert torch.equal(clip.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])


def test_training_data_is_the_train_split_only(tmp_path, datasets_dir):
    from clcl_det.embedded.shapes import ShapesSpec, ensure_shapes, render_image

    spec = ShapesSpec(num_train=12, num_test=6)
    data = P.ShapesTrainData.load(ensure_shapes(spec))
    assert data.images.shape == (12, 3, 128, 128) and data.masks.shape == (12, 128, 128)
    n_objects = sum(len(render_image(spec, "train", i)[2]) for i in range(12))
    assert len(data.objects) == n_objects


def _locked_build(cfg, log_path: str, out_q) -> None:
    from clcl_det.utils.checkpoint import atomic_torch_save

    def fake_build(cfg, out_path, eval_images=0):
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        atomic_torch_save({"w": torch.zeros(1)}, out_path)

    P.build_pinned = fake_build
    out_q.put(P.ensure_shapes_tiny(cfg))


def test_concurrent_builders_build_once(tmp_path):
    cfg = _tiny_recipe_cfg(tmp_path)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    log = str(tmp_path / "builds.txt")
    procs = [ctx.Process(target=_locked_build, args=(cfg, log, q)) for _ in range(3)]
    for p in procs:
        p.start()
    paths = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    with open(log) as f:
        assert len(f.read().split()) == 1
    assert set(paths) == {P.tiny_clip_path(cfg)}


# ---------------------------------------------------------------------------------------------- quality


def test_box_cell_mask_matches_a_direct_count():
    boxes = torch.tensor([[0.0, 0.0, 128.0, 128.0], [10.0, 20.0, 30.0, 33.0], [50.0, 50.0, 53.0, 54.0]])
    mask = box_cell_mask(boxes, 16, 16, 8)
    for b, m in zip(boxes.tolist(), mask):
        expected = torch.zeros(16, 16, dtype=torch.bool)
        for i in range(16):
            for j in range(16):
                cx, cy = 8 * j + 4, 8 * i + 4
                expected[i, j] = b[0] <= cx <= b[2] and b[1] <= cy <= b[3]
        expected[int((b[1] + b[3]) / 2 // 8), int((b[0] + b[2]) / 2 // 8)] = True
        assert torch.equal(m, expected)
    assert mask[0].all() and mask[1].sum() == 3 * 2 and mask[2].sum() == 1  # tiny box: its centre cell


def _hand_made_dense(K: int = 4, D: int = 8):
    """Text = K one-hot directions; V lights up each box's class (or another class) in its cells."""
    text = torch.eye(K, D)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 40.0], [64.0, 64.0, 120.0, 100.0]]), torch.tensor([[70.0, 2.0, 75.0, 9.0]])]
    labels = [torch.tensor([1, 3]), torch.tensor([2])]
    return text, boxes, labels


def _paint(text, boxes, labels, wrong: bool = False):
    K = text.shape[0]
    V = torch.zeros(len(boxes), text.shape[1], 16, 16)
    V[:, 0] = 1.0  # background everywhere: class 0 direction
    for b, (bx, lb) in enumerate(zip(boxes, labels)):
        for box, k in zip(bx, lb.tolist()):
            m = box_cell_mask(box[None], 16, 16, 8)[0]
            vec = text[(k + 1) % K if wrong else k] * 3.0
            V[b][:, m] = vec[:, None]
    return F.normalize(V, dim=1)


def test_dense_hit_rate_on_a_hand_made_map():
    text, boxes, labels = _hand_made_dense()
    right = dense_hit_rate(_paint(text, boxes, labels), text, boxes, labels, stride=8)
    assert right.overall == 1.0 and right.total.tolist() == [0, 1, 1, 1]
    wrong = dense_hit_rate(_paint(text, boxes, labels, wrong=True), text, boxes, labels, stride=8)
    assert wrong.overall == 0.0
    per = (right + wrong).per_class(["a", "b", "c", "d"])
    assert per["b"] == 0.5 and per["a"] != per["a"]  # NaN without boxes


def test_box_responses_are_box_means():
    cost = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    r = box_responses(cost, torch.tensor([[0.0, 0.0, 16.0, 8.0]]), stride=8)  # cells (0,0), (0,1)
    assert torch.allclose(r, cost[:, 0, :2].mean(1)[None])


def test_square_crops_geometry():
    image = torch.rand(3, 32, 32)
    crop = square_crops(image, torch.tensor([[4.0, 6.0, 12.0, 14.0]]), size=8, context=0.0)
    assert torch.allclose(crop[0], image[:, 6:14, 4:12])
    edge = square_crops(image, torch.tensor([[0.0, 0.0, 10.0, 10.0]]), size=12, context=0.1)  # shifted inside
    assert torch.allclose(edge[0], image[:, 0:12, 0:12])


class _ColourCLIP(nn.Module):
    """A stand-in CLIP whose image embedding is the crop's mean colour."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Module()
        self.visual.image_size = 16
        self.w = nn.Parameter(torch.eye(3))

    def encode_image(self, x):
        assert x.shape[-2:] == (16, 16)
        return x.mean((2, 3)) @ self.w


def test_crop_accuracy_with_a_colour_model():
    image = torch.zeros(3, 64, 64)
    image[0, 4:20, 4:20] = 1.0  # a red square
    image[2, 40:60, 30:50] = 1.0  # a blue square
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 20.0], [30.0, 40.0, 50.0, 60.0]])]
    text = torch.eye(3)
    good = crop_accuracy(_ColourCLIP(), [image], boxes, [torch.tensor([0, 2])], text)
    assert good.overall == 1.0
    bad = crop_accuracy(_ColourCLIP(), [image], boxes, [torch.tensor([1, 2])], text)
    assert bad.correct.tolist() == [0, 0, 1] and bad.total.tolist() == [0, 1, 1]


def test_class_accuracy_counts():
    acc = ClassAccuracy.from_predictions(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert acc.correct.tolist() == [1, 1, 1] and acc.total.tolist() == [1, 1, 2] and acc.overall == 0.75


def _dict(boxes, labels, crowd=()):
    return {"annotations": [{"bbox": list(b), "category_id": c, "iscrowd": int(i in crowd)}
                            for i, (b, c) in enumerate(zip(boxes, labels))]}


def test_mixed_box_share_by_hand():
    from clcl_det.embedded.quality import mixed_box_share

    # box 0 (10x10) is covered 30 % by box 1 (class 1); box 1 (10x10) 30 % by box 0; box 2 (class 0,
    # same as box 0) covers box 0 fully and counts for nothing; box 3 is alone; box 4 is a crowd region.
    d = _dict([(0, 0, 10, 10), (7, 0, 17, 10), (0, 0, 10, 10), (50, 50, 60, 60), (0, 0, 60, 60)],
              [0, 1, 0, 2, 3], crowd=(4,))
    n, shares = mixed_box_share([d, {"annotations": []}], min_cover=(0.1, 0.25, 0.5))
    # boxes 0, 1, 2 are each covered 30 % by another class's box; box 3 by nothing
    assert n == 4
    assert shares == {0.1: 0.75, 0.25: 0.75, 0.5: 0.0}


def test_mixed_box_share_matches_a_pixel_count():
    from clcl_det.embedded.quality import mixed_box_share

    g = torch.Generator().manual_seed(0)
    dicts, covers = [], []
    for _ in range(20):
        xy = torch.randint(0, 40, (6, 2), generator=g)
        wh = torch.randint(1, 25, (6, 2), generator=g)
        boxes = torch.cat([xy, xy + wh], dim=1).tolist()
        labels = torch.randint(0, 3, (6,), generator=g).tolist()
        dicts.append(_dict(boxes, labels))
        masks = torch.zeros(6, 70, 70, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, boxes):
            m[y0:y1, x0:x1] = True
        for i in range(6):
            others = [(masks[i] & masks[j]).sum() / masks[i].sum() for j in range(6) if labels[j] != labels[i]]
            covers.append(max(others, default=torch.tensor(0.0)).item())
    n, shares = mixed_box_share(dicts, min_cover=(0.1, 0.25))
    assert n == len(covers)
    for f, share in shares.items():
        assert share == pytest.approx(sum(c >= f - 1e-12 for c in covers) / len(covers))

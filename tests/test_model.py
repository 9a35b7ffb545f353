"""FViT: dense CLIP features, one training step (tiny CLIP and ViT-B-16), inference format,
the frozen CLIP kept out of parameters and checkpoints."""
import os

import open_clip
import pytest
import torch

from clcl_det.continual import begin_task
from clcl_det.data.continual import Task
from clcl_det.engine import setup_cfg
from clcl_det.modeling import build_model
from clcl_det.modeling.clip.dense import CLIPDenseEncoder, _v_path

from conftest import tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("red circle", "blue square", "green triangle", "yellow cross")


def _batch(n=2, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
        boxes = torch.tensor([[8.0, 10.0, 60.0, 50.0], [70.0, 64.0, 120.0, 126.0]]) * size / 128
        out.append({"image": img, "boxes": boxes, "classes": torch.tensor([0, 2]), "seed": 100 + i,
                    "height": 2 * size, "width": 2 * size, "image_id": i})
    return out


def _task(names=NAMES, k=None):
    k = k or len(names)
    return Task(0, 0, k, tuple(names[:k]), tuple(names))


def test_dense_encoder_matches_open_clip():
    torch.manual_seed(0)
    model = open_clip.create_model("shapes-tiny").eval()
    enc = CLIPDenseEncoder(model.visual).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        taps, dense = enc(x)
        ref = model.visual.forward_intermediates(x, indices=enc.tap_indices[:-1], intermediates_only=True)
    for a, b in zip(taps[:-1], ref["image_intermediates"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert dense.shape == (2, model.visual.proj.shape[1], 16, 16)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 16, 16))
    # a block on a single token has nothing to mix: it equals the v-path
    block = model.visual.transformer.resblocks[-1]
    tok = torch.randn(3, 1, enc.width)
    with torch.no_grad():
        torch.testing.assert_close(block(tok), _v_path(block, tok), rtol=1e-5, atol=1e-5)


def test_positional_embedding_resized_for_other_sizes():
    model = open_clip.create_model("shapes-tiny").eval()
    enc = CLIPDenseEncoder(model.visual).eval()
    with torch.no_grad():
        taps, dense = enc(torch.randn(1, 3, 96, 160))
    assert dense.shape[-2:] == (12, 20) and taps[0].shape[-2:] == (12, 20)


def _train_step(cfg, size):
    torch.manual_seed(0)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])  # random weights: every candidate counts
    model = build_model(cfg)
    begin_task(model, _task())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    clip_ids = {id(p) for p in model.clip.parameters()}
    assert params and not any(id(p) in clip_ids for p in params), "CLIP must stay out of the trainable set"
    assert not any(k.startswith("clip") or "visual" in k for k in model.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clip_before = [p.detach().clone() for p in model.clip.parameters()][:5]
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = model(_batch(size=size))
    assert set(losses) >= {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    for prefix in ("backbone.pyramid", "backbone.fpn", "proposal_generator.head", "roi_heads.box_head",
                   "roi_heads.embed", "roi_heads.cls_head.logit_scale"):
        changed = [n for n, p in model.named_parameters() if n.startswith(prefix) and not torch.equal(p, before[n])]
        assert changed, f"no parameter of {prefix} was updated"
    for a, b in zip(clip_before, list(model.clip.parameters())[:5]):
        assert torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        out = model(_batch(size=size))
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    for det in out:
        assert len(det["boxes"]) > 0, "no detection"
        assert float(det["boxes"].max()) <= 2 * size + 1e-3 and float(det["boxes"].max()) > size  # original image coordinates
        assert int(det["labels"].max()) < len(NAMES) and bool((det["scores"] > 0).all())
    return model


def test_train_step_tiny_clip():
    _train_step(tiny_cfg(), 128)


def test_train_step_vit_b16():
    cfg = setup_cfg(os.path.join(REPO, "configs", "fvit", "finetune_voc_10+10.yaml"), [
        "MODEL.CLIP.PRETRAINED", "", "INPUT.IMAGE_SIZE", "128", "MODEL.CLIP.TEMPLATES", "simple",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.CONV_DIM", "16",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64"])
    model = _train_step(cfg, 128)
    assert model.backbone.strides == [4, 8, 16, 32, 64]
    assert model.backbone.encoder.tap_indices == [3, 5, 7, 11] and model.backbone.embed_dim == 512


def test_vocabulary_and_zero_shot_context():
    model = build_model(tiny_cfg())
    begin_task(model, _task(k=2))
    assert model.class_embeddings.shape == (2, model.backbone.embed_dim)
    with model.vocabulary(NAMES):
        assert model.class_embeddings.shape[0] == 4
    assert model.class_names == list(NAMES[:2])
    model.eval()
    with torch.no_grad():
        assert len(model(_batch())) == 2
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.train()
        b = _batch()
        b[0]["classes"] = torch.tensor([0, 3])
        model(b)


@pytest.mark.parametrize("config", ["VOC_10+10.yaml", "clclip/clclip_coco_40+40.yaml"])
def test_real_configs_build_and_detect(config):
    """The VOC/COCO method configs (ViT-B-16, random weights) build and detect as shipped, at a
    small input size (a first task of 3 classes: the random 12-layer text tower encodes 3 names)."""
    from clcl_det.data.continual import Task

    cfg = setup_cfg(os.path.join(REPO, "configs", config), [
        "MODEL.CLIP.PRETRAINED", "", "INPUT.IMAGE_SIZE", "64", "MODEL.CLIP.TEMPLATES", "simple",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    k = 80 if config.startswith("COCO") else 20
    names = tuple(f"class {i}" for i in range(k))
    begin_task(model, Task(0, 0, 3, names[:3], names))
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}])
    assert set(out[0]) >= {"boxes", "scores", "labels"} and model.backbone.embed_dim == 512
    assert len(out[0]["boxes"]) > 0 and int(out[0]["labels"].max()) < 3 and float(out[0]["boxes"].max()) <= 64 + 1e-3

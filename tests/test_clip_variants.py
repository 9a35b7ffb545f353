"""The CL-CLIP paper's other CLIP variants: the SigLIP dense encoder against timm on a tiny random
SigLIP-style tower (taps = timm's intermediates, dense tokens = the attention pool applied to each
token alone), and the shipped SigLIP2 and EVA02 configs built with random weights and run through
detection."""
import os

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from clcl_det.continual import begin_task
from clcl_det.data.continual import build_continual_split
from clcl_det.data.datasets import VOC_CLASSES
from clcl_det.engine import setup_cfg
from clcl_det.modeling import build_model
from clcl_det.modeling.clip.dense import SigLIPDenseEncoder, build_dense_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tower(nn.Module):
    """open_clip's TimmModel layout for a SigLIP tower (pool "map", proj "none"): trunk + empty head."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, nn.Sequential()


def _tiny_siglip(img_size: int = 64) -> nn.Module:
    torch.manual_seed(0)
    trunk = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, global_pool="map",
                              img_size=img_size, embed_dim=32, depth=4, num_heads=2)
    return _Tower(trunk).eval()


@pytest.mark.parametrize("size", [64, 96])
def test_siglip_dense_encoder_against_timm(size):
    tower = _tiny_siglip()
    enc = build_dense_encoder(tower, [1, 3])
    assert isinstance(enc, SigLIPDenseEncoder) and enc.trunk.cls_token is None and enc.embed_dim == 32
    img = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ref = tower.trunk
    if size != 64:  # timm at another input size: positions resampled the same way
        ref = _tiny_siglip()
        ref.trunk.set_input_size(img_size=(size, size))
        ref = ref.trunk
    g = size // 16
    with torch.no_grad():
        taps, dense = enc(img)
        inter = ref.forward_intermediates(img, indices=[1, 3], norm=False, output_fmt="NCHW", intermediates_only=True)
        x = ref.norm(inter[-1].flatten(2).transpose(1, 2))
        alone = torch.stack([ref.head(ref.fc_norm(ref.attn_pool(x[:, i:i + 1]))) for i in range(g * g)], dim=1)
        pooled = ref.attn_pool(x)  # the pool over all tokens mixes them: not the dense map
    for a, b in zip(taps, inter):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, F.normalize(alone, dim=-1).transpose(1, 2).reshape(2, 32, g, g),
                               atol=1e-5, rtol=1e-5)
    assert float((F.normalize(pooled, dim=-1)[:, None] - F.normalize(alone, dim=-1)).abs().max()) > 1e-2


def test_siglip_encoder_refuses_a_tower_with_a_class_token():
    torch.manual_seed(0)
    trunk = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, global_pool="map",
                              img_size=32, embed_dim=16, depth=2, num_heads=2)
    with pytest.raises(NotImplementedError, match="class or register tokens"):
        SigLIPDenseEncoder(_Tower(trunk))


@pytest.mark.parametrize("config,encoder,dim", [("clclip/clclip_voc_10+10_siglip2.yaml", "SigLIPDenseEncoder", 768),
                                                ("clclip/clclip_voc_10+10_eva02.yaml", "EvaDenseEncoder", 512)])
def test_clip_variant_configs_build_and_detect(config, encoder, dim, monkeypatch):
    """Random weights, 64 px, 2+2 VOC classes. SigLIP2's tokenizer (Gemma's, from the Hugging Face
    hub) is replaced by open_clip's bundled one: the text tower's weights are random anyway."""
    real = open_clip.get_tokenizer
    monkeypatch.setattr(open_clip, "get_tokenizer",
                        lambda name, *a, **k: real("ViT-B-16", context_length=64) if "SigLIP" in name else real(name, *a, **k))
    cfg = setup_cfg(os.path.join(REPO, "configs", config), [
        "MODEL.CLIP.PRETRAINED", "", "MODEL.CLIP.TEMPLATES", "simple", "INPUT.IMAGE_SIZE", "64", "CONTINUAL.TASKS",
        "2+2", "MODEL.RPN.PRE_NMS_TOPK_TEST", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert type(model.backbone.encoder).__name__ == encoder and model.backbone.embed_dim == dim
    assert model.backbone.encoder.tap_indices == [3, 5, 7, 11]
    begin_task(model, build_continual_split(cfg, VOC_CLASSES[:4]).task(0))
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g), "height": 64, "width": 64}
              for _ in range(2)]
    with torch.no_grad():
        out = model(images)
    for det in out:
        assert len(det["boxes"]) > 0 and bool(torch.isfinite(det["scores"]).all())
        assert set(det["labels"].tolist()) <= {0, 1} and float(det["boxes"].max()) <= 64.0

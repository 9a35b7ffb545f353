"""The frozen CLIP's feature cache: the same outputs as the encoder, bit for bit, fewer encoder passes."""
from __future__ import annotations

import copy
import os

import torch

from clcl_det.modeling import build_model
from clcl_det.modeling.backbone.feature_cache import FrozenFeatureCache

from conftest import final_state, same_state, tiny_cfg


class CountingEncoder:
    def __init__(self, encoder):
        self.encoder, self.images = encoder, 0

    def __call__(self, images):
        self.images += len(images)
        return self.encoder(images)


def _encoder():
    torch.manual_seed(0)
    return build_model(tiny_cfg()).backbone.encoder


def _same(a, b) -> bool:
    """Equal values laid out alike (later layers may round otherwise for another memory layout)."""
    pairs = [*zip(a[0], b[0]), (a[1], b[1])]
    return len(a[0]) == len(b[0]) and all(torch.equal(x, y) and x.stride() == y.stride() for x, y in pairs)


def test_cache_gives_the_encoders_outputs_bit_for_bit_and_skips_seen_images():
    enc = CountingEncoder(_encoder())
    g = torch.Generator().manual_seed(1)
    a, new = torch.randn(4, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    cache = FrozenFeatureCache(2**30)
    with torch.no_grad():
        assert _same(cache(enc, a), enc.encoder(a))
        mixed = torch.stack([a[0], new[0], a[2], new[1], a[0]])  # seen, new, seen, new, repeated
        out = cache(enc, mixed)
        assert _same(out, enc.encoder(mixed))
    assert enc.images == 4 + 2 and (cache.hits, cache.misses) == (3, 6) and len(cache) == 6


def test_cache_keys_on_bytes_and_autocast_and_drops_the_least_recently_used():
    enc = CountingEncoder(_encoder())
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        taps, dense = enc.encoder(x[:1])
    per_image = sum(t.numel() * t.element_size() for t in [*taps, dense])
    cache = FrozenFeatureCache(2 * per_image)
    with torch.no_grad():
        cache(enc, x[:2])
        cache(enc, x[:1])  # x0 is now the most recent
        cache(enc, x[2:])  # evicts x1
        assert len(cache) == 2 and cache.bytes == 2 * per_image
        before = enc.images
        cache(enc, x[:1])
        assert enc.images == before  # x0 kept
        cache(enc, x[1:2])
        assert enc.images == before + 1  # x1 was dropped
        nudged = x[:1].clone()
        nudged[0, 0, 0, 0] += 1e-3
        cache(enc, nudged)
        assert enc.images == before + 2  # other bytes, another entry
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache(enc, x[:1])
        assert enc.images == before + 3  # under autocast the encoder computes another thing


def test_copies_share_the_cache():
    cfg = tiny_cfg()
    cfg.merge_from_list(["MODEL.CLIP.FEATURE_CACHE_MB", "16"])
    model = build_model(cfg)
    assert copy.deepcopy(model).backbone.feature_cache is model.backbone.feature_cache
    assert build_model(tiny_cfg()).backbone.feature_cache is None  # off by default


def test_a_run_with_the_cache_equals_the_run_without(reference_run, tmp_path):
    from clcl_det.continual import ContinualRunner
    from clcl_det.engine import default_setup

    ref_out, ref_summary = reference_run
    cfg = tiny_cfg(str(tmp_path / "cached"), DETERMINISTIC="True")
    cfg.merge_from_list(["MODEL.CLIP.FEATURE_CACHE_MB", "256"])
    cfg.freeze()
    default_setup(cfg)
    runner = ContinualRunner(cfg)
    summary = runner.run()
    cache = runner.model.backbone.feature_cache
    assert cache.hits > 0 and cache.misses > 0  # images came again and were not encoded again
    assert same_state(final_state(ref_out), final_state(cfg.OUTPUT_DIR))
    assert summary["stages"] == ref_summary["stages"]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_process_grows_by_about_the_bytes_held():
    """Batches of seen and unseen images, as in training: the process must not grow far beyond the
    entries it holds (one small tensor per entry, interleaved with the encoder's temporaries,
    fragments the C heap until the process holds many times the cache's bytes)."""
    enc = _encoder()
    g = torch.Generator().manual_seed(3)
    pool = torch.rand(600, 3, 64, 64, generator=g)
    cache = FrozenFeatureCache(2**30)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        enc(pool[:8])  # the encoder's own first-call allocations are not the cache's
        start = _resident_bytes()
        for _ in range(50):
            cache(enc, pool[torch.randint(0, len(pool), (8,), generator=g)])
    assert cache.hits > 0 and len(cache) > 200
    grown = _resident_bytes() - start
    assert grown < 2 * cache.bytes + 32 * 2**20, (grown / 2**20, cache.bytes / 2**20)

"""Shared fixtures: a tiny Shapes set in a temp CLCL_DATASETS, tiny configs with random CLIP."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CLCL_TEST_THREADS", "2")))  # 1 per worker of tools/mutation_check.py


@pytest.fixture(autouse=True)
def _cudnn_defaults():
    """default_setup turns cuDNN benchmark mode on for non-deterministic runs; a test must not
    inherit it (on CUDA it would break the next test's bit-identity checks)."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A small Shapes dataset (24 train / 12 test images) generated once per session."""
    root = tmp_path_factory.mktemp("datasets")
    old = os.environ.get("CLCL_DATASETS")
    os.environ["CLCL_DATASETS"] = str(root)
    yield str(root)
    if old is None:
        os.environ.pop("CLCL_DATASETS", None)
    else:
        os.environ["CLCL_DATASETS"] = old


def tiny_cfg(output_dir: str = "", **overrides):
    """get_cfg() shrunk for fast CPU tests: random tiny CLIP, small Shapes spec, few iterations."""
    from clcl_det.config import get_cfg
    from clcl_det.config.tiny_run import tiny_run_overrides

    cfg = get_cfg()
    cfg.merge_from_list(tiny_run_overrides({"OUTPUT_DIR": output_dir or "./output/test"}))
    for k, v in overrides.items():
        cfg.merge_from_list([k, str(v)])
    return cfg


def two_box_batch(task, n: int = 2, seed: int = 0, first_class_step: int = 0):
    """`n` random 64-px images with the same two boxes each, labelled with classes of `task`: image i's
    first box is class `task.start + first_class_step * i`, its second `task.start + 2 + i`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
        boxes = torch.tensor([[4.0, 5.0, 30.0, 25.0], [35.0, 32.0, 60.0, 63.0]])
        out.append({"image": img, "boxes": boxes, "seed": 100 * seed + i,
                    "classes": torch.tensor([task.start + first_class_step * i, task.start + 2 + i])})
    return out


def run_tiny(cfg, resume: bool = False):
    """Freeze cfg, set up logging/seeds like tools/train_net.py, run the whole sequence."""
    from clcl_det.continual import ContinualRunner
    from clcl_det.engine import default_setup

    cfg.freeze()
    default_setup(cfg)
    return ContinualRunner(cfg, resume=resume).run()


@pytest.fixture(scope="session")
def reference_run(shapes_root, tmp_path_factory):
    """One uninterrupted deterministic F-ViT 10+10 run on the tiny setup (shared by tests)."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    summary = run_tiny(tiny_cfg(out, DETERMINISTIC="True"))
    return out, summary


def final_state(out: str, t: int = 2):
    from clcl_det.utils.checkpoint import load_checkpoint_file

    return load_checkpoint_file(os.path.join(out, f"task_{t}", "model_final.pth"))["model"]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

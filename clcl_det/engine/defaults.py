"""detectron2-style entry helpers: `default_argument_parser`, `setup_cfg`, `default_setup`,
plugin import and seeding."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import random
import sys
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from ..config import CfgNode, ConfigError, get_cfg, resolve_config_path
from ..embedded.clutter import ClutterSpec, ensure_clutter, register_clutter
from ..embedded.shapes import ShapesSpec, ensure_shapes, register_shapes
from ..embedded.tiny_clip import ensure_shapes_tiny
from ..modeling.clip.factory import PROJECT_PRETRAINED
from ..utils import comm
from ..utils.logger import setup_logger
from ..utils.seed import derive_seed

__all__ = ["default_argument_parser", "setup_cfg", "default_setup", "load_plugins", "seed_all_rng", "prepare_embedded_assets",
           "auto_scale_schedule"]

logger = logging.getLogger("clcl_det")


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """detectron2's arguments (`--config-file` also spelled `--config`), plus `--plugin`."""
    parser = argparse.ArgumentParser(
        epilog=epilog or (
            "Examples:\n  tools/train_net.py --config VOC_10+10.yaml\n"
            "  tools/train_net.py --config-file configs/clclip/clclip_shapes_10+10.yaml SOLVER.MAX_ITER 200\n"
            "  tools/train_net.py --config-file X.yaml --resume\n"
            "  tools/train_net.py --config-file X.yaml --num-gpus 8\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", "--config", dest="config_file", default="", metavar="FILE",
                        help="YAML config: a path, a path under configs/, or a file name unique under configs/")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUTPUT_DIR from its last checkpoint, whatever task it belongs to")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the trained tasks of OUTPUT_DIR "
                        "(or MODEL.WEIGHTS) without training")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per machine: GPUs, or CPU processes (gloo) on a machine without GPUs")
    parser.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine")
    parser.add_argument("--dist-url", default="auto", help="initialisation URL for torch.distributed "
                        "(auto = a free local port)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="python module or .py file imported in every process before building "
                             "(registers user methods); repeatable")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs (or KEY=VALUE), e.g. SOLVER.MAX_ITER 100")
    return parser


def load_plugins(plugins: Sequence[str], base_dirs: Sequence[str] = ()) -> List[Any]:
    """Import each plugin (a module name, or a .py file relative to cwd or `base_dirs`)."""
    modules = []
    for p in plugins:
        if p.endswith(".py"):
            candidates = [p] + [os.path.join(d, p) for d in base_dirs]
            path = next((c for c in candidates if os.path.isfile(c)), None)
            if path is None:
                raise ConfigError(f"plugin file '{p}' not found (looked in: {', '.join(candidates)})")
            name = "clcl_plugin_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
            if name in sys.modules:
                modules.append(sys.modules[name])
                continue
            spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(p)
            except ModuleNotFoundError as e:
                raise ConfigError(f"plugin module '{p}' cannot be imported: {e}") from None
        modules.append(module)
    return modules


def setup_cfg(config_file: str = "", opts: Sequence[str] = (), plugins: Sequence[str] = ()) -> CfgNode:
    """get_cfg() + plugins (their `add_config(cfg)` declares new keys) + the YAML file + overrides."""
    cfg = get_cfg()
    names = list(plugins)
    base_dirs: List[str] = []
    if config_file:
        config_file = resolve_config_path(config_file)
        base_dirs.append(os.path.dirname(os.path.abspath(config_file)))
        raw = CfgNode.load_yaml_with_base(config_file) or {}
        names = list(raw.get("PLUGINS", [])) + names
    opts = list(opts or [])
    if "PLUGINS" in opts[0::2]:
        value = CfgNode._decode_cfg_value(opts[opts.index("PLUGINS") + 1])
        names += list(value) if isinstance(value, (list, tuple)) else [value]
    names = list(dict.fromkeys(names))
    for module in load_plugins(names, base_dirs):
        if callable(getattr(module, "add_config", None)):
            module.add_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(opts)
    cfg.PLUGINS = names
    auto_scale_schedule(cfg)
    cfg.freeze()
    return cfg


def auto_scale_schedule(cfg: CfgNode) -> CfgNode:
    """detectron2's `DefaultTrainer.auto_scale_workers` for a batch: with SOLVER.SCALE_SCHEDULE and
    REFERENCE_BATCH > 0, a batch s = IMS_PER_BATCH / REFERENCE_BATCH times the reference trains
    MAX_ITER / s iterations (warm-up, absolute STEPS, CHECKPOINT_PERIOD and TEST.EVAL_PERIOD alike),
    so the run sees as many images; the lr is scaled by s in `build_optimizer`. Applied in place, once
    (SCALE_SCHEDULE is then False, so a second call or a reloaded config.yaml does not scale again)."""
    s = cfg.SOLVER
    if not s.SCALE_SCHEDULE or s.REFERENCE_BATCH <= 0 or s.IMS_PER_BATCH == s.REFERENCE_BATCH:
        return cfg
    scale = s.IMS_PER_BATCH / s.REFERENCE_BATCH
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    old = (s.MAX_ITER, s.WARMUP_ITERS)
    s.MAX_ITER = max(int(round(s.MAX_ITER / scale)), 1)
    s.WARMUP_ITERS = int(round(s.WARMUP_ITERS / scale))
    s.STEPS = tuple(m if m < 1 else int(round(m / scale)) for m in s.STEPS)  # fractions of MAX_ITER stay
    s.CHECKPOINT_PERIOD = max(int(round(s.CHECKPOINT_PERIOD / scale)), 1)
    if cfg.TEST.EVAL_PERIOD > 0:
        cfg.TEST.EVAL_PERIOD = max(int(round(cfg.TEST.EVAL_PERIOD / scale)), 1)
    s.SCALE_SCHEDULE = False  # applied: the dumped config.yaml holds the scaled schedule
    logger.info(f"SOLVER.SCALE_SCHEDULE: batch {s.IMS_PER_BATCH} = {scale:g} x REFERENCE_BATCH {s.REFERENCE_BATCH}: "
                f"MAX_ITER {old[0]} -> {s.MAX_ITER}, WARMUP_ITERS {old[1]} -> {s.WARMUP_ITERS}, lr x {scale:g}")
    if was_frozen:
        cfg.freeze()
    return cfg
def prepare_embedded_assets(cfg: CfgNode) -> None:
    """What the embedded datasets need before a model is built: the Shapes and Clutter names
    (`shapes_train`, `clutter_val`, ...) registered for `DATASETS.SHAPES` / `DATASETS.CLUTTER`, a
    dataset generated if the run uses it, the tiny CLIP built and cached if `MODEL.CLIP.PRETRAINED`
    is shapes-tiny (each done once)."""
    used = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    for prefix, spec, register, ensure in (("shapes", ShapesSpec.from_cfg(cfg), register_shapes, ensure_shapes),
                                           ("clutter", ClutterSpec.from_cfg(cfg), register_clutter, ensure_clutter)):
        names = register(spec, alias=True)
        if ({f"{prefix}_{s}" for s in names} | set(names.values())) & used:
            ensure(spec)
    if cfg.MODEL.CLIP.PRETRAINED == PROJECT_PRETRAINED:
        ensure_shapes_tiny(cfg)


def seed_all_rng(seed: int) -> int:
    """Seed python, numpy and torch with `derive_seed(seed)` (a negative seed: the run's drawn
    one); the seed used is returned."""
    seed = derive_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def default_setup(cfg: CfgNode, args: Optional[argparse.Namespace] = None) -> None:
    """Output directory, loggers (console on rank 0, a file per rank), seeds, determinism."""
    rank = comm.get_rank()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    for name in ("clcl_det", "fvcore"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name=name)
    logger.info(f"rank {rank} of {comm.get_world_size()}; torch {torch.__version__}, "
                f"{'CUDA ' + torch.version.cuda if torch.cuda.is_available() else 'CPU'}, "
                f"{torch.get_num_threads()} threads")
    if args is not None:
        logger.info(f"command line: {' '.join(sys.argv)}")
    seed_all_rng(derive_seed(cfg.SEED))
    torch.set_flush_denormal(True)  # denormal floats make CPU kernels many times slower
    # bit-identical runs need cuDNN's fixed algorithms; otherwise inputs are padded to one square
    # canvas, so the kernels benchmark mode tunes are reused (both flags are inert on a CPU)
    torch.backends.cudnn.benchmark = not cfg.DETERMINISTIC
    torch.backends.cudnn.deterministic = bool(cfg.DETERMINISTIC)
    torch.use_deterministic_algorithms(bool(cfg.DETERMINISTIC), warn_only=True)
    if cfg.DETERMINISTIC:
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

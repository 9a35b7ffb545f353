"""Engine: trainer, hooks, launch, entry helpers, stage evaluation."""
from .defaults import (auto_scale_schedule, default_argument_parser, default_setup, load_plugins,
                       prepare_embedded_assets, seed_all_rng, setup_cfg)
from .hooks import HOOK_REGISTRY, HookBase
from .launch import launch
from .trainer import NonFiniteLossError, TaskTrainer

__all__ = ["HOOK_REGISTRY", "HookBase", "NonFiniteLossError", "TaskTrainer", "auto_scale_schedule",
           "default_argument_parser", "default_setup", "launch", "load_plugins", "prepare_embedded_assets",
           "seed_all_rng", "setup_cfg"]

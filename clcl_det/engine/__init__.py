"""Engine: trainer, launch, entry helpers, stage evaluation."""
from .defaults import (default_argument_parser, default_setup, load_plugins, prepare_embedded_assets, seed_all_rng,
                       setup_cfg)
from .launch import launch
from .trainer import NonFiniteLossError, TaskTrainer

__all__ = ["NonFiniteLossError", "TaskTrainer", "default_argument_parser", "default_setup", "launch",
           "load_plugins", "prepare_embedded_assets", "seed_all_rng", "setup_cfg"]

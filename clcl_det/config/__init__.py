"""Configuration: `get_cfg()`, YAML with `_BASE_`, `KEY VALUE` overrides, `@configurable`."""
from .config import CfgNode, ConfigError, configurable, get_cfg, resolve_config_path

__all__ = ["CfgNode", "ConfigError", "configurable", "get_cfg", "resolve_config_path"]

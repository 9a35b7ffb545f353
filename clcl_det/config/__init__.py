"""Configuration: `get_cfg()`, YAML with `_BASE_`, `KEY VALUE` overrides, `@configurable`."""
from .config import CfgNode, ConfigError, configurable, get_cfg, register_config_extension, resolve_config_path

__all__ = ["CfgNode", "ConfigError", "configurable", "get_cfg", "register_config_extension", "resolve_config_path"]

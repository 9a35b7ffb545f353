"""Configuration: `get_cfg()`, YAML with `_BASE_`, `KEY VALUE` overrides, `@configurable`, and
`@register_config` for the keys a method declares next to its code."""
from .config import CfgNode, ConfigError, config_adders, configurable, get_cfg, register_config, resolve_config_path

__all__ = ["CfgNode", "ConfigError", "config_adders", "configurable", "get_cfg", "register_config",
           "resolve_config_path"]

"""Config node with friendly errors, `get_cfg()` and the `@configurable` decorator."""
from __future__ import annotations

import difflib
import functools
import importlib
import os
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml
from fvcore.common.config import CfgNode as _FvCfgNode

from .errors import UserError

__all__ = ["CfgNode", "ConfigError", "get_cfg", "configurable", "resolve_config_path", "register_config",
           "config_adders", "split_key_value_overrides"]


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key and the file."""


def _flatten_keys(node: "CfgNode", prefix: str = "") -> List[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        if isinstance(v, _FvCfgNode):
            keys.extend(_flatten_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def _closest_key(root: "CfgNode", key: str) -> Optional[str]:
    candidates = _flatten_keys(root)
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if match:
        return match[0]
    # fall back on the last component (e.g. a key put under the wrong node)
    leaf = key.split(".")[-1]
    leaves = {c.split(".")[-1]: c for c in candidates}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.7)
    return leaves[match[0]] if match else None


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list"}.get(type(v), type(v).__name__)


def _walk_and_check(default: "CfgNode", loaded: dict, prefix: str, root: "CfgNode", where: str) -> None:
    """Check every loaded key exists and has the default's type; coerce int->float and list->tuple."""
    for k, v in list(loaded.items()):
        full = f"{prefix}{k}"
        if k not in default:
            while isinstance(v, dict) and len(v) == 1:  # name the full key the user wrote
                (sub, v), = v.items()
                full = f"{full}.{sub}"
            hint = _closest_key(root, full)
            raise ConfigError(
                f"Unknown config key '{full}'{where}"
                + (f"; did you mean '{hint}'?" if hint
                   else "; see clcl_det/config/defaults.py and the methods' add_*_config functions")
            )
        d = default[k]
        if isinstance(d, _FvCfgNode):
            if not isinstance(v, dict):
                raise ConfigError(f"Config key '{full}'{where} is a group of keys, got {v!r}")
            _walk_and_check(d, v, full + ".", root, where)
            continue
        if isinstance(v, str) and not isinstance(d, str):  # YAML strings such as "(a, b)" as yacs reads them
            v = loaded[k] = root._decode_cfg_value(v)
        if isinstance(d, str) and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = loaded[k] = str(v)  # e.g. CONTINUAL.TASKS 20
        if isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool):
            loaded[k] = float(v)
        elif isinstance(d, tuple) and isinstance(v, list):
            loaded[k] = tuple(v)
        elif isinstance(d, list) and isinstance(v, tuple):
            loaded[k] = list(v)
        elif d is not None and v is not None and not isinstance(v, type(d)):
            raise ConfigError(
                f"Config key '{full}'{where} expects {_type_name(d)} (default {d!r}), got {v!r}"
            )


def split_key_value_overrides(opts: Iterable[str]) -> List[str]:
    """Overrides as KEY VALUE pairs; a `KEY=VALUE` item (as Hydra/mmdetection users write them)
    becomes the pair KEY VALUE."""
    out: List[str] = []
    for item in opts:
        item = str(item)
        key, eq, value = item.partition("=")
        # only at a key position: a value may contain '=' itself
        if eq and len(out) % 2 == 0 and key and all(p.isidentifier() for p in key.split(".")):
            out += [key, value]
        else:
            out.append(item)
    return out


class CfgNode(_FvCfgNode):
    """fvcore's CfgNode (yacs + `_BASE_`) with one-line errors naming the key, the file and the
    closest valid key; YAML only (never code)."""

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        if allow_unsafe:
            raise ConfigError("unsafe YAML loading is not supported: configs are plain YAML")
        if not str(cfg_filename).endswith((".yaml", ".yml")):
            raise ConfigError(f"Config file '{cfg_filename}' is not a .yaml file (configs are YAML only)")
        if not os.path.isfile(cfg_filename):
            raise ConfigError(f"Config file '{cfg_filename}' does not exist")
        try:
            loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=False)
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{cfg_filename}' is not valid YAML: {str(e).splitlines()[0]}") from None
        except FileNotFoundError as e:
            raise ConfigError(f"Config file '{cfg_filename}': _BASE_ file not found: {e.filename}") from None
        if loaded is None:
            return
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file '{cfg_filename}' must hold a mapping of keys, got {type(loaded).__name__}")
        loaded.pop("VERSION", None)
        _walk_and_check(self, loaded, "", self, f" in {cfg_filename}")
        self._assign(loaded)

    def merge_from_list(self, cfg_list: List[str]) -> None:
        cfg_list = split_key_value_overrides(cfg_list)
        if len(cfg_list) % 2 != 0:
            raise ConfigError(f"Overrides must be KEY VALUE pairs, got an odd number of items: {cfg_list}")
        nested: dict = {}
        for key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
            value = self._decode_cfg_value(raw)
            node = nested
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"Override '{key}' conflicts with another override")
            node[parts[-1]] = value
        _walk_and_check(self, nested, "", self, " (command-line override)")
        self._assign(nested)

    def _assign(self, values: dict) -> None:
        """Set checked values (see `_walk_and_check`) into this node."""
        if self.is_frozen():
            raise ConfigError("the config is frozen; call cfg.defrost() before changing it")
        for k, v in values.items():
            if isinstance(self[k], _FvCfgNode):
                self[k]._assign(v)
            else:
                self[k] = v


# -- method keys ------------------------------------------------------------------------------
# A method declares its keys next to its code, in a function `add_<method>_config(cfg)` (detectron2
# projects' `add_deeplab_config` style) decorated with `@register_config`; `get_cfg()` calls every
# registered function on a copy of the framework defaults. The config layer never imports a
# method: the in-tree methods are loaded by module name (BUILTIN_METHOD_MODULES), the way
# PLUGINS are, and register their functions when imported. A plugin's `add_config(cfg)` is called
# by `setup_cfg` (or it may use `@register_config` itself).
BUILTIN_METHOD_MODULES = ("clcl_det.modeling", "clcl_det.embedded")  # imported by get_cfg(): they register the in-tree keys
_CONFIG_ADDERS: "Dict[str, Callable[[CfgNode], None]]" = {}


def register_config(fn: Callable[["CfgNode"], None]) -> Callable[["CfgNode"], None]:
    """Decorator: `fn(cfg)` declares a method's keys (each with a one-line comment); `get_cfg()`
    calls it. Registering the same function again (a re-imported module) replaces it."""
    _CONFIG_ADDERS[f"{fn.__module__}.{fn.__qualname__}"] = fn
    return fn


def config_adders() -> List[Callable[["CfgNode"], None]]:
    """The registered key-declaring functions, in registration order."""
    _load_builtin_methods()
    return list(_CONFIG_ADDERS.values())


def _load_builtin_methods() -> None:
    for name in BUILTIN_METHOD_MODULES:
        importlib.import_module(name)


def get_cfg() -> CfgNode:
    """A fresh copy of the defaults (the embedded Shapes + tiny-CLIP F-ViT 10+10 setup) with the
    keys of every registered method."""
    from .defaults import _C

    cfg = _C.clone()
    for add in config_adders():
        add(cfg)
    return cfg


def _repo_configs_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def resolve_config_path(path: str, search_dirs: Optional[Iterable[str]] = None) -> str:
    """A config path as users write it: an existing file, a path relative to `configs/`, or a
    file name unique under `configs/` (e.g. `VOC_10+10.yaml`)."""
    if os.path.isfile(path):
        return path
    dirs = list(search_dirs) if search_dirs is not None else [os.path.join(os.getcwd(), "configs"), _repo_configs_dir()]
    for d in dirs:
        cand = os.path.join(d, path)
        if os.path.isfile(cand):
            return cand
    base = os.path.basename(path)
    sub = os.path.dirname(path)
    if sub.startswith("configs" + os.sep) or sub == "configs":
        sub = sub[len("configs"):].lstrip(os.sep)
    found = []
    if not sub:  # a bare file name: unique anywhere under configs/
        for d in dirs:
            for dirpath, _, files in os.walk(d):
                if base in files:
                    found.append(os.path.join(dirpath, base))
    found = sorted({os.path.realpath(f) for f in found})
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ConfigError(f"Config '{path}' is ambiguous: " + ", ".join(found))
    all_cfgs = sorted({os.path.relpath(os.path.join(dp, f), d) for d in dirs if os.path.isdir(d)
                       for dp, _, fs in os.walk(d) for f in fs if f.endswith(".yaml")})
    wanted = os.path.join(sub, base) if sub else path
    hint = difflib.get_close_matches(wanted, all_cfgs, n=1, cutoff=0.5)
    raise ConfigError(f"Config file '{path}' not found" + (f"; did you mean 'configs/{hint[0]}'?" if hint else ""))


def configurable(init_func: Callable) -> Callable:
    """Let `__init__` take either plain arguments or `(cfg, ...)`, mapped by `cls.from_config`."""

    @functools.wraps(init_func)
    def wrapped(self, *args, **kwargs):
        if args and isinstance(args[0], _FvCfgNode) or isinstance(kwargs.get("cfg"), _FvCfgNode):
            from_config = type(self).from_config
            explicit = from_config(*args, **kwargs)
            init_func(self, **explicit)
        else:
            init_func(self, *args, **kwargs)

    return wrapped

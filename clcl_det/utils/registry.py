"""Registry look-up with an error that names the config key and the valid choices."""
from __future__ import annotations

import difflib
from typing import Any

from fvcore.common.registry import Registry

__all__ = ["Registry", "lookup"]


def lookup(registry: Registry, name: str, config_key: str) -> Any:
    """The object registered under `name`, or a one-line error naming `config_key`."""
    if name in registry:
        return registry.get(name)
    known = sorted(k for k, _ in registry)
    hint = difflib.get_close_matches(name, known, n=1)
    from ..config import ConfigError

    raise ConfigError(
        f"{config_key} = '{name}' is not registered in {registry._name}"
        + (f"; did you mean '{hint[0]}'?" if hint else "")
        + f" (known: {', '.join(known)}; a plugin must be imported through PLUGINS or --plugin)"
    )

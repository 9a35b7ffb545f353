"""Where datasets live: one rule for every loader."""
import os

__all__ = ["datasets_root"]


def datasets_root() -> str:
    """$CLCL_DATASETS, default ./datasets (read at each call, so the variable can be set after import)."""
    return os.environ.get("CLCL_DATASETS", "datasets")

"""Command-line error handling: errors caused by the user's input print as one line."""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Tuple, Type

__all__ = ["user_errors", "run_cli"]


def user_errors() -> Tuple[Type[BaseException], ...]:
    """Exception types whose message says what is wrong and where (no traceback needed)."""
    from ..config import ConfigError
    from ..continual.loop import RunStateError
    from ..data.catalog import UnknownDatasetError
    from ..data.continual import SplitError
    from ..data.datasets.coco import COCOFormatError
    from ..data.datasets.voc import DatasetMissingError
    from ..data.mapper import ImageReadError
    from ..engine.trainer import NonFiniteLossError
    from .checkpoint import CheckpointError

    return (ConfigError, SplitError, DatasetMissingError, COCOFormatError, ImageReadError, CheckpointError,
            RunStateError, NonFiniteLossError, UnknownDatasetError)


def _child_error_line(e: BaseException) -> str:
    """The last line of a spawned worker's traceback ('SomeError: message')."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1] if lines else repr(e)


def run_cli(fn: Callable[[], Any]) -> int:
    """Run `fn`; a user error prints `clcl_det: error: <message>` and exits with status 2."""
    try:
        fn()
        return 0
    except KeyboardInterrupt:
        print("clcl_det: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted below
        names = {t.__name__ for t in user_errors()}
        if isinstance(e, user_errors()):
            msg = str(e)
        elif type(e).__name__ == "ProcessRaisedException" and _child_error_line(e).split(":")[0] in names:
            msg = _child_error_line(e).split(":", 1)[1].strip()
        else:
            raise
        logging.getLogger("clcl_det").debug("user error", exc_info=True)
        print(f"clcl_det: error: {msg}", file=sys.stderr)
        return 2

"""Command-line error handling: errors caused by the user's input print as one line.

Every such error derives from `UserError` (defined in the lowest layer, `clcl_det.config.errors`,
so that `ConfigError` can derive from it too). This module imports nothing above `config`: the
error types are found by subclassing, not by listing them here.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Set, Tuple, Type

from ..config.errors import UserError

__all__ = ["UserError", "user_errors", "run_cli"]


def user_errors() -> Tuple[Type[BaseException], ...]:
    """`UserError` and every subclass defined so far (names used to recognise a worker's error)."""
    found, todo = [], [UserError]
    while todo:
        t = todo.pop()
        if t not in found:
            found.append(t)
            todo.extend(t.__subclasses__())
    return tuple(found)


def _user_error_names() -> Set[str]:
    return {t.__name__ for t in user_errors()}


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
        if isinstance(e, UserError):
            msg = str(e)
        elif type(e).__name__ == "ProcessRaisedException" and \
                _child_error_line(e).split(":")[0].split(".")[-1] in _user_error_names():
            msg = _child_error_line(e).split(":", 1)[1].strip()
        else:
            raise
        logging.getLogger("clcl_det").debug("user error", exc_info=True)
        print(f"clcl_det: error: {msg}", file=sys.stderr)
        return 2

"""The base of every error caused by the user's input (configs, data, checkpoints, output folders).

It lives in the lowest layer so that `ConfigError` can derive from it too; import it from
`clcl_det.utils.errors`, next to the command-line handling that relies on it.
"""

__all__ = ["UserError"]


class UserError(Exception):
    """An error whose message says what is wrong and where (file, key, class): the command line
    prints the message as one line, without a traceback."""

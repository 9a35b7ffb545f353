"""fvcore's Checkpointer with atomic writes and `weights_only=True` loading; `atomic_write`, the
one writer behind every file the project writes whole (checkpoints, config.yaml, metrics, summaries,
plots, the tiny-CLIP weights). Its temporary files are `.<name>.<random>.tmp` beside the target."""
from __future__ import annotations

import errno
import glob
import logging
import os
import tempfile
from typing import IO, Any, Callable, Dict, List, Optional, Sequence

import torch
from fvcore.common.checkpoint import Checkpointer, PeriodicCheckpointer

from .errors import UserError

__all__ = ["DetectionCheckpointer", "PeriodicCheckpointer", "atomic_write", "atomic_write_bytes", "atomic_torch_save",
           "load_checkpoint_file", "check_fit", "CheckpointError", "TMP_PATTERN", "leftover_temp_files", "remove_leftover_temp_files"]

TMP_PATTERN = ".*.tmp"  # the name of every temporary file of `atomic_write` (`.<name>.<random>.tmp`)

logger = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(f)` on a binary temporary file beside `path`, fsync it and rename it to `path`:
    a file under its real name is always complete. On failure the temporary file is removed and the
    previous `path` is untouched (a full disk raises CheckpointError naming the file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on the device while writing {path}; "
                                  f"the previous files are untouched") from None
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file and `os.replace`: readers never see a partial file."""
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save` to `path` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def leftover_temp_files(root: str) -> List[str]:
    """Temporary files of `atomic_write` under `root` (left by a process killed while writing)."""
    return sorted(glob.glob(os.path.join(glob.escape(root), "**", TMP_PATTERN), recursive=True))


def remove_leftover_temp_files(root: str) -> int:
    """Delete `leftover_temp_files(root)` (the real files next to them are intact); their count."""
    found = leftover_temp_files(root)
    for tmp in found:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
    if found:
        logger.info(f"removed {len(found)} temporary file(s) of an interrupted write under {root}")
    return len(found)


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """`torch.load(..., weights_only=True)` on CPU, with a one-line error naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated zip, foreign objects
        raise CheckpointError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None


def check_fit(path: str, missing: Sequence[str], unexpected: Sequence[str], wrong_shape: Sequence[str] = ()) -> None:
    """Refuse (one line, a few keys named) a checkpoint `path` whose model state does not fit the model."""
    if not (missing or unexpected or wrong_shape):
        return

    def few(keys: Sequence[str]) -> str:
        return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
    shapes = f", keys of another shape {few(list(wrong_shape))}" if wrong_shape else ""
    raise CheckpointError(f"{path} does not fit the model of this config: missing keys {few(list(missing))}, "
                          f"unexpected keys {few(list(unexpected))}{shapes}")


class DetectionCheckpointer(Checkpointer):
    """Checkpoints are written atomically (tmp + fsync + rename, also the `last_checkpoint` tag)
    and loaded with `weights_only=True`; only plain tensors, numbers, strings and containers."""

    def save(self, name: str, **kwargs: Any) -> str:
        if not self.save_dir or not self.save_to_disk:
            return ""
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(f"{name}.pth")
        return path

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_bytes(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename.encode())

    def _load_file(self, f: str) -> Dict[str, Any]:
        self._loading: Optional[str] = f
        return load_checkpoint_file(f)

    def _load_model(self, checkpoint: Any) -> Any:
        """fvcore's loading, then a refusal if any key is missing, unexpected or of another shape."""
        incompatible = super()._load_model(checkpoint)
        shape = [k for k, *_ in incompatible.incorrect_shapes]  # fvcore drops them, so they are also 'missing'
        check_fit(getattr(self, "_loading", None) or "checkpoint", [k for k in incompatible.missing_keys if k not in shape],
                  incompatible.unexpected_keys, shape)
        return incompatible

"""fvcore's Checkpointer with atomic writes and `weights_only=True` loading."""
from __future__ import annotations

import errno
import logging
import os
import tempfile
from typing import Any, Dict

import torch
from fvcore.common.checkpoint import Checkpointer, PeriodicCheckpointer

from .errors import UserError

__all__ = ["DetectionCheckpointer", "PeriodicCheckpointer", "atomic_write_bytes", "atomic_torch_save",
           "load_checkpoint_file", "CheckpointError"]

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


def _atomic_write(path: str, write) -> None:
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
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save` to `path` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """`torch.load(..., weights_only=True)` on CPU, with a one-line error naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated zip, foreign objects
        raise CheckpointError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None


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
        return load_checkpoint_file(f)

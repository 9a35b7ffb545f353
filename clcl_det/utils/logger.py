"""Logging: one console handler on the main process, a log file per process in OUTPUT_DIR."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

__all__ = ["setup_logger"]

_FMT = "[%(asctime)s %(name)s %(levelname).1s] %(message)s"


def setup_logger(output_dir: Optional[str] = None, distributed_rank: int = 0, name: str = "clcl_det",
                 level: int = logging.INFO) -> logging.Logger:
    """Configure the package logger (idempotent): console on rank 0, `log.txt` (rank 0) or
    `log.txt.rank<r>` in `output_dir`."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(_FMT, datefmt="%m/%d %H:%M:%S")
    if distributed_rank == 0:
        ch = logging.StreamHandler(stream=sys.stdout)
        ch.setFormatter(fmt)
        logger.addHandler(ch)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        fname = "log.txt" if distributed_rank == 0 else f"log.txt.rank{distributed_rank}"
        fh = logging.FileHandler(os.path.join(output_dir, fname), mode="a")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger

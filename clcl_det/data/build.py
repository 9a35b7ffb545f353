"""Data loaders. Training batches are a pure function of (seed, task, iteration), sharded over
ranks: 2 processes x b images see exactly the images of 1 process x 2b, and a resumed run
continues with the very batches an uninterrupted run would have seen."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..utils import comm
from ..utils.errors import UserError
from ..utils.seed import derive_seed
from .catalog import DatasetCatalog
from .mapper import DatasetMapper, ImageReadError

__all__ = ["get_detection_dataset_dicts", "build_train_loader", "build_test_loader", "sanitize_dicts",
           "EmptyDatasetError"]

logger = logging.getLogger(__name__)


class EmptyDatasetError(UserError, ValueError):
    """A dataset (or a task's share of it) holds no usable image; the message names it."""


def sanitize_dicts(dicts: List[Dict[str, Any]], name: str) -> List[Dict[str, Any]]:
    """Clip boxes to their image and drop boxes of zero area, with one warning and counts."""
    clipped = dropped = 0
    for d in dicts:
        h, w = d["height"], d["width"]
        keep = []
        for a in d.get("annotations", []):
            x0, y0, x1, y1 = a["bbox"]
            c = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]
            if c != [x0, y0, x1, y1]:
                clipped += 1
                a = {**a, "bbox": c}
            if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
                dropped += 1
                continue
            keep.append(a)
        d["annotations"] = keep
    if clipped or dropped:
        logger.warning(f"dataset '{name}': clipped {clipped} box(es) to the image, dropped {dropped} of zero area")
    return dicts


def get_detection_dataset_dicts(names: Sequence[str]) -> List[Dict[str, Any]]:
    """Dataset dicts of the registered `names`, concatenated and sanitised."""
    if isinstance(names, str):
        names = [names]
    out: List[Dict[str, Any]] = []
    for n in names:
        dicts = DatasetCatalog.get(n)
        if not dicts:
            raise EmptyDatasetError(f"dataset '{n}' is empty (no image with a readable annotation)")
        out += sanitize_dicts(dicts, n)
    return out


def _sample_rng(seed: int, task: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, task, position])


class _TrainBatches(IterableDataset):
    """Infinite stream of this rank's mapped batches from `start_iter` on. Batch i takes global
    positions [i*B, (i+1)*B); position p is image perm_e[p mod N] of epoch e = p // N, where
    perm_e is a permutation seeded by (seed, task, e). Rank r maps its contiguous share."""

    def __init__(self, dicts: List[Dict[str, Any]], mapper: Callable, total_batch: int, seed: int, task: int,
                 start_iter: int, rank: int, world: int):
        if total_batch % world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH ({total_batch}) must be divisible by the number of processes ({world})")
        self.dicts, self.mapper = dicts, mapper
        self.total_batch, self.per_rank = total_batch, total_batch // world
        self.seed, self.task, self.start_iter, self.rank = seed, task, start_iter, rank
        self.skipped = 0
        self._perms: Dict[int, np.ndarray] = {}

    def _index(self, position: int) -> int:
        n = len(self.dicts)
        epoch = position // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed & 0xFFFFFFFF, self.task, epoch, 7]).permutation(n)}
        return int(self._perms[epoch][position % n])

    def _map(self, position: int) -> Dict[str, Any]:
        idx = self._index(position)
        for attempt in range(len(self.dicts)):  # an unreadable image is replaced by the next one
            d = self.dicts[(idx + attempt) % len(self.dicts)]
            try:
                return self.mapper(d, _sample_rng(self.seed, self.task, position))
            except ImageReadError as e:
                self.skipped += 1
                logger.warning(f"{e}; using the next image instead ({self.skipped} skipped so far)")
        raise ImageReadError("no readable training image")

    def batch(self, it: int) -> List[Dict[str, Any]]:
        first = it * self.total_batch + self.rank * self.per_rank
        return [self._map(p) for p in range(first, first + self.per_rank)]

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        it = self.start_iter + wid
        while True:
            yield self.batch(it)
            it += nw


def _list_collate(batch: Any) -> Any:
    return batch


def _pin_memory(cfg: Any) -> bool:
    """Page-locked batches only when they go to a GPU."""
    from ..utils.device import resolve_device

    return resolve_device(cfg.MODEL.DEVICE).type == "cuda"


def build_train_loader(cfg: Any, dicts: List[Dict[str, Any]], task: int = 0, start_iter: int = 0,
                       mapper: Optional[Callable] = None) -> DataLoader:
    """An infinite loader of this rank's training batches (lists of mapped dicts) from iteration
    `start_iter` on. With SOLVER.ACCUM_STEPS = k it yields k micro-batches per iteration, together
    the same images as one batch of IMS_PER_BATCH."""
    if not dicts:
        raise EmptyDatasetError(f"no training images for task {task + 1} (check DATASETS.TRAIN and CONTINUAL.TASKS)")
    mapper = mapper or DatasetMapper(cfg, is_train=True)
    k = max(int(cfg.SOLVER.ACCUM_STEPS), 1)
    if cfg.SOLVER.IMS_PER_BATCH % (k * comm.get_world_size()):
        from ..config import ConfigError

        raise ConfigError(f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by SOLVER.ACCUM_STEPS "
                          f"({k}) x the number of processes ({comm.get_world_size()})")
    ds = _TrainBatches(dicts, mapper, cfg.SOLVER.IMS_PER_BATCH // k, derive_seed(cfg.SEED), task, start_iter * k,
                       comm.get_rank(), comm.get_world_size())
    workers = 0 if cfg.DETERMINISTIC else cfg.DATALOADER.NUM_WORKERS
    return DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_list_collate,
                      persistent_workers=False, pin_memory=_pin_memory(cfg))


class _MappedList(Dataset):
    def __init__(self, dicts: List[Dict[str, Any]], mapper: Callable):
        self.dicts, self.mapper = dicts, mapper

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        try:
            return self.mapper(self.dicts[i])
        except ImageReadError as e:
            logger.warning(f"{e}; the image is left out of the evaluation")
            return {"image_id": self.dicts[i]["image_id"], "unreadable": True}


def build_test_loader(cfg: Any, dicts: List[Dict[str, Any]], mapper: Optional[Callable] = None) -> DataLoader:
    """This rank's contiguous shard of `dicts`, mapped for inference, in batches of TEST.IMS_PER_BATCH."""
    mapper = mapper or DatasetMapper(cfg, is_train=False)
    rank, world = comm.get_rank(), comm.get_world_size()
    per = (len(dicts) + world - 1) // world
    shard = dicts[rank * per:(rank + 1) * per]
    return DataLoader(_MappedList(shard, mapper), batch_size=cfg.TEST.IMS_PER_BATCH, shuffle=False,
                      num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=_list_collate, pin_memory=_pin_memory(cfg))


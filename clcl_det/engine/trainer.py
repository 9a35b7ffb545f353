"""Training of one task: optimizer, LR schedule, AMP, gradient clipping, periodic atomic
checkpoints, NaN/inf guard, and log lines with losses, time/iter and ETA."""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from fvcore.common.history_buffer import HistoryBuffer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..utils import comm
from ..utils.checkpoint import DetectionCheckpointer, PeriodicCheckpointer
from ..utils.optim import cosine_factor, decay_param_groups, warmup_factor

__all__ = ["TaskTrainer", "build_optimizer", "build_lr_scheduler", "NonFiniteLossError"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the iteration and the losses."""


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over trainable parameters; no weight decay on biases, norms and scalars."""
    lr = cfg.SOLVER.BASE_LR
    if cfg.SOLVER.REFERENCE_BATCH > 0:
        lr *= cfg.SOLVER.IMS_PER_BATCH / cfg.SOLVER.REFERENCE_BATCH
    groups = decay_param_groups(model, cfg.SOLVER.WEIGHT_DECAY)
    if cfg.SOLVER.OPTIMIZER == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.SOLVER.BETAS))
    if cfg.SOLVER.OPTIMIZER == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.SOLVER.MOMENTUM)
    raise ValueError(f"SOLVER.OPTIMIZER '{cfg.SOLVER.OPTIMIZER}' is not one of AdamW | SGD")


def lr_factor(cfg: Any, it: int) -> float:
    """Multiplier of the base LR at iteration `it`: linear warm-up then cosine / multistep / constant."""
    s = cfg.SOLVER
    if s.LR_SCHEDULER == "cosine":
        f = cosine_factor(it, s.MAX_ITER)
    elif s.LR_SCHEDULER == "multistep":
        f = s.GAMMA ** sum(it >= int(m * s.MAX_ITER) if m < 1 else it >= m for m in s.STEPS)
    elif s.LR_SCHEDULER == "constant":
        f = 1.0
    else:
        raise ValueError(f"SOLVER.LR_SCHEDULER '{s.LR_SCHEDULER}' is not one of cosine | multistep | constant")
    return f * warmup_factor(it, s.WARMUP_ITERS, s.WARMUP_FACTOR)


def build_lr_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))


class TaskTrainer:
    """Runs SOLVER.MAX_ITER iterations of one task on `model` (wrapped in DDP when distributed).

    `data_fn(start_iter)` gives an iterator of this rank's batches from `start_iter` on. The
    periodic checkpoints (model, optimizer, scheduler, iteration) go to `output_dir`.
    """

    def __init__(self, cfg: Any, model: nn.Module, data_fn: Callable[[int], Iterable], output_dir: str,
                 extra_meta: Optional[Dict[str, Any]] = None, hooks: Optional[List[Callable[[int], None]]] = None):
        self.cfg = cfg
        self.model = model
        self.data_fn = data_fn
        self.output_dir = output_dir
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.extra_meta = dict(extra_meta or {})
        self.hooks = hooks or []
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.checkpointer = DetectionCheckpointer(model, output_dir, save_to_disk=comm.is_main_process(),
                                                  optimizer=self.optimizer, scheduler=self.scheduler)
        self.periodic = PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=None,
                                             max_to_keep=2, file_prefix="model")
        self.device = getattr(model, "device", torch.device("cpu"))
        self.use_amp = bool(cfg.SOLVER.AMP) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_iter = 0
        self.history: Dict[str, HistoryBuffer] = {}

    def resume(self, path: str) -> None:
        """Continue from a periodic checkpoint (model, optimizer, scheduler, iteration)."""
        extra = self.checkpointer.load(path)
        self.start_iter = int(extra["iteration"]) + 1
        logger.info(f"resuming at iteration {self.start_iter} from {path}")

    def _wrapped(self) -> nn.Module:
        if comm.get_world_size() == 1:
            return self.model
        dev = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=dev, find_unused_parameters=True)

    def _check_finite(self, it: int, losses: Dict[str, torch.Tensor]) -> None:
        bad = [k for k, v in losses.items() if not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLossError(
                f"iteration {it}: non-finite loss {', '.join(f'{k}={float(losses[k].detach())}' for k in bad)}; training "
                f"stopped, the last good checkpoint in {self.output_dir} is kept (lower SOLVER.BASE_LR or check the data)"
            )

    def _log(self, it: int, data_time: float, iter_time: float, start_time: float) -> None:
        done = it + 1 - self.start_iter
        med = {k: h.median(self.cfg.SOLVER.LOG_PERIOD) for k, h in self.history.items()}
        per_iter = (time.perf_counter() - start_time) / max(done, 1)
        eta = datetime.timedelta(seconds=int(per_iter * (self.max_iter - it - 1)))
        loss_str = "  ".join(f"{k}: {v:.4g}" for k, v in med.items() if k.startswith("loss"))
        lr = self.optimizer.param_groups[0]["lr"]
        logger.info(f"{self.extra_meta.get('label', '')}iter: {it + 1}/{self.max_iter}  total_loss: "
                    f"{sum(v for k, v in med.items() if k.startswith('loss')):.4g}  {loss_str}  "
                    f"time: {iter_time:.3f}  data_time: {data_time:.3f}  lr: {lr:.3g}  eta: {eta}")
        if comm.is_main_process():
            with open(os.path.join(self.output_dir, "train_metrics.jsonl"), "a") as f:
                f.write(json.dumps({"iteration": it, "lr": lr, "time": iter_time, **med}) + "\n")

    def train(self) -> None:
        if self.start_iter >= self.max_iter:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        model = self._wrapped()
        model.train()
        clip = self.cfg.SOLVER.CLIP_GRAD_NORM
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        data_iter = iter(self.data_fn(self.start_iter))
        start = time.perf_counter()
        logger.info(f"{self.extra_meta.get('label', '')}training iterations {self.start_iter}..{self.max_iter - 1}")
        for it in range(self.start_iter, self.max_iter):
            t0 = time.perf_counter()
            batch = next(data_iter)
            t1 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                losses = model(batch)
            self._check_finite(it, losses)
            total = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            t2 = time.perf_counter()
            for k, v in comm.reduce_dict({k: v.detach() for k, v in losses.items()}).items():
                self.history.setdefault(k, HistoryBuffer()).update(float(v))
            if (it + 1) % self.cfg.SOLVER.LOG_PERIOD == 0 or it == self.max_iter - 1 or it == self.start_iter:
                self._log(it, t1 - t0, t2 - t0, start)
            self.periodic.step(it, **self.extra_meta.get("checkpoint", {}))
            for hook in self.hooks:
                hook(it)
        comm.synchronize()

"""Training of one task: optimizer, LR schedule, AMP (fp16 / bf16), gradient accumulation,
gradient clipping, periodic atomic checkpoints, NaN/inf guard, hooks, and log lines with losses,
time/iter, the task's ETA and the run's ETA."""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from fvcore.common.history_buffer import HistoryBuffer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..utils import comm
from ..utils.checkpoint import DetectionCheckpointer, PeriodicCheckpointer
from ..utils.errors import UserError
from ..utils.optim import cosine_factor, decay_param_groups, warmup_factor
from .hooks import CallbackHook, HookBase

__all__ = ["TaskTrainer", "build_optimizer", "build_lr_scheduler", "NonFiniteLossError", "task_schedule",
           "unused_parameters", "amp_settings", "eval_autocast"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError, FloatingPointError):
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


def task_schedule(cfg: Any, num_images: int) -> Any:
    """The config of one task's schedule: with SOLVER.EPOCHS > 0 the task runs
    ceil(EPOCHS * num_images / IMS_PER_BATCH) iterations, and WARMUP_ITERS and absolute STEPS
    (given at the reference length SOLVER.MAX_ITER) scale with it; else `cfg` itself."""
    s = cfg.SOLVER
    if s.EPOCHS <= 0:
        return cfg
    if num_images <= 0:
        raise ValueError("SOLVER.EPOCHS: the task has no training images to count epochs over")
    iters = max(1, math.ceil(s.EPOCHS * num_images / s.IMS_PER_BATCH))
    ratio = iters / max(s.MAX_ITER, 1)
    out = cfg.clone()
    out.defrost()
    out.SOLVER.MAX_ITER = iters
    out.SOLVER.WARMUP_ITERS = int(round(s.WARMUP_ITERS * ratio))
    out.SOLVER.STEPS = tuple(m if m < 1 else max(1, int(round(m * ratio))) for m in s.STEPS)
    if cfg.is_frozen():
        out.freeze()
    return out


def build_lr_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))


def unused_parameters(model: nn.Module, batch: Any, amp_dtype: Optional[torch.dtype] = None) -> List[str]:
    """Names of the trainable parameters that get no gradient from the loss of `batch` (one
    forward/backward, under autocast to `amp_dtype` like a training step when given; gradients are
    cleared, buffers (e.g. running statistics) and the CPU and CUDA RNG states restored afterwards)."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            losses = model(batch)
        sum(losses.values()).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers and b.shape == buffers[n].shape:
                b.copy_(buffers[n])
    return names


def _amp_dtype(cfg: Any) -> torch.dtype:
    name = cfg.SOLVER.AMP_DTYPE
    if name not in ("float16", "bfloat16"):
        from ..config import ConfigError

        raise ConfigError(f"SOLVER.AMP_DTYPE '{name}' is not one of float16 | bfloat16")
    return getattr(torch, name)


def amp_settings(cfg: Any, device: torch.device) -> Tuple[bool, torch.dtype]:
    """Whether training on `device` runs under autocast, and to which dtype: SOLVER.AMP with
    float16 on CUDA only, bfloat16 on CUDA and CPU."""
    dtype = _amp_dtype(cfg)
    return bool(cfg.SOLVER.AMP) and (device.type == "cuda" or dtype == torch.bfloat16), dtype


def eval_autocast(cfg: Any, device: torch.device) -> Any:
    """The autocast context evaluation runs in: the training one when TEST.AMP, else none."""
    enabled, dtype = amp_settings(cfg, device)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled and bool(cfg.TEST.AMP))


class _ScalerState:
    """The trainer's GradScaler as a checkpointable: its state (empty when fp16 scaling is off) is
    saved, and restored into an enabled scaler, so an fp16 resume keeps its loss scale."""

    def __init__(self, trainer: "TaskTrainer"):
        self.trainer = trainer

    def state_dict(self) -> Dict[str, Any]:
        return self.trainer.scaler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state and self.trainer.scaler.is_enabled():
            self.trainer.scaler.load_state_dict(state)


class TaskTrainer:
    """Runs SOLVER.MAX_ITER iterations of one task on `model` (wrapped in DDP when distributed).

    `data_fn(start_iter)` gives an iterator of this rank's batches from `start_iter` on; with
    SOLVER.ACCUM_STEPS = k each iteration takes k of them (micro-batches of IMS_PER_BATCH / k images,
    see `build_train_loader`) and steps the optimizer once on their mean loss. The periodic
    checkpoints (model, optimizer, scheduler, iteration) go to `output_dir`. `hooks` are
    `HookBase` objects (or plain functions of the iteration, called after each step). The
    checkpoints also hold the fp16 GradScaler's state.
    """

    def __init__(self, cfg: Any, model: nn.Module, data_fn: Callable[[int], Iterable], output_dir: str,
                 extra_meta: Optional[Dict[str, Any]] = None,
                 hooks: Optional[List[Any]] = None):
        self.cfg = cfg
        self.model = model
        self.data_fn = data_fn
        self.output_dir = output_dir
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.extra_meta = dict(extra_meta or {})
        self.task_index = int(self.extra_meta.get("checkpoint", {}).get("task", 0))
        self.hooks: List[HookBase] = [h if isinstance(h, HookBase) else CallbackHook(h) for h in (hooks or [])]
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.checkpointer = DetectionCheckpointer(model, output_dir, save_to_disk=comm.is_main_process(),
                                                  optimizer=self.optimizer, scheduler=self.scheduler,
                                                  scaler=_ScalerState(self))
        self.periodic = PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=None,
                                             max_to_keep=2, file_prefix="model")
        self.device = getattr(model, "device", torch.device("cpu"))
        self.use_amp, self.amp_dtype = amp_settings(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
                                           and self.device.type == "cuda")
        self.accum = int(cfg.SOLVER.ACCUM_STEPS)
        if self.accum < 1:
            from ..config import ConfigError

            raise ConfigError(f"SOLVER.ACCUM_STEPS must be >= 1, got {self.accum}")
        self.start_iter = 0
        self.iter = 0
        self.latest: Dict[str, float] = {}
        self.history: Dict[str, HistoryBuffer] = {}
        # seconds per iteration (data + step) and of loading its batch; logged as medians over LOG_PERIOD
        self.timing: Dict[str, HistoryBuffer] = {"time": HistoryBuffer(), "data_time": HistoryBuffer()}

    def resume(self, path: str) -> None:
        """Continue from a periodic checkpoint (model, optimizer, scheduler, iteration)."""
        extra = self.checkpointer.load(path)
        self.start_iter = int(extra["iteration"]) + 1
        logger.info(f"resuming at iteration {self.start_iter} from {path}")

    def _find_unused(self, batch: Any) -> bool:
        mode = str(self.cfg.SOLVER.FIND_UNUSED_PARAMETERS)
        if mode not in ("auto", "on", "off"):
            from ..config import ConfigError

            raise ConfigError(f"SOLVER.FIND_UNUSED_PARAMETERS '{mode}' is not one of auto | on | off")
        if mode != "auto":
            return mode == "on"
        unused = unused_parameters(self.model, batch, self.amp_dtype if self.use_amp else None)
        flag = torch.tensor([float(bool(unused))], device=self._comm_device())
        torch.distributed.all_reduce(flag)
        if unused:
            logger.info(f"DDP: {len(unused)} trainable parameter(s) get no gradient (e.g. {unused[0]}); "
                        f"find_unused_parameters on")
        return bool(flag.item() > 0)

    def _wrapped(self, first_batch: Any = None) -> nn.Module:
        if comm.get_world_size() == 1:
            return self.model
        dev = [self.device.index] if self.device.type == "cuda" else None
        # no buffer broadcast: buffers the forward updates are combined over ranks after each step
        # (comm.all_reduce_training_statistics), the others are equal on every rank
        return DistributedDataParallel(self.model, device_ids=dev, broadcast_buffers=False,
                                       find_unused_parameters=self._find_unused(first_batch))

    def _comm_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def _check_finite(self, it: int, losses: Dict[str, torch.Tensor]) -> None:
        """Before the backward pass: each rank's non-finite flags (rank x loss) are summed over
        ranks and read once, so a NaN on any rank stops every rank at once with the same error."""
        names, world, rank = sorted(losses), comm.get_world_size(), comm.get_rank()
        bad = torch.stack([~torch.isfinite(losses[k].detach()).all() for k in names]).float()
        if world > 1:
            flags = torch.zeros(world, len(names), device=self._comm_device())
            flags[rank] = bad.to(flags.device)
            torch.distributed.all_reduce(flags)
        else:
            flags = bad[None]
        if not bool(flags.any()):  # the one host sync of the check
            return
        where = "; ".join(", ".join(f"{k}={float(losses[k].detach())}" if r == rank else k
                                    for k, f in zip(names, row) if f) + f" on rank {r}"
                          for r, row in enumerate(flags.bool().tolist()) if any(row))
        raise NonFiniteLossError(
            f"iteration {it}: non-finite loss {where}; training stopped on every rank, the last good checkpoint "
            f"in {self.output_dir} is kept (lower SOLVER.BASE_LR or check the data)")

    def _log(self, it: int, start_time: float) -> None:
        done = it + 1 - self.start_iter
        window = self.cfg.SOLVER.LOG_PERIOD
        med = {k: h.median(window) for k, h in self.history.items()}
        iter_time, data_time = (self.timing[k].median(window) for k in ("time", "data_time"))
        per_iter = (time.perf_counter() - start_time) / max(done, 1)
        eta = datetime.timedelta(seconds=int(per_iter * (self.max_iter - it - 1)))
        after = int(self.extra_meta.get("iters_after_task", 0))  # training iterations of the later tasks
        run_eta = f"  run_eta: {datetime.timedelta(seconds=int(per_iter * (self.max_iter - it - 1 + after)))}" \
            if after else ""
        loss_str = "  ".join(f"{k}: {v:.4g}" for k, v in med.items() if k.startswith("loss"))
        lr = self.optimizer.param_groups[0]["lr"]
        logger.info(f"{self.extra_meta.get('label', '')}iter: {it + 1}/{self.max_iter}  total_loss: "
                    f"{sum(v for k, v in med.items() if k.startswith('loss')):.4g}  {loss_str}  "
                    f"time: {iter_time:.3f}  data_time: {data_time:.3f}  lr: {lr:.3g}  eta: {eta}{run_eta}")
        if comm.is_main_process():
            with open(os.path.join(self.output_dir, "train_metrics.jsonl"), "a") as f:
                f.write(json.dumps({"task": self.task_index + 1, "iteration": it, "lr": lr, "time": iter_time,
                                    "data_time": data_time, **med}) + "\n")

    def _step(self, model: nn.Module, it: int, batches: List[Any], params: List[torch.nn.Parameter]) -> Dict[str, float]:
        """One optimizer step over `batches` (ACCUM_STEPS micro-batches): the mean of their losses."""
        self.optimizer.zero_grad(set_to_none=True)
        sums: Dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) \
                else model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    losses = model(batch)
                self._check_finite(it, losses)
                total = sum(losses.values()) / len(batches)
                self.scaler.scale(total).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / len(batches)
        clip = self.cfg.SOLVER.CLIP_GRAD_NORM
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {k: float(v) for k, v in comm.reduce_dict(sums).items()}

    def train(self) -> None:
        if self.start_iter >= self.max_iter:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        self.model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        data_iter = iter(self.data_fn(self.start_iter))
        pending = [next(data_iter) for _ in range(self.accum)]
        model = self._wrapped(pending[0])
        for h in self.hooks:
            h.trainer = self
        start = time.perf_counter()
        logger.info(f"{self.extra_meta.get('label', '')}training iterations {self.start_iter}..{self.max_iter - 1}"
                    + (f" ({self.accum} accumulated micro-batches each)" if self.accum > 1 else ""))
        for it in range(self.start_iter, self.max_iter):
            self.iter = it
            t0 = time.perf_counter()
            batches = pending if it == self.start_iter else [next(data_iter) for _ in range(self.accum)]
            t1 = time.perf_counter()
            for h in self.hooks:
                h.before_step()
            stats = comm.snapshot_training_statistics(self.model)  # buffers the forward updates ({} in 1 process)
            self.latest = self._step(model, it, batches, params)
            comm.all_reduce_training_statistics(self.model, stats)  # every process's updates, not rank 0's
            t2 = time.perf_counter()
            for k, v in self.latest.items():
                self.history.setdefault(k, HistoryBuffer()).update(v)
            self.timing["time"].update(t2 - t0)
            self.timing["data_time"].update(t1 - t0)
            if (it + 1) % self.cfg.SOLVER.LOG_PERIOD == 0 or it == self.max_iter - 1 or it == self.start_iter:
                self._log(it, start)
            self.periodic.step(it, **self.extra_meta.get("checkpoint", {}))
            for h in self.hooks:
                h.after_step()
        comm.synchronize()

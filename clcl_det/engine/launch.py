"""Multi-process launch: `launch()` spawns one process per device (gloo on CPU, nccl on GPU);
processes started by `torchrun` are recognised from their environment."""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils import comm

__all__ = ["launch", "find_free_port", "init_from_torchrun_env"]

logger = logging.getLogger(__name__)


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_torchrun_env() -> bool:
    """If started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK set), join its process group."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(_backend(), init_method="env://", timeout=timedelta(minutes=30))
    comm.set_local_rank(local_rank)
    return True


def _worker(local_rank: int, main_func: Callable, world_size: int, procs_per_machine: int, machine_rank: int,
            dist_url: str, args: Tuple[Any, ...]) -> None:
    rank = machine_rank * procs_per_machine + local_rank
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(_backend(), init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=timedelta(minutes=30))
    comm.set_local_rank(local_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: Tuple[Any, ...] = ()) -> Any:
    """Run `main_func(*args)` in `num_gpus_per_machine * num_machines` processes (one per device;
    on a CPU machine `num_gpus_per_machine` counts CPU processes), or directly if that is 1 or
    if the processes were started by torchrun."""
    if init_from_torchrun_env():
        return main_func(*args)
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url=auto only works on one machine; pass tcp://<master>:<port>")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} GPUs are visible")
    mp.start_processes(_worker, nprocs=num_gpus_per_machine, start_method="spawn",
                       args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args))

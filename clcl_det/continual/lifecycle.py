"""The one dispatcher of the continual life cycle (see `clcl_det.modeling.continual_module`).

Every hook call of a run goes through these functions: the loop, resume, evaluation and tools
call `begin_task(model, task)`, `end_task(model, task)`, `task_data(model, task, make_loader)` and
`needs_teacher(model)`; nothing else calls a hook.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, List

import torch
from torch import nn

from ..data.continual import Task
from ..utils.errors import UserError
from ..modeling.continual_module import HOOKS, ContinualModule, LifeCycleOptOut

__all__ = ["continual_modules", "begin_task", "end_task", "task_data", "needs_teacher", "LifeCycleError"]


class LifeCycleError(UserError, TypeError):
    """A module defines life-cycle hooks without declaring the contract."""


def _walk(module: nn.Module) -> Iterator[nn.Module]:
    """`module.modules()` order (pre-order, each module once), without opted-out subtrees."""
    seen = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen or isinstance(m, LifeCycleOptOut):
            continue
        seen.add(id(m))
        yield m
        stack.extend(reversed([c for c in m.children()]))


def continual_modules(model: nn.Module) -> List[ContinualModule]:
    """The modules whose hooks run, in `model.modules()` order; a module defining a hook without
    subclassing `ContinualModule` is an error (it would silently never be called)."""
    found = []
    for m in _walk(model):
        if isinstance(m, ContinualModule):
            found.append(m)
            continue
        stray = [h for h in HOOKS + ("needs_teacher",) if hasattr(type(m), h)]
        if stray:
            raise LifeCycleError(f"{type(m).__module__}.{type(m).__qualname__} defines {', '.join(stray)} but does "
                                 f"not subclass clcl_det.modeling.ContinualModule: its hooks would never run")
    return found


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def begin_task(model: nn.Module, task: Task) -> None:
    """`on_task_start` of every continual module (the detector first: its vocabulary grows to
    the task's classes), then whatever they created is moved to the model's device."""
    device = _device(model)
    for m in continual_modules(model):
        m.on_task_start(task, model)
    model.to(device)


def end_task(model: nn.Module, task: Task) -> None:
    """`on_task_end` of every continual module."""
    for m in continual_modules(model):
        m.on_task_end(task, model)


def task_data(model: nn.Module, task: Task, make_loader: Callable[[], Iterable]) -> None:
    """`on_task_data` of every continual module that overrides it, each with a fresh loader over
    the task's training images (none is made when no module needs one)."""
    for m in continual_modules(model):
        if type(m).on_task_data is not ContinualModule.on_task_data:
            m.on_task_data(task, model, make_loader())


def needs_teacher(model: nn.Module) -> bool:
    """Whether some continual module declares `needs_teacher`."""
    return any(m.needs_teacher for m in continual_modules(model))

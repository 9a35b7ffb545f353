"""The continual contract: what a module may do between tasks.

A module takes part in the continual life cycle by subclassing `ContinualModule` and overriding
some of its hooks; `clcl_det.continual.lifecycle` (the one dispatcher) calls them on every
`ContinualModule` of the model, in `model.modules()` order:

- `on_task_start(task, model)`: before task `task` trains (create per-class state, grow);
- `on_task_end(task, model)`: after it trained (freeze what it learned);
- `on_task_data(task, model, loader)`: after `on_task_end`, with a loader over the task's training
  images (statistics of what was learned);
- `needs_teacher`: class attribute; True makes the loop keep the previous task's frozen model and
  hand it to continual losses as a `TeacherOutputs` view.

A subclass defining a method whose name looks like a hook but is not one (`on_task_strat`,
`on_task_finish`, `need_teacher`), or a hook with the wrong number of arguments, fails when the
class is defined. A subtree that must take no part (e.g. frozen snapshots of a head) derives from
`LifeCycleOptOut`.
"""
from __future__ import annotations

import difflib
import inspect
from typing import TYPE_CHECKING, Iterable

from torch import nn

from ..utils.errors import UserError

if TYPE_CHECKING:  # data is a lower layer; imported for the annotations only
    from ..data.continual import Task

__all__ = ["ContinualModule", "LifeCycleOptOut", "HOOKS", "HookNameError"]

HOOKS = ("on_task_start", "on_task_data", "on_task_end")
_HOOK_ARGS = {"on_task_start": ("task", "model"), "on_task_end": ("task", "model"),
              "on_task_data": ("task", "model", "loader")}
_CONTRACT_NAMES = HOOKS + ("needs_teacher",)


class HookNameError(UserError, TypeError):
    """A class defines something that looks like a life-cycle hook but is not one."""


def _check_contract(cls: type) -> None:
    """Fail on misspelt hook names and hooks that cannot take the dispatcher's arguments."""
    for name, value in vars(cls).items():
        if name in _HOOK_ARGS:
            if not callable(value):
                raise HookNameError(f"{cls.__module__}.{cls.__qualname__}.{name} must be a method")
            try:
                inspect.signature(value).bind(None, *_HOOK_ARGS[name])
            except TypeError:
                raise HookNameError(
                    f"{cls.__module__}.{cls.__qualname__}.{name} must take (self, "
                    f"{', '.join(_HOOK_ARGS[name])})") from None
            continue
        if name in _CONTRACT_NAMES or name.startswith("__"):
            continue
        close = difflib.get_close_matches(name, _CONTRACT_NAMES, n=1, cutoff=0.8)
        if name.startswith("on_task") or close:
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise HookNameError(
                f"{cls.__module__}.{cls.__qualname__}.{name} is not a continual hook{hint} "
                f"(hooks: {', '.join(HOOKS)}; attribute: needs_teacher)")


class ContinualModule(nn.Module):
    """Base class of every module with continual state (heads, continual losses, the detector).
    The hooks do nothing by default; override the ones the module needs."""

    needs_teacher: bool = False  # the loop keeps the previous task's frozen model for this module

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _check_contract(cls)

    def on_task_start(self, task: "Task", model: nn.Module) -> None:
        """Before `task` trains: create the state of its new classes."""

    def on_task_end(self, task: "Task", model: nn.Module) -> None:
        """After `task` trained: freeze or summarise what it learned."""

    def on_task_data(self, task: "Task", model: nn.Module, loader: Iterable) -> None:
        """After `on_task_end`: a pass over the task's training images (eval-mode mapping)."""


class LifeCycleOptOut:
    """Mixin for containers of frozen copies (e.g. SG-AKT's head snapshots): the dispatcher skips
    this module and everything under it, so copies of continual modules never grow, freeze or
    collect statistics."""

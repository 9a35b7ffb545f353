"""The continual task loop and the one dispatcher of the life-cycle hooks."""
from .lifecycle import LifeCycleError, begin_task, continual_modules, end_task, needs_teacher, task_data
from .loop import ContinualRunner, RunStateError

__all__ = ["ContinualRunner", "RunStateError", "LifeCycleError", "begin_task", "continual_modules", "end_task",
           "needs_teacher", "task_data"]

"""The continual task loop, the one dispatcher of the life-cycle hooks, and the predictor of a
trained task."""
from .lifecycle import LifeCycleError, begin_task, continual_modules, end_task, needs_teacher, task_data
from .loop import ContinualRunner, RunStateError
from .predictor import Predictor

__all__ = ["ContinualRunner", "Predictor", "RunStateError", "LifeCycleError", "begin_task", "continual_modules", "end_task",
           "needs_teacher", "task_data"]

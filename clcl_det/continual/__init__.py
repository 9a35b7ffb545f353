"""The continual task loop."""
from .loop import ContinualRunner, RunStateError

__all__ = ["ContinualRunner", "RunStateError"]

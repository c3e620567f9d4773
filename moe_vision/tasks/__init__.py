"""Task types (one module each: head, loss, postprocess, evaluator) and the generalist model."""
from . import cls, depth, det, seg  # noqa: F401  (register the task types)
from .base import TASK_TYPES, Evaluator, Task, build_task, register_task
from .generalist import GeneralistModel

__all__ = ["TASK_TYPES", "Evaluator", "GeneralistModel", "Task", "build_task", "register_task"]

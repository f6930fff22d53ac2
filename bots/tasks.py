"""Celery tasks of the bots package (importing this module registers them)."""

from bots.memory_tasks import fold_memory
from bots.pipeline import reply

__all__ = ["fold_memory", "reply"]

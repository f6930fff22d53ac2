"""Celery tasks of the bots package (importing this module registers them)."""

from bots.pipeline import reply

__all__ = ["reply"]

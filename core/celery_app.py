"""The Celery app object and its configuration (Redis broker, at-least-once, state in Postgres).

Lanes: ``conversations`` (prefork; moderation is CPU-bound), ``send`` (threads; waits on HTTP),
``maintenance`` (prefork, concurrency 1). Tasks are routed by name, so the API can enqueue a task
by name without importing the package that implements it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from core.config import Settings, get_settings

QUEUES = ("conversations", "send", "maintenance")

ROUTES: dict[str, dict[str, str]] = {
    "webhooks.send*": {"queue": "send"},
    "jobs.*": {"queue": "maintenance"},
    "maintenance.*": {"queue": "maintenance"},
    "bots.*": {"queue": "conversations"},
}

celery_app = Celery("parley")


def broker_url(redis_url: str) -> str:
    """Celery reaches a Redis unix socket as ``redis+socket://``; redis-py calls it ``unix://``."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility = settings.celery_visibility_timeout
    transport: dict[str, Any] = {
        "visibility_timeout": visibility,
        "socket_connect_timeout": 2,
        "socket_timeout": 10,
    }
    if settings.redis_prefix:
        transport["global_keyprefix"] = settings.redis_prefix
    return {
        "broker_url": broker_url(settings.require_redis_url()),
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 2,
        "task_default_queue": "conversations",
        "task_routes": ROUTES,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "task_time_limit": settings.celery_task_time_limit,
        "task_soft_time_limit": settings.celery_task_soft_time_limit,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": 20,
        "worker_max_tasks_per_child": 1000,
        "worker_enable_remote_control": False,
        "task_create_missing_queues": True,
        "beat_schedule": {
            "jobs.relay": {"task": "jobs.relay", "schedule": settings.outbox_relay_interval},
        },
    }


def configure_celery(settings: Settings | None = None) -> Celery:
    celery_app.conf.update(celery_config(settings or get_settings()))
    return celery_app

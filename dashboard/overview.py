"""The platform at a glance, read from the sources of truth — Postgres counts, Redis list
lengths and the inference pool's health checks — never from Prometheus.

Everything is scoped to one workspace when ``workspace_id`` is given (the dashboard's view);
``None`` is the operator's view of the whole install (``parley status``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.celery_app import QUEUES
from core.config import Settings
from core.models import ChannelAccount, Message, OutboxJob, Outcome, utcnow
from inference import InferenceClient


@dataclass(frozen=True)
class Overview:
    messages_in_per_minute: float
    messages_out_per_minute: float
    outcomes_last_hour: dict[str, int]
    pending_jobs: int
    dead_jobs: int
    queue_depth: dict[str, int | None]  # None: Redis unreachable
    channel_accounts: dict[str, int]
    inference: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages_in_per_minute": self.messages_in_per_minute,
            "messages_out_per_minute": self.messages_out_per_minute,
            "outcomes_last_hour": self.outcomes_last_hour,
            "pending_jobs": self.pending_jobs,
            "dead_jobs": self.dead_jobs,
            "queue_depth": self.queue_depth,
            "channel_accounts": self.channel_accounts,
            "inference": self.inference,
        }


def _per_minute(session: Session, direction: str, minutes: int, workspace_id: int | None) -> float:
    query = (
        select(func.count())
        .select_from(Message)
        .where(
            Message.direction == direction,
            Message.created_at >= utcnow() - timedelta(minutes=minutes),
        )
    )
    if workspace_id is not None:
        query = query.where(Message.workspace_id == workspace_id)
    return round(session.execute(query).scalar_one() / minutes, 2)


def queue_depth(settings: Settings) -> dict[str, int | None]:
    """Messages waiting in each lane's Redis list (what KEDA scales on)."""
    try:
        client = redis.Redis.from_url(
            settings.require_redis_url(), socket_connect_timeout=1, socket_timeout=1
        )
        try:
            return {q: int(client.llen(f"{settings.redis_prefix}{q}")) for q in QUEUES}
        finally:
            client.close()
    except (redis.RedisError, RuntimeError):
        return dict.fromkeys(QUEUES)


def inference_health(settings: Settings) -> list[dict[str, Any]]:
    if not settings.inference_endpoints:
        return []
    client = InferenceClient.from_settings(settings)
    try:
        return [
            {"url": e.url, "role": e.role, "model": e.model, "healthy": ok, "detail": why}
            for e, ok, why in client.health()
        ]
    finally:
        client.close()


def overview(
    session: Session, settings: Settings, *, workspace_id: int | None = None, minutes: int = 5
) -> Overview:
    since = utcnow() - timedelta(hours=1)
    outcomes = select(Outcome.kind, func.count()).where(Outcome.created_at >= since)
    accounts = select(ChannelAccount.status, func.count())
    if workspace_id is not None:
        outcomes = outcomes.join(Message, Message.id == Outcome.inbound_id).where(
            Message.workspace_id == workspace_id
        )
        accounts = accounts.where(ChannelAccount.workspace_id == workspace_id)
    jobs = dict(
        session.execute(
            select(OutboxJob.state, func.count())
            .where(OutboxJob.state.in_(["pending", "dead"]))
            .group_by(OutboxJob.state)
        ).all()
    )
    return Overview(
        messages_in_per_minute=_per_minute(session, "in", minutes, workspace_id),
        messages_out_per_minute=_per_minute(session, "out", minutes, workspace_id),
        outcomes_last_hour=dict(session.execute(outcomes.group_by(Outcome.kind)).all()),
        pending_jobs=int(jobs.get("pending", 0)),
        dead_jobs=int(jobs.get("dead", 0)),
        queue_depth=queue_depth(settings),
        channel_accounts=dict(session.execute(accounts.group_by(ChannelAccount.status)).all()),
        inference=inference_health(settings),
    )

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Identity,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt


class Bot(CreatedAt, Base):
    """A bot as declared in bots YAML: its prompt and generation settings."""

    __tablename__ = "bots"
    __table_args__ = (UniqueConstraint("workspace_id", "name"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    system_prompt: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(200))
    temperature: Mapped[float] = mapped_column(Float, default=0.7)
    max_tokens: Mapped[int] = mapped_column(Integer, default=256)
    top_p: Mapped[float] = mapped_column(Float, default=0.95)
    stop: Mapped[list[str]] = mapped_column(JSONB, default=list)
    seed: Mapped[int | None] = mapped_column(Integer)
    history_turns: Mapped[int] = mapped_column(Integer, default=40)
    fallback_reply: Mapped[str] = mapped_column(Text)
    # Secret per bot from which the system-prompt canary is derived.
    canary_seed: Mapped[str] = mapped_column(String(64))
    extra: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)

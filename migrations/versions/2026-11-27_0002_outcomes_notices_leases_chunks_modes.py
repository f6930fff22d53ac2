"""outcomes notices leases chunks modes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 17:09:56.636247+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "conversation_leases",
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_conversation_leases_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", name=op.f("pk_conversation_leases")),
    )
    op.create_table(
        "notices",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("episode", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_notices_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_notices_message_id_messages"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notices")),
        sa.UniqueConstraint(
            "conversation_id",
            "kind",
            "episode",
            name=op.f("uq_notices_conversation_id_kind_episode"),
        ),
    )
    op.create_table(
        "outbound_chunks",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("workspace_id", sa.BigInteger(), nullable=False),
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("delivery", sa.String(length=16), nullable=True),
        sa.Column("provider_message_id", sa.String(length=128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("resent", sa.Boolean(), nullable=False),
        sa.Column("sending_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_outbound_chunks_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_outbound_chunks_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_outbound_chunks_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_chunks")),
        sa.UniqueConstraint(
            "channel",
            "provider_message_id",
            name=op.f("uq_outbound_chunks_channel_provider_message_id"),
        ),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_outbound_chunks_idempotency_key")),
        sa.UniqueConstraint("message_id", "idx", name=op.f("uq_outbound_chunks_message_id_idx")),
    )
    op.create_index(
        "ix_outbound_chunks_conversation_id_id",
        "outbound_chunks",
        ["conversation_id", "id"],
        unique=False,
    )
    op.create_table(
        "outcomes",
        sa.Column("inbound_id", sa.BigInteger(), nullable=False),
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("reply_id", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_outcomes_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["inbound_id"],
            ["messages.id"],
            name=op.f("fk_outcomes_inbound_id_messages"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reply_id"],
            ["messages.id"],
            name=op.f("fk_outcomes_reply_id_messages"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("inbound_id", name=op.f("pk_outcomes")),
    )
    op.create_index(
        op.f("ix_outcomes_conversation_id"), "outcomes", ["conversation_id"], unique=False
    )
    op.create_index(op.f("ix_outcomes_reply_id"), "outcomes", ["reply_id"], unique=False)
    op.add_column("contacts", sa.Column("language", sa.String(length=8), nullable=True))
    op.add_column("contacts", sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("contacts", sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "conversations",
        sa.Column("mode", sa.String(length=8), server_default="bot", nullable=False),
    )
    op.add_column(
        "conversations", sa.Column("mode_changed_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("conversations", sa.Column("flagged", sa.String(length=64), nullable=True))
    op.add_column("messages", sa.Column("language", sa.String(length=8), nullable=True))


def downgrade() -> None:

    op.drop_column("messages", "language")
    op.drop_column("conversations", "flagged")
    op.drop_column("conversations", "mode_changed_at")
    op.drop_column("conversations", "mode")
    op.drop_column("contacts", "blocked_at")
    op.drop_column("contacts", "opted_out_at")
    op.drop_column("contacts", "language")
    op.drop_index(op.f("ix_outcomes_reply_id"), table_name="outcomes")
    op.drop_index(op.f("ix_outcomes_conversation_id"), table_name="outcomes")
    op.drop_table("outcomes")
    op.drop_index("ix_outbound_chunks_conversation_id_id", table_name="outbound_chunks")
    op.drop_table("outbound_chunks")
    op.drop_table("notices")
    op.drop_table("conversation_leases")

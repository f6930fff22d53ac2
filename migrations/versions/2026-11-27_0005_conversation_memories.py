"""conversation memories: one rolling summary per conversation, folded in steps

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 23:50:00.000000+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversation_memories",
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("summary", sa.LargeBinary(), nullable=True),
        sa.Column("through_id", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "source_ids",
            postgresql.ARRAY(sa.BigInteger()),
            server_default=sa.text("'{}'::bigint[]"),
            nullable=False,
        ),
        sa.Column("fold_through_id", sa.BigInteger(), nullable=True),
        sa.Column("fold_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("folded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("folds", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_conversation_memories_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", name=op.f("pk_conversation_memories")),
    )


def downgrade() -> None:
    op.drop_table("conversation_memories")

"""intake all event kinds

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 18:03:21.795663+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Ids as long as the adapters accept; widening a varchar is a catalog-only change.
    op.alter_column("messages", "provider_message_id", type_=sa.String(length=512))
    op.alter_column("contacts", "external_id", type_=sa.String(length=512))
    op.create_table(
        "templates",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("meta_app_id", sa.BigInteger(), nullable=False),
        sa.Column("waba_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("language", sa.String(length=32), nullable=False),
        sa.Column("template_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("status_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["meta_app_id"],
            ["meta_apps.id"],
            name=op.f("fk_templates_meta_app_id_meta_apps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_templates")),
        sa.UniqueConstraint(
            "meta_app_id",
            "waba_id",
            "name",
            "language",
            name=op.f("uq_templates_meta_app_id_waba_id_name_language"),
        ),
    )
    op.create_table(
        "optins",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("workspace_id", sa.BigInteger(), nullable=False),
        sa.Column("channel_account_id", sa.BigInteger(), nullable=False),
        sa.Column("contact_id", sa.BigInteger(), nullable=True),
        sa.Column("subject", sa.String(length=600), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("ref", sa.Text(), nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("token", sa.LargeBinary(), nullable=True),
        sa.Column("token_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("notification_status", sa.String(length=32), nullable=True),
        sa.Column("frequency", sa.String(length=32), nullable=True),
        sa.Column("opted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["channel_account_id"],
            ["channel_accounts.id"],
            name=op.f("fk_optins_channel_account_id_channel_accounts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["contact_id"],
            ["contacts.id"],
            name=op.f("fk_optins_contact_id_contacts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_optins_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_optins")),
        sa.UniqueConstraint(
            "channel_account_id",
            "subject",
            "topic",
            name=op.f("uq_optins_channel_account_id_subject_topic"),
        ),
    )
    op.create_table(
        "reactions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("workspace_id", sa.BigInteger(), nullable=False),
        sa.Column("conversation_id", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("target_provider_message_id", sa.String(length=512), nullable=False),
        sa.Column("emoji", sa.String(length=64), nullable=True),
        sa.Column("reaction", sa.String(length=32), nullable=True),
        sa.Column("removed", sa.Boolean(), nullable=False),
        sa.Column("reacted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_reactions_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_reactions_message_id_messages"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_reactions_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reactions")),
        sa.UniqueConstraint(
            "conversation_id",
            "target_provider_message_id",
            name=op.f("uq_reactions_conversation_id_target_provider_message_id"),
        ),
    )
    op.create_index(op.f("ix_reactions_message_id"), "reactions", ["message_id"], unique=False)
    op.add_column(
        "contacts", sa.Column("marketing_opted_out_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("messages", sa.Column("content", sa.LargeBinary(), nullable=True))
    op.add_column("meta_apps", sa.Column("messenger_verify_token", sa.LargeBinary(), nullable=True))
    op.add_column("meta_apps", sa.Column("instagram_verify_token", sa.LargeBinary(), nullable=True))
    op.add_column("meta_apps", sa.Column("instagram_app_secret", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.alter_column("contacts", "external_id", type_=sa.String(length=64))
    op.alter_column("messages", "provider_message_id", type_=sa.String(length=128))
    op.drop_column("meta_apps", "instagram_app_secret")
    op.drop_column("meta_apps", "instagram_verify_token")
    op.drop_column("meta_apps", "messenger_verify_token")
    op.drop_column("messages", "content")
    op.drop_column("contacts", "marketing_opted_out_at")
    op.drop_index(op.f("ix_reactions_message_id"), table_name="reactions")
    op.drop_table("reactions")
    op.drop_table("optins")
    op.drop_table("templates")

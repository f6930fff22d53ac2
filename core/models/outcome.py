from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from core.models.base import Base, CreatedAt

OUTCOME_KINDS = (
    "replied",  # a reply (possibly covering a burst) was stored; reply_id names it
    "held",  # moderation holds it for human review
    "blocked",  # moderation blocked it, or the contact is blocked
    "opted_out",  # the contact opted out (the message itself, or one after it)
    "human_mode",  # a human has the conversation (or another app: standby); the bot is silent
    "notice",  # answered by a fixed notice, or not answerable yet (media, unsupported): detail
    "deleted",  # the contact deleted the message before it was answered
    "window_expired",  # the reply could only have gone out after the messaging window closed
    "limited",  # over the contact's message or token limit
    "dead",  # processing failed PARLEY_JOB_MAX_ATTEMPTS times
)


class Outcome(CreatedAt, Base):
    """Exactly one row per acknowledged inbound message: what became of it.

    The primary key makes "at most one" a constraint; the pipeline makes it "exactly one".
    """

    __tablename__ = "outcomes"

    inbound_id: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(20))
    reply_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("messages.id", ondelete="SET NULL"), index=True
    )
    detail: Mapped[str | None] = mapped_column(Text)

"""Every ORM model, one file per table."""

from core.models.base import Base, EncryptedText, utcnow
from core.models.bot import Bot
from core.models.channel_account import ChannelAccount
from core.models.contact import Contact
from core.models.conversation import Conversation
from core.models.message import Message
from core.models.meta_app import MetaApp
from core.models.outbox import OutboxJob
from core.models.unhandled_event import UnhandledEvent
from core.models.workspace import Workspace

__all__ = [
    "Base",
    "Bot",
    "ChannelAccount",
    "Contact",
    "Conversation",
    "EncryptedText",
    "Message",
    "MetaApp",
    "OutboxJob",
    "UnhandledEvent",
    "Workspace",
    "utcnow",
]

"""Every ORM model, one file per table."""

from core.models.base import Base, EncryptedBytes, EncryptedText, utcnow
from core.models.bot import Bot
from core.models.channel_account import ChannelAccount
from core.models.contact import Contact
from core.models.conversation import Conversation
from core.models.conversation_lease import ConversationLease
from core.models.conversation_memory import ConversationMemory
from core.models.media import MediaItem
from core.models.message import Message
from core.models.meta_app import MetaApp
from core.models.notice import Notice
from core.models.optin import OptIn
from core.models.outbound_chunk import OutboundChunk
from core.models.outbox import OutboxJob
from core.models.outcome import OUTCOME_KINDS, Outcome
from core.models.reaction import Reaction
from core.models.template import Template
from core.models.unhandled_event import UnhandledEvent
from core.models.workspace import Workspace

__all__ = [
    "Base",
    "Bot",
    "ChannelAccount",
    "Contact",
    "Conversation",
    "ConversationMemory",
    "ConversationLease",
    "EncryptedBytes",
    "EncryptedText",
    "MediaItem",
    "Message",
    "MetaApp",
    "Notice",
    "OUTCOME_KINDS",
    "OptIn",
    "OutboundChunk",
    "Outcome",
    "OutboxJob",
    "Reaction",
    "Template",
    "UnhandledEvent",
    "Workspace",
    "utcnow",
]
